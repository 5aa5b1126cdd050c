"""The student version of an exercise notebook: solutions out, everything else kept.

An exercise notebook holds, for every exercise, a markdown task, a *solution cell* and a
*check cell*. A solution cell is a code cell tagged ``solution``; the code a student has to
write sits between two marker lines (the nbgrader convention)::

    def my_block_influence(states):
        \"\"\"Kept for the student: the signature and the docstring say what to write.\"\"\"
        # BEGIN SOLUTION
        ...the instructor's code...
        # END SOLUTION

:func:`student_version` replaces every marked region with one line at the indentation of
its ``# BEGIN SOLUTION`` marker::

        raise NotImplementedError("Exercise 1: write your solution here")

so the stub still parses, and running it before writing the solution says which exercise
is missing. The exercise number comes from the last markdown heading above the cell that
reads ``Exercise N``. Every output of the notebook is stripped (an executed solution prints
its own answers), the ``hide-input`` tag is taken off the solution cells (in the rendered
book it hides the solution behind a toggle; a student must see the stub), and every other
cell, the check cells included, is copied unchanged.

One thing in the markdown changes: an *Open in Colab* link of the solved notebook would
open the solutions. With ``colab_path`` (the student file's path in the same repository)
every Colab link is pointed at the student file; without it, Colab badges are dropped and
other Colab links keep only their text.
"""

from __future__ import annotations

import dis
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import nbformat

__all__ = ["BEGIN", "END", "EXERCISE_HEADING", "SOLUTION_TAG", "library_calls", "student_version"]

SOLUTION_TAG = "solution"
HIDE_TAG = "hide-input"
BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"

_MARKER = re.compile(r"^(?P<indent>[ \t]*)#+[ \t]*(?P<kind>BEGIN|END)[ \t]+SOLUTION[ \t]*$")
EXERCISE_HEADING = re.compile(r"^#{1,6}[ \t]+Exercise[ \t]+(?P<label>[0-9A-Za-z.]+)", re.MULTILINE)
_COLAB = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/"
                    r"[^/\s)]+/(?P<path>[^\s)]+?\.ipynb)")
_BADGE = re.compile(r"\[!\[[^\]]*\]\([^)]*\)\]\((?P<url>[^)\s]+)\)\n?")
_LINK = re.compile(r"\[(?P<text>[^\]]*)\]\((?P<url>[^)\s]+)\)")


def _retarget_colab(text: str, colab_path: str | None) -> str:
    """``text`` with every Colab link opening ``colab_path``, or, without one, with no Colab
    badge and no Colab link left (a link's text stays)."""
    if colab_path:
        return _COLAB.sub(lambda m: m[0][:m.start("path") - m.start()] + colab_path, text)
    text = _BADGE.sub(lambda m: "" if _COLAB.fullmatch(m["url"]) else m[0], text)
    return _LINK.sub(lambda m: m["text"] if _COLAB.fullmatch(m["url"]) else m[0], text)


def _stub(indent: str, label: str) -> str:
    return f'{indent}raise NotImplementedError("{label}: write your solution here")'


def _replace_solutions(source: str, label: str, where: str) -> str:
    """``source`` with every BEGIN/END SOLUTION region replaced by a stub.

    ``ValueError`` when the markers do not pair up (an END first, a BEGIN inside a
    region, a region left open) or when there are none at all."""
    out, regions, open_at = [], 0, None
    lines = source.split("\n")
    for number, line in enumerate(lines, start=1):
        marker = _MARKER.match(line.rstrip("\r"))
        if marker is None:
            if open_at is None:
                out.append(line)
            continue
        if marker["kind"] == "BEGIN":
            if open_at is not None:
                raise ValueError(f"{where}: '{BEGIN}' on line {number} comes before the "
                                 f"'{END}' of the region opened on line {open_at}; close "
                                 "each region before opening the next.")
            open_at = number
            out.append(_stub(marker["indent"], label))
        else:
            if open_at is None:
                raise ValueError(f"{where}: '{END}' on line {number} has no '{BEGIN}' "
                                 "before it; put the solution between the two markers.")
            open_at = None
            regions += 1
    if open_at is not None:
        raise ValueError(f"{where}: '{BEGIN}' on line {open_at} is never closed; add "
                         f"'{END}' after the solution.")
    if regions == 0:
        raise ValueError(f"{where} is tagged '{SOLUTION_TAG}' but has no '{BEGIN}' / "
                         f"'{END}' markers; mark the code students must write, or drop "
                         "the tag.")
    return "\n".join(out)


