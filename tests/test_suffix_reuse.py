"""Causal reuse: a sweep's rows patched at position p run only positions >= p on top of the base run's keys and
values, and rows patched inside the prefix both prompts share are the base run (copied, not run). Their numbers
must equal the full recomputation's, on every family, site and direction."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from workbench.core import Run
from workbench.models import load_model
from workbench.models.toy import random_model
from workbench.patching import sweep
from workbench.patching.spec import PatchSpec

sweep_module = importlib.import_module("workbench.patching.sweep")

CLEAN = ["When Mary and John went to the store , John gave a drink to"]
CORRUPT = ["When Mary and John went to the store , Mary gave a drink to"]
ANSWERS = [(" Mary", " John")]
FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "qwen2", "mistral", "gemma", "gemma2"]


def _both(model, monkeypatch, **kwargs):
    """(with suffix reuse, without) for the same sweep."""
    fast = sweep(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(sweep_module, "suffix_reuse", lambda model, s: "switched off by the test")
        full = sweep(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False, **kwargs)
    return fast, full


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_reuse_equals_the_full_recomputation(family, monkeypatch):
    model = random_model(family, seed=3)
    sites = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    if model.cfg.has_resid_mid:
        sites.append("resid_mid")
    for direction in ("denoising", "noising"):
        fast, full = _both(model, monkeypatch, site=sites, direction=direction)
        assert fast.provenance.options["suffix_reuse"] is True
        assert full.provenance.options["suffix_reuse"] is False
        torch.testing.assert_close(fast.raw, full.raw, atol=1e-5, rtol=0)
        heads, heads_full = _both(model, monkeypatch, site=["z", "pattern"], direction=direction, layers=[1])
        torch.testing.assert_close(heads.raw, heads_full.raw, atol=1e-5, rtol=0)


def test_suffix_reuse_with_position_groups(monkeypatch):
    model = random_model("llama", seed=4)
    fast, full = _both(model, monkeypatch, positions=[[3, 4], 9, -1, [0, 12]], site="resid_pre")
    torch.testing.assert_close(fast.raw, full.raw, atol=1e-5, rtol=0)
    fast, full = _both(model, monkeypatch, site="z", positions=[[5, 6], -2], heads=[1, 3])
    torch.testing.assert_close(fast.raw, full.raw, atol=1e-5, rtol=0)


def test_suffix_reuse_falls_back_and_says_why(tmp_path):
    model = random_model("gpt2", seed=1)
    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote="local")
    result = sweep(remote, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False, layers=[1])
    assert result.provenance.options["suffix_reuse"] is False
    assert "remotely" in result.provenance.options["suffix_reuse_off"]
    local = sweep(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False, layers=[1])
    torch.testing.assert_close(result.raw, local.raw, atol=1e-5, rtol=0)


def test_partial_results_fill_in_layer_by_layer():
    model = random_model("gpt2", seed=1)
    seen = []
    run = Run(progress=False, on_partial=seen.append)
    final = sweep(model, CLEAN, CORRUPT, ANSWERS, site=["resid_pre", "mlp_out"], run=run, warn=False)
    assert len(seen) == 3  # after 1, 2 and 3 of the 4 (site, layer) rows; the last is the result itself
    for k, partial in enumerate(seen, start=1):
        filled = torch.isfinite(partial.raw[0, 0]).any(-1)  # [site, layer]
        assert int(filled.sum()) == k and partial.warnings[0].startswith("Partial:")
        torch.testing.assert_close(partial.raw[..., filled, :], final.raw[..., filled, :])
    assert torch.isfinite(final.raw).all() and not any(w.startswith("Partial") for w in final.warnings)


def test_a_gpu_model_runs_full_batches_and_says_why():
    # (measured on an H200: the position buckets' smaller batches were slower there; see benchmarks/README.md)
    gpu_model = types.SimpleNamespace(remote=False, device="cuda:0")
    assert sweep_module.suffix_reuse(gpu_model, None) == "on a GPU the full batches are faster"


# the second pair's prompts differ from the third token on, the first pair's from the eleventh
TWO_CLEAN = [CLEAN[0], CLEAN[0]]
TWO_CORRUPT = [CORRUPT[0], "When Anna and John went to the store , John gave a drink to"]


def _spec(model, clean=TWO_CLEAN, corrupt=TWO_CORRUPT, **kwargs) -> PatchSpec:
    options = {
        "site": "resid_pre",
        "direction": "denoising",
        "layers": None,
        "positions": "each",
        "heads": None,
    }
    return PatchSpec.resolve(model, clean, corrupt, ANSWERS * 2, metric="logit_diff", **{**options, **kwargs})


def test_unchanged_cells_are_the_position_groups_inside_the_shared_prefix():
    model = random_model("gpt2", seed=1)
    assert model.to_tokens(TWO_CLEAN[0]).shape[-1] == 15  # BOS + 14 words: "John" / "Mary" at 10, "Anna" at 2
    s = _spec(model, positions=[[0, 1], [1, 2], 9, [3, 10], 10])
    assert s.unchanged() == {(0, 0), (0, 1), (0, 2), (1, 0)}
    assert _spec(model, positions="together").unchanged() == frozenset()
    same = _spec(model, corrupt=[CLEAN[0], TWO_CORRUPT[1]], positions="together", site="z")
    assert same.unchanged() == {(0, 0)}  # a pair of identical prompts: every patch is a no-op


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_inside_the_shared_prefix_are_copied_and_equal_running_them(family, monkeypatch):
    model = random_model(family, seed=5)
    for direction, kwargs in [
        ("denoising", {"site": ["resid_pre", "attn_out", "mlp_out"]}),
        ("noising", {"site": ["resid_post", "mlp_out"]}),
        ("denoising", {"site": ["z", "pattern"], "layers": [1]}),
        ("noising", {"site": "z", "layers": [0], "positions": [[1, 2], 9, -1]}),
    ]:
        copied = sweep(
            model, TWO_CLEAN, TWO_CORRUPT, ANSWERS * 2, direction=direction, **kwargs, progress=False
        )
        with monkeypatch.context() as m:
            m.setattr(PatchSpec, "unchanged", lambda self: frozenset())
            ran = sweep(
                model, TWO_CLEAN, TWO_CORRUPT, ANSWERS * 2, direction=direction, **kwargs, progress=False
            )
        n = copied.provenance.options["unchanged_cells"]
        assert n == (2 if "positions" in kwargs else 12) and ran.provenance.options["unchanged_cells"] == 0
        torch.testing.assert_close(copied.raw, ran.raw, atol=1e-5, rtol=0)
        base = copied.corrupt if direction == "denoising" else copied.clean  # [metric, pair]
        first = copied.raw[:, 0, ..., 0, :] if copied.heads else copied.raw[:, 0, ..., 0]  # pair 0, group 0
        assert (first == base[:, 0].view(-1, *[1] * (first.dim() - 1))).all()


def test_a_pair_of_identical_prompts_runs_no_patched_run(monkeypatch):
    model = random_model("gpt2", seed=2)
    pairs = []
    real = sweep_module.patched_logits

    def record(model, s, site, layer, rows, *args, **kwargs):
        pairs.extend(rows.pair.tolist())
        return real(model, s, site, layer, rows, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "patched_logits", record)
    clean, corrupt = TWO_CLEAN, [CLEAN[0], TWO_CORRUPT[1]]
    result = sweep(model, clean, corrupt, ANSWERS * 2, site=["resid_pre", "mlp_out"], progress=False, warn=False)
    assert 0 not in pairs and 1 in pairs and result.provenance.options["unchanged_cells"] == 15 + 2
    assert (result.raw[:, 0] == result.corrupt[:, 0].view(-1, 1, 1, 1)).all()


def test_partial_results_show_the_copied_runs_with_their_layer():
    """A layer's row of the heatmap appears whole: its copied runs are not drawn before its other runs."""
    model = random_model("gpt2", seed=1)
    seen = []
    sweep(model, CLEAN, CORRUPT, ANSWERS, run=Run(progress=False, on_partial=seen.append), warn=False)
    (partial,) = seen
    assert torch.isfinite(partial.raw[:, :, :, 0]).all() and torch.isnan(partial.raw[:, :, :, 1]).all()
