"""Circuit engines against independent plain-PyTorch implementations on the same weights (tiny GPT-2, NeoX and
Llama models built locally): path patching, edge attribution, AtP*, logit lens, DLA; plus results and errors."""

from __future__ import annotations

import pytest
import torch
from test_circuits_reference import Reference, get, logit_diff

from workbench.circuits import Graph, compare_directions, path_patch
from workbench.errors import InputError
from workbench.models.toy import random_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:For pair.*opposite sign:UserWarning"),
    pytest.mark.filterwarnings("ignore:A no-op patch:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two, and far faster on a busy machine (no waiting for a second)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLEAN = [
    "When Mary and John went to the store , John gave a drink to",
    "When Tom and Anna went to the park , Anna gave a book to",
]
CORRUPT = [
    "When Mary and John went to the store , Mary gave a drink to",
    "When Tom and Anna went to the park , Tom gave a book to",
]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna")]


@pytest.fixture(scope="module")
def gpt2():
    return random_model("gpt2", seed=1)


@pytest.fixture(scope="module")
def tokens(gpt2):
    answers = torch.tensor([[gpt2.to_single_token(a) for a in pair] for pair in ANSWERS])
    return gpt2.to_tokens(CLEAN), gpt2.to_tokens(CORRUPT), answers


def _slot(label: str) -> int:
    if label == "embed":
        return 0
    if label.startswith("MLP"):
        return 2 * int(label[3:]) + 2
    return 2 * int(label[1 : label.index("H")]) + 1


def _reads(label: str, n_layers: int, parallel: bool) -> int:
    if label == "logits":
        return 2 * n_layers
    if label.startswith("MLP"):
        return 2 * int(label[3:]) + (0 if parallel else 1)
    layer = int(label[1 : label.index("H") if "H" in label else label.index("K")])
    return 2 * layer


def _edges(model, senders, receivers):
    """(receiver, sender) label pairs that exist, by the residual-stream order (independent of Graph)."""
    c = model.cfg
    return [
        (r, s) for r in receivers for s in senders if _slot(s) <= _reads(r, c.n_layers, c.parallel_residual)
    ]


def reference_path_patch(model, senders, receivers, direction, positions=None, ref=None):
    """[pair] logit differences of the patched runs (one forward pass)."""
    ref = ref or Reference(model)
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    src, _ = ref.senders(source)
    logits = ref.edge_run(base, src, _edges(model, senders, receivers), positions)
    return logit_diff(logits, answers)


# -- path patching ---------------------------------------------------------------------------------------------


CASES = [  # (sender groups, receiver groups, direction, positions)
    (["embed", "L0H1", "MLP0", "L1H2"], ["logits", "MLP1", "L1H0.q", "L1H3.v", "L1H2"], "denoising", None),
    # MLP0 -> logits is read after L0H1's query was patched: the sender's value is this run's, not the base run's
    ([["embed", "MLP0"]], [["L0H1.q", "logits"]], "noising", None),
    (["L0H0", ["L0H2", "MLP0"]], ["MLP1", "L1H1.k", "logits"], "noising", [9, -1]),
]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_path_patching_matches_plain_pytorch(family):
    model = random_model(family, seed=2)
    ref = Reference(model)

    def kv(label):  # grouped-query attention: keys and values belong to kv heads
        return label.replace("L1H3.v", "L1KV1.v").replace("L1H1.k", "L1KV0.k") if family == "llama" else label

    for senders, receivers, direction, positions in CASES:
        receivers = [kv(r) if isinstance(r, str) else [kv(x) for x in r] for r in receivers]
        r = path_patch(
            model,
            CLEAN,
            CORRUPT,
            ANSWERS,
            senders=senders,
            receivers=receivers,
            direction=direction,
            positions=positions,
            progress=False,
            warn=False,
        )
        raw = r.raw[r.metric_index("logit_diff")]
        for si, s in enumerate(senders):
            for ri, rc in enumerate(receivers):
                sg = [s] if isinstance(s, str) else s
                rg = [rc] if isinstance(rc, str) else rc
                rg = [f"{x}.{w}" for x in rg for w in "qkv"] if rg == ["L1H2"] else rg
                if family == "llama" and rg == ["L1H2.q", "L1H2.k", "L1H2.v"]:
                    rg = ["L1H2.q", "L1KV1.k", "L1KV1.v"]
                if not _edges(model, sg, rg):
                    assert raw[:, si, ri].isnan().all()
                    continue
                want = reference_path_patch(model, sg, rg, direction, positions, ref)
                torch.testing.assert_close(
                    raw[:, si, ri], want, atol=1e-5, rtol=1e-5, msg=f"{family} {s} -> {rc}"
                )
        # the no-op check ran and passed
        torch.testing.assert_close(r.noop, r.clean, atol=1e-5, rtol=1e-5)


