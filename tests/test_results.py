"""Every stored reference run in results/ reproduces: its key matches its parameters, its
plans follow from its scores, and a slice recomputed with the current library (Block
Influence on the calibration windows; the unpruned model and one plan on the first
windows and items) matches the stored rows within what other CPUs and a GPU explain."""

from pathlib import Path

import pytest

from shortgpt_lite import experiments as ex
from shortgpt_lite.models import BUNDLED_MODELS, load_model

STORED = sorted((Path(__file__).resolve().parent.parent / "results").glob("*/*/provenance.json"))


def test_every_bundled_model_has_its_stored_runs():
    stored = {(p.parent.parent.name, p.parent.name) for p in STORED}
    wanted = {(model, name) for model, runs in ex.STANDARD.items() for name in runs}
    assert wanted <= stored, f"missing stored runs: {sorted(wanted - stored)}; run make results"
    assert set(ex.STANDARD) <= set(BUNDLED_MODELS)


# The session fixtures of conftest.py, so each bundled model loads once for all its runs.
FIXTURES = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}


@pytest.mark.slow
@pytest.mark.parametrize("path", STORED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_stored_result_reproduces(path, request):
    result = ex.load_result(path.parent)
    assert result.model == path.parent.parent.name and result.name == path.parent.name
    assert result.params == ex.standard_params(result.name, result.model), \
        "the stored run is not the one STANDARD describes; run make results"
    # the fixtures hold fp32 models; a run stored in another precision is checked in its own
    fixture = FIXTURES.get(result.model) if result.provenance["dtype"] == "float32" else None
    loaded = request.getfixturevalue(fixture) if fixture \
        else load_model(result.model, device="cpu", dtype=result.provenance["dtype"])
    problems = ex.check(result, loaded=loaded)
    assert problems == [], "\n".join(problems)
