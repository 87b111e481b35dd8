"""Old spellings keep working for this release: each warns with a DeprecationWarning that names the new word,
and gives exactly what the new word gives."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_scrubbing import Reads

from workbench import core
from workbench.lnfree.evaluation import _positions as lnfree_positions
from workbench.models.toy import random_model
from workbench.patching import sweep
from workbench.plateau.core import resolve_positions as plateau_positions
from workbench.scrubbing import Hypothesis, Resample, random_donors, scrub

CLEAN, CORRUPT, ANSWERS = "When Mary and John went out, John gave it to", "When Mary and John went out, Mary gave it to", (" Mary", " John")  # fmt: skip


def test_patching_positions_all_is_together():
    model = random_model("gpt2", seed=1)
    kwargs = {"layers": [0], "progress": False, "warn": False}
    with pytest.warns(DeprecationWarning, match="positions='together'"):
        old = sweep(model, CLEAN, CORRUPT, ANSWERS, positions="all", **kwargs)
    new = sweep(model, CLEAN, CORRUPT, ANSWERS, positions="together", **kwargs)
    assert old.positions == new.positions and torch.equal(old.raw, new.raw)


@pytest.mark.parametrize(
    "resolve, new",
    [(plateau_positions, "all-but-first"), (lnfree_positions, "each")],
    ids=["plateau", "lnfree"],
)
def test_other_engines_positions_all_names_its_new_word(resolve, new):
    with pytest.warns(DeprecationWarning, match=f"positions={new!r}"):
        old = resolve("all", 6)
    assert old == resolve(new, 6)


def test_scrubbing_chunk_and_site_are_batch_size_and_module():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match="module="):
        rule = Resample(site="hidden", donors=random_donors(), units=[0])
    assert rule.module == "hidden"
    hypotheses = [Hypothesis("unit 0 random", (rule,))]
    with pytest.warns(DeprecationWarning, match="batch_size="):
        old = scrub(Reads([1.0, 0.0]), x, hypotheses, output="head", chunk=64, seed=3, progress=False)
    new = scrub(Reads([1.0, 0.0]), x, hypotheses, output="head", batch_size=64, seed=3, progress=False)
    assert torch.equal(torch.as_tensor(old.kept), torch.as_tensor(new.kept))


@pytest.mark.parametrize("name", [*core.__all__, "run_chunked"])
def test_workbench_runner_names_point_to_workbench_core(name):
    runner = importlib.import_module("workbench.runner")
    with pytest.warns(DeprecationWarning, match="workbench.core"):
        value = getattr(runner, name)
    assert name == "run_chunked" or value is getattr(core, name)
    with pytest.raises(AttributeError):
        runner.not_a_name  # noqa: B018
