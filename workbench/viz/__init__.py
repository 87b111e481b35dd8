"""Figure builders: pure functions from engine results to plotly figures. They never run a model.

Each module registers the default figure of its results with `@draws(ResultType)` (`workbench.viz.registry`);
`Result.plot()` calls `default_figure`, which finds the builder by the result's type.
"""

from workbench.viz import (  # noqa: F401 (imported to register their builders)
    casper_pairs,
    circuits,
    lib,
    lnfree,
    patching,
    plateau,
    sae,
    scrubbing,
    toymodels,
)
from workbench.viz.registry import builder_for, default_figure, draws

__all__ = ["builder_for", "default_figure", "draws"]