def test_path_patching_baselines_and_batching(gpt2):
    a = path_patch(
        gpt2, CLEAN, CORRUPT, ANSWERS, senders="heads", receivers="qkv", progress=False, warn=False
    )
    b = path_patch(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        senders="heads",
        receivers="qkv",
        batch_size=3,
        progress=False,
        warn=False,
    )
    torch.testing.assert_close(a.raw, b.raw, equal_nan=True)
    assert a.raw.shape == (4, 2, 8, 4 * 3 * 2)
    # layer-0 receivers never read heads; layer-1 receivers read layer-0 heads only
    assert a.raw[:, :, :, :12].isnan().all() and a.raw[:, :, 4:, 12:].isnan().all()
    assert not a.raw[:, :, :4, 12:].isnan().any()
    ref = Reference(gpt2)
    for logits, half in (
        (ref.senders(gpt2.to_tokens(CLEAN))[1], a.clean),
        (ref.senders(gpt2.to_tokens(CORRUPT))[1], a.corrupt),
    ):
        answers = torch.tensor([[gpt2.to_single_token(x) for x in pair] for pair in ANSWERS])
        torch.testing.assert_close(half[0], logit_diff(logits, answers), atol=1e-5, rtol=1e-5)


def test_patching_every_edge_into_the_logits_gives_the_source_run(gpt2):
    """Every sender into the logits at once: the final residual becomes the source run's, so the logits do."""
    r = path_patch(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        senders=[[s.label for s in Graph.of(gpt2).senders]],
        receivers="logits",
        progress=False,
        warn=False,
    )
    torch.testing.assert_close(r.raw[:, :, 0, 0], r.clean, atol=1e-4, rtol=1e-4)


def test_graph_labels_and_errors(gpt2):
    g = Graph.of(gpt2)
    assert len(g.senders) == 1 + 2 * (4 + 1) and len(g.receivers) == 2 * (3 * 4 + 1) + 1
    assert g.n_edges == int(g.adjacency.sum())
    assert g.resolve_receivers("L1H2") == (
        (g.receiver_index("L1H2.q"), g.receiver_index("L1H2.k"), g.receiver_index("L1H2.v")),
    )
    assert len(g.resolve_senders("layer 1")) == 5
    with pytest.raises(InputError, match="Unknown sender 'L9'"):
        g.resolve_senders("L9")
    with pytest.raises(InputError, match="layer 7 is out of range"):
        g.resolve_receivers("L7H0.q")
    with pytest.raises(InputError, match="head 9 is out of range"):
        g.resolve_senders(["L0H9"])
    with pytest.raises(InputError, match="twice"):
        g.resolve_senders(["L0H1", "L0H1"])
    llama = Graph.of(random_model("llama", seed=0))
    assert "L0KV1.k" in [r.label for r in llama.receivers]


# -- edge attribution --------------------------------------------------------------------------------------------


def _reference_eap(model, direction, steps=None):
    """[pair, receiver label, sender label] scores by plain autograd: (source - base) . dM/d(receiver input)."""
    from test_circuits_reference import receiver_grads

    ref = Reference(model)
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    src, _ = ref.senders(source)
    bse, _ = ref.senders(base)
    if steps is None:
        grads = receiver_grads(ref, base, answers)
    else:
        grads = {}
        for k in range(steps):
            alpha = (k + 0.5) / steps
            g = receiver_grads(ref, base, answers, embed=bse["embed"] + alpha * (src["embed"] - bse["embed"]))
            for key, v in g.items():
                grads[key] = grads.get(key, 0) + v / steps
    return {(r, s): (grads[r] * (src[s] - bse[s])).sum((-1, -2)) for r in grads for s in src}


