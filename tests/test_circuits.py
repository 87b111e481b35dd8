"""Circuit engines against independent plain-PyTorch implementations on the same weights (tiny GPT-2, NeoX and
Llama models built locally): path patching, edge attribution, AtP*, logit lens, DLA; plus results and errors."""

from __future__ import annotations

import pytest
import torch
from test_circuits_reference import Reference, logit_diff

from workbench.circuits import Graph, path_patch
from workbench.errors import InputError
from workbench.models.toy import random_model

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
