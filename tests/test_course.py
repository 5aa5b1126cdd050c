"""The student version of an exercise notebook (shortgpt_lite.course) and its command."""

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from shortgpt_lite import student_version
from shortgpt_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "notebooks" / "08_assignments.ipynb"

FUNCTION_SOLUTION = '''def double(x):
    """Twice x."""
    # BEGIN SOLUTION
    secret_helper = 2
    return secret_helper * x
    # END SOLUTION'''

TOP_LEVEL_SOLUTION = '''n = 3
# BEGIN SOLUTION
answer_block = list(range(n))
# END SOLUTION
print("after the solution")'''

CHECK = 'assert double(2) == 4\nprint("Exercise 1: correct.")'


def _cell(make, source, tags=(), outputs=()):
    cell = make(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    if outputs:
        cell.outputs = list(outputs)
        cell.execution_count = 7
    return cell


def _notebook(*cells):
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def _exercise_notebook():
    printed = new_output("stream", name="stdout", text="the secret output 42\n")
    return _notebook(
        _cell(new_markdown_cell, "# Exercises\n\nSome text."),
        _cell(new_code_cell, "import math", outputs=[printed]),
        _cell(new_markdown_cell, "## Exercise 1: doubling\n\n*Easy, 5 minutes.*"),
        _cell(new_code_cell, FUNCTION_SOLUTION, tags=["solution", "hide-input"],
              outputs=[printed]),
        _cell(new_code_cell, CHECK, tags=["check"], outputs=[
            new_output("stream", name="stdout", text="Exercise 1: correct.\n")]),
        _cell(new_markdown_cell, "## Exercise 2: a block"),
        _cell(new_code_cell, TOP_LEVEL_SOLUTION, tags=["solution", "hide-input"]),
        _cell(new_code_cell, "plot_helper()", tags=["hide-input"]),
    )


@pytest.fixture
def written(tmp_path):
    """(source path, destination path, source notebook, student notebook as read back)."""
    source, destination = tmp_path / "exercises.ipynb", tmp_path / "out" / "student.ipynb"
    nb = _exercise_notebook()
    nbformat.write(nb, source)
    student_version(source, destination)
    return source, destination, nb, nbformat.read(destination, as_version=4)


def _solution_cells(nb):
    return [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]


def test_markers_are_replaced_by_indented_stubs(written):
    _, _, _, student = written
    function_cell, top_level_cell = _solution_cells(student)
    assert function_cell.source == ('def double(x):\n    """Twice x."""\n'
                                    '    raise NotImplementedError("Exercise 1: write your '
                                    'solution here")')
    assert top_level_cell.source == ('n = 3\nraise NotImplementedError("Exercise 2: write your '
                                     'solution here")\nprint("after the solution")')


def test_solutions_and_outputs_are_gone_from_the_file(written):
    _, destination, _, student = written
    text = destination.read_text()
    for secret in ("secret_helper", "answer_block", "BEGIN SOLUTION", "END SOLUTION",
                   "the secret output 42", "widget-state"):
        assert secret not in text, secret
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_check_cells_and_everything_else_are_kept(written):
    _, _, original, student = written
    assert len(student.cells) == len(original.cells)
    for before, after in zip(original.cells, student.cells):
        tags = before.metadata.get("tags", [])
        if "solution" in tags:
            assert after.metadata["tags"] == ["solution"]  # hide-input is gone
        else:
            assert after.source == before.source and after.cell_type == before.cell_type
            assert after.metadata.get("tags", []) == tags  # hide-input elsewhere stays
    check = next(c for c in student.cells if "check" in c.metadata.get("tags", []))
    assert check.source == CHECK


def test_student_notebook_is_valid_nbformat(written):
    _, destination, _, _ = written
    nb = nbformat.read(destination, as_version=4)
    nbformat.validate(nb)  # raises ValidationError if not
    assert json.loads(destination.read_text())["nbformat"] == 4


def test_running_a_stub_raises_not_implemented(written):
    _, _, _, student = written
    function_cell, top_level_cell = _solution_cells(student)
    namespace = {}
    exec(function_cell.source, namespace)  # defining the function works
    with pytest.raises(NotImplementedError, match="Exercise 1: write your solution here"):
        namespace["double"](2)
    with pytest.raises(NotImplementedError, match="Exercise 2"):
        exec(top_level_cell.source, {})


def test_nbgrader_style_markers_are_accepted(tmp_path):
    source = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(_cell(new_code_cell, "x = 1\n    ### BEGIN SOLUTION\ny = 2\n"
                                   "    ### END SOLUTION", tags=["solution"])), source)
    nb = student_version(source, tmp_path / "student.ipynb")
    assert nb.cells[0].source == ('x = 1\n    raise NotImplementedError("Exercise 1: write your '
                                  'solution here")')


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n# END SOLUTION", "has no '# BEGIN SOLUTION' before it"),
    ("# END SOLUTION\nx = 1\n# BEGIN SOLUTION", "has no '# BEGIN SOLUTION' before it"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n# END SOLUTION",
     "comes before the '# END SOLUTION'"),
    ("x = 1", "has no '# BEGIN SOLUTION' / '# END SOLUTION' markers"),
])
def test_bad_markers_raise_and_write_nothing(tmp_path, source, message):
    path, destination = tmp_path / "nb.ipynb", tmp_path / "student.ipynb"
    nbformat.write(_notebook(_cell(new_markdown_cell, "## Exercise 3"),
                             _cell(new_code_cell, source, tags=["solution"])), path)
    with pytest.raises(ValueError, match=message) as err:
        student_version(path, destination)
    assert "nb.ipynb, cell 1" in str(err.value)
    assert not destination.exists()


