"""The Local Interaction Basis (LIB): interaction graphs of small models, rerun step by step.

Bushnaq, Heimersheim et al., "The Local Interaction Basis" (arXiv 2405.10928) rotate each layer's activations
into a basis chosen by what the next layer does with them: centre, whiten (dropping zero-variance directions),
rotate to the eigenvectors of the Jacobian Gram matrix to the next layer's basis, scale each direction by the
square root of its eigenvalue Lambda (how strongly it drives the next layer), and drop directions with Lambda ~ 0.
Between consecutive layers, edges E_ij are squared gradient x activation attributions of feature j to feature i.
On a modular-addition transformer the LIB directions are pure Fourier features and 90 % of the edge weight sits
in a handful of edges where PCA needs dozens; on language models it does not help (the paper says so).

    from workbench.lib import load_modadd, modadd_data, build_graph, node_ablation
    model = load_modadd(seed=0)                          # the authors' checkpoint (path, $WORKBENCH_LIB_DIR or download)
    graph = build_graph(model, modadd_data("train"))     # LIB basis + edges, float64, ~20 s of one core
    graph.edge_counts()                                  # edges holding 90 / 99 / 99.9 % of the weight
    graph.plot()                                         # the interaction graph
    node_ablation(model, graph, modadd_data("test")).plot()

Engines: `build_graph` (bases and edges), `node_ablation`, `edge_ablation`, `fourier_labels`, `communities`,
`feature_activations`, `edge_attributions`. Models: `load_modadd`, `load_mnist_mlp`, `lm_sections`. Data:
`modadd_data`, `mnist_data`, `lm_data`; ready-made experiments: `load_setup("modadd-0" | "mnist" | "demo-lm")`.
`PAPER` holds the authors' committed seed-0 numbers. The panel: `workbench.widgets.InteractionGraph`.
"""

from workbench.lib.ablations import EdgeAblation, NodeAblation, edge_ablation, node_ablation
from workbench.lib.build import BASES, LibGraph, build_graph
from workbench.lib.clusters import GraphCommunities, communities
from workbench.lib.data import LibData, lm_data, mnist_data, modadd_data
from workbench.lib.features import (
    EdgeAttributions,
    FeatureActivations,
    edge_attributions,
    feature_activations,
)
from workbench.lib.fourier import FourierLabels, fourier_labels
from workbench.lib.models import (
    LanguageModelSections,
    LibModel,
    MnistMLP,
    ModAddTransformer,
    lm_sections,
    load_mnist_mlp,
    load_modadd,
)
from workbench.lib.paper import PAPER
from workbench.lib.setups import SETUPS, Setup, load_setup

__all__ = [
    "BASES",
    "PAPER",
    "SETUPS",
    "Setup",
    "EdgeAblation",
    "EdgeAttributions",
    "FeatureActivations",
    "FourierLabels",
    "GraphCommunities",
    "LanguageModelSections",
    "LibData",
    "LibGraph",
    "LibModel",
    "MnistMLP",
    "ModAddTransformer",
    "NodeAblation",
    "build_graph",
    "communities",
    "edge_ablation",
    "edge_attributions",
    "feature_activations",
    "fourier_labels",
    "lm_data",
    "lm_sections",
    "load_mnist_mlp",
    "load_modadd",
    "load_setup",
    "mnist_data",
    "modadd_data",
    "node_ablation",
]