@pytest.mark.parametrize(
    "family,method,direction",
    [("gpt2", "eap", "noising"), ("llama", "eap", "denoising"), ("gpt_neox", "eap-ig", "noising")],
)
def test_edge_attribution_equals_the_autograd_product(family, method, direction):
    from workbench.circuits import edge_attribution

    model = random_model(family, seed=2)
    steps = 3 if method == "eap-ig" else None
    got = edge_attribution(
        model,
        CLEAN,
        CORRUPT,
        ANSWERS,
        method=method,
        steps=steps or 1,
        direction=direction,
        progress=False,
        warn=False,
    )
    want = _reference_eap(model, direction, steps)
    checked = 0
    for r, rl in enumerate(got.receivers):
        for s, sl in enumerate(got.senders):
            if got.adjacency[r, s]:
                torch.testing.assert_close(
                    got.scores[:, r, s], want[(rl, sl)], atol=1e-5, rtol=1e-4, msg=f"{sl} -> {rl}"
                )
                checked += 1
            else:
                assert (got.scores[:, r, s] == 0).all()
    assert checked == got.n_edges == Graph.of(model).n_edges


def test_exact_edge_scores_are_single_edge_path_patches(gpt2):
    from workbench.circuits import edge_attribution

    exact = edge_attribution(
        gpt2, CLEAN, CORRUPT, ANSWERS, method="exact", direction="denoising", progress=False, warn=False
    )
    for sender, receiver in [("embed", "L0H1.k"), ("L0H2", "L1H0.v"), ("MLP0", "logits"), ("L1H3", "MLP1")]:
        pp = path_patch(
            gpt2, CLEAN, CORRUPT, ANSWERS, senders=sender, receivers=receiver, progress=False, warn=False
        )
        change = pp.raw[0, :, 0, 0] - pp.corrupt[0]
        r, s = exact.receivers.index(receiver), exact.senders.index(sender)
        torch.testing.assert_close(exact.scores[:, r, s], change, atol=1e-5, rtol=1e-5)


def test_eap_ig_completeness_error_shrinks_with_steps(gpt2):
    """Integrated gradients are complete: the embedding's edges together carry M(source) - M(base). Their
    EAP-IG scores sum to that in the limit of many steps (midpoint rule: error ~ 1 / steps^2)."""
    from workbench.circuits import edge_attribution

    errors = []
    for steps in (1, 4, 16):
        s = edge_attribution(
            gpt2, CLEAN, CORRUPT, ANSWERS, method="eap-ig", steps=steps, progress=False, warn=False
        )
        total = s.scores[:, :, 0].sum(-1)  # every edge out of the embedding, per pair
        want = s.corrupt[0] - s.clean[0]  # noising: the corrupt run minus the clean run
        errors.append(float((total - want).abs().max()))
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4, errors
    assert errors[2] < 1e-3 * float((s.clean[0] - s.corrupt[0]).abs().max()), errors


def test_faithfulness_runs_circuits_exactly(gpt2):
    from workbench.circuits import edge_attribution, faithfulness

    scores = edge_attribution(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False)
    exact = edge_attribution(gpt2, CLEAN, CORRUPT, ANSWERS, method="exact", progress=False, warn=False)
    f = faithfulness(gpt2, scores, ks=[0, 3, 10, scores.n_edges], verify=5, progress=False)
    raw = f.circuit_values[0]  # [pair, k]
    torch.testing.assert_close(raw[:, 0], f.corrupt[0], atol=1e-5, rtol=1e-5)  # nothing kept: the corrupt run
    torch.testing.assert_close(raw[:, -1], f.clean[0], atol=1e-6, rtol=1e-6)  # everything kept: the clean run
    # the verified edges are their exact scores
    for s_label, r_label, value in zip(f.verified_senders, f.verified_receivers, f.verified_exact):
        r, s = exact.receivers.index(r_label), exact.senders.index(s_label)
        assert float(value) == pytest.approx(float(exact.scores[:, r, s].mean()), abs=1e-5)
    # a circuit of k edges: the clean run with every other edge patched from the corrupt run
    kept = scores.circuit(3)
    outside = [
        [s, r]
        for r_i, s_i, _ in scores.edge_list()[3:]
        for s, r in [(scores.senders[s_i], scores.receivers[r_i])]
    ]
    assert len(kept) == 3 and len(outside) == scores.n_edges - 3
    assert f.curve().shape == (4,) and f.curve()[-1] == pytest.approx(1.0)


