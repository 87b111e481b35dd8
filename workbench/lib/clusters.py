"""Communities of the interaction graph: Louvain modularity clustering (networkx).

The authors cluster with Leiden (networkit) at resolution 0.5 on the top 25-30 nodes per layer, constant node
hidden. networkx's Leiden is only an entry point for other backends, so this uses networkx's Louvain, the
algorithm Leiden refines; on graphs of a few hundred nodes both optimise the same modularity.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.errors import InputError
from workbench.lib.build import LibGraph
from workbench.lib.linalg import smallest_holding
from workbench.results import Provenance, Result

# networkx and pandas are imported where they are used: they are slow to import, and only communities need
# networkx.

NORMALISATIONS = ("none", "section", "log")
"""none: raw E; section: E over its section's total (sections comparable); log: log10(E / eps) per section, eps =
the smallest edge among those holding 99 % of the section's weight (smaller edges dropped)."""


@dataclasses.dataclass(frozen=True)
class GraphCommunities(Result):
    """A community per node of the clustered part of a graph.

    Axes: node layer (`node_layers`), node (its index in the graph's basis, `nodes`).

    Attributes:
        nodes: per node layer, the node indices that were clustered.
        community: per node layer [node] the community of each clustered node (0 = the largest community).
        modularity: the partition's modularity (networkx, same weights and resolution).
        resolution, normalisation, nodes_per_layer, seed: the options.
    """

    node_layers: tuple[str, ...]
    nodes: tuple[tuple[int, ...], ...]
    community: tuple[torch.Tensor, ...]
    modularity: float
    n_communities: int
    resolution: float
    normalisation: str
    nodes_per_layer: int
    seed: int
    provenance: Provenance

    def of(self, layer: str, node: int) -> int | None:
        """The community of `node` at `layer`, or None if it was not clustered."""
        i = self.node_layers.index(layer)
        if node not in self.nodes[i]:
            return None
        return int(self.community[i][self.nodes[i].index(node)])

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {"layer": layer, "node": n, "community": int(c)}
                for i, layer in enumerate(self.node_layers)
                for n, c in zip(self.nodes[i], self.community[i].tolist())
            ]
        )


def weighted_edges(graph: LibGraph, section: int, normalisation: str) -> torch.Tensor:
    """The section's edges [k_out, k_in] under `normalisation` (see `NORMALISATIONS`)."""
    if normalisation not in NORMALISATIONS:
        raise InputError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    E = graph.edges[section].to(torch.float64)
    if normalisation == "none":
        return E
    if normalisation == "section":
        return E / E.sum().clamp(min=1e-300)
    n = smallest_holding(E, 0.99)
    eps = E.flatten().sort(descending=True).values[max(n - 1, 0)]
    return torch.log10(E / eps).clamp(min=0)


def communities(
    graph: LibGraph,
    *,
    resolution: float = 0.5,
    nodes_per_layer: int = 30,
    normalisation: str = "log",
    seed: int = 0,
) -> GraphCommunities:
    """Louvain communities of the graph's first `nodes_per_layer` non-constant nodes per layer (networkx)."""
    import networkx as nx

    graph._require_edges()
    if isinstance(nodes_per_layer, bool) or not isinstance(nodes_per_layer, int) or nodes_per_layer < 1:
        raise InputError(f"nodes_per_layer must be a positive int, got {nodes_per_layer!r}")
    if not (isinstance(resolution, (int, float)) and resolution > 0):
        raise InputError(f"resolution must be a positive number, got {resolution!r}")
    chosen = []
    for i in range(len(graph.node_layers)):
        start = 1 if graph.has_const(i) else 0
        chosen.append(tuple(range(start, min(graph.n_nodes(i), start + nodes_per_layer))))
    G = nx.Graph()
    for i, nodes in enumerate(chosen):
        G.add_nodes_from((i, n) for n in nodes)
    for s in range(len(graph.sections)):
        W = weighted_edges(graph, s, normalisation)
        for o in chosen[s + 1]:
            for n in chosen[s]:
                w = float(W[o, n])
                if w > 0:
                    G.add_edge((s, n), (s + 1, o), weight=w)
    parts = nx.community.louvain_communities(G, weight="weight", resolution=resolution, seed=seed)
    parts = sorted(parts, key=len, reverse=True)
    label = {node: c for c, part in enumerate(parts) for node in part}
    modularity = (
        nx.community.modularity(G, parts, weight="weight", resolution=resolution)
        if G.number_of_edges()
        else 0.0
    )
    return GraphCommunities(
        node_layers=graph.node_layers,
        nodes=tuple(chosen),
        community=tuple(
            torch.tensor([label[(i, n)] for n in nodes], dtype=torch.long) for i, nodes in enumerate(chosen)
        ),
        modularity=float(modularity),
        n_communities=len(parts),
        resolution=float(resolution),
        normalisation=normalisation,
        nodes_per_layer=nodes_per_layer,
        seed=seed,
        provenance=Provenance.capture(
            graph.model_code,
            basis=graph.basis,
            resolution=resolution,
            nodes_per_layer=nodes_per_layer,
            normalisation=normalisation,
            seed=seed,
        ),
    )
