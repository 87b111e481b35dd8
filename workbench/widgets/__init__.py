"""ipywidgets panels: controls + a plotly FigureWidget + a status line. They hold no science.

from workbench.widgets import PatchingExplorer, LNRemovalPreview, PlateauProbe
"""

import importlib

_PANELS = {
    "PatchingExplorer": "workbench.widgets.patching",
    "LNRemovalPreview": "workbench.widgets.lnfree",
    "PlateauProbe": "workbench.widgets.plateau",
    "ToyModelExplorer": "workbench.widgets.toymodels",
    "SyntheticActivationProbe": "workbench.widgets.sae",
    "InteractionGraph": "workbench.widgets.lib",
    "CircuitExplorer": "workbench.widgets.circuits",
}

__all__ = list(_PANELS)


def __getattr__(name):  # import a panel's module only when it is asked for
    if name in _PANELS:
        return getattr(importlib.import_module(_PANELS[name]), name)
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