# -- AtP* --------------------------------------------------------------------------------------------------------


class _Centre(torch.nn.Module):
    """A final norm without the per-token scale: exactly linear."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.bias = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias


def _linear_tail(family):
    """A tiny model whose metric is linear in its last layer's attention patterns: that layer's MLP is zeroed and
    the final norm has no per-token scale. Attention is sharpened so that linearising the softmax is poor."""
    from transformers import AutoModelForCausalLM

    from workbench.models import load_model
    from workbench.models.toy import random_config, toy_tokenizer

    cfg = random_config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(4)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    blocks, parent, name = {
        "gpt2": ("transformer.h", "transformer", "ln_f"),
        "llama": ("model.layers", "model", "norm"),
        "gpt_neox": ("gpt_neox.layers", "gpt_neox", "final_layer_norm"),
    }[family]
    last = hf.get_submodule(blocks)[-1]
    attn = {"gpt2": "attn", "llama": "self_attn", "gpt_neox": "attention"}[family]
    with torch.no_grad():
        for p in last.mlp.parameters():
            p.zero_()
        for p in getattr(last, attn).parameters():
            p.mul_(4.0)
    setattr(hf.get_submodule(parent), name, _Centre(cfg.hidden_size))
    return load_model(hf, toy_tokenizer())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_qk_fix_is_exact_where_the_metric_is_linear_in_the_pattern(family):
    """One query or one key patched, the metric linear in the pattern: the QK fix recomputes the softmax exactly, so
    AtP* equals exact patching; plain AtP (the linearised softmax) does not."""
    from workbench.circuits import atp_star

    model = _linear_tail(family)
    last = model.cfg.n_layers - 1
    r = atp_star(model, CLEAN, CORRUPT, ANSWERS, exact=True, graddrop=False, progress=False, warn=False)
    for ki in (0, 1):  # queries, keys
        exact, fixed, plain = r.exact[:, ki, last], r.atp_qk[:, ki, last], r.atp[:, ki, last]
        mask = ~exact.isnan()
        scale = float(exact[mask].abs().max())
        assert scale > 0
        assert (
            float((fixed - exact)[mask].abs().max()) < 1e-4 * scale + 1e-8
        )  # float32 rounding of the logits
        if ki == 1:
            assert float((plain - exact)[mask].abs().max()) > 1e-2 * scale


def _reference_atp(model, direction, drop=None):
    """[pair, kind, layer, pos, head] plain AtP by autograd on the HF module (values through hooks); with `drop`
    the gradient through that block's residual contribution is stopped."""
    ref = Reference(model)
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)

    def run(tokens, grad):
        store, handles = {}, []
        for layer in range(ref.L):
            for which in "qkv":
                proj = ref.proj_module(layer, which)
                n = ref.H if which == "q" else ref.KV

                def keep(m, a, o, which=which, layer=layer, n=n):
                    store[(which, layer)] = torch.stack([ref.proj_slice(o, which, h) for h in range(n)], 2)
                    if grad:
                        o.retain_grad()
                        store[(which, layer, "out")] = o

                if which == "q" or len(ref.qkv) == 3:
                    handles.append(proj.register_forward_hook(keep))
                else:  # one fused projection serves q, k and v
                    handles.append(proj.register_forward_hook(lambda m, a, o, keep=keep: keep(m, a, o)))
            mlp = get(ref.block(layer), ref.mlp)

            def keep_mlp(m, a, o, layer=layer):
                out = o[0] if isinstance(o, tuple) else o
                store[("mlp", layer)] = out
                if grad:
                    out.retain_grad()

            handles.append(mlp.register_forward_hook(keep_mlp))
            if drop == layer:
                handles.append(
                    ref.block(layer).register_forward_hook(
                        lambda m, a, o: (
                            a[0] + (o - a[0]).detach()
                            if not isinstance(o, tuple)
                            else (a[0] + (o[0] - a[0]).detach(), *o[1:])
                        )
                    )
                )
        try:
            with torch.set_grad_enabled(grad):
                logits = ref.hf(tokens, use_cache=False).logits
                if grad:
                    logit_diff(logits, answers).sum().backward()
        finally:
            for h in handles:
                h.remove()
        return store

    b, s = run(base, True), run(source, False)
    c = model.cfg
    out = torch.full((2, 4, c.n_layers, base.shape[1], c.n_heads), float("nan"))
    for layer in range(c.n_layers):
        for ki, which in enumerate("qkv"):
            o = b[(which, layer, "out")]
            n = ref.H if which == "q" else ref.KV
            g = (
                torch.stack([ref.proj_slice(o.grad, which, h) for h in range(n)], 2)
                if o.grad is not None
                else torch.zeros_like(b[(which, layer)])
            )
            out[:, ki, layer, :, :n] = ((s[(which, layer)] - b[(which, layer)]) * g).sum(-1)
        g = b[("mlp", layer)].grad
        g = torch.zeros_like(b[("mlp", layer)]) if g is None else g
        out[:, 3, layer, :, 0] = ((s[("mlp", layer)] - b[("mlp", layer)]) * g).sum(-1)
    return out.detach()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_atp_and_graddrop_equal_plain_autograd(family):
    from workbench.circuits import atp_star

    model = random_model(family, seed=5)
    r = atp_star(model, CLEAN, CORRUPT, ANSWERS, qk_fix=False, progress=False, warn=False)
    torch.testing.assert_close(r.atp, _reference_atp(model, "noising"), atol=1e-6, rtol=1e-4, equal_nan=True)
    drops = [_reference_atp(model, "noising", drop=layer).abs() for layer in range(model.cfg.n_layers)]
    want = torch.stack(drops).nan_to_num(0).sum(0) / (model.cfg.n_layers - 1)
    torch.testing.assert_close(r.graddrop.nan_to_num(0), want, atol=1e-6, rtol=1e-4)


