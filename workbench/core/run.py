"""`Run`: how an engine call runs — progress, cancellation, memory budget, batch size, partial results.

Every engine takes the same keywords (``progress=``, ``cancel=``, ``memory_budget=``, ``batch_size=``) or one
``run=Run(...)``, and does all its looping through the run:

    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    outputs = run.map(chunks, one_chunk, desc="patching")     # a list of chunk outputs, in order
    for step in run.steps(n_steps, desc="training"):          # training loops
        ...

`map` and `steps` check the cancel token between items (raising `Cancelled`) and report ``(done, total)`` to
the progress callback, or draw a tqdm bar when ``progress=True``. Sizes are validated once, here: a batch
size or memory budget that is not a positive finite number is refused with a sentence, never silently used.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from workbench.errors import Cancelled, InputError

T = TypeVar("T")
R = TypeVar("R")

REMOTE_JOB_BUDGET = 2**30
"""Bytes per NDIF job when the memory budget is "auto"."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(done, total)`` after each item."""


class CancelToken:
    """Set from another thread (a widget's Stop button); the run raises `Cancelled` at the next item."""

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


def positive_size(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    """`value` as a positive int, or an `InputError` naming `name` (bools, floats with a fraction, NaN, 0 and
    negative numbers are refused: -1 is not "no limit" here)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a positive whole number, got {value!r}.")
    if not math.isfinite(float(value)) or value <= 0 or float(value) != int(value):
        hint = " (leave it as None for the default)" if allow_none else ""
        raise InputError(f"{name} must be a positive whole number, got {value!r}{hint}.")
    return int(value)


def parse_budget(budget: int | float | str | None, device: torch.device | str) -> int:
    """A memory budget in bytes. `None`/"auto" is a quarter of what is free; strings like "2GB" or "512MB"."""
    if budget is None or budget == "auto":
        return max(available_memory(device) // 4, 64 * 2**20)
    if isinstance(budget, str):
        text = budget.strip().upper().replace("IB", "B")
        for suffix, factor in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
            if text.endswith(suffix):
                try:
                    value = float(text[: -len(suffix)]) * factor
                except ValueError:
                    break
                if math.isfinite(value) and value >= 1:
                    return int(value)
                break
        raise InputError(
            f"memory_budget={budget!r} is not understood; give a positive number of bytes, "
            "a string like '2GB' or '512MB', or 'auto'."
        )
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(float(budget)):
        raise InputError(
            f"memory_budget must be a positive number of bytes, '2GB' or 'auto', got {budget!r}."
        )
    if budget < 1:
        raise InputError(f"memory_budget must be a positive number of bytes, got {budget!r}.")
    return int(budget)


def chunk_size(bytes_per_item: int, budget: int, max_chunk: int | None = None) -> int:
    """How many items fit in `budget` bytes (at least one)."""
    n = max(1, budget // max(1, bytes_per_item))
    return min(n, max_chunk) if max_chunk else n


class Run:
    """The settings and reporting of one engine call.

    Args:
        progress: True for a tqdm bar, False for nothing, or a ``callback(done, total)``.
        cancel: a `CancelToken` (a widget's Stop button); checked between items.
        memory_budget: bytes, a string like "2GB", or "auto" (a quarter of free memory).
        batch_size: at most this many rows per forward pass (None: the engine's default).
        on_partial: called by engines that can show work in progress with what is finished so far (e.g. a
            partial Result), after each item.
        reporter: who hears about remote jobs (a `workbench.remote.RemoteRunner`: job states, timeout, result
            size limit); engines pass the run to every ``model.trace``. None: nnsight's own status line, or a
            runner entered with ``with runner:``. Local models never use it.
    """

    def __init__(
        self,
        *,
        progress: bool | ProgressCallback = True,
        cancel: CancelToken | None = None,
        memory_budget: int | float | str | None = "auto",
        batch_size: int | None = None,
        on_partial: Callable[[Any], None] | None = None,
        reporter: Any = None,
    ):
        if not (isinstance(progress, bool) or callable(progress)):
            raise InputError(f"progress must be True, False or a callback(done, total), got {progress!r}.")
        if cancel is not None and not isinstance(cancel, CancelToken):
            raise InputError(f"cancel must be a workbench CancelToken, got {type(cancel).__name__}.")
        self.progress = progress
        self.cancel = cancel if cancel is not None else CancelToken()
        self.batch_size = positive_size(batch_size, "batch_size")
        if memory_budget is not None and memory_budget != "auto":
            parse_budget(memory_budget, "cpu")  # validate now, before any model runs
        self.memory_budget = memory_budget
        self.on_partial = on_partial
        self.reporter = reporter

    @classmethod
    def of(cls, run: Run | None = None, **settings: Any) -> Run:
        """`run` itself when given (settings then must be left at None), else a new Run from `settings`."""
        if run is None:
            return cls(**{k: v for k, v in settings.items() if v is not None or k == "memory_budget"})
        if not isinstance(run, Run):
            raise InputError(f"run must be a workbench Run, got {type(run).__name__}.")
        return run

    def __repr__(self) -> str:
        return f"Run(memory_budget={self.memory_budget!r}, batch_size={self.batch_size!r})"

    def quiet(self) -> Run:
        """The same run without progress reports (for a sub-step whose progress would confuse the bar)."""
        return Run(
            progress=False,
            cancel=self.cancel,
            memory_budget=self.memory_budget,
            batch_size=self.batch_size,
            reporter=self.reporter,
        )

    # -- sizes ---------------------------------------------------------------------------------------
    def budget(self, device: torch.device | str) -> int:
        """The memory budget in bytes on `device`."""
        return parse_budget(self.memory_budget, device)

    def rows_per_chunk(self, bytes_per_row: int, where, default_max: int) -> int:
        """Rows per forward pass: as many as fit the budget, at most `batch_size` (or `default_max`).

        where: a device, or a model; for a model on NDIF an "auto" budget is 1 GiB per job (its memory is the
        server's, and each job's result comes back whole).
        """
        if getattr(where, "remote", False) is True and self.memory_budget in (None, "auto"):
            budget = REMOTE_JOB_BUDGET
        else:
            budget = self.budget(getattr(where, "device", where))
        return chunk_size(bytes_per_row, budget, max_chunk=self.batch_size or default_max)

    # -- looping -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise `Cancelled` if Stop was pressed."""
        self.cancel.raise_if_cancelled()

    def map(
        self,
        items: Sequence[T],
        fn: Callable[[T], R],
        *,
        desc: str = "",
        weights: Sequence[int] | None = None,
    ) -> list[R]:
        """``[fn(item) for item in items]`` with a cancel check before each item and progress after it.

        weights: how much each item counts towards progress (e.g. its rows); default 1 each.
        """
        weights = [1] * len(items) if weights is None else list(weights)
        out: list[R] = []
        with self._progress(sum(weights), desc) as progress:
            for item, w in zip(items, weights):
                self.check()
                out.append(fn(item))
                progress.tick(w)
        return out

    def chunked(self, n: int, chunk: int, fn: Callable[[int, int], R], *, desc: str = "") -> list[R]:
        """``fn(start, stop)`` over consecutive chunks of `n` rows, progress counted in rows."""
        spans = chunks(n, chunk)
        return self.map(spans, lambda span: fn(*span), desc=desc, weights=[b - a for a, b in spans])

    def steps(
        self, n: int, *, start: int = 0, desc: str = "", postfix: Callable[[], dict] | None = None
    ) -> Iterator[int]:
        """``range(start, n)`` with a cancel check before each step and progress after it (training loops).

        postfix: called after each step; what it returns is shown beside the progress bar (e.g. the loss).
        """
        with self._progress(n, desc, initial=start) as progress:
            for step in range(start, n):
                self.check()
                yield step
                progress.tick(1, postfix() if postfix is not None and progress.bar is not None else None)

    def partial(self, value: Any) -> None:
        """Hand work in progress to `on_partial` (no-op without one)."""
        if self.on_partial is not None:
            self.on_partial(value)

    def _progress(self, total: int, desc: str, initial: int = 0):
        return _Progress(self.progress, total, desc, initial)


class _Progress:
    """Progress of one loop: a tqdm bar, a callback, or nothing; ``tick(n)`` after each item."""

    def __init__(self, progress, total: int, desc: str, initial: int):
        self.progress, self.total, self.desc, self.done = progress, total, desc, initial
        self.bar = None

    def __enter__(self) -> _Progress:
        if self.progress is True and self.total > 0:
            self.bar = tqdm(total=self.total, initial=self.done, desc=self.desc or None, leave=False)
        return self

    def tick(self, n: int, postfix: dict | None = None) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif callable(self.progress):
            self.progress(self.done, self.total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2 * size), ..., (.., n)]``."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def concat(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key concatenation of chunk outputs (dicts of tensors) along the first axis."""
    parts = list(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
