"""Plateau probes: engine numbers against a plain-PyTorch loop, curve metrics, statistics, directions, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from workbench.core import CancelToken
from workbench.errors import Cancelled, InputError, SiteError
from workbench.models import load_model
from workbench.models.toy import TOY_WORDS, random_model
from workbench.plateau import (
    InterpolationResult,
    PlateauResult,
    RefStats,
    compare_samples,
    interpolate,
    kl_divergence,
    ledoit_wolf,
    max_slope,
    plateau_length,
    probe,
    reference_stats,
    sharpness,
    slice_2d,
    stats_from_activations,
)
from workbench.plateau import directions as dirs
from workbench.plateau.core import _bytes_per_row

PROMPTS = [
    "When Mary and John went to the store , John gave a drink to",
    "The capital of France is Paris",
    "The cat sat on the mat . Then the dog ran quickly to the park",
]
_WORDS = TOY_WORDS[2:]  # no BOS / unknown token
CORPUS = [" ".join(np.random.default_rng(i).choice(_WORDS, 12)) for i in range(40)]  # 440 activations


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model("gpt2", "tiny", seed=1)


@pytest.fixture(scope="module")
def ref(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference_stats(model, CORPUS, layer=1, progress=False)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- a plain-PyTorch reference: hooks on the Hugging Face modules, full prompts, no skipping -------------------


def plain_run(model, tokens, site, layer, pos, vecs, read_layer):
    """Log-probs [n, vocab] at `pos` and the last block's output [n, d] there, with `site` of `layer` at `pos`
    replaced by each row of `vecs` (GPT-2 modules, plain forward hooks)."""
    hf = model.module
    block = hf.transformer.h[layer]
    n = len(vecs)

    def set_pos(h):
        h = h.clone()
        h[:, pos] = vecs.to(h.dtype)
        return h

    handles, captured = [], {}
    if site == "resid_pre":

        def pre(mod, args, kwargs):
            if args:
                return (set_pos(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = set_pos(kwargs["hidden_states"])
            return args, kwargs

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    elif site == "mlp_out":
        handles.append(block.mlp.register_forward_hook(lambda mod, args, out: set_pos(out)))
    elif site == "resid_post":
        handles.append(block.register_forward_hook(lambda mod, args, out: set_pos(out)))
    elif site == "resid_mid":

        def pre_ln2(mod, args):
            args[0][:, pos] = vecs.to(args[0].dtype)  # the residual itself, as the site writes it

        handles.append(block.ln_2.register_forward_pre_hook(pre_ln2))
    read_block = hf.transformer.h[read_layer]
    handles.append(read_block.register_forward_hook(lambda mod, args, out: captured.update(read=out)))
    try:
        with torch.no_grad():
            logits = hf(tokens.expand(n, -1), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    read = captured["read"][0] if isinstance(captured["read"], tuple) else captured["read"]
    return torch.log_softmax(logits[:, pos].double(), -1), read[:, pos].double()


def plain_kl(p_logp, q_logp):
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


@pytest.mark.parametrize(
    "site,layer,positions",
    [
        ("resid_pre", 1, -1),
        ("resid_pre", 0, "all"),
        ("mlp_out", 0, [3, -1]),
        ("resid_post", 0, -1),
        ("resid_mid", 1, -2),
    ],
)
def test_probe_matches_plain_pytorch_loop(model, ref, site, layer, positions):
    """Every KL, L2 and top token equals a plain hooked forward pass on the full prompt."""
    sizes = torch.tensor([0.0, 0.3, 1.0, 2.5])
    prompts = PROMPTS[1:2] if positions == "all" else PROMPTS[:2]
    res = quiet(
        probe,
        model,
        prompts,
        site=site,
        layer=layer,
        positions=positions,
        families=("isotropic", "cov_mixture", "toward_real"),
        n_directions=2,
        sizes=sizes,
        reference=None if site != "resid_pre" or layer != 1 else ref,
        progress=False,
    )
    n_layers = model.cfg.n_layers
    rows = [model.to_tokens(p) for p in prompts]
    clean = {}
    for b in range(len(res.base_kind)):
        i, pos = res.base_prompt[b], res.base_position[b]
        if i not in clean:
            with torch.no_grad():
                out = model.module(rows[i], use_cache=False, output_hidden_states=True)
            clean[i] = out
        # unperturbed reference: the clean run with no edit
        vec0 = res.x0[b][None]
        ref_logp, ref_read = plain_run(model, rows[i], site, layer, pos, vec0, n_layers - 1)
        clean_logp = torch.log_softmax(clean[i].logits[0, pos].double(), -1)
        assert torch.allclose(ref_logp[0], clean_logp, atol=1e-5)
        vecs = res.x0[b] + (sizes[1:, None, None] * res.scale * res.directions[b]).reshape(
            -1, res.x0.shape[-1]
        )
        logp, read = plain_run(model, rows[i], site, layer, pos, vecs, n_layers - 1)
        kl = plain_kl(ref_logp, logp).reshape(len(sizes) - 1, -1).T  # [direction, size]
        l2 = (read - ref_read).norm(dim=-1).reshape(len(sizes) - 1, -1).T
        torch.testing.assert_close(res.kl[b, :, 1:].double(), kl, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(res.l2[b, :, 1:].double(), l2, atol=2e-5, rtol=1e-4)
        top = logp.topk(1).indices.reshape(len(sizes) - 1, -1).T
        agree = (res.top_ids[b, :, 1:, 0] == top).float().mean()
        assert agree > 0.97  # near-ties may swap order under float noise
        assert torch.all(res.kl[b, :, 0] == 0) and torch.all(res.l2[b, :, 0] == 0)
    if positions == "all":
        assert 0 not in res.base_position
        assert sorted(set(res.base_position)) == list(range(1, max(r.shape[1] for r in rows)))


def test_size_zero_reproduces_clean_logits(model, ref):
    """The unperturbed path (blocks skipped, prompt cut, one logit position) gives the clean run's logits."""
    res = quiet(
        probe,
        model,
        PROMPTS,
        positions="all",
        families=("isotropic",),
        n_directions=1,
        sizes=[0, 1],
        progress=False,
    )
    assert res.noise_floor.abs().max() < 1e-6
    rows = [model.to_tokens(p) for p in PROMPTS]
    for b in range(len(res.base_kind)):
        i, pos = res.base_prompt[b], res.base_position[b]
        with torch.no_grad():
            logits = model.module(rows[i], use_cache=False).logits[0, pos]
        probs = torch.softmax(logits.float(), -1)
        top = probs.topk(5)
        assert torch.equal(res.ref_top_ids[b], top.indices) or torch.allclose(
            res.ref_top_probs[b], top.values, atol=1e-6
        )
        torch.testing.assert_close(res.ref_top_probs[b], top.values, atol=1e-6, rtol=1e-5)


