"""No chapter output escapes validation: what nbval does not compare, a check cell asserts.

nbval compares a cell's stored output with a fresh run, unless the cell is tagged
``nbval-ignore-output``. Such a cell (its numbers depend on the CPU's last bits, or on the
machine's speed) must be followed directly by a *check cell*: a code cell tagged ``claim-check``
and ``remove-cell`` (hidden from the rendered book) that reads what the ignored cell
computed and asserts what the prose says of it, through ``sgl.claim`` or ``assert``.
"""

import ast
import json
import warnings
from pathlib import Path

import pytest

from shortgpt_lite.claims import STRICT_ENV, ClaimNotHeld, claim

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
IGNORE, CHECK, HIDDEN = "nbval-ignore-output", "claim-check", "remove-cell"


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def _source(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _parse(cell) -> ast.Module:
    # IPython magics (%pip, !ls) are not Python; they never hold results to check.
    lines = [ln for ln in _source(cell).splitlines() if not ln.lstrip().startswith(("%", "!"))]
    return ast.parse("\n".join(lines))


def _assigned(tree: ast.Module) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _loaded(tree: ast.Module) -> set:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _asserts(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "claim") or \
                    (isinstance(f, ast.Name) and f.id == "claim"):
                return True
    return False


def unchecked_outputs(nb: dict) -> list[str]:
    """Every way in which ``nb`` lets an output go unvalidated, as readable lines."""
    problems = []
    cells = nb["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        tags = _tags(cell)
        if CHECK in tags:
            if HIDDEN not in tags:
                problems.append(f"cell {i}: a check cell must be tagged '{HIDDEN}'")
            if IGNORE in tags:
                problems.append(f"cell {i}: a check cell's own output must be compared")
            if not _asserts(_parse(cell)):
                problems.append(f"cell {i}: a check cell must assert (sgl.claim or assert)")
        if IGNORE not in tags:
            continue
        after = cells[i + 1] if i + 1 < len(cells) else None
        if after is None or after["cell_type"] != "code" or CHECK not in _tags(after):
            problems.append(f"cell {i} is tagged '{IGNORE}' but the next cell is no check cell")
            continue
        shared = _assigned(_parse(cell)) & _loaded(_parse(after))
        if not shared:
            problems.append(f"cell {i + 1} checks nothing that cell {i} computed")
    return problems


def _nb(*cells):
    out = []
    for source, tags in cells:
        kind = "markdown" if source.startswith("#") else "code"
        out.append({"cell_type": kind, "metadata": {"tags": list(tags)}, "source": source})
    return {"cells": out}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_ignored_output_has_a_check(path):
    nb = json.loads(path.read_text())
    assert unchecked_outputs(nb) == []


def test_the_walker_rejects_an_ignored_output_without_its_check():
    ok = _nb(("ppl = measure()", [IGNORE]), ("sgl.claim(ppl < 40, 'below 40')", [CHECK, HIDDEN]))
    assert unchecked_outputs(ok) == []
    missing = _nb(("ppl = measure()", [IGNORE]), ("# Next section", []))
    assert "no check cell" in unchecked_outputs(missing)[0]
    unrelated = _nb(("ppl = measure()", [IGNORE]), ("assert other > 0", [CHECK, HIDDEN]))
    assert "checks nothing" in unchecked_outputs(unrelated)[0]
    shown = _nb(("ppl = measure()", [IGNORE]), ("assert ppl > 0", [CHECK]))
    assert "remove-cell" in unchecked_outputs(shown)[0]
    idle = _nb(("ppl = measure()", [IGNORE]), ("print(ppl)", [CHECK, HIDDEN]))
    assert "must assert" in unchecked_outputs(idle)[0]


def test_a_claim_raises_in_strict_mode_and_warns_otherwise(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "strict")
    assert claim(True, "holds") is None
    with pytest.raises(AssertionError, match="Wanda beats magnitude.*2:4 189 > 150"):
        claim(False, "Wanda beats magnitude", "2:4 189 > 150")
    monkeypatch.delenv(STRICT_ENV)
    with pytest.warns(ClaimNotHeld, match="default parameters"):
        claim(False, "Wanda beats magnitude")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        claim(1 < 2, "holds")
