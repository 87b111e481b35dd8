"""interp-workbench: a Jupyter-first workbench for mechanistic interpretability over nnsight.

Layers (arrows point down only): `widgets` wire controls to `engines` (`patching`, `lnfree`, `plateau`,
`scrubbing`) and to figure builders in `viz`; engines run models from `models` on prompt sets from `tasks`.
"""

__version__ = "0.1.0"