def test_kl_nonnegative_and_grows(model, ref):
    res = quiet(
        probe, model, PROMPTS, reference=ref, n_directions=4, sizes=torch.linspace(0, 4, 9), progress=False
    )
    assert res.kl.min() > -1e-6 and res.l2.min() >= 0
    assert torch.isfinite(res.kl).all() and torch.isfinite(res.l2).all()
    # the output moves away from the base: median KL rises over the first sizes (LayerNorm saturates later)
    med = res.kl.flatten(0, 1).median(0).values
    assert 0 < med[1] < med[2] < med[3]


def test_kl_direction_is_clean_given_perturbed():
    """kl_divergence(p, q) = KL(p || q) = sum p log(p / q), pinned on an asymmetric example."""
    p = torch.tensor([0.98, 0.01, 0.01]).log()
    q = torch.full((3,), 1 / 3).log()
    forward = 0.98 * math.log(0.98 * 3) + 2 * 0.01 * math.log(0.03)  # 0.987 nats
    backward = math.log(1 / 3) - (math.log(0.98) + 2 * math.log(0.01)) / 3  # 1.978 nats
    assert float(kl_divergence(p, q)) == pytest.approx(forward, rel=1e-5)
    assert float(kl_divergence(q, p)) == pytest.approx(backward, rel=1e-5)
    assert kl_divergence(p.double(), q.double()).dtype == torch.float32


