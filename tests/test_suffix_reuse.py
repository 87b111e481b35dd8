"""Causal-suffix reuse: a sweep's rows patched at position p run only positions >= p on top of the base run's
keys and values. Its numbers must equal the full recomputation's, on every family, site and direction."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from workbench.core import Run
from workbench.models import load_model
from workbench.models.toy import random_model
from workbench.patching import sweep

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
