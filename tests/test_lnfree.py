"""LayerNorm removal: the frozen-scale norm, calibration, the zero-shot preview (local and remote=local),
the removal schedule and fine-tuning, LN-free checkpoints in the released convention, and the evaluations.

Numbers are checked against independent plain-PyTorch computations (hooks, module surgery, transformers'
own learning-rate schedule) on tiny random models; the demo-model test measures the removal gap to the control.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import InputError, ModelLoadError, UnsupportedModelError
from workbench.lnfree import (
    FinetuneConfig,
    FrozenNorm,
    RemovalPreview,
    RemovalSchedule,
    TrainingHistory,
    calibrate,
    dla_exactness,
    evaluate_loss,
    export_lnfree,
    finetune,
    is_lnfree,
    load_lnfree,
    norm_statistics,
    paper_order,
    paper_prefix,
    parse_sites,
    preset,
    preview,
)
from workbench.lnfree.freezing import frozen_forward, norm_infos
from workbench.lnfree.norms import (
    all_norms,
    consolidate,
    install_frozen_norms,
    plain_copy,
    rescale_output,
    site_path,
    token_scale,
)
from workbench.lnfree.schedule import removal_events
from workbench.models import load_model
from workbench.models.toy import random_model
from workbench.results import load_result

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def gpt2():
    return random_model("gpt2", "tiny", seed=1)


@pytest.fixture(scope="module")
def tokens(gpt2):
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(2, gpt2.cfg.d_vocab, (6, 16), generator=gen)
    toks[:, 0] = 0  # <|endoftext|> first, as in packed text
    toks[1, 7] = 0  # and one inside a row
    return toks


def plain_loss(module, toks) -> torch.Tensor:
    with torch.no_grad():
        logits = module(toks).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1), reduction="none"
    ).view(toks.shape[0], -1)


def train_tokens(model, rows=64, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, model.cfg.d_vocab, (rows, length), generator=gen)
    toks[:, 0] = 0
    return toks


# ---------------------------------------------------------------------------------------------------------------
# the frozen-scale norm


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_frozen_norm_equals_original_when_scale_is_the_tokens_own(family):
    model = random_model(family, "tiny", seed=2)
    original = model.torch_submodule("ln2", 0)
    with torch.no_grad():  # non-trivial weights (and bias) so that the affine part is exercised
        original.weight.uniform_(0.5, 1.5)
        if getattr(original, "bias", None) is not None:
            original.bias.uniform_(-0.3, 0.3)
    frozen = FrozenNorm.from_norm(original)
    real = FrozenNorm.from_norm(original)
    x = torch.randn(3, 5, model.cfg.d_model) * 3 + 0.7
    with torch.no_grad():
        expected = original(x)
        assert torch.allclose(real(x), expected, atol=1e-6)  # a real path is the original norm
        sigma = token_scale(x, frozen.kind, frozen.eps)
        for b in range(3):
            for p in range(5):
                frozen.freeze(scale=float(sigma[b, p]))
                got = frozen(x[b : b + 1, p : p + 1])
                assert torch.allclose(got, expected[b : b + 1, p : p + 1], atol=1e-5, rtol=1e-5)
        # ... and the in-trace rescaling of the real output is the same function
        bias = getattr(original, "bias", None)
        assert torch.allclose(
            rescale_output(expected, bias, sigma, 2.0), frozen_at(frozen, 2.0)(x), atol=1e-5
        )


def frozen_at(norm, scale):
    out = copy.deepcopy(norm)
    out.freeze(scale=scale)
    return out


def test_frozen_norm_keeps_centring_for_layernorm_only():
    ln = FrozenNorm(4, kind="layernorm")
    rms = FrozenNorm(4, kind="rmsnorm", bias=False)
    ln.freeze(scale=2.0)
    rms.freeze(scale=2.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    assert torch.allclose(ln(x), (x - 3.0) / 2.0)
    assert torch.allclose(rms(x), x / 2.0)


def test_running_scale_is_a_moving_average_and_freeze_uses_it():
    norm = FrozenNorm(8, momentum=0.9)
    with pytest.raises(InputError, match="no running scale"):
        norm.freeze()
    norm.train()
    a, b = torch.randn(2, 3, 8) * 2, torch.randn(2, 3, 8) * 5
    norm(a)
    norm(b)
    mean_a = token_scale(a, "layernorm", 1e-5).mean()
    mean_b = token_scale(b, "layernorm", 1e-5).mean()
    assert torch.allclose(norm.running_scale, 0.9 * mean_a + 0.1 * mean_b)
    used = norm.freeze()
    assert used == pytest.approx(float(norm.running_scale))
    norm(torch.randn(2, 3, 8) * 100)  # frozen: the average no longer moves
    assert float(norm.running_scale) == pytest.approx(used)
    with pytest.raises(InputError, match="positive"):
        norm.freeze(scale=-1.0)
    with pytest.raises(InputError, match="paths"):
        norm.is_frozen("v")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_installed_norms_change_nothing_until_frozen_and_consolidation_is_exact(family):
    model = random_model(family, "tiny", seed=3)
    toks = train_tokens(model, rows=3, length=10)
    module = plain_copy(model.module)
    sites = install_frozen_norms(module, model.adapter)
    assert set(sites) == set(paper_order(model.cfg.n_layers))
    assert torch.allclose(plain_loss(module, toks), plain_loss(model.module, toks), atol=1e-5)
    for i, (site, norm) in enumerate(sites.items()):  # q/k and v of one block get different scales
        norm.freeze(site_path(site), 0.5 + 0.1 * i)
    before = plain_loss(module, toks)
    consolidate(module, model.adapter)
    assert all(isinstance(n, FrozenNorm) and n.is_frozen() for n in all_norms(module, model.adapter).values())
    assert torch.allclose(plain_loss(module, toks), before, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# sites


def test_sites_parse_and_paper_order():
    assert paper_order(2) == ["mlp.0", "mlp.1", "qk.0", "qk.1", "v.0", "v.1", "final"]
    assert parse_sites(["final", "mlp1", ("qk", 0), "attn.-1"], 2) == [
        "mlp.1",
        "qk.0",
        "qk.1",
        "v.1",
        "final",
    ]
    assert parse_sites("v", 3) == ["v.0", "v.1", "v.2"]
    assert paper_prefix(3, 2) == ["mlp.0", "mlp.1", "qk.0"]
    for bad, match in (
        ("mlp.7", "out of range"),
        ("foo", "Unknown"),
        ("final.1", "no layer"),
        (3, "Cannot read"),
    ):
        with pytest.raises(InputError, match=match):
            parse_sites(bad, 2)
    with pytest.raises(InputError, match="steps"):
        paper_prefix(8, 2)


# ---------------------------------------------------------------------------------------------------------------
# freezing inside traces


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_freezing_in_a_trace_equals_module_surgery(family):
    model = random_model(family, "tiny", seed=4)
    toks = train_tokens(model, rows=3, length=12)
    freeze = {"mlp.0": 0.5, "qk.0": 0.7, "v.1": 1.3, "qk.1": 0.9, "final": 2.0}
    got = frozen_forward(model, toks, infos=norm_infos(model), freeze=freeze)["loss"]
    module = plain_copy(model.module)
    sites = install_frozen_norms(module, model.adapter)
    for site, scale in freeze.items():
        sites[site].freeze(site_path(site), scale)
    expected = plain_loss(module, toks)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (expected - plain_loss(model.module, toks)).abs().max() > 1e-3  # freezing did change something


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_split_attention_paths_recompute_the_fused_projection_exactly(family):
    """Freezing q/k and v separately (their part of the fused projection is recomputed) equals freezing the
    whole pre-attention norm when both scales are (nearly) the same."""
    model = random_model(family, "tiny", seed=5)
    with torch.no_grad():  # sharpen attention: at initialisation it is uniform whatever q and k are
        proj = model.torch_submodule("block", 1).get_submodule(model.adapter.qkv_paths[0])
        proj.weight.mul_(30)
    toks = train_tokens(model, rows=2, length=9)
    infos = norm_infos(model)
    together = frozen_forward(model, toks, infos=infos, freeze={"qk.1": 0.8, "v.1": 0.8})["loss"]
    apart = frozen_forward(model, toks, infos=infos, freeze={"qk.1": 0.8, "v.1": 0.8 * (1 + 1e-7)})["loss"]
    only_v = frozen_forward(model, toks, infos=infos, freeze={"v.1": 0.8})["loss"]
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(together, only_v, atol=1e-4)


def test_skipping_cached_blocks_gives_identical_losses(gpt2, tokens):
    infos = norm_infos(gpt2)
    cached = frozen_forward(gpt2, tokens, infos=infos, cache_blocks=True)
    cache = [cached[f"block.{i}"] for i in range(gpt2.cfg.n_layers)]
    for site in ("mlp.1", "v.1", "final"):
        full = frozen_forward(gpt2, tokens, infos=infos, freeze={site: 0.9})["loss"]
        skipped = frozen_forward(gpt2, tokens, infos=infos, freeze={site: 0.9}, skip_cache=cache)["loss"]
        assert torch.equal(full, skipped)


# ---------------------------------------------------------------------------------------------------------------
# calibration


def test_statistics_and_calibration_match_plain_hooks(gpt2, tokens):
    stats = norm_statistics(gpt2, tokens, progress=False, batch_size=4)
    recorded = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, label=label: recorded.__setitem__(label, args[0]))
        for label, module in all_norms(gpt2.module, gpt2.adapter).items()
    ]
    try:
        base = plain_loss(gpt2.module, tokens)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(stats.loss, base, atol=1e-5)
    for label, x in recorded.items():
        expected = (x.var(-1, unbiased=False) + 1e-5).sqrt()
        assert torch.allclose(stats.norm_scales(label), expected, atol=1e-6)
    assert stats.eot[1, 7] and stats.eot[:, 0].all() and stats.eot.sum() == 7

    x = recorded["ln2.1"]
    sigma = (x.var(-1, unbiased=False) + 1e-5).sqrt()
    mean = calibrate(gpt2, tokens, progress=False)
    assert mean["mlp.1"] == pytest.approx(float(sigma.mean()), rel=1e-5)
    assert mean["qk.0"] == mean["v.0"]
    keep = torch.ones_like(sigma, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 7] = False
    excl = stats.frozen_scales("mean", exclude_first=True, exclude_eot=True)
    assert excl["mlp.1"] == pytest.approx(float(sigma[keep].mean()), rel=1e-5)
    assert stats.frozen_scales("median")["mlp.1"] == pytest.approx(
        float(sigma.flatten().double().median()), rel=1e-5
    )
    ema = stats.frozen_scales("ema", momentum=0.9, batch_size=2)
    batches = [float(sigma[i : i + 2].mean()) for i in range(0, 6, 2)]
    expected = batches[0]
    for value in batches[1:]:
        expected = 0.9 * expected + 0.1 * value
    assert ema["mlp.1"] == pytest.approx(expected, rel=1e-5)
    assert len(mean.to_frame()) == 3 * gpt2.cfg.n_layers + 1
    with pytest.raises(InputError, match="method"):
        stats.frozen_scales("mode")
    with pytest.raises(InputError, match="no tokens"):
        norm_statistics(gpt2, tokens[:, :1].repeat(1, 2).fill_(0), progress=False).frozen_scales(
            exclude_first=True, exclude_eot=True
        )


def test_bad_inputs_raise_clear_errors(gpt2, tokens):
    with pytest.raises(InputError, match=r"\[row, pos\]"):
        preview(gpt2, torch.randn(3, 4), progress=False)
    with pytest.raises(InputError, match="0.."):
        preview(gpt2, torch.full((2, 4), 10_000), progress=False)
    with pytest.raises(InputError, match="documents"):
        preview(gpt2, [1, 2, 3], progress=False)
    with pytest.raises(InputError, match="scales"):
        evaluate_loss(gpt2, tokens, freeze="mlp", progress=False)
    cnn = load_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(UnsupportedModelError, match="plain module"):
        preview(cnn, tokens, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# preview


def test_preview_matches_separate_evaluations(gpt2, tokens):
    result = preview(gpt2, tokens, progress=False, batch_size=4)  # two chunks
    n_sites = 3 * gpt2.cfg.n_layers + 1
    assert isinstance(result, RemovalPreview)
    assert result.sites == paper_order(gpt2.cfg.n_layers) and result.order == result.sites
    assert result.single_loss.shape == (n_sites,) and result.cumulative_loss.shape == (n_sites,)
    assert torch.isfinite(result.single_loss).all() and torch.isfinite(result.cumulative_loss).all()
    assert result.base_loss == pytest.approx(float(plain_loss(gpt2.module, tokens).double().mean()), rel=1e-5)
    for i in (0, 3, n_sites - 1):
        site = result.sites[i]
        alone = evaluate_loss(gpt2, tokens, freeze=[site], scales=result.scales, progress=False)
        assert result.single_loss[i] == pytest.approx(alone.mean, rel=1e-5)
    everything = evaluate_loss(gpt2, tokens, freeze="all", scales=result.scales, progress=False)
    assert result.cumulative_loss[-1] == pytest.approx(everything.mean, rel=1e-5)
    assert result.cumulative_loss[0] == pytest.approx(float(result.single_loss[0]), rel=1e-6)
    no_skip = preview(gpt2, tokens, progress=False, batch_size=4, skip_unchanged=False)
    assert torch.allclose(no_skip.single_loss, result.single_loss, atol=1e-9)
    # per-token error: r = sigma_token / sigma_frozen
    r = result.ratio("mlp.1")
    assert torch.allclose(r * result.scales["mlp.1"], result.statistics.norm_scales("ln2.1"))
    frame = result.to_frame()
    assert list(frame["site"]) == result.sites and frame["single_delta"].notna().all()


def test_preview_subset_order_and_given_scales(gpt2, tokens):
    scales = calibrate(gpt2, tokens, method="median", progress=False)
    result = preview(
        gpt2, tokens, sites=["final", "mlp.0"], order=["v.1", "mlp"], scales=scales, progress=False
    )
    assert result.sites == ["mlp.0", "final"] and result.order == ["v.1", "mlp.0", "mlp.1"]
    assert result.scales is scales
    alone = evaluate_loss(gpt2, tokens, freeze=["v.1", "mlp.0"], scales=scales, progress=False)
    assert result.cumulative_loss[1] == pytest.approx(alone.mean, rel=1e-5)
    with pytest.raises(InputError, match="scales"):
        preview(gpt2, tokens, scales={"mlp.0": 1.0}, progress=False)


def test_preview_runs_through_the_remote_path(tmp_path, gpt2, tokens):
    """The same engine on a model loaded with remote='local' (nnsight serialises every trace as for NDIF)."""
    gpt2.module.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote="local")
    local = preview(gpt2, tokens, progress=False, batch_size=6)
    far = preview(remote, tokens, progress=False, batch_size=6)
    assert torch.allclose(local.single_loss, far.single_loss, atol=1e-5)
    assert torch.allclose(local.cumulative_loss, far.cumulative_loss, atol=1e-5)
    assert torch.allclose(local.statistics.scales, far.statistics.scales, atol=1e-6)
    d_local = dla_exactness(gpt2, tokens, progress=False)
    d_far = dla_exactness(remote, tokens, progress=False)
    assert torch.allclose(d_local.nmae_heads, d_far.nmae_heads, atol=1e-5)
    with pytest.raises(UnsupportedModelError, match="local model only"):
        finetune(remote, tokens, "smoke")


def test_results_save_and_load(tmp_path, gpt2, tokens):
    result = preview(gpt2, tokens, sites="final", progress=False)
    loaded = load_result(result.save(tmp_path / "preview.pt"))
    assert isinstance(loaded, RemovalPreview)
    assert torch.equal(loaded.single_loss, result.single_loss)
    assert loaded.scales.as_dict() == result.scales.as_dict()
    assert torch.equal(loaded.statistics.scales, result.statistics.scales)


# ---------------------------------------------------------------------------------------------------------------
# schedule


def test_paper_presets_fire_removals_at_the_papers_steps():
    small = preset("gpt2")
    events = small.schedule.events(12)
    assert len(events) == 37
    by_site = {site: step for step, site in events}
    assert (by_site["mlp.0"], by_site["mlp.11"]) == (20, 42)
    assert (by_site["qk.0"], by_site["qk.11"]) == (44, 66)
    assert (by_site["v.0"], by_site["v.11"]) == (68, 101)
    assert by_site["final"] == 104
    assert small.tokens_per_step == 524_288
    expected = {  # (layers, micro-batch x accumulation x 1024 tokens, last removal, checkpoint step, horizon)
        "gpt2-medium": (24, 518_144, 188, 500, 500),
        "gpt2-large": (36, 516_096, 534, 600, 1200),
        "gpt2-xl": (48, 516_096, 722, 800, 1200),
    }
    for name, (layers, tokens_per_step, last, steps, horizon) in expected.items():
        cfg = preset(name)
        cfg.validate(layers)
        assert cfg.tokens_per_step == tokens_per_step
        assert cfg.schedule.last_step(layers) == last
        assert (cfg.steps, cfg.horizon) == (steps, horizon)
        steps_in_order = [site for _, site in cfg.schedule.events(layers)]
        assert steps_in_order == paper_order(layers)  # groups never overlap: the paper's order
    assert preset("gpt2-large").momentum == pytest.approx(0.9 ** (28 / 32))
    assert removal_events(preset("smoke"), 2) == {
        2: ["mlp.0"],
        3: ["mlp.1"],
        6: ["qk.0"],
        7: ["qk.1"],
        10: ["v.0"],
        11: ["v.1"],
        14: ["final"],
    }
    at_once = RemovalSchedule(5, 0, 6, 0, 7, 0, 8).events(3)
    assert [step for step, _ in at_once] == [5, 5, 5, 6, 6, 6, 7, 7, 7, 8]


def test_learning_rate_schedule_is_transformers_cosine_with_min_lr():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    for name in ("gpt2", "gpt2-large"):
        cfg = preset(name)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup, cfg.horizon, min_lr=cfg.min_lr)
        for step in range(cfg.steps):
            assert cfg.lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
            opt.step()
            sched.step()


def test_schedule_and_config_validation():
    with pytest.raises(InputError, match="last norm at step 104"):
        preset("gpt2", steps=100).validate(12)
    with pytest.raises(InputError, match="non-negative"):
        RemovalSchedule(-1, 2, 3, 4, 5, 6, 7).validate(2, 100)
    with pytest.raises(InputError, match="min_lr"):
        preset("smoke", min_lr=1.0).validate(2)
    with pytest.raises(InputError, match="preset"):
        preset("gpt3")
    cfg = preset("demo").replace(steps=50, schedule={"final_step": 40})
    assert cfg.schedule.final_step == 40 and FinetuneConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def smoke_runs(gpt2):
    train = train_tokens(gpt2, rows=40, length=32)
    val = train_tokens(gpt2, rows=6, length=32, seed=9)
    run = finetune(gpt2, train, "smoke", val=val, eval_every=8, progress=False)
    control = finetune(gpt2, train, "smoke", val=val, eval_every=8, remove=False, progress=False)
    return run, control, train, val


def test_removal_run_follows_the_schedule_and_ends_ln_free(gpt2, smoke_runs):
    run, control, _, val = smoke_runs
    history = run.history
    assert isinstance(history, TrainingHistory) and history.removed and run.lnfree
    assert history.events == preset("smoke").schedule.events(gpt2.cfg.n_layers)
    assert history.n_frozen.tolist()[:3] == [0, 0, 1] and history.n_frozen[-1] == 3 * gpt2.cfg.n_layers + 1
    assert set(history.frozen_scales) == set(paper_order(gpt2.cfg.n_layers))
    assert history.val_step.tolist() == [0, 8, 16, 24]
    assert (history.aux_loss > 0).all() and torch.isfinite(history.loss).all()
    assert history.lr[0] == 0.0 and history.lr[2] == pytest.approx(preset("smoke").lr)
    assert is_lnfree(run.model) and not is_lnfree(gpt2) and not is_lnfree(control.model)
    assert (
        not control.history.removed and control.history.events == [] and (control.history.aux_loss == 0).all()
    )
    # the returned model is a WorkbenchModel whose validation loss is the history's last one
    assert evaluate_loss(run.model, val, progress=False).mean == pytest.approx(
        history.final_val_loss, rel=1e-4
    )
    # the original model is untouched
    assert isinstance(gpt2.torch_submodule("ln2", 0), torch.nn.LayerNorm)
    assert len(history.to_frame()) == preset("smoke").steps


def test_dla_error_is_zero_without_layernorm(gpt2, smoke_runs, tokens):
    run, control, _, _ = smoke_runs
    with_ln = dla_exactness(control.model, tokens, progress=False)
    lnfree = dla_exactness(run.model, tokens, progress=False, positions="all")
    assert with_ln.final_norm == "layernorm" and lnfree.final_norm == "frozen"
    assert with_ln.mean_nmae > 0.01
    assert lnfree.mean_nmae < 1e-9 and lnfree.max_abs_error < 1e-9
    assert with_ln.nmae_heads.shape == (gpt2.cfg.n_layers, gpt2.cfg.n_heads)
    assert len(with_ln.to_frame()) == gpt2.cfg.n_layers * (gpt2.cfg.n_heads + 1)


def test_dla_direct_effect_matches_an_ablation_with_hooks(gpt2, tokens):
    """DE of one head = logit change when that head's output is removed from the final norm's input only."""
    result = dla_exactness(gpt2, tokens, progress=False)
    layer, head = 1, 2
    d = gpt2.cfg.d_head
    saved = {}
    proj = gpt2.torch_submodule("out_proj", layer)
    w_o = proj.weight.reshape(gpt2.cfg.n_heads, d, -1)[head]
    h1 = proj.register_forward_pre_hook(
        lambda m, a: saved.__setitem__("z", a[0][..., head * d : (head + 1) * d])
    )
    lnf = gpt2.torch_submodule("ln_final")

    def remove_head(m, args):
        return (args[0] - saved["z"] @ w_o,)

    targets = tokens[:, -1]
    with torch.no_grad():
        full = gpt2.module(tokens).logits[:, -2].gather(1, targets[:, None]).squeeze(1)
        h2 = lnf.register_forward_pre_hook(remove_head)
        try:
            ablated = gpt2.module(tokens).logits[:, -2].gather(1, targets[:, None]).squeeze(1)
        finally:
            h2.remove()
    h1.remove()
    de = full - ablated
    assert float(result.mean_abs_de_heads[layer, head]) == pytest.approx(float(de.abs().mean()), rel=1e-4)


def test_checkpoint_and_resume_reproduce_an_uninterrupted_run(tmp_path, gpt2, smoke_runs):
    run, _, train, val = smoke_runs
    cfg = preset("smoke")
    finetune(
        gpt2, train, cfg, val=val, eval_every=8, checkpoint_dir=tmp_path, checkpoint_every=12, progress=False
    )
    assert (tmp_path / "step_12.pt").exists() and (tmp_path / "final.pt").exists()
    resumed = finetune(
        gpt2, train, cfg, val=val, eval_every=8, resume=tmp_path / "step_12.pt", progress=False
    )
    assert resumed.history.events == run.history.events
    assert torch.allclose(resumed.history.loss, run.history.loss, atol=1e-6)
    toks = train[:2]
    assert torch.allclose(
        plain_loss(resumed.model.module, toks), plain_loss(run.model.module, toks), atol=1e-5
    )
    with pytest.raises(InputError, match="another FinetuneConfig"):
        finetune(gpt2, train, cfg.replace(lr=2e-3), resume=tmp_path / "step_12.pt", progress=False)
    with pytest.raises(InputError, match="remove=True"):
        finetune(gpt2, train, cfg, remove=False, resume=tmp_path / "step_12.pt", progress=False)


def test_finetune_llama_style_and_refusals():
    llama = random_model("llama", "tiny", seed=6)
    run = finetune(llama, train_tokens(llama, rows=16, length=16), "smoke", progress=False)
    assert run.lnfree and is_lnfree(run.model)
    assert dla_exactness(run.model, train_tokens(llama, rows=3, length=12), progress=False).mean_nmae < 1e-9
    neox = random_model("gpt_neox", "tiny")
    with pytest.raises(UnsupportedModelError, match="NeoX"):
        finetune(neox, train_tokens(neox, rows=8, length=16), "smoke", progress=False)
    with pytest.raises(InputError, match="FinetuneConfig"):
        finetune(llama, train_tokens(llama, rows=8, length=16), 3, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints in the released convention


def test_export_loads_in_plain_transformers_with_the_same_logits(tmp_path, smoke_runs, tokens):
    from transformers import AutoModelForCausalLM

    run = smoke_runs[0]
    path = export_lnfree(run.model, tmp_path / "lnfree")
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    assert plain.config.layer_norm_epsilon == 1e12
    assert isinstance(plain.transformer.h[0].ln_1, torch.nn.LayerNorm)
    assert plain.transformer.h[0].ln_1.weight.abs().max() > 1e4  # weights carry the 1e6 / scale factor
    with torch.no_grad():
        ours = run.model.module(tokens).logits
        theirs = plain(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # our loader restores the exact linear norms, with or without the scales file
    back = load_lnfree(str(path))
    assert is_lnfree(back)
    assert isinstance(back.torch_submodule("ln1", 0), FrozenNorm)
    assert back.torch_submodule("ln1", 0).frozen_scale() == pytest.approx(
        run.model.torch_submodule("ln1", 0).frozen_scale(), rel=1e-6
    )
    (path / "lnfree.json").unlink()  # as a released checkpoint: no scales file
    released = load_lnfree(str(path))
    with torch.no_grad():
        for m in (back, released):
            assert torch.allclose(m.module(tokens).logits, ours, atol=1e-4, rtol=1e-4)
    # exporting again gives the same checkpoint behaviour
    again = export_lnfree(released, tmp_path / "again")
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(again)(tokens).logits, theirs, atol=1e-4)


def test_apollo_style_folded_checkpoint_loads(tmp_path, gpt2, tokens):
    """The 2024 checkpoint folded the block norms' weight and bias away: weight 1e6, bias 0, eps 1e12."""
    module = plain_copy(gpt2.module)
    for block in module.transformer.h:
        for ln in (block.ln_1, block.ln_2):
            ln.eps = 1e12
            with torch.no_grad():
                ln.weight.fill_(1e6)
                ln.bias.zero_()
    module.transformer.ln_f.eps = 1e12
    with torch.no_grad():
        module.transformer.ln_f.weight.mul_(1e6 / 2.5)
    module.config.layer_norm_epsilon = 1e12
    module.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    model = load_lnfree(str(tmp_path))
    assert model.torch_submodule("ln1", 0).weight.allclose(torch.ones(gpt2.cfg.d_model))
    with torch.no_grad():
        assert torch.allclose(model.module(tokens).logits, module(tokens).logits, atol=1e-4, rtol=1e-4)
    assert dla_exactness(model, tokens, progress=False).mean_nmae < 1e-9