def test_engine_kl_is_unperturbed_given_perturbed():
    """The probe's KL is KL(unperturbed || perturbed), not the reverse (which differs at large sizes)."""
    model = random_model("gpt2", "tiny", seed=1)
    model.module.transformer.ln_f.weight.data *= 30  # peaked next-token distributions make KL asymmetric
    res = quiet(
        probe, model, PROMPTS[0], families=("isotropic",), n_directions=3, sizes=[0, 3.0], progress=False
    )
    tokens = model.to_tokens(PROMPTS[0])
    pos = res.base_position[0]
    ref_logp, _ = plain_run(model, tokens, "resid_pre", 1, pos, res.x0[:1], 1)
    vecs = res.x0[0] + 3.0 * res.scale * res.directions[0]
    logp, _ = plain_run(model, tokens, "resid_pre", 1, pos, vecs, 1)
    forward, backward = plain_kl(ref_logp, logp), plain_kl(logp, ref_logp)
    torch.testing.assert_close(res.kl[0, :, 1].double(), forward, atol=1e-5, rtol=1e-4)
    assert (forward - backward).abs().max() > 0.1 * forward.max()


# -- curve metrics on synthetic curves with a known plateau ---------------------------------------------------


def test_plateau_length_on_known_curves():
    sizes = torch.linspace(0, 1, 11, dtype=torch.float64)  # steps of 0.1
    flat_then_ramp = torch.where(sizes < 0.4, 0.0, 10 * (sizes - 0.4))  # 0 until 0.4, slope 10
    never = torch.full((11,), 0.01)
    from_start = torch.full((11,), 5.0)
    curves = torch.stack([flat_then_ramp, never, from_start])
    lengths = plateau_length(curves, sizes, threshold=1.0)
    assert lengths[0] == pytest.approx(0.5, abs=1e-9)  # 10 * (0.5 - 0.4) = 1
    assert math.isinf(lengths[1])
    assert lengths[2] == 0.0
    # linear interpolation between grid points: threshold 0.5 is crossed at 0.45
    assert float(plateau_length(flat_then_ramp, sizes, 0.5)) == pytest.approx(0.45, abs=1e-9)


def test_max_slope_and_sharpness_on_known_curves():
    sizes = torch.linspace(0, 1, 21, dtype=torch.float64)
    line = 2 * sizes
    step = (sizes >= 0.5).double()
    slope, where = max_slope(torch.stack([line, step]), sizes)
    assert slope[0] == pytest.approx(2.0)
    assert slope[1] == pytest.approx(20.0)  # one unit of rise over one step of 0.05
    assert where[1] == pytest.approx(0.475)
    sharp = sharpness(torch.stack([line, step, torch.zeros(21)]), sizes)
    assert sharp[0] == pytest.approx(1.0)
    assert sharp[1] == pytest.approx(20.0)
    assert math.isnan(sharp[2])


def test_metric_input_errors():
    with pytest.raises(InputError, match="increase"):
        plateau_length(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]), 1.0)
    with pytest.raises(InputError, match="points"):
        max_slope(torch.zeros(4), torch.tensor([0.0, 1.0, 2.0]))


def test_compare_samples_detects_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 400), rng.normal(1, 1, 400)
    same = rng.normal(0, 1, 400)
    frame = compare_samples({"base": a, "shifted": b, "same": same}, baseline="base").set_index("group")
    assert frame.loc["shifted", "mw_p"] < 1e-10 and frame.loc["shifted", "ks_p"] < 1e-10
    # P(N(1,1) > N(0,1)) = Phi(1 / sqrt 2) = 0.760
    assert frame.loc["shifted", "p_greater"] == pytest.approx(0.760, abs=0.04)
    assert frame.loc["same", "mw_p"] > 0.01
    assert math.isnan(frame.loc["base", "mw_p"])
    with pytest.raises(InputError, match="Baseline"):
        compare_samples({"a": a}, baseline="b")


