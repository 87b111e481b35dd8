"""Activation and attribution patching: every grid equals an independent one-patch-at-a-time plain-PyTorch
implementation on the same weights; baselines, normalisation, metrics, errors, results and figures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workbench.core import CancelToken
from workbench.errors import Cancelled, InputError, SiteError, UnsupportedModelError
from workbench.models import load_model
from workbench.models.toy import random_model
from workbench.patching import Metric, PatchingResult, attribute, compare_attribution, sweep

# random weights answer nothing: their small baseline gaps are warned about (tested once, below)
pytestmark = [
    pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:For pair.*opposite sign:UserWarning"),
]

CLEAN = [
    "When Mary and John went to the store , John gave a drink to",
    "When Tom and Anna went to the park , Anna gave a book to",
]
CORRUPT = [
    "When Mary and John went to the store , Mary gave a drink to",
    "When Tom and Anna went to the park , Tom gave a book to",
]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna")]
SHORT = (  # 9 tokens: for the one-patch-per-pass references, whose cost grows with the number of positions
    ["Mary and John went , John gave it to", "Tom and Anna ran , Anna gave it to"],
    ["Mary and John went , Mary gave it to", "Tom and Anna ran , Tom gave it to"],
    ANSWERS,
)
METRIC_NAMES = ("logit_diff", "logprob", "prob", "kl")


@pytest.fixture(scope="module")
def gpt2():
    return random_model("gpt2", seed=1)


# -- an independent reference: plain PyTorch hooks on the Hugging Face module, one patch per forward pass -------

PATHS = {  # block list, attention, MLP, norm before the MLP, attention output projection, qkv layout
    "gpt2": ("transformer.h", "attn", "mlp", "ln_2", "attn.c_proj", "fused"),
    "gpt_neox": (
        "gpt_neox.layers",
        "attention",
        "mlp",
        "post_attention_layernorm",
        "attention.dense",
        "neox",
    ),
    "llama": ("model.layers", "self_attn", "mlp", "post_attention_layernorm", "self_attn.o_proj", "separate"),
}


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


class Reference:
    """Reads and writes one activation per forward pass with torch hooks; no workbench code involved."""

    def __init__(self, model):
        from transformers import AutoModelForCausalLM

        # a fresh copy of the weights: no nnsight wrapping, nothing shared with the engine but the numbers
        self.hf = AutoModelForCausalLM.from_config(model.module.config, attn_implementation="eager").eval()
        self.hf.load_state_dict(model.module.state_dict())
        self.family = "llama" if model.cfg.family in ("llama", "qwen2", "mistral") else model.cfg.family
        self.blocks, self.attn, self.mlp, self.ln2, self.out_proj, self.qkv = PATHS[self.family]
        cfg = model.cfg
        self.H, self.KV, self.dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head

    def block(self, layer):
        return _get(self.hf, self.blocks)[layer]

    def _v(self, layer, out_store):
        blk = self.block(layer)
        if self.qkv == "separate":
            return blk.self_attn.v_proj.register_forward_hook(
                lambda m, a, o: out_store.__setitem__("v", o.view(*o.shape[:-1], self.KV, self.dh))
            )
        mod = _get(blk, "attn.c_attn" if self.qkv == "fused" else "attention.query_key_value")

        def hook(m, a, o):
            if self.qkv == "fused":
                out_store["v"] = o.view(*o.shape[:-1], 3, self.H, self.dh)[..., 2, :, :]
            else:
                out_store["v"] = o.view(*o.shape[:-1], self.H, 3, self.dh)[..., 2, :]

        return mod.register_forward_hook(hook)

    def run(self, tokens, site, layer, write=None):
        """Logits [pos, vocab] of one prompt; `write(act)` edits the site's activation in place and the edit is
        applied; returns (logits, activation read at the site)."""
        store = {}
        blk = self.block(layer)
        hooks = []
        if site == "resid_pre":

            def pre(m, args):
                x = args[0].clone()
                store["act"] = x.clone()
                if write:
                    write(x)
                return (x, *args[1:])

            hooks.append(blk.register_forward_pre_hook(pre))
        elif site in ("resid_post", "attn_out", "mlp_out"):
            mod = {"resid_post": blk, "attn_out": _get(blk, self.attn), "mlp_out": _get(blk, self.mlp)}[site]

            def post(m, args, out):
                x = (out[0] if isinstance(out, tuple) else out).clone()
                store["act"] = x.clone()
                if write:
                    write(x)
                return (x, *out[1:]) if isinstance(out, tuple) else x

            hooks.append(mod.register_forward_hook(post))
        elif site == "resid_mid":

            def mid(m, args):
                store["act"] = args[0].clone()
                if write:
                    write(args[0])  # in place: the MLP's residual add uses this very tensor

            hooks.append(_get(blk, self.ln2).register_forward_pre_hook(mid))
        elif site == "z":

            def z(m, args):
                x = args[0].clone()
                view = x.view(*x.shape[:-1], self.H, self.dh)
                store["act"] = view.clone()
                if write:
                    write(view)
                return (x, *args[1:])

            hooks.append(_get(blk, self.out_proj).register_forward_pre_hook(z))
        elif site == "pattern":
            hooks.append(self._v(layer, store))
            hooks.append(
                _get(blk, self.attn).register_forward_hook(
                    lambda m, a, o: store.__setitem__("act", o[1].clone())
                )
            )

            def pz(m, args):
                if write:
                    x = args[0].clone()
                    view = x.view(*x.shape[:-1], self.H, self.dh)
                    write((view, store["v"]))
                    return (x, *args[1:])

            hooks.append(_get(blk, self.out_proj).register_forward_pre_hook(pz))
        try:
            with torch.no_grad():
                logits = self.hf(tokens[None], use_cache=False).logits[0]
        finally:
            for h in hooks:
                h.remove()
        return logits, store["act"]


def metrics_of(logits, answers, clean_logits):
    last, clean_last = logits[-1].double(), clean_logits[-1].double()
    lp, clp = last.log_softmax(-1), clean_last.log_softmax(-1)
    return torch.stack(
        [
            last[answers[0]] - last[answers[1]],
            lp[answers[0]],
            lp[answers[0]].exp(),
            (clp.exp() * (clp - lp)).sum(),
        ]
    ).float()


def reference_grid(model, sites, direction, layers, groups, heads=None, pairs=(CLEAN, CORRUPT, ANSWERS)):
    """[metric, pair, site, layer, group(, head)] raw metric values, one forward pass per patch."""
    ref = Reference(model)
    clean_t, corrupt_t = model.to_tokens(pairs[0]), model.to_tokens(pairs[1])
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in pairs[2]])
    group_of_kv = ref.H // ref.KV
    heads_axis = heads if heads is not None else [None]
    out = torch.zeros(4, len(clean_t), len(sites), len(layers), len(groups), len(heads_axis))
    for p in range(len(clean_t)):
        base, source = (corrupt_t[p], clean_t[p]) if direction == "denoising" else (clean_t[p], corrupt_t[p])
        clean_logits, _ = ref.run(clean_t[p], "resid_pre", 0)
        for si, site in enumerate(sites):
            for li, layer in enumerate(layers):
                _, src = ref.run(source, site, layer)
                for gi, group in enumerate(groups):
                    for hi, head in enumerate(heads_axis):
                        idx = list(group)

                        def write(x, idx=idx, head=head, src=src, site=site):
                            if site == "pattern":
                                z, v = x
                                for q in idx:
                                    z[0, q, head] = src[0, head, q] @ v[0, :, head // group_of_kv]
                            elif head is None:
                                x[0, idx] = src[0, idx]
                            else:
                                x[0, idx, head] = src[0, idx, head]

                        logits, _ = ref.run(base, site, layer, write)
                        out[:, p, si, li, gi, hi] = metrics_of(logits, answers[p], clean_logits)
    return out if heads is not None else out[..., 0]


def assert_matches(result: PatchingResult, expected: torch.Tensor):
    assert result.metrics[:4] == METRIC_NAMES
    torch.testing.assert_close(result.raw[:4], expected, atol=2e-5, rtol=1e-4)


# -- exact patching against the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_block_sites_match_reference(gpt2, direction):
    sites = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"]
    result = sweep(gpt2, *SHORT, site=sites, direction=direction, progress=False)
    n = gpt2.to_tokens(SHORT[0]).shape[1]
    assert result.raw.shape == (4, 2, 5, 2, n)
    expected = reference_grid(gpt2, sites, direction, [0, 1], [(t,) for t in range(n)], pairs=SHORT)
    assert_matches(result, expected)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_head_sites_match_reference(gpt2, direction):
    positions = [3, [9, 10], -1]
    result = sweep(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        site=["z", "pattern"],
        positions=positions,
        direction=direction,
        progress=False,
    )
    n = gpt2.to_tokens(CLEAN).shape[1]
    groups = [(3,), (9, 10), (n - 1,)]
    assert result.positions == tuple(groups) and result.heads == (0, 1, 2, 3)
    expected = reference_grid(gpt2, ["z", "pattern"], direction, [0, 1], groups, heads=[0, 1, 2, 3])
    assert_matches(result, expected)


def test_all_positions_and_chosen_layers_heads(gpt2):
    result = sweep(
        gpt2, CLEAN, CORRUPT, ANSWERS, site="z", layers=[1], heads=[2, 0], positions="all", progress=False
    )
    n = gpt2.to_tokens(CLEAN).shape[1]
    assert result.position_labels == ("all",) and result.layers == (1,) and result.heads == (2, 0)
    expected = reference_grid(gpt2, ["z"], "denoising", [1], [tuple(range(n))], heads=[2, 0])
    assert_matches(result, expected)


@pytest.mark.parametrize(
    "family, sites",
    [
        ("gpt_neox", ["resid_pre", "attn_out", "mlp_out", "resid_post"]),  # parallel attention and MLP
        ("llama", ["resid_pre", "resid_mid", "attn_out", "mlp_out"]),  # RMSNorm, grouped-query attention
        ("llama", ["z", "pattern"]),
    ],
)
def test_other_families_match_reference(family, sites):
    model = random_model(family, seed=2)
    positions = [2, 10, -1]
    result = sweep(model, CLEAN, CORRUPT, ANSWERS, site=sites, positions=positions, progress=False)
    n = model.to_tokens(CLEAN).shape[1]
    groups = [(2,), (10,), (n - 1,)]
    heads = list(range(model.cfg.n_heads)) if sites[0] in ("z", "pattern") else None
    assert_matches(result, reference_grid(model, sites, "denoising", [0, 1], groups, heads=heads))


def test_batching_does_not_change_numbers(gpt2):
    kwargs = dict(site=["resid_pre", "attn_out"], positions=[3, [9, 10], -1], progress=False)
    batched = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, **kwargs)
    one_at_a_time = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, batch_size=1, **kwargs)
    tight_budget = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, memory_budget=200_000, **kwargs)
    torch.testing.assert_close(batched.raw, one_at_a_time.raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.raw, tight_budget.raw, atol=1e-5, rtol=1e-5)
    assert one_at_a_time.provenance.options["batch_size"] == 1
    assert 1 < tight_budget.provenance.options["batch_size"] < batched.provenance.options["batch_size"]


# -- baselines and normalisation -------------------------------------------------------------------------------


def test_full_patch_restores_the_source_run(gpt2):
    """Patching every position of resid_pre at layer 0 turns the base run into the source run."""
    for direction, target in (("denoising", "clean"), ("noising", "corrupt")):
        r = sweep(
            gpt2, CLEAN, CORRUPT, ANSWERS, layers=[0], positions="all", direction=direction, progress=False
        )
        torch.testing.assert_close(r.raw[:, :, 0, 0, 0], getattr(r, target), atol=1e-5, rtol=1e-5)
        expected = 1.0 if target == "clean" else 0.0
        for m in ("logit_diff", "logprob", "prob"):
            assert r.values(m).item() == pytest.approx(expected, abs=1e-4)
            assert r.values(m, per_pair=True).flatten().tolist() == pytest.approx([expected] * 2, abs=1e-4)
    # positions where clean and corrupt agree are no-ops at layer 0 (causal attention: nothing earlier differs)
    r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[0], positions=[0, 1, 2], progress=False)
    torch.testing.assert_close(r.values("logit_diff"), torch.zeros(1, 1, 3), atol=1e-5, rtol=0)
    assert r.base_level() == 0.0 and r.base_level(normalize=False) == pytest.approx(
        r.corrupt[0].mean().item()
    )


def test_baselines_are_the_unpatched_runs(gpt2):
    r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[1], positions=[-1], progress=False)
    ref = Reference(gpt2)
    for p, (c, k) in enumerate(zip(gpt2.to_tokens(CLEAN), gpt2.to_tokens(CORRUPT))):
        answers = [gpt2.to_single_token(a) for a in ANSWERS[p]]
        clean_logits, _ = ref.run(c, "resid_pre", 0)
        corrupt_logits, _ = ref.run(k, "resid_pre", 0)
        torch.testing.assert_close(
            r.clean[:, p], metrics_of(clean_logits, answers, clean_logits), atol=2e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            r.corrupt[:, p], metrics_of(corrupt_logits, answers, clean_logits), atol=2e-5, rtol=1e-4
        )
    assert r.clean[3].abs().max() < 1e-6  # KL of the clean run to itself


def test_normalisation_formula_and_per_pair_views(gpt2):
    r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False)
    raw = r.raw[0]  # logit_diff [pair, site, layer, pos]
    clean, corrupt = r.clean[0], r.corrupt[0]
    expected_mean = (raw.mean(0) - corrupt.mean()) / (clean.mean() - corrupt.mean())
    torch.testing.assert_close(r.values(), expected_mean)
    expected_pairs = (raw - corrupt.view(2, 1, 1, 1)) / (clean - corrupt).view(2, 1, 1, 1)
    torch.testing.assert_close(r.values(per_pair=True), expected_pairs)
    torch.testing.assert_close(r.values(normalize=False), raw.mean(0))
    torch.testing.assert_close(r.spread(normalize=False), raw.std(0))
    assert r.dims == ("site", "layer", "position")


def test_unreliable_baselines_are_warned_about(gpt2):
    with pytest.warns(UserWarning, match="differ by only .*less than 1 logit"):
        r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[1], positions=[-1], progress=False)
    assert any("less than 1 logit" in w for w in r.warnings)  # a random model does not answer anything
    gap = (r.clean[0] - r.corrupt[0]).tolist()
    assert any("opposite sign" in w for w in r.warnings) == (gap[0] * gap[1] < 0)
    # the third pair is the first one reversed: its gap has the other sign
    c, k = CLEAN[0], CORRUPT[0]
    with pytest.warns(UserWarning, match="For pair 2 the clean - corrupt gap of logit_diff has the opposite"):
        sweep(gpt2, [c, c, k], [k, k, c], ANSWERS[0], layers=[1], positions=[-1], progress=False)


def test_equal_baselines_make_normalisation_an_error(gpt2):
    r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[1], positions=[-1], progress=False)
    same = dataclasses.replace(r, corrupt=r.clean.clone())
    with pytest.raises(InputError, match="baselines are equal.*undefined.*normalize=False"):
        same.values("logit_diff")
    with pytest.raises(InputError, match="pair 0"):
        same.values("logit_diff", per_pair=True)
    assert same.values("logit_diff", normalize=False).shape == (1, 1, 1)


# -- metrics ---------------------------------------------------------------------------------------------------


def test_user_metrics(gpt2):
    def answer_logit(logits, answers):
        return logits.gather(-1, answers[:, :1])[:, 0]

    def mean_entropy(logits, answers):  # needs every position
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean(-1)

    r = sweep(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        layers=[1],
        positions=[9, -1],
        metric=[answer_logit, Metric("entropy", mean_entropy, all_positions=True)],
        progress=False,
    )
    assert r.metric == "answer_logit" and r.metrics == (*METRIC_NAMES, "answer_logit", "entropy")
    ref = Reference(gpt2)
    n = gpt2.to_tokens(CLEAN).shape[1]
    for p, (c, k) in enumerate(zip(gpt2.to_tokens(CLEAN), gpt2.to_tokens(CORRUPT))):
        _, src = ref.run(c, "resid_pre", 1)
        for gi, t in enumerate([9, n - 1]):
            logits, _ = ref.run(k, "resid_pre", 1, lambda x, t=t, src=src: x.__setitem__((0, t), src[0, t]))
            a = gpt2.to_single_token(ANSWERS[p][0])
            assert r.raw[4, p, 0, 0, gi].item() == pytest.approx(logits[-1, a].item(), abs=1e-4)
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
            assert r.raw[5, p, 0, 0, gi].item() == pytest.approx(ent, abs=1e-4)
    # the built-ins are still there, and agree with a sweep that computes only last-position logits
    plain = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[1], positions=[9, -1], progress=False)
    torch.testing.assert_close(r.raw[:4], plain.raw, atol=1e-5, rtol=1e-5)


def test_metric_errors(gpt2):
    with pytest.raises(InputError, match="Unknown metric 'logitdiff'.*logit_diff"):
        sweep(gpt2, CLEAN, CORRUPT, ANSWERS, metric="logitdiff", progress=False)
    with pytest.raises(InputError, match="Two metrics are called 'kl'"):
        sweep(gpt2, CLEAN, CORRUPT, ANSWERS, metric=Metric("kl", lambda lg, a: lg[:, 0]), progress=False)


# -- attribution patching --------------------------------------------------------------------------------------


def reference_attribution(model, site, layer, direction):
    """Plain autograd: (source - base) . dM/da summed over d_model, [metric(3), pair, pos] for a block site."""
    ref = Reference(model)
    out = torch.zeros(3, len(CLEAN), model.to_tokens(CLEAN).shape[1])
    grads = {}

    def pre(m, args):
        args[0].retain_grad()
        grads["act"] = args[0]

    for p, (c, k) in enumerate(zip(model.to_tokens(CLEAN), model.to_tokens(CORRUPT))):
        base, source = (k, c) if direction == "denoising" else (c, k)
        _, src = ref.run(source, site, layer)
        a = [model.to_single_token(x) for x in ANSWERS[p]]
        for mi in range(3):
            h = ref.block(layer).register_forward_pre_hook(pre)
            try:
                logits = ref.hf(base[None], use_cache=False).logits[0, -1]
            finally:
                h.remove()
            lp = logits.log_softmax(-1)
            value = [logits[a[0]] - logits[a[1]], lp[a[0]], lp[a[0]].exp()][mi]
            value.backward()
            act = grads["act"]
            out[mi, p] = ((src[0] - act[0].detach()) * act.grad[0]).sum(-1)
            ref.hf.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_matches_autograd_reference(gpt2, direction):
    r = attribute(
        gpt2, CLEAN, CORRUPT, ANSWERS, site="resid_pre", layers=[1], direction=direction, progress=False
    )
    assert r.method == "attribution"
    base = r.corrupt if direction == "denoising" else r.clean
    estimate = r.raw[:3, :, 0, 0] - base[:3, :, None]
    torch.testing.assert_close(
        estimate, reference_attribution(gpt2, "resid_pre", 1, direction), atol=1e-4, rtol=1e-4
    )
    assert all(p.grad is None for p in gpt2.module.parameters())  # gradients never reach the weights


def test_attribution_grids_have_the_sweep_axes_and_track_it(gpt2):
    for site, kwargs in [
        ("resid_pre", {}),
        (["attn_out", "mlp_out"], {}),
        (["z", "pattern"], {"positions": "all"}),
    ]:
        exact = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site=site, progress=False, **kwargs)
        approx = attribute(gpt2, CLEAN, CORRUPT, ANSWERS, site=site, progress=False, **kwargs)
        assert approx.raw.shape == exact.raw.shape and approx.position_labels == exact.position_labels
        torch.testing.assert_close(approx.clean, exact.clean)
        comp = compare_attribution(exact, approx, top_k=5)
        assert -1 <= comp.pearson <= 1 and 0 <= comp.top_k_agreement <= 1 and comp.top_k == 5
        # a grid compared with itself agrees perfectly
        same = compare_attribution(exact, exact, top_k=5)
        assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
        assert same.top_k_agreement == 1.0
        frame = comp.to_frame()
        assert len(frame) == exact.raw[0, 0].numel() and {"exact", "attribution", "error"} <= set(
            frame.columns
        )
    # attribution of a z patch at every position is the sum of the per-position estimates (first order adds up)
    each = attribute(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", progress=False)
    every = attribute(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", positions="all", progress=False)
    base = each.corrupt[:, :, None, None, None, None]
    torch.testing.assert_close(
        (each.raw - base).sum(4), (every.raw - base)[:, :, :, :, 0], atol=1e-4, rtol=1e-4
    )


def test_compare_attribution_checks_axes(gpt2):
    a = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[0], progress=False)
    b = attribute(gpt2, CLEAN, CORRUPT, ANSWERS, layers=[1], progress=False)
    with pytest.raises(InputError, match="differ in layers"):
        compare_attribution(a, b)


# -- inputs and errors -----------------------------------------------------------------------------------------


def test_prompt_pairs_and_token_inputs(gpt2):
    from workbench.tasks import PromptPairs

    pairs = PromptPairs(
        clean=tuple(CLEAN),
        corrupt=tuple(CORRUPT),
        answers=tuple(ANSWERS),
        template=("t", "t"),
        info=({}, {}),
    )
    a = sweep(gpt2, pairs, layers=[1], progress=False)
    ids = torch.tensor([[gpt2.to_single_token(x) for x in p] for p in ANSWERS])
    b = sweep(gpt2, gpt2.to_tokens(CLEAN), gpt2.to_tokens(CORRUPT), ids, layers=[1], progress=False)
    torch.testing.assert_close(a.raw, b.raw)
    assert a.answers == tuple(ANSWERS) and a.clean_tokens[0][2] == "Mary"
    assert a.position_labels[2] == "2:Mary" and a.position_labels[10] == "10:John/Mary"  # word-level tokens
    assert b.answers == (("Mary", "John"), ("Tom", "Anna"))  # ids are decoded
    one = sweep(gpt2, CLEAN[0], CORRUPT[0], ANSWERS[0], layers=[1], positions=[-1], progress=False)
    assert one.n_pairs == 1


def test_length_mismatch_names_the_tokens(gpt2):
    with pytest.raises(
        InputError,
        match=r"Pair 1: the clean prompt has 15 tokens and the corrupt prompt 16; they first differ at position 10: clean 'Anna' vs corrupt 'Tom'",
    ):
        sweep(
            gpt2, CLEAN, [CORRUPT[0], CORRUPT[1].replace("Tom gave", "Tom Tom gave")], ANSWERS, progress=False
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"answers": (" Mary", " Mary John")}, InputError, r"Pair 0: ' Mary John' is 2 tokens.*single token"),
        ({"answers": " Mary"}, InputError, "answers must be .correct, incorrect."),
        ({"answers": (" Mary", " Mary")}, InputError, "same token"),
        ({"answers": None}, InputError, "Give answers"),
        ({"layers": [2]}, SiteError, r"Layer 2 is out of range.*0\.\.1"),
        ({"positions": [15]}, InputError, r"Position 15 is out of range.*15 tokens"),
        ({"positions": "every"}, InputError, "positions='every'"),
        ({"site": "z", "heads": [4]}, SiteError, r"Head 4 is out of range.*0\.\.3"),
        ({"heads": [0]}, SiteError, "heads= applies to per-head sites"),
        ({"site": ["resid_pre", "z"]}, SiteError, "mix per-head sites"),
        ({"site": "ln1"}, SiteError, "Cannot patch site 'ln1'.*Patchable sites"),
        ({"direction": "backwards"}, InputError, "direction='backwards'.*denoising.*noising"),
        ({"corrupt": CORRUPT[:1]}, InputError, "2 clean prompts but 1 corrupt"),
        ({"corrupt": CLEAN}, InputError, "identical"),
    ],
)
def test_bad_input_is_a_clear_error(gpt2, kwargs, error, match):
    args = {"corrupt": CORRUPT, "answers": ANSWERS} | kwargs
    corrupt, answers = args.pop("corrupt"), args.pop("answers")
    with pytest.raises(error, match=match):
        sweep(gpt2, CLEAN, corrupt, answers, progress=False, **args)
    with pytest.raises(error, match=match):
        attribute(gpt2, CLEAN, corrupt, answers, progress=False, **args)


def test_pairs_of_different_lengths_and_missing_resid_mid(gpt2):
    with pytest.raises(InputError, match="same token length.*pair 0: 15, pair 1: 9"):
        sweep(
            gpt2,
            [CLEAN[0], "When Tom and Anna went to the park"],
            [CORRUPT[0], "When Anna and Tom went to the park"],
            ANSWERS,
            progress=False,
        )
    neox = random_model("gpt_neox")
    with pytest.raises(SiteError, match="resid_mid.*does not exist"):
        sweep(neox, CLEAN, CORRUPT, ANSWERS, site="resid_mid", progress=False)
    with pytest.raises(InputError, match="Expected a WorkbenchModel.*load_model"):
        sweep(gpt2.module, CLEAN, CORRUPT, ANSWERS, progress=False)
    with pytest.raises(UnsupportedModelError, match="plain module"):
        sweep(load_model(torch.nn.Linear(2, 2)), CLEAN, CORRUPT, ANSWERS, progress=False)


# -- running: progress, cancel, remote serialisation -----------------------------------------------------------


def test_progress_and_cancel(gpt2):
    calls = []
    sweep(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        site=["resid_pre", "mlp_out"],
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls[-1] == (4, 4) and len(calls) == 4  # one trace per (site, layer)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        sweep(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False, cancel=token)


def test_remote_local_gives_the_same_numbers(gpt2, tmp_path):
    gpt2.module.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote="local")
    for site, kwargs in [
        ("resid_pre", {}),
        (["attn_out", "resid_mid"], {"layers": [1]}),
        (["z", "pattern"], {"layers": [1], "positions": [9, -1]}),
    ]:
        local = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site=site, progress=False, **kwargs)
        served = sweep(remote, CLEAN, CORRUPT, ANSWERS, site=site, progress=False, **kwargs)
        torch.testing.assert_close(served.raw, local.raw, atol=1e-5, rtol=1e-5)
    a_local = attribute(gpt2, CLEAN, CORRUPT, ANSWERS, site=["z", "pattern"], positions="all", progress=False)
    a_served = attribute(
        remote, CLEAN, CORRUPT, ANSWERS, site=["z", "pattern"], positions="all", progress=False
    )
    torch.testing.assert_close(a_served.raw, a_local.raw, atol=1e-5, rtol=1e-5)



def test_remote_sweeps_patch_within_one_batch_with_the_local_numbers(gpt2, tmp_path):
    """The dry run takes the remote path (patched rows copy activations from the clean and corrupt rows of the
    same batch): position groups, noising, several sites and pairs, a metric reading every position, and jobs
    split by a small batch size all give the local numbers."""

    def mean_entropy(logits, answers):
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean(-1)

    gpt2.module.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote="local")
    entropy = Metric("entropy", mean_entropy, all_positions=True)
    for kwargs in [
        {"site": ["resid_pre", "resid_post", "mlp_out"], "positions": [[3, 4], 9, -1], "direction": "noising"},
        {"site": "z", "positions": "together", "heads": [0, 2]},
        {"site": "resid_mid", "layers": [1], "metric": ["logit_diff", entropy]},
        {"site": "attn_out", "batch_size": 5},
    ]:
        local = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False, **kwargs)
        served = sweep(remote, CLEAN, CORRUPT, ANSWERS, progress=False, **kwargs)
        assert served.provenance.options["in_batch"], kwargs
        torch.testing.assert_close(served.raw, local.raw, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(served.clean, local.clean, atol=1e-5, rtol=1e-5)


# -- the result object -----------------------------------------------------------------------------------------


def test_result_frame_save_load_and_top(gpt2, tmp_path):
    r = sweep(
        gpt2, CLEAN, CORRUPT, ANSWERS, site=["resid_pre", "attn_out"], positions=[9, 10, -1], progress=False
    )
    frame = r.to_frame()
    assert len(frame) == 2 * 2 * 3
    assert {"site", "layer", "position", "positions", "logit_diff", "logit_diff_norm", "kl"} <= set(
        frame.columns
    )
    row = frame[(frame.site == "attn_out") & (frame.layer == 1) & (frame.positions == "14")].iloc[0]
    assert row.logit_diff_norm == pytest.approx(r.values()[1, 1, 2].item())
    per_pair = r.to_frame(per_pair=True)
    assert len(per_pair) == 2 * len(frame) and set(per_pair.pair) == {0, 1}
    heads = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", layers=[1], positions="all", progress=False)
    assert list(heads.to_frame()["head"]) == [0, 1, 2, 3]
    path = r.save(tmp_path / "grid.pt")
    loaded = PatchingResult.load(path)
    torch.testing.assert_close(loaded.raw, r.raw)
    assert loaded.position_labels == r.position_labels and loaded.provenance == r.provenance
    assert (
        loaded.provenance.options["clean"] == CLEAN and loaded.provenance.options["direction"] == "denoising"
    )
    top = r.top(3)
    assert len(top) == 3 and top.change.abs().is_monotonic_decreasing
    base = r.baselines()
    assert list(base.correct) == [" Mary", " Tom"] and "kl_corrupt" in base.columns
    assert "PatchingResult(exact, denoising" in repr(r)


# -- figures ---------------------------------------------------------------------------------------------------


def test_heatmap_figure(gpt2):
    from workbench.viz.patching import comparison, heatmap

    r = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site=["resid_pre", "attn_out"], progress=False)
    fig = r.plot()
    assert len(fig.data) == 2 and fig.data[0].type == "heatmap"
    trace = fig.data[0]
    assert list(trace.y) == ["L0", "L1"] and trace.x[2] == "2:Mary" and trace.x[10] == "10:John/Mary"
    values = r.values()[0].numpy()
    assert (trace.z == values).all()
    assert trace.zmid == 0.0 and trace.zmin == pytest.approx(-trace.zmax)
    assert trace.zmax >= abs(values).max() - 1e-6  # never clipped
    assert "value: %{z:.6g}" in trace.hovertemplate and "std over pairs" in trace.hovertemplate
    assert "normalised logit difference (0 = corrupt, 1 = clean)" in fig.data[1].colorbar.title.text
    assert tuple(trace.customdata[1][14][:3]) == (1, 14, -1)
    raw = heatmap(r, metric="kl", normalize=False, pair=1)
    assert (raw.data[0].z == r.values("kl", False, per_pair=True)[1, 0].numpy()).all()
    assert raw.data[0].zmid == pytest.approx(r.corrupt[3].mean().item()) and "pair 1" in raw.layout.title.text
    noising = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, direction="noising", layers=[1], progress=False)
    assert noising.plot().data[0].zmid == 1.0  # the unpatched (clean) run's level
    heads = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", positions="all", progress=False)
    h = heads.plot().data[0]
    assert list(h.x) == ["H0", "H1", "H2", "H3"] and list(h.y) == ["L0", "L1"]
    assert tuple(h.customdata[1][2][:3]) == (1, 0, 2)
    one_layer = sweep(
        gpt2, CLEAN, CORRUPT, ANSWERS, site="pattern", layers=[1], positions=[9, -1], progress=False
    )
    t = one_layer.plot().data[0]
    assert list(t.y) == ["H0", "H1", "H2", "H3"] and len(t.x) == 2
    assert tuple(t.customdata[3][1][:3]) == (1, 1, 3)
    comp = compare_attribution(
        heads, attribute(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", positions="all", progress=False)
    )
    scatter = comp.plot()
    assert scatter.data[0].type == "scatter" and "Pearson" in scatter.layout.title.text
    assert comparison(comp).data[-1].name == "y = x"


# -- the demo model: the picture's strongest cells are where the IOI circuit puts them --------------------------


@pytest.fixture(scope="module")
def demo():
    from workbench.demo_model import DEMO_DIR

    if not (DEMO_DIR / "config.json").exists():
        pytest.skip("the demo model has not been built in this checkout")
    return load_model("demo")


def test_demo_factual_recall_picture(demo):
    """Factual recall ("The capital of Veloria is" -> " Marrowby", corrupt: another country): the information
    enters at the subject token and has to reach the final position through attention."""
    from workbench.tasks import factual_pairs

    pairs = factual_pairs(phrasings="train").by_template()["fact/0"][:8]
    r = sweep(demo, pairs, site=["resid_pre", "attn_out", "mlp_out", "resid_post"], progress=False)
    assert (r.clean[0] > 1).all() and (
        r.corrupt[0] < -1
    ).all()  # the model knows the facts; the swap flips them
    assert not r.warnings
    grid = r.values()  # [site, layer, position]
    clean, corrupt = demo.to_tokens(list(pairs.clean)), demo.to_tokens(list(pairs.corrupt))
    subject = int((clean != corrupt).any(0).nonzero().squeeze())
    resid, attn, mlp, post = grid
    # layer 0: the subject token is all that differs; patching it there is running the clean prompt
    assert resid[0, subject] == pytest.approx(1.0, abs=1e-4) and resid[0].abs().sum() == pytest.approx(
        1.0, abs=1e-3
    )
    # the final position's last residual decides the answer alone
    assert post[-1, -1] == pytest.approx(1.0, abs=1e-4)
    # along the layers the information leaves the subject position for the final one
    assert resid[-1, -1] > resid[0, -1] + 0.2 and resid[-1, subject] < resid[0, subject] - 0.2
    # attention moves it: its strongest cell is at the final position
    assert int(attn.abs().flatten().argmax()) % attn.shape[1] == attn.shape[1] - 1


def test_demo_ioi_resid_pre_picture(demo):
    from workbench.tasks import ioi_pairs

    pairs = ioi_pairs(8, templates=0)
    r = sweep(demo, pairs, site="resid_pre", progress=False)
    gap = r.baseline("clean") - r.baseline("corrupt")
    assert gap > 1, (
        f"the demo model does not solve IOI (clean - corrupt logit difference {gap:.3f} < 1 logit)"
    )
    assert not r.warnings
    grid = r.values()[0]  # [layer, position], normalised logit difference
    clean, corrupt = demo.to_tokens(list(pairs.clean)), demo.to_tokens(list(pairs.corrupt))
    differ = (clean != corrupt).any(0)
    assert r.baseline("clean") > 0 > r.baseline("corrupt")  # the model solves the task; the swap flips it
    # layer 0: only the positions whose tokens differ can matter (nothing earlier differs)
    assert grid[0, ~differ].abs().max() < 1e-4 and grid[0, differ].max() > 0.5
    # the last layer: the answer has moved to the final position, which restores most of it on its own
    assert grid[-1].argmax() == grid.shape[1] - 1 and grid[-1, -1] > 0.5
    # and the name positions no longer matter there
    assert grid[-1, differ].abs().max() < 0.5 * grid[-1, -1]
