"""``python -m shortgpt_lite.bench NAME [options]``: run one benchmark."""

from __future__ import annotations

import argparse

import shortgpt_lite.bench as package

from . import BENCHES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shortgpt_lite.bench",
                                     description=package.__doc__)
    parser.add_argument("name", choices=sorted(BENCHES), help="which benchmark to run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=None,
                        help="calibration or evaluation tokens (each benchmark has its default)")
    parser.add_argument("--items", type=int, default=None,
                        help="multiple-choice items per task (each benchmark has its default)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--shapes", default=None,
                        help="random-weight model with a known shape, e.g. 'llama-2-7b'")
    args = parser.parse_args(argv)
    BENCHES[args.name][0](args)


if __name__ == "__main__":
    main()
