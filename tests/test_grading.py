"""Grading submissions with the instructor's checks (shortgpt_lite.grading) and its command."""

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from shortgpt_lite import student_version
from shortgpt_lite.cli import main
from shortgpt_lite.grading import exercise_cells, grade, graded_notebook, tampering

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "notebooks" / "08_assignments.ipynb"


def _tagged(source, *tags):
    cell = new_code_cell(source)
    cell.metadata["tags"] = list(tags)
    return cell


def _write(path, *cells):
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def _two_exercises(path):
    """An instructor's notebook: a parameter, then two exercises with solutions and checks."""
    return _write(
        path,
        _tagged("factor = 2", "parameters"),
        new_markdown_cell("## Exercise 1: double"),
        _tagged("def double(x):\n    # BEGIN SOLUTION\n    return factor * x\n    # END SOLUTION",
                "solution"),
        _tagged('assert double(3) == 3 * factor, "not doubled"\nprint("Exercise 1: correct.")',
                "check"),
        new_markdown_cell("## Exercise 2: square"),
        _tagged("def square(x):\n    # BEGIN SOLUTION\n    return x * x\n    # END SOLUTION",
                "solution"),
        _tagged('assert square(5) == 25, "not squared"\nprint("Exercise 2: correct.")', "check"))


def _submission(student, path, answers: dict, check_edits: dict | None = None):
    """``student`` with the stub of exercise N replaced by ``answers[N]``, and the check of
    exercise N replaced by ``check_edits[N]``, written to ``path``."""
    nb = nbformat.read(student, as_version=4)
    for tag, sources in [("solution", answers), ("check", check_edits or {})]:
        for label, cells in exercise_cells(nb, tag).items():
            if int(label) in sources:
                cells[0].source = sources[int(label)]
    nbformat.write(nb, path)
    return path


def test_tampering_flags_code_that_changes_the_checks_and_nothing_else():
    modules = {"torch", "np", "sgl", "sys"}
    for source in ["torch.testing.assert_close = lambda *a, **k: None",
                   "from torch import testing\ntesting.assert_close = print",
                   "setattr(torch.testing, 'assert_close', print)",
                   "import builtins\nbuiltins.print = None",
                   "sys.modules['torch'].testing.assert_close = print",
                   "globals()['sgl'] = None",
                   "np.percentile = lambda *a, **k: (0, 0)",
                   "sgl.block_influence.__code__ = None"]:
        assert tampering(source, modules), source
    for source in ["def f(w):\n    new = torch.nn.Linear(2, 3)\n    new.weight.data = w\n    return new",
                   "mlp.gate_proj = torch.nn.Linear(2, 3)\nscores = sgl.block_influence(lm, x)",
                   "x = np.asarray(a)\nx[0] = 1", "!pip install something\ny = 1"]:
        assert tampering(source, modules) == [], source


def test_graded_notebook_keeps_the_instructors_checks(tmp_path):
    exercises = _two_exercises(tmp_path / "ex.ipynb")
    student = tmp_path / "student.ipynb"
    student_version(exercises, student)
    submission = _submission(student, tmp_path / "alice.ipynb",
                             {1: "def double(x):\n    return 0\nprint('Exercise 1: correct.')"},
                             {1: 'print("Exercise 1: correct.")'})
    nb, flagged = graded_notebook(exercises, submission)
    assert flagged == {}
    sources = [c.source for c in nb.cells]
    assert "def double(x):\n    return 0\nprint('Exercise 1: correct.')" in sources
    assert any(s.startswith("assert double(3)") for s in sources)  # the instructor's check
    assert 'print("Exercise 1: correct.")' not in sources  # not the edited one
    assert any("NotImplementedError" in s for s in sources)  # exercise 2 left as a stub


def test_grade_scores_each_exercise_from_the_instructors_checks(tmp_path):
    exercises = _two_exercises(tmp_path / "ex.ipynb")
    student_version(exercises, tmp_path / "student.ipynb")
    folder = tmp_path / "submissions"
    folder.mkdir()
    _submission(tmp_path / "student.ipynb", folder / "bob.ipynb",
                {1: "def double(x):\n    return factor * x", 2: "def square(x):\n    return x ** 2"})
    _submission(tmp_path / "student.ipynb", folder / "carol.ipynb",  # a wrong answer whose
                {1: "def double(x):\n    print('Exercise 1: correct.')\n    return x + x"},
                {2: 'print("Exercise 2: correct.")'})  # check was edited, and a stub left
    _submission(tmp_path / "student.ipynb", folder / "dave.ipynb",
                {1: "def double(x):\n    return 2 * x\nimport builtins\nbuiltins.AssertionError = None"})
    rows = grade(exercises, folder, parameters={"factor": 3}, progress=False)
    scores = rows.pivot(index="submission", columns="exercise", values="score")
    assert scores.to_dict("index") == {"bob.ipynb": {"1": 1, "2": 1},
                                       "carol.ipynb": {"1": 0, "2": 0},
                                       "dave.ipynb": {"1": 0, "2": 0}}
    feedback = rows.set_index(["submission", "exercise"])["feedback"]
    assert feedback["carol.ipynb", "1"] == "AssertionError: not doubled"  # 2 * 3 != 3 * factor
    assert feedback["carol.ipynb", "2"].startswith("NotImplementedError")
    assert "read it by hand" in feedback["dave.ipynb", "1"] and "builtins" in feedback["dave.ipynb", "1"]


