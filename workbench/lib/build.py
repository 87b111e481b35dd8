"""`build_graph`: the LIB (or PCA, or neuron) basis of every node layer and the interaction edges between them."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from workbench.core import Run
from workbench.errors import InputError
from workbench.lib import linalg
from workbench.lib.data import LibData
from workbench.lib.models import LibModel
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

BASES = ("lib", "pca", "neuron")
"""lib: the local interaction basis; pca: centred PCA (orthogonal, unscaled); neuron: the coordinates themselves,
centred, ordered by variance."""
TRUNCATION = 1e-15
"""The authors' threshold: drop Gram eigenvalues and Lambdas below it (only exact null directions)."""


@dataclasses.dataclass(frozen=True)
class LibGraph(Result):
    """A basis per node layer and the interaction edges between consecutive node layers.

    Axes: node layer (`node_layers`), node (basis direction; the constant direction first when centred, then
    by `eigenvalues`, descending), and per section [out node, in node] for `edges`.

    Attributes:
        node_layers: the node layers, in forward order.
        basis: "lib", "pca" or "neuron".
        C: per node layer the basis [d, k] (f_hat = f @ C), float64; None for the logits (never rotated).
        C_pinv: per node layer [k, d] with f ~ f_hat @ C_pinv on the kept subspace; None for the logits.
        eigenvalues: per node layer [k]: Lambda (lib), the centred Gram's eigenvalues (pca) or the variances
            (neuron); the constant direction's entry first. Empty for the logits.
        gram_eigenvalues: per node layer [d], the centred Gram matrix's full spectrum (constant first), whatever the
            basis: the PCA spectrum every basis is compared with. Empty for the logits.
        means: per node layer [d], the mean activation (constant coordinate 1).
        dims: per node layer d, the width including the constant coordinate.
        positions: per node layer, positions per example (3 at the mod-add embedding, else 1 or the sequence length).
        edges: per section l -> l + 1, E [k_{l+1}, k_l] (squared attributions, averaged over data and input
            positions); empty when `build_graph(edges=False)`.
        integration, n_intervals: how the path integral of the Jacobians was taken.
        truncation: threshold on eigenvalues below which directions were dropped.
        center: whether activations were centred (constant direction first, ablations to the mean).
        sources: stochastic position sources (None: exact).
        n_samples: examples the basis and edges were computed on.
        kind: the model's kind ("modadd", "mnist", "lm", ...).
        model_code, data_code: expressions that recreate the model and data (for "show code").
    """

    node_layers: tuple[str, ...]
    basis: str
    C: tuple[torch.Tensor | None, ...]
    C_pinv: tuple[torch.Tensor | None, ...]
    eigenvalues: tuple[torch.Tensor, ...]
    gram_eigenvalues: tuple[torch.Tensor, ...]
    means: tuple[torch.Tensor, ...]
    dims: tuple[int, ...]
    positions: tuple[int, ...]
    edges: tuple[torch.Tensor, ...]
    integration: str
    n_intervals: int
    truncation: float
    center: bool
    sources: int | None
    n_samples: int
    kind: str
    model_code: str
    data_code: str
    provenance: Provenance

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def sections(self) -> list[tuple[str, str]]:
        """(in node layer, out node layer) per section."""
        return list(zip(self.node_layers[:-1], self.node_layers[1:]))

    def layer_index(self, layer: str | int) -> int:
        if isinstance(layer, int) and not isinstance(layer, bool):
            if not -len(self.node_layers) <= layer < len(self.node_layers):
                raise InputError(
                    f"node layer {layer} is out of range: this graph has {len(self.node_layers)}"
                )
            return layer % len(self.node_layers)
        if layer not in self.node_layers:
            raise InputError(f"{layer!r} is not a node layer of this graph: {list(self.node_layers)}")
        return self.node_layers.index(layer)

    def n_nodes(self, layer: str | int) -> int:
        """Directions kept at `layer` (for the logits: their number)."""
        i = self.layer_index(layer)
        c = self.C[i]
        return c.shape[1] if c is not None else self.dims[i]

    @property
    def has_edges(self) -> bool:
        return len(self.edges) == len(self.node_layers) - 1

    def has_const(self, layer: str | int) -> bool:
        i = self.layer_index(layer)
        return self.center and self.C[i] is not None

    def _require_edges(self) -> None:
        if not self.has_edges:
            raise InputError(
                "this graph was built without edges; rebuild it with build_graph(..., edges=True)"
            )

    # -- analyses on stored numbers ------------------------------------------------------------------
    def edges_holding(self, section: int, fraction: float, include_const: bool = True) -> int:
        """How many of the largest edges of `section` hold `fraction` of its total edge weight."""
        self._require_edges()
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must be in (0, 1], got {fraction}")
        return linalg.smallest_holding(self._section_edges(section, include_const), fraction)

    def _section_edges(self, section: int, include_const: bool) -> torch.Tensor:
        E = self.edges[section]
        if include_const:
            return E
        r0 = 1 if self.has_const(section + 1) else 0
        c0 = 1 if self.has_const(section) else 0
        return E[r0:, c0:]

    def edge_counts(self, fractions=(0.9, 0.99, 0.999), include_const: bool = True):
        """pandas DataFrame: per section the number of edges holding each fraction of the total edge weight."""
        import pandas as pd

        self._require_edges()
        rows = []
        for s, (a, b) in enumerate(self.sections):
            row = {"section": f"{a} -> {b}", "edges": self._section_edges(s, include_const).numel()}
            for q in fractions:
                row[f"{q:.1%}"] = self.edges_holding(s, q, include_const)
            rows.append(row)
        return pd.DataFrame(rows)

    def variance_directions(self, layer: str | int, fraction: float = 0.99) -> int:
        """Non-constant PCA directions needed for `fraction` of the variance at `layer`."""
        i = self.layer_index(layer)
        d = self.gram_eigenvalues[i]
        if len(d) == 0:
            raise InputError(f"{self.node_layers[i]} has no Gram spectrum (the logits are not analysed)")
        return linalg.smallest_holding(d[1:] if self.center else d, fraction)

    def to_frame(self):
        """One row per node: layer, node index, eigenvalue (Lambda / variance), basis."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.node_layers):
            for k, v in enumerate(self.eigenvalues[i].tolist()):
                rows.append(
                    {
                        "layer": layer,
                        "node": k,
                        "eigenvalue": v,
                        "basis": self.basis,
                        "const": k == 0 and self.has_const(i),
                    }
                )
        return pd.DataFrame(rows)

    def edge_frame(self, section: int, include_const: bool = False):
        """pandas DataFrame of the edges of `section`: out node, in node, weight, sorted by weight."""
        import pandas as pd

        self._require_edges()
        E = self.edges[section]
        out_nodes, in_nodes = torch.meshgrid(
            torch.arange(E.shape[0]), torch.arange(E.shape[1]), indexing="ij"
        )
        frame = pd.DataFrame(
            {
                "out_node": out_nodes.flatten().numpy(),
                "in_node": in_nodes.flatten().numpy(),
                "weight": E.flatten().numpy(),
            }
        )
        if not include_const:
            if self.has_const(section):
                frame = frame[frame.in_node != 0]
            if self.has_const(section + 1):
                frame = frame[frame.out_node != 0]
        return frame.sort_values("weight", ascending=False, ignore_index=True)

    def __repr__(self) -> str:
        dims = ", ".join(f"{n}: {self.n_nodes(i)}/{self.dims[i]}" for i, n in enumerate(self.node_layers))
        return f"LibGraph({self.basis}, {dims}, edges={'yes' if self.has_edges else 'no'})"


# ---------------------------------------------------------------------------------------------------------------
# the engine


def float64_twin(model: LibModel) -> LibModel:
    """A float64 copy of `model` (shared tokenizer, no gradients on its weights)."""
    if not isinstance(model, LibModel):
        raise InputError(
            f"LIB runs on a LibModel (load_modadd, load_mnist_mlp, lm_sections), got {type(model).__name__}"
        )
    memo: dict[int, Any] = {}
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        memo[id(tok)] = tok
    twin = copy.deepcopy(model, memo).to(torch.float64)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


def resolve_node_layers(model: LibModel, node_layers) -> list[int]:
    """Indices into `model.node_layers` of the chosen node layers (all by default), in forward order."""
    if node_layers is None:
        return list(range(len(model.node_layers)))
    if isinstance(node_layers, str):
        raise InputError("node_layers is a list of names, e.g. ['ln2.0', 'unembed', 'output']")
    idx = [model.index(n) for n in node_layers]
    if len(idx) < 2:
        raise InputError("give at least two node layers: edges and LIB bases live between consecutive ones")
    if idx != sorted(idx) or len(set(idx)) != len(idx):
        raise InputError(f"node_layers must be distinct and in forward order {list(model.node_layers)}")
    return idx


def _resolve_sources(model: LibModel, sources) -> int | None:
    if sources == "auto":
        return model.default_sources
    if sources is None:
        return None
    if isinstance(sources, bool) or not isinstance(sources, int) or sources < 1:
        raise InputError(f"sources must be None (exact), 'auto' or a positive int, got {sources!r}")
    return sources


def collect_acts(model: LibModel, x: torch.Tensor, idx: list[int], run: Run) -> list[torch.Tensor]:
    """Activations [N, pos, d] at the node layers `idx` (float64)."""
    n = len(x)
    rows = run.rows_per_chunk(64 * 1024, "cpu", default_max=4096)
    spans = [(a, min(n, a + rows)) for a in range(0, n, rows)]
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for a, b in spans:
            run.check()
            acts = model.acts(x[a:b], upto=idx[-1])
            parts.append([acts[i] for i in idx])
    return [torch.cat([p[j] for p in parts]) for j in range(len(idx))]


def _jacobian_passes(
    fn,
    leaf_value: torch.Tensor,
    k_out: int,
    sources: int | None,
    points,
    generator,
    run: Run,
    bytes_per_row: int,
    consume,
) -> None:
    """Integrated gradients of fn(alpha * leaf) [n, P_out, k_out] w.r.t. its input, one backward pass per output
    cotangent: for each row chunk of `leaf_value` [N, P_in, k_in] and each cotangent r, `consume(rows, r, g)` with
    g = sum_alpha w_alpha d<cot_r, fn(alpha * leaf)> / d(alpha * leaf) [n, P_in, k_in] and r's output direction
    r % k_out.

    Cotangents: exact (sources None) one-hot at each (output position t, direction i), r = t * k_out + i;
    stochastic: random +-1 over output positions at direction i, r = source * k_out + i. A Python loop of plain
    backward passes is 2-3x faster on CPU here than one vmapped (``is_grads_batched``) pass.
    """
    n_rows = len(leaf_value)
    rows = run.rows_per_chunk(max(bytes_per_row, 1), "cpu", default_max=4096)
    with torch.enable_grad():
        for a in range(0, n_rows, rows):
            run.check()
            base = leaf_value[a : a + rows]
            leaves, outs = [], []
            for alpha, _ in points:
                leaf = (alpha * base).detach().requires_grad_(True)
                leaves.append(leaf)
                outs.append(fn(leaf))
            p_out = outs[0].shape[1]
            if sources is None:
                cots = [(t, i, None) for t in range(p_out) for i in range(k_out)]
            else:
                signs = (
                    torch.randint(0, 2, (sources, len(base), p_out), generator=generator).to(base.dtype) * 2
                    - 1
                )
                cots = [(None, i, signs[s]) for s in range(sources) for i in range(k_out)]
            for r, (t, i, sign) in enumerate(cots):
                g = None
                for (_, weight), leaf, out in zip(points, leaves, outs):
                    scalar = out[:, t, i].sum() if sign is None else (out[:, :, i] * sign).sum()
                    (gi,) = torch.autograd.grad(scalar, leaf, retain_graph=True)
                    g = gi * weight if g is None else g + gi * weight
                consume(slice(a, a + len(base)), r, g)


def build_graph(
    model: LibModel,
    data: LibData,
    *,
    basis: str = "lib",
    node_layers=None,
    edges: bool = True,
    integration: str = "gradient",
    n_intervals: int = 0,
    truncation: float = TRUNCATION,
    center: bool = True,
    sources: int | str | None = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | str | None = "auto",
    progress=True,
    cancel=None,
    run: Run | None = None,
) -> LibGraph:
    """Build the basis of every node layer (from the last backwards) and the edges between them, in float64.

    LIB at node layer l, given the next layer's basis C^{l+1} [d_{l+1}, k_{l+1}]:
    1. Gram G = mean over data and positions of (f - mu)(f - mu)^T (constant coordinate kept, so the constant
       direction is an eigenvector); G = U D U^T; the constant direction moved first; D <= truncation dropped.
    2. Jacobian Gram M' = 1/(N P_l) sum_x sum_{i,t} sum_s g g^T with g = d f_hat^{l+1}_{i,t} / d f^l_s (one backward
       pass per output direction and output position, or per stochastic source), integrated over alpha * f^l.
    3. M = R+ M' R+^T in whitened coordinates (R+ = D^1/2 U^T S^-1); M = V Lambda V^T with the constant direction
       held fixed (its Lambda is M[0, 0]); Lambda < truncation dropped; C = S U D^-1/2 V Lambda^1/2.
    The last node layer has the identity (logits) or the centred PCA basis. "pca" stops after step 1 (C = S U);
    "neuron" keeps the coordinates (centred, by variance). Edges: E_ij = 1/(N P_l) sum_x sum_t (sum_s
    d f_hat^{l+1}_{i,t} / d f_hat^l_{j,s} * f_hat^l_{j,s})^2.

    Args:
        model: a `LibModel` (`load_modadd`, `load_mnist_mlp`, `lm_sections`).
        data: the inputs the basis is built on (`modadd_data("train")`, ...).
        basis: "lib", "pca" or "neuron".
        node_layers: names of the node layers to use (a forward-ordered subset of `model.node_layers`; all by
            default). Sections between non-consecutive ones are composed.
        edges: compute the interaction edges too.
        integration: "gradient" (alpha = 1), "trapezoidal" or "gauss-legendre", with `n_intervals` (0 for
            gradient); used for the Jacobians of both the basis and the edges.
        truncation: eigenvalue threshold (the authors': 1e-15).
        center: centre activations (constant direction first). Without it nothing is centred and ablated
            directions go to zero.
        sources: stochastic position sources: None (exact), an int, or "auto" (the model's default: exact for
            mod-add and MNIST, 1 for language models).
        seed: seeds the stochastic sources.
        batch_size / memory_budget / progress / cancel / run: see `workbench.core.Run`. Progress is reported per
            node layer (activations, each basis, each section's edges).
    """
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    if basis not in BASES:
        raise InputError(f"basis must be one of {BASES}, got {basis!r}")
    if not isinstance(data, LibData):
        raise InputError(
            f"data must be a LibData (modadd_data, mnist_data, lm_data), got {type(data).__name__}"
        )
    if not (isinstance(truncation, (int, float)) and truncation >= 0):
        raise InputError(f"truncation must be a number >= 0, got {truncation!r}")
    points = linalg.integration_points(integration, n_intervals)
    m = float64_twin(model)
    sources = _resolve_sources(model, sources)
    idx = resolve_node_layers(m, node_layers)
    names = tuple(m.node_layers[i] for i in idx)
    if "output" in names[:-1]:
        raise InputError("'output' (the logits) can only be the last node layer")
    builder = _Builder(m, idx, basis, center, float(truncation), sources, points, seed, run)
    L = len(idx)
    items = [("acts", 0)] + [("basis", li) for li in reversed(range(L))]
    if edges:
        items += [("edges", li) for li in range(L - 1)]
    run.map(items, lambda item: builder.step(data, *item), desc=f"{basis.upper()} graph")

    acts = builder.acts
    return LibGraph(
        node_layers=names,
        basis=basis,
        C=tuple(builder.C),
        C_pinv=tuple(builder.C_pinv),
        eigenvalues=tuple(builder.eig),
        gram_eigenvalues=tuple(builder.gram),
        means=tuple(builder.means),
        dims=tuple(a.shape[-1] for a in acts),
        positions=tuple(a.shape[1] for a in acts),
        edges=tuple(builder.edges) if edges else (),
        integration=integration,
        n_intervals=n_intervals,
        truncation=float(truncation),
        center=center,
        sources=sources,
        n_samples=len(data),
        kind=model.kind,
        model_code=model.code,
        data_code=data.code,
        provenance=Provenance.capture(
            model.code,
            data=data.code,
            basis=basis,
            node_layers=list(names),
            edges=edges,
            integration=integration,
            n_intervals=n_intervals,
            truncation=truncation,
            center=center,
            sources=sources,
            seed=seed,
        ),
    )


class _Builder:
    """The bases and edges of one `build_graph` call, filled step by step (`step`): the activations, each node
    layer's basis from the last backwards, then each section's edges (see `build_graph` for the maths).

    m: the float64 model; idx: the node layers' indices into `m.node_layers`.
    """

    def __init__(self, m: LibModel, idx: list[int], basis: str, center: bool, truncation: float, sources,
                 points, seed: int, run: Run):  # fmt: skip
        self.m, self.idx, self.basis, self.center, self.truncation = m, idx, basis, center, truncation
        self.sources, self.points, self.run = sources, points, run
        self.names = tuple(m.node_layers[i] for i in idx)
        self.generator = torch.Generator().manual_seed(seed)
        L = len(idx)
        self.acts: list[torch.Tensor] = []
        self.C: list[torch.Tensor | None] = [None] * L
        self.C_pinv: list[torch.Tensor | None] = [None] * L
        self.eig = [torch.zeros(0, dtype=torch.float64)] * L
        self.gram = [torch.zeros(0, dtype=torch.float64)] * L
        self.means: list[torch.Tensor | None] = [None] * L
        self.edges: list[torch.Tensor | None] = [None] * (L - 1)

    def step(self, data: LibData, kind: str, li: int) -> None:
        if kind == "acts":
            self.acts = collect_acts(self.m, data.x, self.idx, self.run)
        elif kind == "basis":
            self.basis_step(li)
        else:
            self.edge_step(li)

    def section(self, l_in: int):
        """The model from node layer `l_in` to the next one, as a function of the activations."""
        a, b = self.idx[l_in], self.idx[l_in + 1]
        return lambda f: self.m.run(f, a, b)

    def k_out(self, li: int) -> int:
        """Directions of node layer li + 1 (its basis', or its width for the logits)."""
        C_next = self.C[li + 1]
        return C_next.shape[1] if C_next is not None else self.acts[li + 1].shape[-1]

    def stats(self, li: int):
        """Mean [d] and the centred Gram matrix's spectrum D [d] and eigenvectors U [d, d] (constant first)."""
        f = self.acts[li].reshape(-1, self.acts[li].shape[-1])
        mean = f.mean(0)
        if self.center:
            mean_c = mean.clone()
            mean_c[-1] = 0
            fc = f - mean_c
        else:
            fc = f
        G = fc.T @ fc / len(f)
        D, U = linalg.eigh_desc(G)
        if self.center:
            D, U = linalg.const_first(D, U)
        self.means[li] = mean
        self.gram[li] = D
        return mean, D, U

    def basis_step(self, li: int) -> None:
        name = self.names[li]
        if name == "output":
            f = self.acts[li]
            self.means[li] = f.reshape(-1, f.shape[-1]).mean(0)
            return
        if not self.m.has_const(name) and self.center:
            raise InputError(f"{name} has no constant coordinate to centre on")
        mean, D, U = self.stats(li)
        eye = torch.eye(len(mean), dtype=torch.float64)
        S, S_inv = linalg.centring(mean) if self.center else (eye, eye)
        if self.basis == "neuron":
            order, values = self.neuron_order(li, len(mean))
            self.C[li], self.C_pinv[li], self.eig[li] = S[:, order], S_inv[order, :], values
            return
        keep = D > self.truncation
        D, U = D[keep], U[:, keep]
        if self.basis == "pca" or li == len(self.idx) - 1:
            self.C[li], self.C_pinv[li], self.eig[li] = S @ U, U.T @ S_inv, D
            return
        self.C[li], self.C_pinv[li], self.eig[li] = self.lib_basis(li, D, U, S, S_inv)

    def neuron_order(self, li: int, d: int):
        """The coordinates by variance (constant first when centred), and their variances (or mean squares)."""
        f = self.acts[li]
        if self.center:
            var = f.reshape(-1, d).var(0, unbiased=False)
            neurons = [j for j in range(d - 1) if var[j] > self.truncation]
            order = [d - 1] + sorted(neurons, key=lambda j: -float(var[j]))
            return order, torch.cat([torch.ones(1, dtype=torch.float64), var[order[1:]]])
        order = sorted(range(d), key=lambda j: -float((f[..., j] ** 2).mean()))
        return order, torch.stack([(f[..., j] ** 2).mean() for j in order])

    def lib_basis(self, li: int, D, U, S, S_inv):
        """C, C_pinv and Lambda of node layer li: the whitened Jacobian Gram to the next layer's basis."""
        R = S @ U @ torch.diag(D.rsqrt())
        R_pinv = torch.diag(D.sqrt()) @ U.T @ S_inv
        C_next = self.C[li + 1]
        F = self.section(li)
        fn = (lambda f: F(f) @ C_next) if C_next is not None else F
        f_all = self.acts[li]
        d = f_all.shape[-1]
        p_in = f_all.shape[1]
        M_dash = torch.zeros(d, d, dtype=torch.float64)

        def consume(_rows, _r, g):
            flat = g.reshape(-1, d)
            M_dash.addmm_(flat.T, flat)

        self.jacobians(fn, f_all, self.k_out(li), p_in * d * 8 * 24, consume)
        M_dash /= len(f_all) * p_in * (self.sources or 1)
        M = R_pinv @ M_dash @ R_pinv.T
        n_fixed = 1 if self.center else 0
        lam_rest, V_rest = linalg.eigh_desc(M[n_fixed:, n_fixed:])
        k = M.shape[0]
        V = torch.zeros(k, k, dtype=torch.float64)
        V[:n_fixed, :n_fixed] = torch.eye(n_fixed, dtype=torch.float64)
        V[n_fixed:, n_fixed:] = V_rest
        lam = torch.cat([M.diagonal()[:n_fixed], lam_rest])
        kept = torch.cat([torch.ones(n_fixed, dtype=torch.bool), lam_rest >= self.truncation])
        lam, V = lam[kept], V[:, kept]
        return R @ V @ torch.diag(lam.sqrt()), torch.diag(lam.rsqrt()) @ V.T @ R_pinv, lam

    def edge_step(self, li: int) -> None:
        C_in, C_in_pinv, C_out = self.C[li], self.C_pinv[li], self.C[li + 1]
        F = self.section(li)
        k_in = C_in.shape[1]
        k_out = self.k_out(li)
        f_hat = self.acts[li] @ C_in
        p_in = f_hat.shape[1]

        def fn(fh):
            out = F(fh @ C_in_pinv)
            return out @ C_out if C_out is not None else out

        E = torch.zeros(k_out, k_in, dtype=torch.float64)

        def consume(rows, r, g):
            J = (g * f_hat[rows]).sum(
                1
            )  # [n, k_in]: attribution of each input direction, summed over positions
            E[r % k_out] += (J**2).sum(0)

        self.jacobians(fn, f_hat, k_out, p_in * k_in * 8 * 24, consume)
        E /= len(f_hat) * p_in * (self.sources or 1)
        self.edges[li] = E

    def jacobians(self, fn, leaf_value, k_out: int, bytes_per_row: int, consume) -> None:
        _jacobian_passes(
            fn, leaf_value, k_out, self.sources, self.points, self.generator, self.run, bytes_per_row, consume
        )