def test_atp_verify_is_exact_patching_of_the_top_nodes(gpt2):
    from workbench.circuits import atp_star, verify

    full = atp_star(gpt2, CLEAN, CORRUPT, ANSWERS, exact=True, progress=False, warn=False)
    fast = atp_star(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False)
    checked = verify(gpt2, fast, n=6, progress=False)
    measured = ~checked.exact[0].isnan()
    assert int(measured.sum()) == 6
    top = fast.ranking("atp*")[:6]
    assert all(bool(measured[n]) for n in top)
    torch.testing.assert_close(checked.exact[:, measured], full.exact[:, measured], atol=1e-5, rtol=1e-5)
    table = full.compare(k=10)
    assert list(table.method) == ["atp", "atp+qk", "atp*"] and table["top10_recall"].between(0, 1).all()
    with pytest.raises(InputError, match="Too few nodes"):
        fast.compare()


# -- logit lens, DLA, attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_logit_lens_last_row_is_the_output_and_dla_adds_up(family):
    from workbench.circuits import direct_logit_attribution, logit_lens

    model = random_model(family, seed=1)
    tokens = model.to_tokens(CLEAN)
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    lens = logit_lens(model, CLEAN, ANSWERS, k=3, progress=False)
    with torch.no_grad():
        logits = model.module(tokens, use_cache=False).logits
    # the top token's logit is the maximum (ties, e.g. at a zero padding embedding, may pick another index)
    torch.testing.assert_close(logits.gather(-1, lens.top_ids[:, -1, :, :1])[..., 0], logits.max(-1).values)
    torch.testing.assert_close(
        lens.top_probs[:, -1, :, 0], logits.softmax(-1).max(-1).values, atol=1e-5, rtol=1e-4
    )
    diff = (
        logits.gather(-1, answers[:, None, :1].expand(-1, tokens.shape[1], -1))[..., 0]
        - logits.gather(-1, answers[:, None, 1:].expand(-1, tokens.shape[1], -1))[..., 0]
    )
    torch.testing.assert_close(lens.logit_diff[:, -1], diff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        lens.correct_rank[:, -1],
        (logits > logits.gather(-1, answers[:, None, :1].expand(-1, tokens.shape[1], -1))).sum(-1),
    )
    dla = direct_logit_attribution(model, CLEAN, ANSWERS, progress=False)
    assert dla.residual_error() < 1e-4
    assert dla.per_head == (family != "gemma2") and "scale frozen" in dla.note
    if family == "gemma2":
        assert "soft-cap" in dla.note
    else:
        torch.testing.assert_close(dla.total, diff[:, -1], atol=1e-4, rtol=1e-4)


