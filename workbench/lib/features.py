"""What a node and an edge look like on data: feature activations and per-example edge attributions."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from workbench.core import Run
from workbench.errors import InputError
from workbench.lib import linalg
from workbench.lib.build import LibGraph, collect_acts, float64_twin
from workbench.lib.data import LibData
from workbench.lib.models import LibModel
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


@dataclasses.dataclass(frozen=True)
class FeatureActivations(Result):
    """Every basis direction of some node layers on a data set.

    Axes: node layer (`layers`), example, position, node.

    Attributes:
        layers: the node layers.
        basis: the graph's basis.
        acts: per layer [example, position, node] f_hat = f @ C (float32).
        x, y: the data's inputs and labels (tokens [N, pos] / pixels [N, 784]; labels [N] or next tokens).
        kind: the model's kind ("modadd", "mnist", "lm").
        input_directions: per layer [node, 784] for MNIST: the mean gradient of each direction w.r.t. the pixels
            (at ``layers.0`` exactly the column of C that reads it); empty tensors otherwise.
        tokens: for language models, the string of every token id in `x` ({id: text}); empty otherwise.
        data_code: recreates the data.
    """

    layers: tuple[str, ...]
    basis: str
    acts: tuple[torch.Tensor, ...]
    x: torch.Tensor
    y: torch.Tensor
    kind: str
    input_directions: tuple[torch.Tensor, ...]
    tokens: dict[int, str]
    data_code: str
    provenance: Provenance

    def of(self, layer: str) -> torch.Tensor:
        if layer not in self.layers:
            raise InputError(f"{layer!r} has no activations here; layers: {list(self.layers)}")
        return self.acts[self.layers.index(layer)]

    def top_examples(self, layer: str, node: int, k: int = 12) -> torch.Tensor:
        """Indices [k, 2] (example, position) of the `k` largest activations of `node`."""
        a = self.of(layer)[..., node]
        flat = torch.topk(a.flatten(), min(k, a.numel())).indices
        return torch.stack([flat // a.shape[1], flat % a.shape[1]], dim=1)

    def to_frame(self):
        import pandas as pd

        rows = []
        for layer, a in zip(self.layers, self.acts):
            rows.append(
                {"layer": layer, "examples": a.shape[0], "positions": a.shape[1], "nodes": a.shape[2]}
            )
        return pd.DataFrame(rows)


def feature_activations(
    model: LibModel,
    graph: LibGraph,
    data: LibData,
    *,
    layers=None,
    input_directions: bool = True,
    progress=False,
    cancel=None,
    run: Run | None = None,
) -> FeatureActivations:
    """f_hat = f @ C at the graph's node layers (all by default) on `data`; for MNIST also each direction's mean
    input gradient (set `input_directions=False` to skip). Progress and cancel per layer."""
    run = Run.of(run, progress=progress, cancel=cancel)
    if not isinstance(graph, LibGraph):
        raise InputError(f"graph must be a LibGraph, got {type(graph).__name__}")
    if not isinstance(data, LibData):
        raise InputError(f"data must be a LibData, got {type(data).__name__}")
    layers = list(graph.node_layers) if layers is None else list(layers)
    m = float64_twin(model)

    def one(name):
        gi = graph.layer_index(name)
        (f,) = collect_acts(m, data.x, [m.index(name)], run)
        C = graph.C[gi]
        acts = (f @ C if C is not None else f).float()
        direction = torch.zeros(0)
        if input_directions and model.kind == "mnist":
            direction = _input_gradients(m, m.index(name), C, data.x).float()
        return acts, direction

    out = run.map(layers, one, desc="feature activations")
    tokens: dict[int, str] = {}
    tok = getattr(model, "tokenizer", None)
    if model.kind == "lm" and tok is not None:
        tokens = {int(i): tok.decode([int(i)]) for i in torch.unique(data.x)}
    return FeatureActivations(
        layers=tuple(layers),
        basis=graph.basis,
        acts=tuple(o[0] for o in out),
        x=data.x,
        y=data.y,
        kind=model.kind,
        input_directions=tuple(o[1] for o in out),
        tokens=tokens,
        data_code=data.code,
        provenance=Provenance.capture(model.code, data=data.code, basis=graph.basis, layers=layers),
    )


def _input_gradients(
    m: LibModel, idx: int, C: torch.Tensor | None, x: torch.Tensor, rows: int = 2048
) -> torch.Tensor:
    """[node, n_inputs]: mean over x of d f_hat_k / d input (inputs without the constant coordinate)."""
    total = None
    with torch.enable_grad():
        for a in range(0, len(x), rows):
            leaf = x[a : a + rows].to(torch.float64).requires_grad_(True)
            f = m.run(m.node_input(leaf), 0, idx)
            fh = f @ C if C is not None else f
            rows_out = []
            for k in range(fh.shape[-1]):
                (g,) = torch.autograd.grad(fh[..., k].sum(), leaf, retain_graph=True)
                rows_out.append(g.sum(0))
            part = torch.stack(rows_out)
            total = part if total is None else total + part
    return total / len(x)


@dataclasses.dataclass(frozen=True)
class EdgeAttributions(Result):
    """One edge of a graph on data: the two features and the attribution behind the edge weight.

    Axes: point (one per example and output position).

    Attributes:
        section: "in -> out"; section_index its index.
        in_node, out_node: the edge's input and output directions.
        x_in: [point] the input feature (at the same position when input and output have as many positions, else
            summed over the input positions).
        y_out: [point] the output feature.
        attribution: [point] sum_s d f_hat_out / d f_hat_in,s * f_hat_in,s (integrated as the graph was); the edge
            weight is the mean of its square times (output positions / input positions).
        edge_weight: the graph's stored weight of this edge.
    """

    section: str
    section_index: int
    in_node: int
    out_node: int
    x_in: torch.Tensor
    y_out: torch.Tensor
    attribution: torch.Tensor
    edge_weight: float
    basis: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {"x_in": "point", "y_out": "point", "attribution": "point"}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {"x_in": self.x_in.numpy(), "y_out": self.y_out.numpy(), "attribution": self.attribution.numpy()}
        )


def edge_attributions(
    model: LibModel, graph: LibGraph, data: LibData, section: int, out_node: int, in_node: int
) -> EdgeAttributions:
    """Per-example attribution of edge (out_node <- in_node) of `section` on `data` (one backward pass per
    output position)."""
    if not isinstance(graph, LibGraph):
        raise InputError(f"graph must be a LibGraph, got {type(graph).__name__}")
    if not 0 <= section < len(graph.sections):
        raise InputError(f"section {section} is out of range: the graph has {len(graph.sections)}")
    k_in, k_out = graph.n_nodes(section), graph.n_nodes(section + 1)
    if not (0 <= in_node < k_in and 0 <= out_node < k_out):
        raise InputError(f"edge ({out_node} <- {in_node}) is out of range: {k_out} x {k_in} nodes")
    m = float64_twin(model)
    a_name, b_name = graph.node_layers[section], graph.node_layers[section + 1]
    ia, ib = m.index(a_name), m.index(b_name)
    C_in, C_in_pinv, C_out = graph.C[section], graph.C_pinv[section], graph.C[section + 1]
    (f,) = collect_acts(m, data.x, [ia], Run(progress=False))
    f_hat = f @ C_in
    points = linalg.integration_points(graph.integration, graph.n_intervals)
    with torch.enable_grad():
        outs, leaves = [], []
        for alpha, _ in points:
            leaf = (alpha * f_hat).detach().requires_grad_(True)
            out = m.run(leaf @ C_in_pinv, ia, ib)
            outs.append(out @ C_out[:, out_node] if C_out is not None else out[..., out_node])
            leaves.append(leaf)
        with torch.no_grad():
            y_out = m.run(f, ia, ib)
            y_out = y_out @ C_out[:, out_node] if C_out is not None else y_out[..., out_node]
        p_out = outs[0].shape[1]
        attr = torch.zeros(len(f), p_out, dtype=torch.float64)
        for t in range(p_out):
            for (_, w), leaf, out in zip(points, leaves, outs):
                (g,) = torch.autograd.grad(out[:, t].sum(), leaf, retain_graph=True)
                attr[:, t] += w * (g[..., in_node] * f_hat[..., in_node]).sum(1)
    x_in = f_hat[..., in_node]
    x_in = x_in if x_in.shape[1] == p_out else x_in.sum(1, keepdim=True).expand(-1, p_out)
    weight = float(graph.edges[section][out_node, in_node]) if graph.has_edges else float("nan")
    return EdgeAttributions(
        section=f"{a_name} -> {b_name}",
        section_index=section,
        in_node=in_node,
        out_node=out_node,
        x_in=x_in.flatten().float(),
        y_out=y_out.flatten().float(),
        attribution=attr.flatten().float(),
        edge_weight=weight,
        basis=graph.basis,
        provenance=Provenance.capture(
            model.code, data=data.code, section=section, out_node=out_node, in_node=in_node
        ),
    )
