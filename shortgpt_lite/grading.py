"""Grading submissions of an exercise notebook with the instructor's own checks.

A submission is a student's copy of the student version (see :mod:`shortgpt_lite.course`).
The only cells of it that count are its *solution cells* (tagged ``solution``): each one
is put in place of the solution cell of the same exercise in the instructor's notebook, and
that notebook runs from the top in a fresh kernel, with errors allowed so that one failing
exercise does not stop the others. An exercise scores 1 when each of its check cells (tagged
``check``) ran without an error and printed ``Exercise N: correct``, else 0, with the
check's error as feedback. So

* the setup, the given cells and the checks are the instructor's: a student who edits a
  check cell, deletes it or prints ``Exercise N: correct`` anywhere gains nothing;
* only what the checks print counts, never what a solution cell prints;
* a solution that raises or is missing costs that exercise only.

Solution code still runs in the kernel that runs the checks, as it does under otter-grader
and nbgrader. A solution that rebinds the attributes of a module (``torch.testing.assert_close
= ...``), calls ``setattr`` or touches ``globals()``, ``builtins`` or ``sys.modules`` could
change what a check computes, so such a submission is not run: its exercises score 0 with
feedback that asks for a person to read it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

from .course import EXERCISE_HEADING, SOLUTION_TAG

if TYPE_CHECKING:
    import nbformat
    import pandas as pd

__all__ = ["CHECK_TAG", "exercise_cells", "grade", "graded_notebook", "tampering"]

CHECK_TAG = "check"
_SUSPECT_CALLS = {"setattr", "delattr", "globals", "vars", "exec", "eval", "__import__"}
_SUSPECT_NAMES = {"builtins", "__builtins__", "sys", "gc"}


def exercise_cells(nb, tag: str) -> dict[str, list]:
    """{exercise label: the cells tagged ``tag`` under its ``Exercise N`` heading}."""
    found, label = {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            labels = EXERCISE_HEADING.findall(cell.source)
            label = labels[-1] if labels else label
        elif tag in cell.metadata.get("tags", []):
            if label is None:
                raise ValueError(f"a cell tagged {tag!r} comes before any 'Exercise N' heading; "
                                 "each solution and check belongs under its exercise's heading.")
            found.setdefault(label, []).append(cell)
    return found


def _parse(source: str):
    """The syntax tree of a cell, its IPython lines (``!cmd``, ``%magic``) left out; None
    when it does not parse."""
    kept = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
    try:
        return ast.parse("\n".join(kept))
    except SyntaxError:
        return None


def _imported(trees) -> set[str]:
    """The names that import statements bind in the syntax ``trees`` (None ones skipped)."""
    return {(a.asname or a.name).split(".")[0] for tree in filter(None, trees)
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in node.names}


def tampering(source: str, modules=()) -> list[str]:
    """What in solution code could change a check rather than answer it: assignments to
    attributes of ``modules`` (names bound by the notebook's imports, such as ``torch``,
    or by the code's own), and the calls and names that reach around the notebook's
    namespace. Empty when there is none."""
    tree = _parse(source)
    if tree is None:
        return []  # a typo: the check reports what does not run
    modules = set(modules) | _imported([tree])
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            base = target
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(target, (ast.Attribute, ast.Subscript)) and \
                    isinstance(base, ast.Name) and base.id in modules:
                found.append(f"changes {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in _SUSPECT_CALLS:
            found.append(f"calls {node.func.id}()")
        if isinstance(node, ast.Name) and node.id in _SUSPECT_NAMES:
            found.append(f"uses {node.id}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"imports {n}" for n in names if n.split(".")[0] in _SUSPECT_NAMES]
    return sorted(set(found))


def graded_notebook(exercises, submission) -> tuple[nbformat.NotebookNode, dict[str, list[str]]]:
    """The instructor's notebook ``exercises`` with each solution cell replaced by the
    submission's solution cell of the same exercise, in order, all outputs cleared; and
    ``{exercise: what tampering found in its solution}``.

    ``ValueError`` when the submission has no cell tagged ``solution`` (its tags were lost,
    so its answers cannot be found), or more solution cells for an exercise than the
    instructor's notebook has."""
    import nbformat
    from papermill.iorw import load_notebook_node

    exercises, submission = Path(exercises), Path(submission)
    nb = load_notebook_node(str(exercises))  # with the metadata papermill's parameters need
    theirs = exercise_cells(nbformat.read(submission, as_version=4), SOLUTION_TAG)
    if not theirs:
        raise ValueError(f"{submission.name} has no cell tagged {SOLUTION_TAG!r}: its cells lost "
                         "their tags, so its answers cannot be found. Ask for the notebook as "
                         "downloaded from Jupyter or Colab, with its metadata.")
    ours = exercise_cells(nb, SOLUTION_TAG)
    modules = _imported(_parse(c.source) for c in nb.cells if c.cell_type == "code")
    flagged = {}
    for label, cells in theirs.items():
        if len(cells) > len(ours.get(label, [])):
            raise ValueError(f"{submission.name}: exercise {label} has {len(cells)} solution cells, "
                             f"the exercises {len(ours.get(label, []))}.")
        for mine, answer in zip(ours[label], cells):
            mine.source = answer.source
        found = [f for cell in cells for f in tampering(cell.source, modules)]
        if found:
            flagged[label] = found
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb, flagged


def _error(cell) -> str | None:
    """``"Name: first line of the message"`` of the error a cell raised, or None."""
    for output in cell.outputs:
        if output.output_type == "error":
            first = (output.get("evalue") or "").strip().splitlines()
            return f"{output.get('ename', 'Error')}: {first[0] if first else ''}".rstrip(": ")
    return None


def _outcome(label: str, solutions: list, checks: list) -> tuple[int, str]:
    """(score, feedback) of one exercise from its executed solution and check cells."""
    for cell in solutions:
        if error := _error(cell):
            return 0, f"the solution cell raised {error}"
    for cell in checks:
        if error := _error(cell):
            return 0, error
        if cell.execution_count is None:
            return 0, "the check did not run"
        printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        if f"Exercise {label}: correct" not in printed:
            return 0, "the check ran but did not print its line"
    return 1, "correct"


def grade(exercises, submissions, *, parameters: dict | None = None, timeout: int = 900,
          keep=None, progress: bool = True) -> pd.DataFrame:
    """Grade every ``.ipynb`` in the folder ``submissions`` (or a list of paths) against the
    instructor's notebook ``exercises``.

    Each submission runs as :func:`graded_notebook` builds it, from the folder of
    ``exercises`` in a fresh ``python3`` kernel, with papermill's ``parameters`` injected
    after the cell tagged ``parameters`` (for example ``{"n_items": 0}`` to grade faster)
    and ``timeout`` seconds per cell (a cell that runs longer is interrupted and fails).
    ``keep``: a folder to write each executed notebook into, to hand back as feedback.

    Returns one row per submission and exercise: ``submission``, ``exercise``, ``score``
    (1 or 0) and ``feedback`` (``"correct"``, the error of the solution cell or of the check,
    or why it did not run).
    """
    import nbformat
    import pandas as pd
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.parameterize import parameterize_notebook
    from tqdm.auto import tqdm

    exercises = Path(exercises)
    if isinstance(submissions, (str, Path)):
        folder = Path(submissions)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder; pass the folder of submitted notebooks, "
                             "or a list of their paths.")
        submissions = sorted(folder.glob("*.ipynb"))
    submissions = [Path(p) for p in submissions]
    if not submissions:
        raise ValueError("No submissions to grade: the folder holds no .ipynb file.")
    labels = list(exercise_cells(nbformat.read(exercises, as_version=4), CHECK_TAG))
    rows = []
    for path in tqdm(submissions, desc="grading", unit="submission", disable=not progress):
        try:
            nb, flagged = graded_notebook(exercises, path)
        except (ValueError, nbformat.reader.NotJSONError) as err:
            rows += [(path.name, label, 0, f"not graded: {err}") for label in labels]
            continue
        if flagged:
            why = "; ".join(f"exercise {k}: {', '.join(v)}" for k, v in flagged.items())
            rows += [(path.name, label, 0, f"not run, read it by hand: the solutions {why}")
                     for label in labels]
            continue
        if parameters:
            nb = parameterize_notebook(nb, dict(parameters))
        # A cell past `timeout` is interrupted and fails like any error, so an endless loop
        # costs its exercise only.
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                interrupt_on_timeout=True,
                                resources={"metadata": {"path": str(exercises.parent)}})
        try:
            client.execute()
        except (DeadKernelError, CellTimeoutError):
            pass  # the cells that did not run score 0: "the check did not run"
        if keep is not None:
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(keep) / path.name)
        solutions, checks = exercise_cells(nb, SOLUTION_TAG), exercise_cells(nb, CHECK_TAG)
        rows += [(path.name, label, *_outcome(label, solutions.get(label, []), checks[label]))
                 for label in labels]
    return pd.DataFrame(rows, columns=["submission", "exercise", "score", "feedback"])
