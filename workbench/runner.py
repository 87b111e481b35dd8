"""Former home of the shared runner. It lives in `workbench.core` now; names imported from here still work for
this release, with a DeprecationWarning that names the new place."""

from __future__ import annotations

import warnings

from workbench import core


def __getattr__(name: str):
    if name == "run_chunked":
        warnings.warn(
            "workbench.runner.run_chunked is deprecated: use workbench.core.Run(progress=..., "
            "cancel=...).chunked(n_items, chunk, fn).",
            DeprecationWarning,
            stacklevel=2,
        )
        return _run_chunked
    if name in core.__all__:
        warnings.warn(
            f"workbench.runner.{name} is now workbench.core.{name}.", DeprecationWarning, stacklevel=2
        )
        return getattr(core, name)
    raise AttributeError(f"module 'workbench.runner' has no attribute {name!r}")


def _run_chunked(n_items, fn, *, chunk, progress=True, desc="", cancel=None):
    """Call ``fn(start, stop)`` for consecutive chunks of `n_items` and return the list of chunk results."""
    return core.Run(progress=progress, cancel=cancel).chunked(n_items, chunk, fn, desc=desc)
