"""One shared runner for long sweeps: chunking to a memory budget, progress, cancellation.

Engines describe their work as `n_items` independent rows (patched copies, perturbed activations, ...) and a
function that computes rows `[start, stop)`. The runner picks the chunk size from a memory budget, reports
progress (a tqdm bar, or a callback a widget supplies), and checks a `CancelToken` between chunks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from workbench.errors import Cancelled, InputError

ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(done, total)`` after each chunk."""


class CancelToken:
    """Set from another thread (a widget's Stop button); the runner raises `Cancelled` at the next chunk."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("The run was cancelled; nothing was changed.")


def available_memory(device: torch.device | str) -> int:
    """Free memory in bytes on `device` (GPU: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def parse_budget(budget: int | float | str | None, device: torch.device | str) -> int:
    """A memory budget in bytes. `None`/"auto" is a quarter of what is free; strings like "2GB" or "512MB"."""
    if budget is None or budget == "auto":
        return max(available_memory(device) // 4, 64 * 2**20)
    if isinstance(budget, str):
        text = budget.strip().upper().replace("IB", "B")
        for suffix, factor in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
            if text.endswith(suffix):
                try:
                    return int(float(text[: -len(suffix)]) * factor)
                except ValueError:
                    break
        raise InputError(f"memory_budget={budget!r} is not understood; give bytes or a string like '2GB'")
    if budget <= 0:
        raise InputError(f"memory_budget must be positive, got {budget}")
    return int(budget)


def chunk_size(bytes_per_item: int, budget: int, max_chunk: int | None = None) -> int:
    """How many items fit in `budget` bytes (at least one)."""
    n = max(1, budget // max(1, bytes_per_item))
    return min(n, max_chunk) if max_chunk else n


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
    if n_items <= 0:
        return []
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_items, desc=desc or None, leave=False)
    outputs = []
    try:
        for start in range(0, n_items, chunk):
            if cancel is not None:
                cancel.raise_if_cancelled()
            stop = min(n_items, start + chunk)
            outputs.append(fn(start, stop))
            if bar is not None:
                bar.update(stop - start)
            elif callable(progress):
                progress(stop, n_items)
    finally:
        if bar is not None:
            bar.close()
    return outputs