def test_dla_equals_each_parts_frozen_scale_share(gpt2):
    """Each head's DLA, computed independently: its z @ W_O through the final LayerNorm with the run's scale."""
    from workbench.circuits import direct_logit_attribution

    ref = Reference(gpt2)
    tokens = gpt2.to_tokens(CLEAN)
    answers = torch.tensor([[gpt2.to_single_token(a) for a in pair] for pair in ANSWERS])
    store, final = ref.senders(tokens)[0], {}
    lnf = get(ref.hf, ref.lnf)
    h = lnf.register_forward_pre_hook(lambda m, a: final.__setitem__("x", a[0]))
    with torch.no_grad():
        ref.hf(tokens, use_cache=False)
    h.remove()
    x = final["x"][:, -1]
    sigma = (x.var(-1, unbiased=False) + lnf.eps).sqrt()
    u = ref.hf.lm_head.weight[answers[:, 0]] - ref.hf.lm_head.weight[answers[:, 1]]
    dla = direct_logit_attribution(gpt2, CLEAN, ANSWERS, progress=False)
    for label in ("L0H1", "L1H3", "MLP0"):
        part = store[label][:, -1]
        want = (((part - part.mean(-1, keepdim=True)) / sigma[:, None]) * lnf.weight * u).sum(-1)
        torch.testing.assert_close(
            dla.contributions[:, dla.parts.index(label)], want.detach(), atol=1e-5, rtol=1e-4
        )


def test_attention_patterns_have_tokens_on_both_axes(gpt2):
    from workbench.circuits import attention_patterns

    a = attention_patterns(gpt2, CLEAN[0], heads=["L1H2", (0, 3)])
    assert a.heads == ("L1H2", "L0H3") and a.pattern.shape == (2, len(a.tokens), len(a.tokens))
    torch.testing.assert_close(a.pattern.sum(-1), torch.ones(2, len(a.tokens)))
    assert torch.equal(a.pattern.triu(1), torch.zeros_like(a.pattern))
    with pytest.raises(InputError, match="does not exist"):
        attention_patterns(gpt2, CLEAN[0], heads=[(5, 0)])


# -- remote: nnsight's serialising dry run ---------------------------------------------------------------------


