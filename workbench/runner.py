"""Former home of the shared runner; it lives in `workbench.core.run` now (`Run`, `CancelToken`, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workbench.core.run import (  # noqa: F401  (re-exported for existing imports)
    CancelToken,
    ProgressCallback,
    Run,
    available_memory,
    chunk_size,
    chunks,
    parse_budget,
)


def run_chunked(
    n_items: int,
    fn: Callable[[int, int], Any],
    *,
    chunk: int,
    progress: bool | ProgressCallback = True,
    desc: str = "",
    cancel: CancelToken | None = None,
) -> list[Any]:
    """Call ``fn(start, stop)`` for consecutive chunks of `n_items` and return the list of chunk results."""
    return Run(progress=progress, cancel=cancel).chunked(n_items, chunk, fn, desc=desc)