def test_checkpoint_refusals(tmp_path, gpt2, smoke_runs):
    run = smoke_runs[0]
    path = export_lnfree(run.model, tmp_path / "lnfree")
    with pytest.raises(InputError, match="float16"):
        load_lnfree(str(path), dtype=torch.float16)
    with pytest.raises(InputError, match="float16"):
        load_lnfree(str(path), dtype="float16")
    with pytest.raises(InputError, match="still has norms"):
        export_lnfree(gpt2, tmp_path / "nope")
    gpt2.module.save_pretrained(tmp_path / "with_ln")
    gpt2.tokenizer.save_pretrained(tmp_path / "with_ln")
    with pytest.raises(InputError, match="not an LN-free checkpoint"):
        load_lnfree(str(tmp_path / "with_ln"))
    with pytest.raises(ModelLoadError, match="hf download"):
        load_lnfree("schaeff/gpt2-small_LNFree300")


# ---------------------------------------------------------------------------------------------------------------
# evaluation and figures


def test_evaluate_loss_summary(gpt2, tokens):
    stats = evaluate_loss(gpt2, tokens, progress=False, batch_size=2)
    assert torch.allclose(stats.token_loss, plain_loss(gpt2.module, tokens), atol=1e-5)
    summary = stats.summary()
    assert summary["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert summary["median"] <= summary["p95"] <= summary["p99"] <= summary["max"]
    assert summary["n_nonfinite"] == 0 and math.isfinite(summary["mean"])


def test_figures(gpt2, tokens, smoke_runs):
    from workbench.viz.lnfree import history_figure, preview_figure

    result = preview(gpt2, tokens, progress=False)
    fig = preview_figure(result, selected=["mlp.0", "final"], k=3, frozen_loss=result.base_loss + 0.1)
    bars = [t for t in fig.data if t.type == "bar" and t.name == "MLP"]
    assert bars and list(bars[0].marker.opacity) == [1.0, 0.3]
    assert "+0.1000 nats" in fig.layout.title.text
    assert any(t.type == "scatter" and t.name == "position 0" for t in fig.data)
    assert any(t.type == "box" for t in fig.data)
    assert result.plot().layout.title.text.startswith(gpt2.name)
    run, control, _, _ = smoke_runs
    hist = history_figure(run.history, control=control.history)
    assert len(hist.layout.shapes) == 4  # one band per removal group
    for obj in (result.statistics, result.scales, run.history, dla_exactness(gpt2, tokens, progress=False)):
        assert len(obj.plot().data) > 0
    loss = evaluate_loss(gpt2, tokens, progress=False)
    assert (
        len(
            loss.plot(
                others={
                    "frozen": evaluate_loss(
                        gpt2, tokens, freeze="final", scales=result.scales, progress=False
                    )
                }
            ).data
        )
        == 2
    )


# ---------------------------------------------------------------------------------------------------------------
# the demo model


@pytest.fixture(scope="module")
def demo():
    from workbench.demo_model import DEMO_DIR

    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("the demo model's weights are not in this checkout yet")
    return load_model("demo")


@pytest.mark.slow
def test_removal_on_the_demo_model_ends_close_to_the_control(demo):
    """A shortened removal schedule (CI-sized) on the demo model: the LN-free model's validation loss stays
    within a small margin of the control fine-tuned with LayerNorm, and its DLA is exact."""
    from workbench.tasks import demo_corpus

    train = demo_corpus("train", 3000)
    val = demo_corpus("validation", 300)
    cfg = preset("demo-quick")
    run = finetune(demo, train, cfg, val=val, progress=False)
    control = finetune(demo, train, cfg, val=val, remove=False, progress=False)
    gap = run.history.final_val_loss - control.history.final_val_loss
    print(
        f"demo removal gap after {cfg.steps} steps: {gap:+.4f} nats "
        f"(LN-free {run.history.final_val_loss:.4f}, control {control.history.final_val_loss:.4f})"
    )
    assert run.lnfree
    assert gap < 0.25
    assert dla_exactness(run.model, val, n_rows=4, progress=False).mean_nmae < 1e-6