def test_remote_dry_run_gives_the_local_numbers(gpt2, tmp_path):
    from workbench.circuits import direct_logit_attribution, edge_attribution, logit_lens
    from workbench.models import load_model

    gpt2.module.save_pretrained(tmp_path)
    gpt2.tokenizer.save_pretrained(tmp_path)
    dry = load_model(str(tmp_path), remote="local")
    kwargs = dict(
        senders=["L0H1", "MLP0"], receivers=["L1H2.q", "MLP1", "logits"], progress=False, warn=False
    )
    local = path_patch(gpt2, CLEAN, CORRUPT, ANSWERS, **kwargs)
    served = path_patch(dry, CLEAN, CORRUPT, ANSWERS, **kwargs)
    torch.testing.assert_close(served.raw, local.raw, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(
        logit_lens(dry, CLEAN, ANSWERS, progress=False).logit_diff,
        logit_lens(gpt2, CLEAN, ANSWERS, progress=False).logit_diff,
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        direct_logit_attribution(dry, CLEAN, ANSWERS, progress=False).contributions,
        direct_logit_attribution(gpt2, CLEAN, ANSWERS, progress=False).contributions,
        atol=1e-5,
        rtol=1e-5,
    )
    e_local = edge_attribution(gpt2, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False)
    e_dry = edge_attribution(dry, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False)
    torch.testing.assert_close(e_dry.scores, e_local.scores, atol=1e-5, rtol=1e-4)


# -- guards ----------------------------------------------------------------------------------------------------


def test_guards_say_what_is_wrong(gpt2):
    from workbench.circuits import guards
    from workbench.patching import sweep

    # training mode with dropout: patched runs are noisy, and the no-op check catches it
    model = random_model("gpt2", seed=1, resid_pdrop=0.5)
    model.module.train()
    try:
        with pytest.warns(UserWarning, match="training mode with dropout active"):
            r = path_patch(
                model,
                CLEAN,
                CORRUPT,
                ANSWERS,
                senders="heads",
                receivers=["L1H0.q", "logits"],
                progress=False,
            )
        assert any("no-op patch" in w for w in r.warnings)  # layer 1 reruns, with another dropout mask
    finally:
        model.module.eval()
    r = path_patch(
        model, CLEAN, CORRUPT, ANSWERS, senders="heads", receivers="logits", progress=False, warn=False
    )
    assert not any("no-op" in w or "training" in w for w in r.warnings)
    # baselines: random weights barely tell the answers apart
    assert any("less than 1 logit" in w for w in r.warnings)
    # misaligned prompts: the corrupt prompt shifted by one token
    clean = gpt2.to_str_tokens(CLEAN[0])
    assert guards.misaligned([clean], [clean[1:] + ["to"]])[0].startswith(
        "Pair 0: the corrupt prompt is the clean prompt shifted"
    )
    assert guards.misaligned([clean], [clean]) == []
    # noising and denoising that disagree are listed, not averaged away
    den = sweep(gpt2, CLEAN, CORRUPT, ANSWERS, site="z", positions="together", progress=False, warn=False)
    noi = sweep(
        gpt2,
        CLEAN,
        CORRUPT,
        ANSWERS,
        site="z",
        positions="together",
        direction="noising",
        progress=False,
        warn=False,
    )
    message = compare_directions(den, noi, threshold=0.0)
    assert message and "disagree strongly" in message[0] and "denoising" in message[0]
    assert compare_directions(den, noi, threshold=1e9) == []


# -- TransformerLens 4.3, where it implements the same method ------------------------------------------------


def test_transformer_lens_gives_the_same_eap_and_dla():
    """TL's edge attribution (denoising, per position: summed here) and its per-head DLA on a TransformerBridge over
    a copy of the same weights (skipped without transformer_lens)."""
    import copy

    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch
    from transformer_lens.tools.analysis.direct_logit_attribution import direct_logit_attribution as tl_dla

    from workbench.circuits import direct_logit_attribution, edge_attribution
    from workbench.models.toy import toy_tokenizer

    model = random_model("gpt2", seed=2)
    tok = toy_tokenizer()
    tok.init_kwargs.update(name_or_path="toy", add_bos_token=True)
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=copy.deepcopy(model.module), tokenizer=tok, device="cpu"
    )
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    answers = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    writer = {
        "embed": lambda n: "embed",
        "attn_head_out": lambda n: f"L{n.layer}H{n.head}",
        "mlp_out": lambda n: f"MLP{n.layer}",
    }
    reader = {
        "q_input": lambda n: f"L{n.layer}H{n.head}.q",
        "k_input": lambda n: f"L{n.layer}H{n.head}.k",
        "v_input": lambda n: f"L{n.layer}H{n.head}.v",
        "mlp_in": lambda n: f"MLP{n.layer}",
        "logits": lambda n: "logits",
    }
    ours = edge_attribution(model, CLEAN, CORRUPT, ANSWERS, direction="denoising", progress=False, warn=False)
    theirs = torch.zeros_like(ours.scores)
    for p in range(len(CLEAN)):
        a = answers[p]
        result = attribution_patch(
            bridge,
            clean[p : p + 1],
            corrupt[p : p + 1],
            lambda lg, a=a: lg[0, -1, a[0]] - lg[0, -1, a[1]],
            EdgeAttributionConfig(granularity="edge"),
        )
        for (w, r), value in result.edge_scores.items():
            theirs[p, ours.receivers.index(reader[r.kind](r)), ours.senders.index(writer[w.kind](w))] += value
    torch.testing.assert_close(ours.scores, theirs, atol=1e-6, rtol=1e-4)
    bridge.enable_compatibility_mode()  # folds the final norm into the unembedding, as TL's DLA requires
    tl = tl_dla(bridge, clean, answer_tokens=answers[:, 0], incorrect_tokens=answers[:, 1], unit="head")
    dla = direct_logit_attribution(model, CLEAN, ANSWERS, progress=False)
    for label, values in zip(tl.labels, tl.attribution):
        if label in dla.parts:
            torch.testing.assert_close(
                dla.contributions[:, dla.parts.index(label)], values.float(), atol=1e-6, rtol=1e-4
            )