def test_compare_samples_ranks_censored_lengths_last():
    frame = compare_samples(
        {"short": np.array([0.1, 0.2, 0.3]), "never": np.array([np.inf, np.inf, 0.5])}, baseline="short"
    ).set_index("group")
    assert frame.loc["never", "p_greater"] == pytest.approx(1.0)
    assert frame.loc["never", "finite"] == pytest.approx(1 / 3)


# -- covariance utilities on synthetic data --------------------------------------------------------------------


def _true_cov(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)


def _lw_reference(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4 written out with explicit sums (independent of the vectorised code)."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    m = np.trace(s) / d
    d2 = np.sum((s - m * np.eye(d)) ** 2) / d
    b_bar2 = sum(np.sum((np.outer(r, r) - s) ** 2) / d for r in xc) / n**2
    b2 = min(b_bar2, d2)
    lam = b2 / d2
    return (1 - lam) * s + lam * m * np.eye(d), lam


def test_ledoit_wolf_matches_the_papers_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(_true_cov(12)).T
    cov, lam = ledoit_wolf(x)
    ref_cov, ref_lam = _lw_reference(x.numpy())
    assert lam == pytest.approx(ref_lam, rel=1e-9)
    np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=1e-9, atol=1e-12)


def test_ledoit_wolf_shrinks_small_samples_and_helps():
    d = 30
    true = _true_cov(d)
    chol = torch.linalg.cholesky(true)
    g = torch.Generator().manual_seed(2)
    small = torch.randn(20, d, generator=g, dtype=torch.float64) @ chol.T  # n < d: sample cov is singular
    big = torch.randn(20_000, d, generator=g, dtype=torch.float64) @ chol.T
    cov_small, lam_small = ledoit_wolf(small)
    _, lam_big = ledoit_wolf(big)
    assert torch.linalg.eigvalsh(cov_small).min() > 0  # positive definite although n < d
    assert lam_small > 0.1 and lam_big < 0.01
    xc = small - small.mean(0)
    sample_cov = xc.T @ xc / len(small)
    assert (cov_small - true).norm() < (sample_cov - true).norm()