def test_refuses_a_markdown_solution_and_overwriting_the_source(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(_cell(new_markdown_cell, "the answer", tags=["solution"])), path)
    with pytest.raises(ValueError, match="only code cells can hold solutions"):
        student_version(path, tmp_path / "student.ipynb")
    nbformat.write(_exercise_notebook(), path)
    with pytest.raises(ValueError, match="would delete the solutions"):
        student_version(path, path)


def test_cli_writes_the_student_notebook(tmp_path, capsys):
    source, destination = tmp_path / "exercises.ipynb", tmp_path / "student" / "ex.ipynb"
    nbformat.write(_exercise_notebook(), source)
    main(["student", str(source), str(destination)])
    assert f"wrote {destination}: 2 solution cells" in capsys.readouterr().out
    student = nbformat.read(destination, as_version=4)
    assert "secret_helper" not in json.dumps(student)


SOLVED_BADGE = ("[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                "(https://colab.research.google.com/github/o/r/blob/main/notebooks/ex.ipynb)")


@pytest.mark.parametrize("colab_path", ["student/ex.ipynb", None])
def test_colab_links_never_open_the_solutions(tmp_path, colab_path):
    source = tmp_path / "ex.ipynb"
    intro = (f"# Exercises\n\n{SOLVED_BADGE}\n\nOr [open it](https://colab.research.google.com/"
             "github/o/r/blob/main/notebooks/ex.ipynb), see [the docs](https://example.org).")
    nbformat.write(_notebook(_cell(new_markdown_cell, intro)), source)
    text = student_version(source, tmp_path / "out.ipynb", colab_path=colab_path).cells[0].source
    assert "notebooks/ex.ipynb" not in text and "[the docs](https://example.org)" in text
    if colab_path:
        assert text.count("/blob/main/student/ex.ipynb)") == 2 and "colab-badge.svg" in text
    else:
        assert "colab" not in text and "Or open it, see" in text


def test_cli_turns_errors_into_messages(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        main(["student", str(tmp_path / "missing.ipynb"), str(tmp_path / "out.ipynb")])
    bad = tmp_path / "bad.ipynb"
    nbformat.write(_notebook(_cell(new_code_cell, "x = 1", tags=["solution"])), bad)
    with pytest.raises(SystemExit, match="has no '# BEGIN SOLUTION'"):
        main(["student", str(bad), str(tmp_path / "out.ipynb")])
    with pytest.raises(SystemExit) as err:
        main(["student", str(bad)])
    assert err.value.code == 2  # argparse: the destination is required


# ------------------------------------------------------------- the book's exercises


def _sections(nb):
    """{exercise number: the cells under its '## Exercise N' heading}."""
    import re

    sections, current = {}, None
    for cell in nb.cells:
        found = re.match(r"#+\s+Exercise\s+(\d+)", cell.source) \
            if cell.cell_type == "markdown" else None
        if found:
            current = int(found[1])
            sections[current] = []
        elif cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = None
        elif current is not None:
            sections[current].append(cell)
    return sections


def test_every_exercise_has_a_marked_solution_and_a_check():
    nb = nbformat.read(EXERCISES, as_version=4)
    sections = _sections(nb)
    assert sorted(sections) == list(range(1, len(sections) + 1)) and len(sections) >= 10
    for number, cells in sections.items():
        solutions = [c for c in cells if "solution" in c.metadata.get("tags", [])]
        checks = [c for c in cells if "check" in c.metadata.get("tags", [])]
        assert solutions, f"exercise {number} has no solution cell"
        assert checks, f"exercise {number} has no check cell"
        assert any(f"Exercise {number}: correct" in c.source for c in checks), number
        # the check's output gives the answer away: the rendered book leaves it out
        assert all("remove-output" in c.metadata["tags"] for c in checks), number
        for cell in solutions:
            assert "hide-input" in cell.metadata["tags"], number
            lines = [line.strip() for line in cell.source.splitlines()]
            markers = [line for line in lines if line in ("# BEGIN SOLUTION", "# END SOLUTION")]
            assert markers and markers == ["# BEGIN SOLUTION", "# END SOLUTION"] * (
                len(markers) // 2), f"exercise {number}: unbalanced markers"
    tagged = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert len(tagged) == sum(len([c for c in cells if "solution" in c.metadata.get("tags", [])])
                              for cells in sections.values()), "a solution cell outside an exercise"


def test_student_version_of_the_book_exercises(tmp_path):
    original = nbformat.read(EXERCISES, as_version=4)
    student = student_version(EXERCISES, tmp_path / "08_assignments.ipynb")
    for number, cells in _sections(student).items():
        stubs = [c for c in cells if "solution" in c.metadata.get("tags", [])]
        assert all(f'raise NotImplementedError("Exercise {number}: write your solution here")'
                   in c.source for c in stubs), number
    text = (tmp_path / "08_assignments.ipynb").read_text()
    for cell in _solution_cells(original):
        inside = cell.source.split("# BEGIN SOLUTION")[1].split("# END SOLUTION")[0]
        body = [line.strip() for line in inside.splitlines() if line.strip()]
        assert body and not any(json.dumps(line)[1:-1] in text for line in body
                                if len(line) > 25), body[0]
    assert all(not c.get("outputs") for c in student.cells)


def test_the_committed_student_version_is_up_to_date(tmp_path):
    """student/08_assignments.ipynb, which the book's student link opens in Colab, is what
    `make student` writes from the current exercises: regenerate it after editing them."""
    committed = ROOT / "student" / "08_assignments.ipynb"
    fresh = tmp_path / "08_assignments.ipynb"
    student_version(EXERCISES, fresh, colab_path="student/08_assignments.ipynb")
    assert fresh.read_text() == committed.read_text(), "run `make student` and commit the result"
    assert "blob/main/notebooks/08_assignments.ipynb" not in fresh.read_text()


def test_the_library_imports_without_nbformat_and_says_what_to_install(tmp_path):
    """nbformat is a course tool, outside the plain install: only student_version needs it."""
    import subprocess
    import sys

    blocked = ("import sys; sys.modules['nbformat'] = None\n"  # any `import nbformat` now fails
               "import shortgpt_lite as sgl\n"
               "try:\n"
               f"    sgl.student_version({str(EXERCISES)!r}, {str(tmp_path / 'out.ipynb')!r})\n"
               "except ModuleNotFoundError as err:\n"
               "    print(err)\n")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pip install 'shortgpt-lite[course]'" in run.stdout
    assert not (tmp_path / "out.ipynb").exists()


def _exercise_cells(number: int) -> tuple[str, str]:
    """The solution and the check source of one exercise of the book's notebook."""
    cells = _sections(nbformat.read(EXERCISES, as_version=4))[number]
    solution = next(c.source for c in cells if "solution" in c.metadata.get("tags", []))
    check = next(c.source for c in cells if "check" in c.metadata.get("tags", []))
    return solution, check


def _check_passes_then_rejects(number, namespace, right, wrong, error=AssertionError):
    """Run exercise ``number``'s reference solution and check in ``namespace`` (the check must
    pass), then the solution with ``right`` replaced by ``wrong`` (the check must fail)."""
    solution, check = _exercise_cells(number)
    exec(solution, namespace)
    exec(check, namespace)
    assert right in solution
    exec(solution.replace(right, wrong), namespace)
    with pytest.raises(error):
        exec(check, namespace)


NM_LOWEST = "[..., :m - n]"


@pytest.mark.parametrize("wrong", [
    (NM_LOWEST, "[..., :n]"),  # zeroes N of every M, the other reading of N:M
    (NM_LOWEST, "[..., m - n:]"),  # zeroes the highest scores
    ("return mask.reshape(out_features, in_features)", 'return sgl.sparsity_mask(scores, f"{n}:{m}")'),
], ids=["n-zeroed", "highest", "library-call"])
def test_exercise_3_check_rejects_a_wrong_nm_mask_and_passes_the_solution(wrong):
    """The N:M check runs on the layer's scores and on random ones, and tries 1:4 as well as
    2:4 and 4:8, so the convention that zeroes N of every M, which agrees with it on 2:4 and
    4:8, is caught."""
    import torch

    import shortgpt_lite as sgl

    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    _check_passes_then_rejects(3, {"sgl": sgl, "torch": torch, "wanda": scores, "name": "a layer"},
                               *wrong)


def _wanda_namespace():
    import torch

    import shortgpt_lite as sgl

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 16, generator=g) * torch.rand(16, generator=g) * 4
    return {"sgl": sgl, "torch": torch, "name": "a test layer", "inputs": inputs,
            "weight": torch.randn(6, 16, generator=g), "wanda_sparsity": 0.5}


K_ROW = "k_row = round(sparsity * weight.shape[1])"


@pytest.mark.parametrize("wrong", [
    ("scores = weight.float().abs() * norms[None, :]", "scores = weight.float().abs()"),
    (K_ROW, "k_row = weight.shape[1] // 2"),
    (K_ROW, "k_row = int(sparsity * weight.shape[1])"),
    ("return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)",
     "return sgl.sparsity_mask(sgl.wanda_scores(weight, norms), sparsity)"),
], ids=["magnitude", "sparsity-ignored", "floor", "library-call"])
def test_exercise_2_check_rejects_wrong_wanda_masks_and_passes_the_solution(wrong):
    """Exercise 2's check tries a second, random layer at another sparsity, so a mask that
    ignores the input norms, the sparsity or the rounding is caught."""
    _check_passes_then_rejects(2, _wanda_namespace(), *wrong)


RETURN = "    return pruned.eval(), reloaded.to(pruned.device).eval()"


@pytest.mark.parametrize("wrong", [
    ("    pruned.save_pretrained(folder)\n", "", (OSError, ValueError)),  # nothing saved: no reload
    (RETURN, "    return pruned, pruned", AssertionError),  # no reload
    (RETURN, "    return pruned, copy.deepcopy(pruned)", AssertionError),  # not what was saved
    (RETURN, "    return pruned, type(pruned)(pruned.config)", AssertionError),  # a fresh model
    ('scores=scores, metric="bi"', "", AssertionError),  # the plan's origin not recorded
], ids=["no-save", "no-reload", "copy", "fresh-model", "no-record"])
def test_exercise_5_check_rejects_answers_that_skip_saving_or_reloading(tmp_path, wrong):
    import copy
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    import shortgpt_lite as sgl
    from tiny import tiny_llama

    lm = tiny_llama(layers=4).eval()
    namespace = {"sgl": sgl, "torch": torch, "tempfile": tempfile, "copy": copy,
                 "AutoModelForCausalLM": AutoModelForCausalLM, "lm": lm, "L": 4, "k": 2,
                 "plan": [1, 2], "bi": torch.tensor([0.5, 0.1, 0.2, 0.9]),
                 "evaluation": torch.randint(0, 128, (2, 64),
                                             generator=torch.Generator().manual_seed(0))}
    _check_passes_then_rejects(5, namespace, *wrong)


def _given_cells(number: int) -> list[str]:
    """The untagged code cells of one exercise: what the notebook hands the student."""
    cells = _sections(nbformat.read(EXERCISES, as_version=4))[number]
    return [c.source for c in cells if c.cell_type == "code" and not c.metadata.get("tags")]


def _tiny_namespace(layers: int = 6):
    """A tiny Llama and what the notebook's setup defines from it, for the checks that run
    the model."""
    import pandas as pd
    import torch

    import shortgpt_lite as sgl
    from tiny import tiny_llama

    torch.manual_seed(0)
    lm = tiny_llama(layers=layers).eval()
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 128, (2, 32), generator=g)
    bi = sgl.block_influence(lm, calibration, progress=False)
    k = 2
    return {"sgl": sgl, "torch": torch, "pd": pd, "lm": lm, "L": layers, "k": k,
            "calibration": calibration, "evaluation": torch.randint(0, 128, (3, 32), generator=g),
            "bi": bi, "plan": sgl.layers_to_remove(bi, k), "items": [], "tokenizer": None,
            "n_windows": 3, "seq_len": 32, "task": "piqa"}


BI_APPEND = "scores.append(1 - cos.mean())"
BI_COS = "cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)"


@pytest.mark.parametrize("wrong", [
    (BI_APPEND, "scores.append(torch.arccos(cos.clamp(-1, 1)).mean() / torch.pi)"),  # angular distance
    (BI_COS, "cos = torch.nn.functional.cosine_similarity(x_in.float().flatten(), "
             "x_out.float().flatten(), dim=0)"),  # one cosine of whole tensors, not per token
    ("return torch.stack(scores)", "return sgl.block_influence(lm, calibration, progress=False)"),
], ids=["angular", "not-per-token", "library-call"])
def test_exercise_1_check_rejects_other_scores_and_the_library_call(wrong):
    """Exercise 1's check also feeds random states of another shape, so calling the library on
    the model, which the first case alone would accept, fails."""
    namespace = _tiny_namespace()
    exec(_given_cells(1)[0], namespace)  # hidden_states(...) and `states`
    _check_passes_then_rejects(1, namespace, *wrong)


def _similarity_namespace():
    import torch

    import shortgpt_lite as sgl

    g = torch.Generator().manual_seed(4)
    states = [torch.randn(64, 16, generator=g)]
    # L = 10 layers, each turning the stream by its share of the stream's size: the closest
    # pair of layers (1, 2) is not in the closest run of three (4, 5, 6), and layer 3 turns it
    # most in the whole stack, layer 7 in the second half
    for turn in (0.3, 0.05, 0.05, 1.0, 0.12, 0.12, 0.12, 0.9, 0.6, 0.4):
        states.append(states[-1] + turn * states[-1].std() * torch.randn(64, 16, generator=g))
    x = torch.nn.functional.normalize(torch.stack(states), dim=-1)
    S = torch.einsum("itd,jtd->ij", x, x) / x.shape[1]
    return {"sgl": sgl, "torch": torch, "S": S, "L": 10, "block_size": 3}


@pytest.mark.parametrize("wrong", [
    ("first = int(ends.argmax())", "first = int(ends.argmin())"),
    ("[S[start, start + n].item()", "[S[start, start + n - 1].item()"),  # a run one layer short
    ("int(adjacent[L // 2:L - 1].argmin())", "int(adjacent[L // 2:L - 1].argmax())"),
    ("int(adjacent[L // 2:L - 1].argmin())", "int(adjacent.argmin())"),  # the whole stack
    ("same_as_lowest_bi = sorted(", "same_as_lowest_bi = not sorted("),
    ('explanation = """', 'explanation = ""; unused = """'),
], ids=["least-similar-run", "run-too-short", "flattest-layer", "whole-stack", "bi-flipped",
        "no-explanation"])
def test_exercise_4_check_rejects_misread_heatmaps(wrong):
    namespace = _similarity_namespace()
    _check_passes_then_rejects(4, namespace, *wrong)


SCORES_RETURN = "return (ranks[0] + ranks[1]) / 2"


@pytest.mark.parametrize("wrong", [
    (SCORES_RETURN, "return bi_scores"),  # BI itself
    (SCORES_RETURN, "return 2 * bi_scores + 1"),  # BI's order under another scale
    (SCORES_RETURN, "return torch.zeros(len(ranks[0]))"),  # every layer equal
    (SCORES_RETURN, "return ranks[1] + sgl.block_influence(model, evaluation, progress=False)"),
    (SCORES_RETURN, "return ((ranks[0] + ranks[1]) / 2)[:-1]"),  # a score missing
    (SCORES_RETURN, "return (ranks[0] + ranks[1]) / 2 * float('nan')"),
], ids=["bi", "bi-rescaled", "constant", "reads-evaluation", "too-few", "nan"])
def test_exercise_6_check_rejects_scores_that_break_the_rules(wrong):
    """The open exercise's check cannot grade a design, but it refuses scores that are BI in
    disguise, say nothing, or look at the held-out windows; the example solution passes."""
    namespace = _tiny_namespace()
    _check_passes_then_rejects(6, namespace, *wrong)
    assert "evaluation" in namespace and "items" in namespace  # put back after the check


@pytest.mark.parametrize("wrong", [
    ("quiet = round(fraction * n)", "quiet = int(fraction * n)"),  # floor: 12 of 37, not 13
    ("indices[quiet:]", "indices[:n - quiet]"),  # removes the busiest
    ("linear(down.weight[:, keep], down.bias)", "linear(down.weight[:, keep], None)"),
    ("return rows(gate), rows(up), linear(down.weight[:, keep], down.bias)",
     "return gate, up, down"),  # nothing removed
], ids=["floor", "busiest", "down-bias-dropped", "unchanged"])
def test_exercise_7_check_rejects_wrong_shrinking(wrong):
    namespace = _tiny_namespace()
    exec(_given_cells(7)[0], namespace)  # the middle layer's MLP and its activity
    _check_passes_then_rejects(7, namespace, *wrong)


MEANS = "means = d[np.asarray(draws)].mean(axis=1)"


@pytest.mark.parametrize("wrong", [
    (MEANS, "means = np.asarray(a)[draws].mean(axis=1) - np.asarray(b)[draws[::-1]].mean(axis=1)"),
    (MEANS, "means = d"),  # percentiles of the windows, not of the mean
    ("low, high = np.percentile(means, [2.5, 97.5])",
     "low, high = d.mean() - 1.96 * d.std() / len(d) ** 0.5, d.mean() + 1.96 * d.std() / len(d) ** 0.5"),
], ids=["unpaired", "no-mean", "normal-approximation"])
def test_exercise_8_check_rejects_unpaired_and_other_intervals(wrong):
    import numpy as np

    rng = np.random.default_rng(0)
    hard = rng.normal(4, 1, 6)
    namespace = {"np": np, "n_windows": 6, "draws": rng.integers(0, 6, size=(2000, 6)),
                 "sgl": __import__("shortgpt_lite"),
                 "per_window": {"shortgpt": hard + 0.2 + rng.normal(0, .05, 6),
                                "width": hard + rng.normal(0, .05, 6)}}
    _check_passes_then_rejects(8, namespace, *wrong)


SCALE = "scale = w.abs().amax(dim=1, keepdim=True) / 127"


@pytest.mark.parametrize("wrong", [
    (SCALE, "scale = w.abs().amax() / 127"),  # one scale for the whole matrix
    ("(w / scale).round()", "(w / scale).trunc()"),  # truncation, as int() does
    (SCALE, "scale = w.abs().amax(dim=1, keepdim=True) / 128"),
    ("    scale = torch.where(scale > 0, scale, torch.ones_like(scale))", "    pass"),  # 0 / 0
    ("return (w / scale).round().clamp(-127, 127) * scale", "return sgl.int8_weights(weight)"),
], ids=["per-tensor", "truncation", "scale-128", "zero-row", "library-call"])
def test_exercise_9_check_rejects_wrong_int8(wrong):
    import torch

    import shortgpt_lite as sgl

    weight = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    _check_passes_then_rejects(9, {"torch": torch, "sgl": sgl, "name": "a test layer",
                                   "weight": weight}, *wrong)


KL = "kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)"


@pytest.mark.parametrize("wrong", [
    (KL, "kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)"),  # KL(student || teacher)
    (KL, "kl = log_p.exp() * (log_p - log_q)"),  # mean over the vocabulary too
    ("return kl.mean() * temperature ** 2", "return kl.mean()"),  # no tau^2
    ("student_logits.float() / temperature", "student_logits.float()"),  # tau on one side only
    ("return kl.mean() * temperature ** 2",
     "return sgl.healing.distillation_loss(student_logits, teacher_logits, temperature)"),
], ids=["reversed", "mean-over-vocabulary", "no-tau-squared", "student-not-tempered",
        "library-call"])
def test_exercise_10_check_rejects_wrong_distillation_losses(wrong):
    import torch

    import shortgpt_lite as sgl

    g = torch.Generator().manual_seed(0)
    namespace = {"sgl": sgl, "torch": torch, "student_logits": torch.randn(2, 8, 50, generator=g),
                 "teacher_logits": torch.randn(2, 8, 50, generator=g)}
    _check_passes_then_rejects(10, namespace, *wrong)


def test_library_calls_finds_every_way_a_function_reaches_the_library():
    import types

    import torch

    import shortgpt_lite as sgl
    from shortgpt_lite import library_calls

    namespace = {"torch": torch, "sgl": sgl, "sparsity_mask": sgl.sparsity_mask, "L": 4,
                 "quantize": sgl.quantize, "lm": torch.nn.Linear(2, 2)}
    sources = {
        "def f(x):\n    return torch.ones(L) + lm.weight.sum()": [],
        "def f(x):\n    return sgl.sparsity_mask(x, 0.5)": ["sgl"],
        "def f(x):\n    return sparsity_mask(x, 0.5)": ["sparsity_mask"],
        "def f(x):\n    import shortgpt_lite\n    return (lambda y: shortgpt_lite.wanda_scores(y))(x)":
            ["shortgpt_lite"],
        "def f(x):\n    def g(y):\n        return quantize.int8_weights(y)\n    return g(x)": ["quantize"],
    }
    for source, expected in sources.items():
        exec(source, namespace)
        assert isinstance(namespace["f"], types.FunctionType)
        assert library_calls(namespace["f"]) == expected, source
