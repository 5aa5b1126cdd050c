"""The benchmark package ``python -m shortgpt_lite.bench``: its registry, its command line,
a run of the Block Influence benchmark on a random-weight tiny model, and the rule that
no module reaches into another module's private names."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shortgpt_lite
from shortgpt_lite.bench import BENCHES

# The benchmarks the command line offered when it was one module, bench.py, and the
# shared-prefix sweep, the timing protocols, streaming, data-parallel scoring, healing and
# ShortGPT-gen, and float32 against bfloat16.
NAMES = ("load", "bi", "eval", "cost", "wanda", "context", "prefix", "timing", "stream",
         "distributed", "heal", "gen", "dtype")
PACKAGE = Path(shortgpt_lite.__file__).parent


def _run(*args, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "shortgpt_lite.bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_every_benchmark_is_registered_and_offered_by_the_command_line():
    assert set(NAMES) <= set(BENCHES)
    for f, help in BENCHES.values():
        assert callable(f) and help
    run = _run("--help", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "python -m shortgpt_lite.bench" in run.stdout
    choices = run.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert set(NAMES) <= set(choices)


def test_bi_on_a_random_weight_tiny_model_prints_all_four_approaches():
    run = _run("bi", "--shapes", "llama-tiny", "--tokens", "64", "--seq-len", "16",
               "--batch-size", "2", "--repeats", "1", "--device", "cpu", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert "random-weight llama-tiny, 4 layers" in run.stdout
    assert "64 tokens = 4 windows of 16, batch size 2" in run.stdout
    rows = {line.split()[0]: line.split()[1:] for line in lines
            if line.split() and line.split()[0] in ("forward", "decoder", "block_influence",
                                                    "reference")}
    assert set(rows) == {"forward", "decoder", "block_influence", "reference"}
    for values in rows.values():
        assert len(values) == 8
        [float(v) for v in values]
    assert rows["forward"][1] == "1.000"  # wall time relative to the plain forward


@pytest.mark.slow
def test_prefix_sweep_computes_what_the_pruned_copies_compute():
    run = _run("prefix", "--tokens", "256", "--seq-len", "64", "--repeats", "1", "--device",
               "cpu", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()
            if line.startswith(("pruned", "shared"))}
    assert set(rows) == {"pruned", "shared"}
    assert "10 Block Influence plans (k = 1 .. 10)" in run.stdout
    worst = float(run.stdout.split("mean NLL between the two: ")[1].split()[0])
    assert worst < 1e-4
    assert "every skip in full" in run.stdout and "from the shared prefix" in run.stdout
    scores = float(run.stdout.split("between the two sets of scores: ")[1].split()[0])
    assert scores < 1e-2  # perplexities in the thousands, equal to float rounding


@pytest.mark.slow
def test_dtype_times_both_copies_and_measures_what_bfloat16_moves():
    run = _run("dtype", "--tokens", "512", "--seq-len", "128", "--items", "3", "--repeats", "1",
               "--device", "cpu", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    first = out.splitlines()[0]
    assert first.startswith("machine: ")
    assert first.endswith(("; CPU with AVX512-BF16", "; CPU with AMX", "; CPU with AVX512-BF16 and AMX",
                           "; CPU without bfloat16 instructions (emulated: expect it slower than "
                           "float32)"))  # on any CPU, said either way
    assert "512 tokens = 4 windows of 128" in out
    assert out.count("x fp32") == 4  # both tables speak of float32, not of a bare forward
    assert "12 items (3 each of piqa, hellaswag, winogrande, arc_easy)" in out
    for line in ("perplexity(), float32", "perplexity(), bfloat16", "score_items(), float32",
                 "score_items(), bfloat16"):
        values = next(row for row in out.splitlines() if row.startswith(line))[len(line):]
        assert len(values.split()) == 5
        [float(v) for v in values.split()]
    changes = out.split("what bfloat16 changes")[1]
    mean = float(changes.split("mean ")[1].split()[0])
    largest = float(changes.split("largest |difference| ")[1].split()[0])
    assert 0 < largest < 0.05  # the copies differ, by rounding, not by a broken conversion
    assert abs(mean) <= largest
    assert " of 12 answers move" in changes
    same = _run("dtype", "--dtype", "float32", "--tokens", "128", "--seq-len", "128",
                "--device", "cpu", timeout=600)
    assert same.returncode != 0 and "compares float32 with itself" in same.stderr


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_module(parts: list[str]) -> bool:
    path = PACKAGE.parent.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(path: Path, source: str | None = None) -> list[str]:
    """``from shortgpt_lite.x import _y`` (relative or absolute), ``import
    shortgpt_lite._x`` and ``x._y`` where ``x`` is a shortgpt_lite module, in the file at
    ``path`` (or in ``source``, read as if it were that file)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "shortgpt_lite":
                target = node.module.split(".")
            else:
                continue
            if any(_private(p) for p in target):
                found.append(f"{path.name}:{node.lineno} from {'.'.join(target)}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.name}:{node.lineno} {alias.name} from "
                                 f"{'.'.join(target)}")
                elif _is_module(target + [alias.name]):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != "shortgpt_lite":
                    continue
                if any(_private(p) for p in parts):
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
                if alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and _private(node.attr)):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_the_private_import_check_finds_each_form():
    source = ("from ..evaluate import _plan_batches, perplexity\n"
              "from shortgpt_lite.models import _resolve_dtype\n"
              "from .. import evaluate as ev\n"
              "import shortgpt_lite.bench as package\n"
              "ev._default_ppl_batch(None, 1)\n"
              "print(package.__doc__, ev.perplexity)\n")
    found = _private_imports(PACKAGE / "bench" / "probe.py", source)  # a file never written
    assert [f.split(" ", 1)[1] for f in found] == [
        "_plan_batches from shortgpt_lite.evaluate",
        "_resolve_dtype from shortgpt_lite.models",
        "ev._default_ppl_batch",
    ]


def test_no_module_imports_a_private_name_from_another_module():
    found = [f"{path.relative_to(PACKAGE.parent)}: {hit}"
             for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)
