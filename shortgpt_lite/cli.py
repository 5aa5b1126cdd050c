"""The command line: score layers, prune a model and write it out, or write the student
version of an exercise notebook and grade its submissions.

    shortgpt-lite score --model smollm2-135m --corpus wikipedia --tokens 32768 [--metric bi] [--json FILE]
    shortgpt-lite score --model meta-llama/Llama-2-70b-hf --stream [--resume DIR]
    torchrun --nproc_per_node 2 -m shortgpt_lite.cli score --model smollm2-135m
    shortgpt-lite prune --model smollm2-135m --remove 8 [--metric bi] [--stream] --out DIR
    shortgpt-lite check pruned/ [--original smollm2-135m]
    shortgpt-lite heal --model pruned/ --teacher smollm2-135m --method lora --minutes 10 --out healed/
    shortgpt-lite student notebooks/08_assignments.ipynb student/08_assignments.ipynb
    shortgpt-lite grade notebooks/08_assignments.ipynb submissions/ [-p n_items 0] [--out grades.csv]
    shortgpt-lite experiment removal --model smollm2-135m [--max-remove 10 ...] [--out results]
    shortgpt-lite experiment all --out results

``score`` prints one line per layer: its score and the order in which the metric would
remove it. ``prune`` removes the ``--remove`` lowest-scoring layers and writes a folder
that plain ``AutoModelForCausalLM.from_pretrained`` loads. With ``--stream`` the model is
never in memory whole: scores come one decoder block at a time
(:mod:`shortgpt_lite.stream`) and ``prune`` rewrites the checkpoint shard by shard
(:func:`shortgpt_lite.checkpoint.prune_checkpoint`). Under ``torchrun`` each process
scores its share of the windows and the sums are all-reduced. ``check`` runs the
conformance checks of :mod:`shortgpt_lite.conformance` on a saved model, prints a table
and exits non-zero when one fails. ``heal`` trains a pruned model on calibration text by one
of the recipes of :mod:`shortgpt_lite.healing`, prints its held-out perplexity before and
after, and writes the healed model. ``student`` replaces the
marked solutions of an exercise notebook with stubs and strips its outputs
(see :mod:`shortgpt_lite.course`). ``grade`` runs the solution cells of every submitted
notebook in a folder with the instructor's checks and prints a score per exercise
(:mod:`shortgpt_lite.grading`). ``experiment`` computes a reference run with its
provenance (:mod:`shortgpt_lite.experiments`); any parameter of the experiment can be set
as ``--name value`` (lists comma-separated), and ``all`` regenerates every stored run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _add_common(parser: argparse.ArgumentParser) -> None:
    from .importance import METRICS

    parser.add_argument("--model", default="smollm2-135m",
                        help="a bundled model (smollm2-135m, gemma3-270m), a local folder or a hub id")
    parser.add_argument("--corpus", default="wikipedia", help="calibration corpus (default wikipedia)")
    parser.add_argument("--tokens", type=int, default=32768,
                        help="calibration tokens, cut into windows of --seq-len (default 32768)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    parser.add_argument("--metric", default="bi", choices=list(METRICS),
                        help="importance metric; lower scores are removed first (default bi)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' metric")
    parser.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 "
                        "(default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--stream", action="store_true",
                        help="never load the model whole: read, run and free one decoder block "
                             "at a time (bi, angular, relative_magnitude; safetensors folders)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="with --stream: keep the state after every block in DIR, and "
                             "continue an interrupted run from there")


def _rank() -> tuple[int, int]:
    """This process's rank and the number of processes, under torchrun (else 0 and 1);
    the process group is started here, gloo on CPUs and nccl on GPUs."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _scores(args):
    """The model (loaded, or its folder when streamed), tokenizer, this rank's calibration
    windows, the scores and the seconds they took."""
    import os

    from transformers import AutoTokenizer

    from .checkpoint import model_folder
    from .data import load_text, token_windows
    from .importance import layer_importance
    from .models import load_model

    if args.tokens < args.seq_len:
        raise SystemExit(f"--tokens ({args.tokens}) must be at least --seq-len ({args.seq_len}).")
    if args.resume and not args.stream:
        raise SystemExit("--resume keeps the state of a streamed run: add --stream.")
    rank, world = _rank()
    device = args.device
    if world > 1 and device == "auto":
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}" if torch.cuda.is_available() else "cpu"
    try:
        if args.stream:
            model = model_folder(args.model)
            tokenizer = AutoTokenizer.from_pretrained(model)
        else:
            model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    windows = token_windows(tokenizer, load_text(args.corpus, "calibration"), seq_len=args.seq_len,
                            max_windows=args.tokens // args.seq_len)
    if world > len(windows):
        raise SystemExit(f"{world} processes but {len(windows)} calibration windows: give each "
                         "process at least one (raise --tokens or use fewer processes).")
    t0 = time.perf_counter()
    try:
        scores = layer_importance(model, windows[rank::world], args.metric,
                                  batch_size=args.batch_size, seed=args.seed,
                                  progress=not args.no_progress and rank == 0,
                                  stream=args.stream, resume_dir=args.resume,
                                  distributed=world > 1, device=device, dtype=args.dtype)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    seconds = time.perf_counter() - t0
    return model, tokenizer, windows, scores, seconds


def _removal_order(scores) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    rank = [0] * len(scores)
    for position, layer in enumerate(order, start=1):
        rank[layer] = position
    return rank


def _print_table(scores, metric: str, out=None) -> None:
    out = out or sys.stdout  # looked up at call time, so redirection works
    rank = _removal_order(scores)
    print(f"{'layer':>5}  {metric:>18}  {'removal order':>13}", file=out)
    for i, s in enumerate(scores):
        print(f"{i:>5}  {float(s):>18.6g}  {rank[i]:>13}", file=out)


def cmd_score(args) -> None:
    _, _, windows, scores, seconds = _scores(args)
    rank, world = _rank()
    if rank:
        return  # rank 0 reports for all of them
    _print_table(scores, args.metric)
    n_tokens = windows.numel()
    how = (" streamed block by block" if args.stream else "") + \
        (f", data-parallel over {world} processes" if world > 1 else "")
    print(f"{args.metric} of {len(scores)} layers of {args.model} on {n_tokens} {args.corpus} "
          f"tokens ({windows.shape[0]} windows of {windows.shape[1]}){how} in {seconds:.1f} s")
    if args.json:
        record = {"model": args.model, "corpus": args.corpus, "metric": args.metric,
                  "tokens": n_tokens, "seq_len": args.seq_len, "seconds": round(seconds, 2),
                  "streamed": args.stream, "processes": world,
                  "scores": [float(s) for s in scores], "removal_order": _removal_order(scores)}
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")


def cmd_prune(args) -> None:
    from .importance import layers_to_remove
    from .removal import remove_layers

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose a new --out folder.")
    model, tokenizer, _, scores, _ = _scores(args)
    if _rank()[0]:
        return
    _print_table(scores, args.metric)
    try:
        plan = layers_to_remove(scores, args.remove)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.stream:  # the checkpoint is rewritten shard by shard, never loaded whole
        from .checkpoint import prune_checkpoint

        prune_checkpoint(model, plan, out, scores=scores, metric=args.metric)
        print(f"removed layers {plan} by {args.metric}; "
              f"{len(scores) - len(plan)} layers left; wrote {out}")
        return
    pruned = remove_layers(model, plan, inplace=True, scores=scores, metric=args.metric)
    pruned.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = pruned.config.get_text_config().num_hidden_layers
    print(f"removed layers {plan} by {args.metric}; {n} layers left; wrote {out}")


def cmd_student(args) -> None:
    from .course import SOLUTION_TAG, student_version

    if not Path(args.source).is_file():
        raise SystemExit(f"{args.source} is not a file; pass the exercise notebook, e.g. "
                         "notebooks/08_assignments.ipynb.")
    try:
        nb = student_version(args.source, args.destination, colab_path=args.colab_path)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    stubs = sum(1 for c in nb.cells if SOLUTION_TAG in c.metadata.get("tags", []))
    print(f"wrote {args.destination}: {stubs} solution cells replaced by stubs, outputs stripped")


def cmd_grade(args) -> None:
    from .grading import grade

    if not Path(args.exercises).is_file():
        raise SystemExit(f"{args.exercises} is not a file; pass the exercise notebook with its "
                         "solutions and checks, e.g. notebooks/08_assignments.ipynb.")
    parameters = {}
    for name, value in args.parameter or []:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value  # a bare word is a string, as papermill's -p reads it
    try:
        rows = grade(args.exercises, args.submissions, parameters=parameters,
                     timeout=args.timeout, keep=args.keep, progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    table = rows.pivot(index="submission", columns="exercise", values="score")
    table = table[list(dict.fromkeys(rows["exercise"]))]
    table["total"] = table.sum(axis=1)
    print(table.to_string())
    for submission, group in rows[rows["score"] == 0].groupby("submission", sort=False):
        print(f"\n{submission}:")
        for _, row in group.iterrows():
            print(f"  exercise {row['exercise']}: {row['feedback']}")
    if args.out:
        rows.to_csv(args.out, index=False)
        print(f"\nwrote {args.out}")


def cmd_check(args) -> None:
    import pandas as pd

    from .conformance import check_model

    try:
        table = check_model(args.folder, original=args.original, device=args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    shown = table.assign(result=table["passed"].map({True: "pass", False: "FAIL", None: "skipped"}))
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(shown[["result", "check", "detail"]].to_string(index=False))
    failed = int((table["passed"] == False).sum())  # noqa: E712 (None is not a failure)
    print(f"{args.folder}: {failed} of {len(table)} checks failed" if failed
          else f"{args.folder}: every check that could run passed")
    if failed:
        raise SystemExit(1)


def cmd_heal(args) -> None:
    import math

    from .data import load_text, token_windows
    from .evaluate import perplexity
    from .healing import heal
    from .models import load_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose a new --out folder.")
    if (args.steps is None) == (args.minutes is None):
        raise SystemExit("Give one budget: --steps N or --minutes M.")
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        teacher = None
        if args.teacher:
            teacher, teacher_tokenizer = load_model(args.teacher, device=args.device,
                                                    dtype=args.dtype)
            if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise SystemExit(f"{args.teacher} uses another tokenizer than {args.model}; the "
                                 "teacher must be the model the layers were removed from.")
        windows = token_windows(tokenizer, load_text(args.corpus, "calibration"), args.seq_len,
                                max_windows=max(1, args.tokens // args.seq_len))
        held = token_windows(tokenizer, load_text(args.corpus, "evaluation"), args.seq_len,
                             max_windows=max(1, args.eval_tokens // args.seq_len))
        before = perplexity(model, held, progress=False)["perplexity"]
        healed = heal(model, windows, teacher=teacher, method=args.method, steps=args.steps,
                      minutes=args.minutes, seed=args.seed, lr=args.lr, rank=args.rank,
                      batch_size=args.batch_size, teacher_name=args.teacher,
                      progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    after = perplexity(healed, held, progress=False)["perplexity"]
    healed.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = healed.config.shortgpt_lite_healing
    print(f"healed {args.model} by {args.method}: {record['steps']} steps, {record['tokens']} "
          f"{args.corpus} calibration tokens, {record['seconds']:.0f} s")
    line = f"held-out {args.corpus} perplexity ({held.numel()} tokens): {before:.2f} -> {after:.2f}"
    if teacher is not None:
        dense = perplexity(teacher, held, progress=False)["perplexity"]
        gap = math.log(before) - math.log(dense)
        closed = f"; {100 * (math.log(before) - math.log(after)) / gap:.0f}% of the log-perplexity " \
                 f"gap to {args.teacher} ({dense:.2f}) closed" if gap > 0 else ""
        line += closed
    print(line)
    print(f"wrote {out}")


def _experiment_params(name: str, extra: list[str]) -> dict:
    """``--max-remove 6 --tasks piqa,boolq`` as ``{"max_remove": 6, "tasks": [...]}``,
    each value converted to the type of the parameter's default."""
    from .experiments import EXPERIMENTS

    defaults = EXPERIMENTS[name].defaults
    if len(extra) % 2:
        raise SystemExit(f"Parameters come in pairs --name value; got {' '.join(extra)}.")
    params = {}
    for flag, value in zip(extra[::2], extra[1::2]):
        key = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or key not in defaults:
            raise SystemExit(f"{flag} is not a parameter of {name}. Its parameters: "
                             + ", ".join("--" + k.replace("_", "-") for k in defaults) + ".")
        default = defaults[key]
        if isinstance(default, (list, tuple)):
            kind = type(default[0]) if default else str  # budgets are floats, tasks names
            params[key] = [kind(v) for v in value.split(",")]
        elif isinstance(default, bool):
            params[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or (default is None and value.isdigit()):
            params[key] = int(value)
        elif isinstance(default, float):
            params[key] = float(value)
        else:
            params[key] = value
    return params


def cmd_experiment(args, extra) -> None:
    from .experiments import EXPERIMENTS, STANDARD, run

    if args.name == "all":
        if extra:
            raise SystemExit("'experiment all' runs the stored parameters; it takes no others.")
        jobs = [(name, model, {}) for model, runs in STANDARD.items() for name in runs]
    elif args.name in EXPERIMENTS:
        jobs = [(args.name, args.model, _experiment_params(args.name, extra))]
    else:
        raise SystemExit(f"Unknown experiment {args.name!r}. Choose one of: "
                         f"{', '.join(EXPERIMENTS)}, or all.")
    for name, model, params in jobs:
        t0 = time.perf_counter()
        try:
            result = run(name, model, out=args.out, device=args.device, dtype=args.dtype,
                         overwrite=args.overwrite, progress=not args.no_progress, **params)
        except (FileExistsError, ValueError) as err:
            raise SystemExit(str(err)) from None
        tables = ", ".join(f"{t} ({len(df)} rows)" for t, df in result.tables.items())
        print(f"{name} for {model}: {result.path} [{tables}], "
              f"{time.perf_counter() - t0:.0f} s this call")


def main(argv=None) -> None:
    """Entry point of the ``shortgpt-lite`` command."""
    parser = argparse.ArgumentParser(prog="shortgpt-lite", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="print per-layer importance scores")
    _add_common(score)
    score.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    score.set_defaults(run=cmd_score)

    prune = commands.add_parser("prune", help="remove the least important layers, save the model")
    _add_common(prune)
    prune.add_argument("--remove", type=int, required=True, help="how many layers to remove")
    prune.add_argument("--out", required=True, help="folder to write the pruned model into")
    prune.set_defaults(run=cmd_prune)

    check = commands.add_parser("check", help="check that a pruned model on disk reloads, "
                                "matches, caches, pads and scores as it should")
    check.add_argument("folder", help="the model folder, as save_pretrained wrote it")
    check.add_argument("--original", default=None, help="the unpruned model (folder, hub id or "
                       "bundled name): rebuild the pruned one from it and compare logits")
    check.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    check.set_defaults(run=cmd_check)

    from .healing import METHODS

    heal = commands.add_parser("heal", help="train a pruned model to recover what pruning lost, "
                               "and save it")
    heal.add_argument("--model", required=True, help="the pruned model (folder, hub id or "
                      "bundled name)")
    heal.add_argument("--teacher", default=None, help="the model the layers were removed from "
                      "(needed by distill, distill+lora and bridge)")
    heal.add_argument("--method", default="lora", choices=list(METHODS),
                      help="healing recipe (default lora)")
    heal.add_argument("--steps", type=int, default=None, help="optimizer steps")
    heal.add_argument("--minutes", type=float, default=None, help="or minutes of wall-clock time")
    heal.add_argument("--out", required=True, help="folder to write the healed model into")
    heal.add_argument("--corpus", default="wikipedia", help="calibration corpus (default wikipedia)")
    heal.add_argument("--tokens", type=int, default=32768,
                      help="calibration tokens to train on (default 32768)")
    heal.add_argument("--eval-tokens", type=int, default=4096,
                      help="held-out tokens for the perplexity before and after (default 4096)")
    heal.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    heal.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    heal.add_argument("--lr", type=float, default=None, help="learning rate (default per method)")
    heal.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    heal.add_argument("--seed", type=int, default=0)
    heal.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default)")
    heal.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    heal.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    heal.set_defaults(run=cmd_heal)

    student = commands.add_parser("student", help="write the student version of an exercise "
                                  "notebook: solutions replaced by stubs, outputs stripped")
    student.add_argument("source", help="the exercise notebook with solutions")
    student.add_argument("destination", help="where to write the student notebook")
    student.add_argument("--colab-path", default=None,
                         help="the student notebook's path in the repository, which its Open "
                         "in Colab links then open (default: drop those links)")
    student.set_defaults(run=cmd_student)

    grading = commands.add_parser(
        "grade", help="grade a folder of submitted exercise notebooks with the instructor's checks",
        description="Run each submission's solution cells inside the instructor's notebook, with "
                    "the instructor's checks, and print one score per exercise.")
    grading.add_argument("exercises", help="the exercise notebook with solutions and checks")
    grading.add_argument("submissions", help="the folder of submitted .ipynb files")
    grading.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                         help="override a parameter of the notebook, as papermill's -p does "
                         "(repeatable), e.g. -p n_items 0")
    grading.add_argument("--out", default=None, help="write every score and its feedback to this CSV")
    grading.add_argument("--keep", default=None, help="write each executed notebook into this folder")
    grading.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    grading.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    grading.set_defaults(run=cmd_grade)

    experiment = commands.add_parser(
        "experiment", help="compute a reference run and store it with its provenance",
        description="Compute a reference run into OUT/<model>/<name>/; an interrupted run "
                    "resumes. Set any parameter of the experiment as --name value.")
    experiment.add_argument("name", help="the experiment (removal, block_influence, wanda, context, "
                                         "comparison, combining, costs, healing, generation), or all "
                                         "for every stored run")
    experiment.add_argument("--model", default="smollm2-135m", help="a bundled model, a local "
                            "folder or a hub id (default smollm2-135m)")
    experiment.add_argument("--out", default="results", help="results folder (default results)")
    experiment.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default)")
    experiment.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    experiment.add_argument("--overwrite", action="store_true",
                            help="replace a stored run that has other parameters")
    experiment.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    experiment.set_defaults(run=cmd_experiment)

    args, extra = parser.parse_known_args(argv)
    if args.command == "experiment":
        args.run(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    else:
        args.run(args)


if __name__ == "__main__":
    main()
