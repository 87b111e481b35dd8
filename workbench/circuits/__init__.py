"""From a heatmap to a circuit: path patching, edge attribution, AtP*, logit lens, direct logit attribution.

Activation patching (`workbench.patching`) says *where* information sits. These engines ask how it *flows*, on
the component graph of `workbench.circuits.graph` (senders: embedding, heads, MLPs; receivers: each head's query,
key and value input, each MLP's input, the logits):

- `path_patch`: exact path patching of senders into chosen receivers only (Wang et al. 2022).
"""

from workbench.circuits.graph import Graph, Node
from workbench.circuits.guards import compare_directions
from workbench.circuits.paths import path_patch
from workbench.circuits.results import PathPatchingResult

__all__ = ["Graph", "Node", "PathPatchingResult", "compare_directions", "path_patch"]