def test_an_endless_or_broken_solution_costs_its_exercise_only(tmp_path):
    exercises = _two_exercises(tmp_path / "ex.ipynb")
    student_version(exercises, tmp_path / "student.ipynb")
    erin = _submission(tmp_path / "student.ipynb", tmp_path / "erin.ipynb",
                       {1: "def double(x):\n    return 2 * x\nwhile True:\n    pass",
                        2: "def square(x):\n    return x * x"})
    frank = _submission(tmp_path / "student.ipynb", tmp_path / "frank.ipynb",
                        {1: "def double(x)\n    return 2 * x", 2: "def square(x):\n    return x * x"})
    rows = grade(exercises, [erin, frank], timeout=10, progress=False)
    outcome = rows.set_index(["submission", "exercise"])
    assert outcome["score"].to_dict() == {("erin.ipynb", "1"): 0, ("erin.ipynb", "2"): 1,
                                          ("frank.ipynb", "1"): 0, ("frank.ipynb", "2"): 1}
    assert outcome.loc[("erin.ipynb", "1"), "feedback"].startswith("the solution cell raised")
    assert "SyntaxError" in outcome.loc[("frank.ipynb", "1"), "feedback"]


def test_grade_refuses_what_it_cannot_grade(tmp_path):
    exercises = _two_exercises(tmp_path / "ex.ipynb")
    with pytest.raises(ValueError, match="is not a folder"):
        grade(exercises, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .ipynb"):
        grade(exercises, tmp_path / "empty")
    untagged = _write(tmp_path / "untagged.ipynb", new_markdown_cell("## Exercise 1"),
                      new_code_cell("def double(x):\n    return 2 * x"))
    rows = grade(exercises, [untagged], progress=False)
    assert (rows["score"] == 0).all() and rows["feedback"].str.contains("lost their tags").all()


WRONG_ANSWERS = {  # one plausible mistake per exercise, as the mutation tests make them
    1: ("scores.append(1 - cos.mean())", "scores.append(torch.arccos(cos.clamp(-1, 1)).mean() / torch.pi)"),
    2: ("scores = weight.float().abs() * norms[None, :]", "scores = weight.float().abs()"),
    5: ("    return pruned.eval(), reloaded.to(pruned.device).eval()", "    return pruned, pruned"),
    6: ("return (ranks[0] + ranks[1]) / 2", "return bi_scores"),
    7: ("quiet = round(fraction * n)", "quiet = int(fraction * n)"),
    8: ("means = d[np.asarray(draws)].mean(axis=1)", "means = d"),
    9: ("scale = w.abs().amax(dim=1, keepdim=True) / 127", "scale = w.abs().amax() / 127"),
    10: ("kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)",
         "kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)"),
}


def test_the_grader_on_two_real_submissions_of_the_book_exercises(tmp_path):
    """Two submissions of the book's exercises, graded with its command: one with every
    reference solution, one with a plausible mistake in eight exercises, a stub left in
    exercise 3 and its check edited to print the line. Only exercise 4 of the second is right."""
    student = tmp_path / "student.ipynb"
    student_version(EXERCISES, student)
    solutions = {int(label): cells[0].source for label, cells in
                 exercise_cells(nbformat.read(EXERCISES, as_version=4), "solution").items()}
    assert len(solutions) >= 10
    wrong = {n: source.replace(*WRONG_ANSWERS[n]) for n, source in solutions.items()
             if n in WRONG_ANSWERS}
    assert all(wrong[n] != solutions[n] for n in wrong)
    folder = tmp_path / "submissions"
    folder.mkdir()
    _submission(student, folder / "correct.ipynb", solutions)
    _submission(student, folder / "wrong.ipynb", wrong | {4: solutions[4]},
                {3: 'print("Exercise 3: correct.")'})
    out = tmp_path / "grades.csv"
    main(["grade", str(EXERCISES), str(folder), "-p", "n_items", "0", "-p", "n_windows", "2",
          "--out", str(out), "--no-progress"])
    rows = pd.read_csv(out, dtype={"exercise": str})
    scores = rows.pivot(index="submission", columns="exercise", values="score")
    assert scores.loc["correct.ipynb"].tolist() == [1] * len(solutions)
    assert scores.loc["wrong.ipynb"].to_dict() == {str(n): int(n == 4) for n in solutions}
    feedback = rows.set_index(["submission", "exercise"])["feedback"]
    assert feedback["wrong.ipynb", "3"].startswith("NotImplementedError")
    assert feedback["wrong.ipynb", "5"].startswith("AssertionError")
