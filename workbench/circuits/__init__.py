"""From a heatmap to a circuit: path patching, edge attribution, AtP*, logit lens, direct logit attribution.

Activation patching (`workbench.patching`) says *where* information sits. These engines ask how it *flows*, on
the component graph of `workbench.circuits.graph` (senders: embedding, heads, MLPs; receivers: each head's query,
key and value input, each MLP's input, the logits):

- `path_patch`: exact path patching of senders into chosen receivers only (Wang et al. 2022).
- `edge_attribution`: EAP (Syed et al. 2023), EAP-IG (Hanna et al. 2024) or exact scores for every edge;
  `faithfulness`: the metric of the top-k edges' circuit, and the strongest edges verified exactly.
- `atp_star`: AtP, the QK fix and GradDrop over every query, key, value and MLP node (Kramar et al. 2024);
  `verify`: the top n nodes patched exactly, a fixed budget.
- `logit_lens`, `direct_logit_attribution` (the final norm's scale frozen at the run, said in the result),
  `attention_patterns` (tokens on both axes).
- `compare_directions`: where noising and denoising disagree (a guard; the others run inside every engine).
"""

from workbench.circuits.atp import atp_star, verify
from workbench.circuits.eap import edge_attribution, faithfulness
from workbench.circuits.graph import Graph, Node
from workbench.circuits.guards import compare_directions
from workbench.circuits.lens import attention_patterns, direct_logit_attribution, logit_lens
from workbench.circuits.paths import path_patch
from workbench.circuits.results import (
    AtPResult,
    AttentionPatterns,
    DLAResult,
    EdgeScores,
    Faithfulness,
    LogitLensResult,
    PathPatchingResult,
)

__all__ = [
    "AtPResult",
    "AttentionPatterns",
    "DLAResult",
    "LogitLensResult",
    "attention_patterns",
    "direct_logit_attribution",
    "logit_lens",
    "EdgeScores",
    "Faithfulness",
    "Graph",
    "Node",
    "PathPatchingResult",
    "compare_directions",
    "edge_attribution",
    "faithfulness",
    "path_patch",
    "atp_star",
    "verify",
]
