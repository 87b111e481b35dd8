"""The execution core every engine runs through: Spec -> Run -> Result.

- `Run` (`workbench.core.run`): progress, cancellation, memory budget, batch size, partial results; engines loop
  with ``run.map(items, fn)`` and ``run.steps(n)``, never with their own progress or cancel code.
- Results are frozen dataclasses deriving from `workbench.results.Result` (named axes, provenance, save/load,
  ``to_frame``, ``plot``).
"""

from workbench.core.run import (
    CancelToken,
    ProgressCallback,
    Run,
    available_memory,
    chunk_size,
    chunks,
    concat,
    parse_budget,
    positive_size,
)

__all__ = [
    "CancelToken",
    "ProgressCallback",
    "Run",
    "available_memory",
    "chunk_size",
    "chunks",
    "concat",
    "parse_budget",
    "positive_size",
]