def student_version(source, destination, colab_path: str | None = None) -> nbformat.NotebookNode:
    """Write the student version of the exercise notebook ``source`` to ``destination``.

    In every code cell tagged ``solution``, each region from ``# BEGIN SOLUTION`` to
    ``# END SOLUTION`` (marker lines included) becomes
    ``raise NotImplementedError("Exercise N: write your solution here")`` at the
    indentation of the BEGIN marker; code outside the markers (signatures, docstrings,
    given variables) stays. Those cells lose the ``hide-input`` tag. All outputs and
    execution counts of the notebook are removed. Colab links in the markdown open
    ``colab_path`` (a path in the repository, such as ``student/08_assignments.ipynb``),
    or are dropped when it is ``None``, so that none opens the solutions. Every other cell
    is copied as it is.

    Returns the student notebook, which is also validated against the nbformat schema
    before it is written. ``ValueError`` if a solution cell has no markers or unbalanced
    ones, or if ``destination`` is ``source`` (that would overwrite the solutions).
    """
    try:  # a course tool, not needed to prune a model: the `course` extra brings it
        import nbformat
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "Writing a student notebook needs nbformat, which a plain install of shortgpt-lite "
            "leaves out. Install it with `pip install 'shortgpt-lite[course]'` (or `pip install "
            "nbformat`).") from None
    source, destination = Path(source), Path(destination)
    if destination.resolve() == source.resolve():
        raise ValueError(f"The destination {destination} is the source notebook; writing "
                         "there would delete the solutions. Choose another path.")
    nb = nbformat.read(source, as_version=4)
    nb.metadata.pop("widgets", None)  # widget state belongs to the stripped outputs
    label, solutions = None, 0
    for index, cell in enumerate(nb.cells):
        tags = list(cell.metadata.get("tags", []))
        if cell.cell_type != "code" and SOLUTION_TAG in tags:
            raise ValueError(f"{source.name}, cell {index} is a {cell.cell_type} cell tagged "
                             f"'{SOLUTION_TAG}'; only code cells can hold solutions. Move the "
                             "answer into a code cell, or drop the tag.")
        if cell.cell_type == "markdown":
            cell.source = _retarget_colab(cell.source, colab_path)
            found = EXERCISE_HEADING.findall(cell.source)
            if found:
                label = f"Exercise {found[-1]}"
            continue
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
        if SOLUTION_TAG not in tags:
            continue
        solutions += 1
        where = f"{source.name}, cell {index}"
        cell.source = _replace_solutions(cell.source, label or f"Exercise {solutions}", where)
        cell.metadata.tags = [t for t in tags if t != HIDE_TAG]
    nbformat.validate(nb)
    destination.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, destination)
    return nb


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def library_calls(function) -> list[str]:
    """The names through which ``function`` reaches shortgpt-lite: globals it uses that are
    the package, one of its modules or something defined in it (``sgl``, a
    ``from shortgpt_lite import ...`` name), and imports of it inside the function,
    nested functions and lambdas included. Empty for code that uses only torch, NumPy and
    the like.

    A check cell of an exercise that asks for an implementation refuses a solution that
    calls the library's own version: ``assert not library_calls(my_function), ...``."""
    package = __name__.split(".")[0]
    used = [(i.opname, i.argval) for code in _code_objects(function.__code__)
            for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME",
                                                                 "IMPORT_NAME")]
    found = {name for op, name in used if op == "IMPORT_NAME" and name.split(".")[0] == package}
    for _, name in used:
        value = function.__globals__.get(name)
        module = value.__name__ if isinstance(value, types.ModuleType) else \
            getattr(value, "__module__", None) or ""
        if module == package or module.startswith(package + "."):
            found.add(name)
    return sorted(found)