def test_refstats_sampling_reproduces_mean_and_cov():
    d = 8
    true = _true_cov(d, seed=3)
    g = torch.Generator().manual_seed(3)
    mean = torch.arange(d, dtype=torch.float32)
    acts = (
        torch.randn(5000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(true).T
    ).float() + mean
    stats = stats_from_activations(acts)
    draws = stats.sample_normal(40_000, torch.Generator().manual_seed(4)).double()
    assert torch.allclose(draws.mean(0), mean.double(), atol=0.05)
    assert torch.allclose(torch.cov(draws.T), stats.cov, atol=0.06)
    assert stats.median_norm == pytest.approx(float(np.median(acts.norm(dim=-1).numpy())), rel=1e-6)


def test_too_few_samples_warns_and_shrinks():
    acts = torch.randn(50, 16)
    with pytest.warns(UserWarning, match="fewer than 10x"):
        stats = stats_from_activations(acts)
    assert stats.shrinkage > 0 and stats.warnings
    with pytest.raises(InputError, match="shrinkage"):
        stats_from_activations(acts, shrinkage=2.0)


def test_reference_stats_excludes_position_zero(model):
    stats = quiet(reference_stats, model, CORPUS[:5], layer=1, progress=False, keep=10_000)
    acts = []
    for text in CORPUS[:5]:
        with torch.no_grad():
            hs = model.module(model.to_tokens(text), use_cache=False, output_hidden_states=True).hidden_states
        acts.append(hs[1][0, 1:])  # resid_pre of layer 1, BOS left out
    acts = torch.cat(acts)
    assert stats.n_samples == len(acts)
    torch.testing.assert_close(stats.mean, acts.mean(0), atol=1e-5, rtol=1e-5)
    assert stats.median_norm == pytest.approx(float(np.median(acts.norm(dim=-1).numpy())), rel=1e-5)
    assert (stats.site, stats.layer) == ("resid_pre", 1)


def test_refstats_save_and_load(tmp_path, ref):
    path = ref.save(tmp_path / "ref.pt")
    back = RefStats.load(path)
    torch.testing.assert_close(back.cov, ref.cov)
    assert back.median_norm == ref.median_norm


# -- directions -------------------------------------------------------------------------------------------------


def test_direction_families(ref):
    x0 = ref.sample[0]
    for fam in dirs.FAMILIES:
        d = dirs.draw(fam, 6, x0, ref, torch.Generator().manual_seed(0))
        assert d.shape == (6, ref.d_model)
        torch.testing.assert_close(d.norm(dim=-1), torch.ones(6))
    # mixtures do not depend on x0: the same draws for two different bases (neither in the real sample)
    x1 = torch.randn(ref.d_model)
    for fam in ("cov_mixture", "real_mixture", "isotropic"):
        a = dirs.draw(fam, 4, x1, ref, torch.Generator().manual_seed(5))
        b = dirs.draw(fam, 4, 10 * x1 + 1, ref, torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b)
    # "toward" families point from x0 to a target: for toward_real, a real activation other than x0
    d = dirs.draw("toward_real", 5, x0, ref, torch.Generator().manual_seed(6))
    others = ref.sample[(ref.sample - x0).norm(dim=-1) > 1e-6]
    cos = dirs.unit(others - x0) @ d.T  # [others, 5]
    assert torch.allclose(cos.max(0).values, torch.ones(5), atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(
        dirs.draw("cov_random", 3, x0, ref, g1), dirs.unit(ref.sample_normal(3, g2) - x0)
    )


def test_user_directions_are_normalised_and_checked(model, ref):
    v = torch.randn(3, model.cfg.d_model) * 7
    res = quiet(
        probe,
        model,
        PROMPTS[0],
        families=(),
        directions={"sae": v},
        sizes=[0, 0.5, 1],
        reference=ref,
        progress=False,
    )
    assert res.families == ("sae",) * 3
    torch.testing.assert_close(res.directions[0], v / v.norm(dim=-1, keepdim=True))
    with pytest.raises(InputError, match="built-in"):
        probe(model, PROMPTS[0], directions={"isotropic": v}, progress=False)
    with pytest.raises(InputError, match=r"\[k, 32\]"):
        probe(model, PROMPTS[0], directions={"bad": torch.randn(3, 5)}, progress=False)
    with pytest.raises(InputError, match="zero length"):
        probe(model, PROMPTS[0], directions={"z": torch.zeros(2, 32)}, progress=False)


# -- the probe's pitfalls, options and errors -----------------------------------------------------------------


def test_position_zero_only_when_asked(model, ref):
    res = quiet(
        probe, model, PROMPTS[1], positions="all", families=("isotropic",), n_directions=1, progress=False
    )
    assert 0 not in res.base_position
    with pytest.warns(UserWarning, match="position 0"):
        res = probe(
            model,
            PROMPTS[1],
            positions=[0, 2],
            reference=ref,
            families=("isotropic",),
            n_directions=1,
            progress=False,
        )
    assert res.base_position == (0, 2)


def test_own_prompts_as_reference_warn(model):
    with pytest.warns(UserWarning, match="covariance"):
        res = probe(model, PROMPTS, families=("cov_mixture",), n_directions=2, progress=False)
    assert any("covariance" in w for w in res.warnings)


def test_low_precision_warns():
    m = random_model("gpt2", "tiny", seed=1, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16"):
        res = probe(
            m, PROMPTS[0], families=("isotropic",), n_directions=2, sizes=[0, 0.5, 1.0], progress=False
        )
    assert any("noise floor" in w for w in res.warnings)


def test_cov_random_bases_are_paired_with_real_ones(model, ref):
    res = quiet(
        probe,
        model,
        PROMPTS[:2],
        bases=("real", "cov_random"),
        reference=ref,
        n_directions=2,
        sizes=[0, 1],
        progress=False,
    )
    n = len(res.base_kind) // 2
    assert res.base_kind == ("real",) * n + ("cov_random",) * n
    assert not torch.allclose(res.x0[:n], res.x0[n:])
    # x0-independent families get the same directions for the real and the synthetic base of a cell
    mix = [i for i, f in enumerate(res.families) if f == "cov_mixture"]
    torch.testing.assert_close(res.directions[:n, mix], res.directions[n:, mix])
    assert torch.isnan(res.noise_floor[n:]).all() and torch.isfinite(res.noise_floor[:n]).all()
    groups = res.groups()
    assert "cov_mixture @ real base" in groups and "cov_mixture @ cov_random base" in groups
    frame = res.compare(baseline="cov_mixture @ cov_random base")
    assert set(frame["group"]) == set(groups)


def test_results_are_seeded(model, ref):
    a = quiet(probe, model, PROMPTS[0], reference=ref, n_directions=2, sizes=[0, 1], seed=3, progress=False)
    b = quiet(probe, model, PROMPTS[0], reference=ref, n_directions=2, sizes=[0, 1], seed=3, progress=False)
    c = quiet(probe, model, PROMPTS[0], reference=ref, n_directions=2, sizes=[0, 1], seed=4, progress=False)
    torch.testing.assert_close(a.kl, b.kl)
    assert not torch.allclose(a.directions, c.directions)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(site="q"), SiteError, "Cannot perturb"),
        (dict(layer=5), SiteError, "out of range"),
        (dict(read_site="resid_pre", read_layer=0), SiteError, "must come after"),
        (dict(read_site="logits"), SiteError, "Cannot read"),
        (dict(families=("gaussian",)), InputError, "Unknown direction families"),
        (dict(families=()), InputError, "No directions"),
        (dict(sizes=[0, 1, 0.5]), InputError, "increase"),
        (dict(sizes=[-1, 1]), InputError, ">= 0"),
        (dict(sizes=[1]), InputError, "two sizes"),
        (dict(positions=40), InputError, "out of range"),
        (dict(positions="every"), InputError, "positions="),
        (dict(n_directions=0), InputError, "n_directions"),
        (dict(bases=("fake",)), InputError, "bases"),
        (dict(scale=-1.0, families=("isotropic",)), InputError, "scale"),
        (dict(top_k=0), InputError, "top_k"),
    ],
)
def test_probe_input_errors(model, ref, kwargs, error, match):
    kwargs = {"reference": ref, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        probe(model, PROMPTS[1], **kwargs)


def test_reference_at_another_site_is_refused(model, ref):
    with pytest.raises(InputError, match="same site"):
        probe(model, PROMPTS[0], layer=0, reference=ref, progress=False)
    with pytest.raises(InputError, match="No prompts"):
        probe(model, [], reference=ref, progress=False)


def test_progress_and_cancel(model, ref):
    seen = []
    kw = dict(reference=ref, families=("isotropic",), n_directions=2, sizes=[0, 1, 2, 3])
    budget = 2 * _bytes_per_row(model, model.to_tokens(PROMPTS[0]).shape[1], cached=True)
    quiet(probe, model, PROMPTS[0], memory_budget=budget, progress=lambda d, t: seen.append((d, t)), **kw)
    assert seen[-1] == (6, 6) and len(seen) == 3  # 6 rows in chunks of 2 under this budget
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        probe(model, PROMPTS[0], reference=ref, n_directions=2, progress=False, cancel=token)


def test_result_table_summaries_and_save(tmp_path, model, ref):
    res = quiet(
        probe,
        model,
        PROMPTS[:2],
        reference=ref,
        n_directions=3,
        sizes=torch.linspace(0, 3, 7),
        progress=False,
    )
    n_b, n_d, n_s = res.kl.shape
    frame = res.to_frame()
    assert len(frame) == n_b * n_d * n_s
    assert set(frame["family"]) == set(dirs.FAMILIES)
    assert np.allclose(frame["size_l2"], frame["size"] * res.scale)
    lengths = res.plateau_length(threshold=0.01)
    assert lengths.shape == (n_b, n_d)
    table = res.compare(threshold=0.01)
    assert list(table["group"]) == res.family_names
    steps = res.tokens_along(0, 0)
    assert len(steps) == n_s and steps.loc[0, "kl"] == 0
    back = PlateauResult.load(res.save(tmp_path / "res.pt"))
    torch.testing.assert_close(back.kl, res.kl)
    assert back.families == res.families and back.token_strings == res.token_strings


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_other_families_and_both_paths_agree(family, monkeypatch):
    """Llama-style (rotary, GQA), NeoX (parallel blocks) and Gemma 2 (sandwich norms, soft-cap): the unperturbed
    path reproduces the clean logits, and reusing the prefix's keys and values gives the numbers of running the
    whole prompt (the path used on NDIF)."""
    m = random_model(family, "tiny", seed=0)
    kw = dict(families=("isotropic",), n_directions=2, sizes=[0, 1, 3], positions=[3, -1], progress=False)
    res = quiet(probe, m, PROMPTS[0], **kw)
    assert res.kl.shape == (2, 2, 3) and res.noise_floor.abs().max() < 1e-6
    assert res.kl[:, :, 2].min() > 0
    monkeypatch.setattr("workbench.plateau.core.use_prefix_cache", lambda model: False)
    whole = quiet(probe, m, PROMPTS[0], **kw)
    torch.testing.assert_close(whole.kl, res.kl, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(whole.l2, res.l2, atol=1e-5, rtol=1e-4)


def test_remote_local_gives_the_same_numbers(tmp_path, model, ref):
    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote="local")
    kw = dict(reference=ref, n_directions=2, sizes=[0, 0.5, 2.0], progress=False)
    local_res = quiet(probe, model, PROMPTS[0], **kw)
    remote_res = quiet(probe, remote, PROMPTS[0], **kw)
    torch.testing.assert_close(remote_res.kl, local_res.kl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(remote_res.l2, local_res.l2, atol=1e-5, rtol=1e-5)
    a = quiet(interpolate, model, PROMPTS[0], PROMPTS[1], n_steps=5, progress=False)
    b = quiet(interpolate, remote, PROMPTS[0], PROMPTS[1], n_steps=5, progress=False)
    torch.testing.assert_close(a.kl, b.kl, atol=1e-6, rtol=1e-5)


# -- interpolation and 2-D slices -------------------------------------------------------------------------------


def test_interpolation_matches_plain_loop(model):
    res = interpolate(model, PROMPTS[0], PROMPTS[1:], n_steps=6, progress=False)
    assert isinstance(res, InterpolationResult) and res.kl.shape == (2, 6)
    n_layers = model.cfg.n_layers
    a = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        hs_a = model.module(a, use_cache=False, output_hidden_states=True).hidden_states
    for pair, text_b in enumerate(PROMPTS[1:]):
        b = model.to_tokens(text_b)
        with torch.no_grad():
            out_b = model.module(b, use_cache=False, output_hidden_states=True)
        x_a, x_b = hs_a[1][0, -1], out_b.hidden_states[1][0, -1]
        vecs = torch.stack([(1 - t) * x_a + t * x_b for t in res.alphas])
        logp, read = plain_run(model, a, "resid_pre", 1, a.shape[1] - 1, vecs, n_layers - 1)
        torch.testing.assert_close(res.kl[pair].double(), plain_kl(logp[:1], logp), atol=2e-6, rtol=1e-4)
        l2 = (read - read[:1]).norm(dim=-1)
        torch.testing.assert_close(res.l2[pair].double(), l2, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(res.distance[pair].double(), l2 / l2[-1], atol=1e-4, rtol=1e-4)
        answer_b = out_b.logits[0, -1].argmax()
        assert int(res.answer_b[pair]) == int(answer_b)
        diff = logp[:, int(res.answer_a[pair])] - logp[:, int(answer_b)]
        torch.testing.assert_close(res.logit_diff[pair].double(), diff, atol=1e-4, rtol=1e-4)
    assert res.distance[:, -1].allclose(torch.ones(2)) and (res.kl[:, 0] == 0).all()
    assert res.sharpness().shape == (2,)
    assert len(res.to_frame()) == 12 and len(res.tokens_along(1)) == 6


def test_interpolation_errors(model):
    with pytest.raises(InputError, match="as many"):
        interpolate(model, PROMPTS[:2], PROMPTS, progress=False)
    with pytest.raises(InputError, match="n_steps"):
        interpolate(model, PROMPTS[0], PROMPTS[1], n_steps=1, progress=False)
    with pytest.raises(InputError, match="one integer"):
        interpolate(model, PROMPTS[0], PROMPTS[1], position=[1, 2], progress=False)


def test_slice_through_three_activations(model):
    res = slice_2d(model, *PROMPTS, n=5, span=(0.0, 1.0), progress=False)
    assert res.distance.shape == (3, 5, 5)
    # grid corners (u, v) = (0, 0), (1, 0), (0, 1) are the endpoints: zero distance to their own output
    assert res.distance[0, 0, 0] < 1e-4 and res.distance[1, 0, -1] < 1e-4 and res.distance[2, -1, 0] < 1e-4
    assert res.nearest()[0, 0] == 0 and res.nearest()[0, -1] == 1 and res.nearest()[-1, 0] == 2
    assert res.kl_to_a[0, 0].abs() < 1e-6
    assert len(res.to_frame()) == 25
    with pytest.raises(InputError, match="exactly one"):
        slice_2d(model, PROMPTS[:2], PROMPTS[1], PROMPTS[2], progress=False)


# -- the papers' qualitative findings on the demo model --------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    from workbench.demo_model import DEMO_DIR

    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("the demo model's files are not in this checkout")
    model = load_model("demo")
    from workbench.tasks import demo_corpus, pack

    # Reference rows shaped like the prompts (one document each, as the demo model was trained): packed rows of
    # several documents are outside its training distribution and blur the statistics.
    ref = quiet(reference_stats, model, pack(model, demo_corpus("validation", 2000), 12, 320), progress=False)
    prompts = pack(model, demo_corpus("validation", 3000)[2000:], 12, 8)
    return model, ref, prompts


def test_demo_real_activations_sit_on_longer_plateaus(demo):
    """Plateau test (Heimersheim & Mendel; Giglemiani et al.): the same x0-independent directions change the output
    later from real activations than from random ones with the real mean and covariance."""
    model, ref, prompts = demo
    sizes = torch.linspace(0, 1.5, 16)
    res = quiet(
        probe, model, prompts, reference=ref, families=("cov_mixture",), n_directions=8, sizes=sizes,
        bases=("real", "cov_random"), progress=False,
    )  # fmt: skip
    row = (
        res.compare(baseline="cov_mixture @ cov_random base")
        .set_index("group")
        .loc["cov_mixture @ real base"]
    )
    assert row["p_greater"] > 0.7 and row["mw_p"] < 1e-3


def test_demo_sensitive_directions_against_the_mixture_baseline(demo):
    """Directions toward other real activations break the plateau sooner than the cov-random mixture baseline
    (Heimersheim & Mendel; Lee & Heimersheim), isotropic ones later (Lee & Heimersheim)."""
    model, ref, prompts = demo
    res = quiet(
        probe, model, prompts, reference=ref, families=("isotropic", "cov_mixture", "toward_real"), n_directions=8,
        sizes=torch.linspace(0, 1.5, 16), progress=False,
    )  # fmt: skip
    table = res.compare(baseline="cov_mixture").set_index("group")
    assert table.loc["toward_real", "p_greater"] < 0.3 and table.loc["toward_real", "mw_p"] < 1e-3
    assert table.loc["isotropic", "p_greater"] > 0.6 and table.loc["isotropic", "mw_p"] < 1e-2
