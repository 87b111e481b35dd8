"""The Local Interaction Basis engine: a hand-computable model against a dense reference, the research note's
sanity checks, the authors' checkpoints, and their committed seed-0 results (research note, section 5).

Tolerances against the authors' numbers are the rounding of the digits the note prints, except where stated with
the difference we measured.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from workbench.core import CancelToken
from workbench.errors import Cancelled, InputError, ModelLoadError
from workbench.lib import (
    PAPER,
    EdgeAblation,
    LibData,
    LibModel,
    build_graph,
    communities,
    edge_ablation,
    edge_attributions,
    feature_activations,
    fourier_labels,
    lm_data,
    lm_sections,
    load_mnist_mlp,
    load_modadd,
    mnist_data,
    modadd_data,
    node_ablation,
)
from workbench.lib import data as lib_data
from workbench.lib.ablations import base_score, exponential_schedule
from workbench.lib.build import float64_twin
from workbench.lib.linalg import integration_points
from workbench.results import load_result


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread (restored afterwards): these engines run many small operations, which gain little from a
    second thread and slow down badly when threads compete with other work for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# a model small enough to write every Jacobian by hand


class Tiny(LibModel):
    """in [N, 2 positions, 3 (+1)] -> hidden [N, 1, 2 (+1)] = tanh(sum_s x_s W_s + c b) -> logits [N, 1, 2]."""

    kind = "tiny"
    node_layers = ("in", "hidden", "output")

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(2, 3, 2, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64) * 0.5)
        self.W2 = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))
        self.b2 = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        self.code = "Tiny()"

    def node_input(self, x):
        return torch.cat([x.to(self.dtype), torch.ones(*x.shape[:-1], 1, dtype=self.dtype)], -1)

    def section(self, i, f):
        x, c = f[..., :-1], f[..., -1:]
        if i == 0:
            pre = torch.einsum("nsj,sjk->nk", x, self.W) + c[:, -1] * self.b
            return torch.cat([torch.tanh(pre), c[:, -1]], -1)[:, None]
        return x @ self.W2 + c * self.b2


def tiny_data(n: int = 40, seed: int = 1) -> LibData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    x[:, :, 2] = x[:, :, 0] - 0.5 * x[:, :, 1] + 0.3  # a direction of zero variance: truncated
    y = torch.randint(0, 2, (n,), generator=g)
    return LibData(x, y, "tiny", "tiny_data()")


def dense_reference(model: Tiny, x: np.ndarray, method: str, n_intervals: int, eps: float = 1e-15):
    """The LIB basis and edges of `Tiny`, written out with numpy and analytic Jacobians (no autograd)."""
    W, b = model.W.detach().numpy(), model.b.detach().numpy()
    W2, b2 = model.W2.detach().numpy(), model.b2.detach().numpy()
    N = len(x)
    f0 = np.concatenate([x, np.ones((N, 2, 1))], -1)  # [N, 2, 4]

    def hidden(f):  # f [N, 2, 4] -> [N, 3], and d hidden / d f [N, 3, 2, 4]
        pre = np.einsum("nsj,sjk->nk", f[..., :3], W) + f[:, 1, 3:4] * b
        h = np.tanh(pre)
        J = np.zeros((len(f), 3, 2, 4))
        d = 1 - h**2
        for k in range(2):
            J[:, k, :, :3] = d[:, k, None, None] * W[None, :, :, k]
            J[:, k, 1, 3] = d[:, k] * b[k]
        J[:, 2, 1, 3] = 1.0
        return np.concatenate([h, f[:, 1, 3:4]], -1), J

    f1, _ = hidden(f0)
    G_out = np.concatenate([W2, b2[None]], 0)  # logits = f1 @ G_out, [3, 2]
    points = integration_points(method, n_intervals)

    def basis(f, jac_rows):  # f [M, d] (rows over data and positions), jac_rows [R, d] gradients
        mu = f.mean(0)
        S = np.eye(len(mu))
        S[-1, :-1] = -mu[:-1]
        S_inv = np.eye(len(mu))
        S_inv[-1, :-1] = mu[:-1]
        fc = f @ S
        D, U = np.linalg.eigh(fc.T @ fc / len(f))
        D = np.abs(D)
        order = np.argsort(-D)
        D, U = D[order], U[:, order]
        c = [i for i in range(len(D)) if abs(U[-1, i]) > 1e-6 and D[i] > 1e-6]
        assert len(c) == 1
        order = c + [i for i in range(len(D)) if i != c[0]]
        D, U = D[order], U[:, order]
        keep = D > eps
        D, U = D[keep], U[:, keep]
        R = S @ U @ np.diag(D**-0.5)
        Rp = np.diag(D**0.5) @ U.T @ S_inv
        M = Rp @ jac_rows @ Rp.T
        lam, V = np.linalg.eigh(M[1:, 1:])
        order = np.argsort(-np.abs(lam))
        lam, V = np.abs(lam[order]), V[:, order]
        Vf = np.zeros_like(M)
        Vf[0, 0] = 1
        Vf[1:, 1:] = V
        lam = np.concatenate([[M[0, 0]], lam])
        kept = np.concatenate([[True], lam[1:] >= eps])
        lam, Vf = lam[kept], Vf[:, kept]
        return R @ Vf @ np.diag(lam**0.5), np.diag(lam**-0.5) @ Vf.T @ Rp, lam

    # hidden layer: gradients of the two logits, constant over data
    M1 = G_out @ G_out.T  # sum over outputs of g g^T, averaged over N examples x 1 position
    C1, C1p, lam1 = basis(f1, M1)
    # input layer: integrated Jacobian of f_hat1 = hidden(f) @ C1 w.r.t. f, per position
    Jint = sum(w * hidden(a * f0)[1] for a, w in points)  # [N, 3, 2, 4]
    g = np.einsum("mi,nmsd->nisd", C1, Jint)  # [N, k1, 2, 4]
    M0 = np.einsum("nisd,nise->de", g, g) / (N * 2)
    C0, C0p, lam0 = basis(f0.reshape(-1, 4), M0)
    # edges: Jacobians in the bases, at alpha * f_hat, times f_hat
    fh0 = f0 @ C0  # [N, 2, k0]
    fr0 = fh0 @ C0p  # the reconstructed input
    Jh0 = sum(w * np.einsum("mi,nmsd,jd->nisj", C1, hidden(a * fr0)[1], C0p) for a, w in points)
    E0 = (np.einsum("nisj,nsj->nij", Jh0, fh0) ** 2).sum(0) / (N * 2)
    fh1 = f1 @ C1
    Jh1 = (C1p @ G_out).T  # [2 logits, k1], linear
    E1 = (np.einsum("ij,nj->nij", Jh1, fh1) ** 2).sum(0) / N
    return {"C": [C0, C1], "lam": [lam0, lam1], "E": [E0, E1]}


def _align(C: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    """C's columns with the sign of the reference's (eigenvectors are defined up to sign)."""
    C = C.numpy()
    signs = np.sign((C * ref).sum(0))
    return C * signs


@pytest.mark.parametrize("method,n", [("gradient", 0), ("trapezoidal", 3), ("gauss-legendre", 2)])
def test_lib_equals_dense_reference_on_a_hand_computable_model(method, n):
    model, data = Tiny(), tiny_data()
    graph = build_graph(model, data, integration=method, n_intervals=n, batch_size=7, progress=False)
    ref = dense_reference(model, data.x.numpy(), method, n)
    assert graph.dims == (4, 3, 2) and graph.positions == (2, 1, 1)
    assert graph.n_nodes("in") == 3  # 4 coordinates, one of zero variance truncated
    for i in range(2):
        np.testing.assert_allclose(graph.eigenvalues[i].numpy(), ref["lam"][i], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(_align(graph.C[i], ref["C"][i]), ref["C"][i], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(graph.edges[i].numpy(), ref["E"][i], rtol=1e-8, atol=1e-12)


def test_sanity_checks_on_the_tiny_model():
    model, data = Tiny(seed=3), tiny_data(60, seed=4)
    for basis in ("lib", "pca", "neuron"):
        graph = build_graph(model, data, basis=basis, progress=False)
        m = float64_twin(model)
        f0 = m.node_input(data.x)
        logits = m.logits_from(0, f0)
        for i in range(2):
            C, Cp = graph.C[i], graph.C_pinv[i]
            torch.testing.assert_close(Cp @ C, torch.eye(C.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)
            f = m.acts(data.x)[i]
            # rotating into the full basis and back leaves the output unchanged
            assert (m.logits_from(i, f @ C @ Cp) - logits).abs().max() < 1e-10
            # the constant direction is first: it reads the constant coordinate
            fh = f @ C
            assert torch.allclose(fh[..., 0], fh[..., 0].flatten()[0].expand_as(fh[..., 0]), atol=1e-10)
            assert (fh[..., 1:].reshape(-1, C.shape[1] - 1).mean(0).abs() < 1e-10).all()
        ablation = node_ablation(model, graph, data, progress=False)
        for layer in ablation.layers:  # nothing ablated reproduces the base score
            assert ablation.score_at(layer, graph.n_nodes(layer)) == ablation.base_score
    # sorted by Lambda after the constant direction
    graph = build_graph(model, data, progress=False)
    for i in range(2):
        lam = graph.eigenvalues[i][1:]
        assert (lam[:-1] >= lam[1:]).all()


def test_stochastic_sources_are_exact_with_one_output_position_and_chunking_changes_nothing():
    model, data = Tiny(), tiny_data()
    exact = build_graph(model, data, progress=False)
    stochastic = build_graph(model, data, sources=3, batch_size=5, progress=False)
    for a, b in zip(exact.eigenvalues[:2], stochastic.eigenvalues[:2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(exact.edges, stochastic.edges):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_progress_per_layer_cancel_and_bad_input():
    model, data = Tiny(), tiny_data()
    seen = []
    build_graph(model, data, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]  # activations, 3 bases, 2 sections of edges
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        build_graph(model, data, cancel=token, progress=False)
    with pytest.raises(InputError, match="basis"):
        build_graph(model, data, basis="ica", progress=False)
    with pytest.raises(InputError, match="n_intervals"):
        build_graph(model, data, integration="gradient", n_intervals=4, progress=False)
    with pytest.raises(InputError, match="integration"):
        build_graph(model, data, integration="simpson", progress=False)
    with pytest.raises(InputError, match="forward order"):
        build_graph(model, data, node_layers=["hidden", "in"], progress=False)
    with pytest.raises(InputError, match="not a node layer"):
        build_graph(model, data, node_layers=["in", "mlp"], progress=False)
    with pytest.raises(InputError, match="LibData"):
        build_graph(model, data.x, progress=False)
    with pytest.raises(InputError, match="LibModel"):
        build_graph(torch.nn.Linear(2, 2), data, progress=False)
    graph = build_graph(model, data, edges=False, progress=False)
    with pytest.raises(InputError, match="without edges"):
        graph.edge_counts()


def test_analyses_refuse_bad_input():
    model, data = Tiny(), tiny_data()
    graph = build_graph(model, data, progress=False)
    no_edges = build_graph(model, data, edges=False, progress=False)
    with pytest.raises(InputError, match="without edges"):
        edge_ablation(model, no_edges, data, progress=False)
    with pytest.raises(InputError, match="cannot ablate"):
        node_ablation(model, graph, data, layers=["output"], progress=False)
    with pytest.raises(InputError, match="schedule"):
        node_ablation(model, graph, data, schedule="linear", progress=False)
    with pytest.raises(InputError, match="out of range"):
        edge_ablation(model, graph, data, sections=[5], progress=False)
    with pytest.raises(InputError, match="mod-add"):
        fourier_labels(model, graph, progress=False)
    with pytest.raises(InputError, match="out of range"):
        edge_attributions(model, graph, data, 0, 99, 0)
    with pytest.raises(InputError, match="not a point"):
        node_ablation(model, graph, data, schedule=[1], progress=False).score_at("in", 2)
    with pytest.raises(InputError, match="nodes_per_layer"):
        communities(graph, nodes_per_layer=0)
    with pytest.raises(InputError, match="positive"):
        data.subset(0)


def test_result_files_round_trip(tmp_path):
    model, data = Tiny(), tiny_data()
    graph = build_graph(model, data, progress=False)
    results = [
        graph,
        node_ablation(model, graph, data, progress=False),
        edge_ablation(model, graph, data, progress=False),
        communities(graph, nodes_per_layer=2),
        feature_activations(model, graph, data),
        edge_attributions(model, graph, data, 0, 1, 1),
    ]
    for r in results:
        back = load_result(r.save(tmp_path / f"{type(r).__name__}.safetensors"))
        assert type(back) is type(r)
        assert back.to_frame().equals(r.to_frame())
    back = load_result(tmp_path / "LibGraph.safetensors")
    assert back.C[-1] is None and all(torch.equal(a, b) for a, b in zip(back.C[:2], graph.C[:2]))


def test_edge_attributions_average_to_the_edge_weight():
    model, data = Tiny(), tiny_data()
    graph = build_graph(model, data, progress=False)
    attr = edge_attributions(model, graph, data, 0, 1, 2)
    # E = mean over examples of the squared attribution x (output positions / input positions)
    assert math.isclose(float((attr.attribution.double() ** 2).mean()) / 2, attr.edge_weight, rel_tol=1e-5)


def test_schedules_and_integration_points():
    assert exponential_schedule(12) == list(range(13))
    ks = exponential_schedule(129)
    assert ks[:31] == list(range(31)) and ks[-1] == 129 and all(b > a for a, b in zip(ks, ks[1:]))
    for method, n in [("trapezoidal", 0), ("trapezoidal", 5), ("gauss-legendre", 4), ("gradient", 0)]:
        pts = integration_points(method, n)
        assert math.isclose(sum(w for _, w in pts), 1.0) and all(0 < a <= 1 for a, _ in pts)
    assert integration_points("trapezoidal", 0) == [(0.5, 1.0)]  # the authors' quirk for n_intervals = 0


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and data


def test_split_is_the_authors():
    train, test = lib_data.modadd_split()
    assert (len(train), len(test)) == (3830, 8939)
    assert len(set(train.tolist()) | set(test.tolist())) == 113**2
    x = modadd_data("all").x
    assert x[113 * 5 + 7].tolist() == [5, 7, 113]
    with pytest.raises(InputError):
        modadd_data("validation")


def test_checkpoint_download_is_verified(tmp_path, monkeypatch, lib_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(lib_data.ENV_VAR, raising=False)
    payload = (lib_dir / "modadd" / "seed3.pt").read_bytes()
    urls = []

    def fake(url, timeout=60.0):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(lib_data, "_urlopen", fake)
    model = load_modadd(3)
    assert urls == [lib_data.FILES["modadd/seed3.pt"].urls[0]] and lib_data.RIB_COMMIT in urls[0]
    assert (tmp_path / "workbench" / "lib" / "modadd" / "seed3.pt").is_file()
    assert model.code == "load_modadd(seed=3)"
    payload = b"not a checkpoint"
    with pytest.raises(ModelLoadError, match="sha256"):
        load_modadd(4)
    assert not (tmp_path / "workbench" / "lib" / "modadd" / "seed4.pt").exists()
    with pytest.raises(ModelLoadError, match="download"):
        load_modadd(4, download=False)
    with pytest.raises(InputError, match="seed"):
        load_modadd(7)


@pytest.fixture(scope="module")
def modadd(lib_dir):
    return load_modadd(0, data_dir=lib_dir)


def test_checkpoints_accuracy(lib_dir, modadd):
    """Seed 0 scores 100 % on the 3 830 training pairs and 99.955 % (8 935 of 8 939) on the test pairs, as the
    authors' files say; the plain model and the LIB sections give the same logits. Seeds 1-4 (no published
    numbers): 100 % train; test accuracy measured 0.999-1.000, checked >= 0.99."""
    train, test = modadd_data("train"), modadd_data("test")
    m = float64_twin(modadd)
    with torch.no_grad():
        plain = m(test.x)[:, -1]
        sections = m.logits_from(0, m.node_input(test.x))[:, -1]
    assert (plain - sections).abs().max() < 1e-9
    assert base_score(modadd, train) == 1.0
    assert int((plain.argmax(-1) != test.y).sum()) == 4
    assert math.isclose(base_score(modadd, test), PAPER["unablated_test_accuracy"], abs_tol=5e-6)
    everything = modadd_data("all")
    train_idx, test_idx = lib_data.modadd_split()
    for seed in (1, 2, 3, 4):
        with torch.no_grad():
            right = load_modadd(seed, data_dir=lib_dir)(everything.x)[:, -1].argmax(-1) == everything.y
        assert bool(right[train_idx].all())
        assert float(right[test_idx].double().mean()) >= 0.99


def test_mnist_checkpoint_accuracy(lib_dir, casper_dir):
    """97.60 % on the MNIST test set (the research note's measurement)."""
    model = load_mnist_mlp(data_dir=lib_dir)
    test = mnist_data("test", data_dir=casper_dir)
    assert len(test) == 10_000
    assert base_score(model, test) == pytest.approx(PAPER["mnist_test_accuracy"], abs=1e-9)
    with pytest.raises(InputError, match="pixels"):
        model.node_input(torch.zeros(3, 10))


def test_mnist_lib_graph(lib_dir, casper_dir):
    model = load_mnist_mlp(data_dir=lib_dir)
    train = mnist_data("test", data_dir=casper_dir).subset(256)  # the test split reads fastest
    graph = build_graph(model, train, node_layers=["layers.1", "layers.2", "output"], progress=False)
    assert graph.dims == (101, 101, 10)
    # layers.2 feeds 10 logits, so only ~11 of its Lambdas are real; the authors' absolute threshold (1e-15) lets
    # float64 noise (Lambda ~ 1e-15) through, and those directions are scaled by Lambda^-1/2 ~ 3e7: C+ C = I holds
    # to 5e-8 there (measured), to 2e-12 at layers.1
    for i, atol in ((0, 1e-10), (1, 1e-6)):
        C, Cp = graph.C[i], graph.C_pinv[i]
        torch.testing.assert_close(Cp @ C, torch.eye(C.shape[1], dtype=torch.float64), rtol=0, atol=atol)
    assert int((graph.eigenvalues[1] > 1e-10).sum()) <= 11
    test = mnist_data("test", data_dir=casper_dir).subset(500)
    feats = feature_activations(model, graph, test, layers=["layers.1"])
    assert feats.input_directions[0].shape == (graph.n_nodes("layers.1"), 784)
    # the constant direction's input gradient is zero; the others are not
    assert feats.input_directions[0][0].abs().max() < 1e-6 and feats.input_directions[0][1].abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# the authors' committed seed-0 results


@pytest.fixture(scope="module")
def lib_graph(modadd):
    return build_graph(modadd, modadd_data("train"), progress=False)


@pytest.fixture(scope="module")
def pca_graph(modadd):
    return build_graph(modadd, modadd_data("train"), basis="pca", progress=False)


def _printed_tolerance(text: str) -> float:
    """Half a unit in the last digit of a number as printed ("1.17e5" -> 500, "0.011" -> 0.0005)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10 ** (int(exponent or 0) - decimals)


LAMBDA_PRINTED = {
    "ln1.0": "1.17e5 1.81e4 4.08e3 3.04e3 1.35e3 1.15e3 1.06e3 1.01e3 78 74 72 61 40 27 10.5 2.9 1.1 0.25",
    "ln2.0": "2.96e5 1.64e4 5.0e3 4.6e3 4.2e3 3.8e3 2.9e3 1.5e3 1.0e3 825 487 377 341 278 241 216 149 0.17 0.011 0.003",
    "unembed": "2.17e5 9.3e3 5.3e3 1.9e3 1.6e3 1.4e3 1.2e3 681 279 17.6 1.6 1.4 1.2",
}


def test_authors_dims_and_spectra(lib_graph, pca_graph):
    """Basis sizes and Lambdas as in the authors' graph files. Two measured differences: ln2.0 keeps 111
    directions, not 110 (its Lambdas fall smoothly from 0.003 to 1.0e-15, where float64 rounding decides which
    side of the 1e-15 threshold the last one falls), and the constant direction's Lambda at ln1.0 is 1.156e5 against
    1.17e5 (1.2 %; the note's independent re-implementation differs there too). Both change nothing downstream:
    edges do not depend on the scale of input directions, and the extra direction's edges are ~1e-15."""
    dims = PAPER["dims"]
    for layer in ("ln1.0", "unembed", "output"):
        assert lib_graph.n_nodes(layer) == dims["lib"][layer]
    assert abs(lib_graph.n_nodes("ln2.0") - dims["lib"]["ln2.0"]) <= 1
    assert float(lib_graph.eigenvalues[1][-1]) < 2e-15  # the 111th: 1.02e-15, just above the threshold
    for layer in ("ln1.0", "ln2.0", "unembed", "output"):
        assert pca_graph.n_nodes(layer) == dims["pca"][layer]
    for layer, printed in LAMBDA_PRINTED.items():
        ours = lib_graph.eigenvalues[lib_graph.layer_index(layer)]
        for k, text in enumerate(printed.split()):
            tol = _printed_tolerance(text)
            if layer == "ln1.0" and k == 0:
                tol = 0.015 * float(text)
            assert abs(float(ours[k]) - float(text)) <= tol * 1.0001, (layer, k, float(ours[k]), text)
    gram = pca_graph.gram_eigenvalues[0]  # the constant direction's (1.00) first, then 2.42, 0.145, 0.122
    for ours, text in zip(gram[:4].tolist(), ["1.00", "2.42", "0.145", "0.122"]):
        assert abs(ours - float(text)) <= _printed_tolerance(text)


def test_authors_edge_counts(lib_graph, pca_graph):
    """Edges holding 90 / 99 / 99.9 % of each section's weight: all equal to the authors' except two PCA counts in
    the attention block, within 2: 209 against 208 for 99 % (our 208 largest edges hold 98.9989 %, 1.1e-5 short)
    and 385 against 383 for 99.9 % (383 hold 99.8980 %). Such near-ties move with rounding: the edges depend on
    near-degenerate eigenspaces, and two float64 implementations of the same sections differ by 1e-6 relative."""
    for basis, graph in (("lib", lib_graph), ("pca", pca_graph)):
        for s, (a, b) in enumerate(graph.sections):
            expected = PAPER["edge_counts"][basis][f"{a} -> {b}"]
            ours = tuple(graph.edges_holding(s, q) for q in (0.9, 0.99, 0.999))
            slack = (0, 1, 2) if (basis, s) == ("pca", 0) else (0, 0, 0)
            assert all(abs(o - e) <= d for o, e, d in zip(ours, expected, slack)), (basis, a, ours, expected)
    # edges are non-negative and the sparsity claim holds by an order of magnitude
    assert all((e >= 0).all() for e in lib_graph.edges)
    assert pca_graph.edges_holding(0, 0.9) > 10 * lib_graph.edges_holding(0, 0.9)


def test_authors_node_ablation(modadd, lib_graph, pca_graph):
    """Test accuracy with k directions kept: every value of the note's table within its printed rounding
    (measured: all equal at 3 decimals)."""
    test = modadd_data("test")
    for basis, graph in (("lib", lib_graph), ("pca", pca_graph)):
        table = PAPER["node_ablation"][basis]
        ks = sorted({k for row in table.values() for k in row})
        result = node_ablation(modadd, graph, test, schedule=ks, progress=False)
        assert result.base_score == pytest.approx(PAPER["unablated_test_accuracy"], abs=5e-6)
        for layer, row in table.items():
            for k, acc in row.items():
                assert abs(result.score_at(layer, k) - acc) <= 0.0005 + 1e-12, (basis, layer, k)


def test_authors_fourier_labels(modadd, lib_graph):
    """LIB directions are Fourier terms of the key frequencies {1, 8, 15, 18, 36, 56}; shares within 1 % of the
    note's (whole percents) where it gives them."""
    labels = fourier_labels(modadd, lib_graph, n_directions=16, progress=False)
    key = set(PAPER["key_frequencies"])
    emb = labels.frequencies("ln1.0", n=14, min_share=0.5)
    assert set(emb) == key  # the first 13 non-constant embedding directions use exactly the six
    assert labels.terms[0][0][0] == "const"
    unembed = labels.layers.index("unembed")
    for d, (term, share) in {
        2: ("cos(15(x + y))", 0.97),
        7: ("cos(56(x + y))", 0.87),
        8: ("cos(8(x + y))", 0.83),
    }.items():
        assert labels.terms[unembed][d][0] == term
        assert abs(labels.shares[unembed][d][0] - share) <= 0.01
    tops = [labels.terms[unembed][d][0] for d in range(1, 9)]
    assert all("(x + y)" in t for t in tops)  # after the MLP: functions of x + y
    mid = labels.layers.index("ln2.0")
    assert labels.terms[mid][5][0] == "cos(15x) cos(15y)" and abs(labels.shares[mid][5][0] - 0.60) <= 0.01


def test_rotating_through_the_full_basis_keeps_the_logits(modadd, lib_graph):
    """Note section 9: C+ C = I to 1e-8; rotating into the full LIB basis and back changes no logit by 1e-6."""
    m = float64_twin(modadd)
    test = modadd_data("test").subset(1000)
    acts = m.acts(test.x)
    logits = acts[-1]
    for i in range(3):
        C, Cp = lib_graph.C[i], lib_graph.C_pinv[i]
        torch.testing.assert_close(Cp @ C, torch.eye(C.shape[1], dtype=torch.float64), rtol=0, atol=1e-8)
        with torch.no_grad():
            assert (m.logits_from(i, acts[i] @ C @ Cp) - logits).abs().max() < 1e-6
        const = (acts[i] @ C[:, 0]).flatten()
        assert torch.allclose(const, torch.full_like(const, math.sqrt(float(lib_graph.eigenvalues[i][0]))))


def test_edge_ablation_of_the_logit_section(modadd, lib_graph):
    """Fewest unembed -> output edges keeping test accuracy within 0.001: 633, as the authors'. (The other two
    sections measure 130 and 73 against 133 and 82: see the notebook; they take minutes.)"""
    result = edge_ablation(modadd, lib_graph, modadd_data("test"), sections=[2], progress=False)
    assert isinstance(result, EdgeAblation)
    assert result.min_edges == (PAPER["edge_bisect"]["lib"]["unembed -> output"],)
    assert result.n_edges == (114 * 115,)


def test_communities(lib_graph):
    a = communities(lib_graph, resolution=0.5, nodes_per_layer=20, seed=0)
    b = communities(lib_graph, resolution=0.5, nodes_per_layer=20, seed=0)
    assert a.to_frame().equals(b.to_frame())
    assert [len(n) for n in a.nodes] == [20, 20, 20, 20] and a.nodes[0][
        0
    ] == 1  # the constant node is left out
    assert 1 < a.n_communities < 80 and a.modularity > 0.3
    assert a.of("ln1.0", 0) is None
    with pytest.raises(InputError):
        communities(lib_graph, normalisation="softmax")


# ---------------------------------------------------------------------------------------------------------------
# the demo language model


def test_lm_sections_and_graph():
    from workbench.models import load_model

    lm = load_model("demo")
    sections = lm_sections(lm, (1, 2))
    assert sections.node_layers == (
        "resid_pre.1",
        "resid_mid.1",
        "resid_pre.2",
        "resid_mid.2",
        "resid_post.2",
    )
    data = lm_data(lm, n_rows=6, seq_len=12)
    with torch.no_grad():
        ours = sections.logits_from(0, sections.node_input(data.x))
        theirs = lm.module(input_ids=data.x, attention_mask=torch.ones_like(data.x)).logits
    assert (ours - theirs).abs().max() < 1e-4
    one = lm_sections(lm, 1)
    graph = build_graph(one, data, progress=False)
    assert graph.sources == 1 and graph.dims == (129, 129, 129) and graph.positions == (12, 12, 12)
    again = build_graph(one, data, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(graph.edges, again.edges))  # seeded sources
    for i in range(2):
        torch.testing.assert_close(
            graph.C_pinv[i] @ graph.C[i], torch.eye(graph.n_nodes(i), dtype=torch.float64), rtol=0, atol=1e-8
        )
    ablation = node_ablation(one, graph, data, layers=["resid_mid.1"], schedule=[0, 8], progress=False)
    assert ablation.metric == "loss" and ablation.score_at("resid_mid.1", graph.n_nodes(1)) == pytest.approx(
        ablation.base_score, abs=1e-6
    )
    assert ablation.score_at("resid_mid.1", 8) > ablation.base_score
    with pytest.raises(InputError, match="consecutive"):
        lm_sections(lm, (0, 2))
