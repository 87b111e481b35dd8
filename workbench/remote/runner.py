"""`RemoteRunner`: how engine calls become tracked NDIF jobs, without remote code in the engines.

Engines run every model call through ``model.trace(...)``. For a remote model each trace is one NDIF job, sent
by the backend from `workbench.remote.backend.backend_for`, which reports to the runner that is active in the
calling thread:

    runner = RemoteRunner(on_update=lambda u: print(u.text()), cancel=token, timeout=600)
    with runner:                                   # every remote trace in this thread reports to `runner`
        result = patching.sweep(model, clean, corrupt)
    result = runner.run(patching.sweep, model, clean, corrupt)   # the same, cached by (model, inputs, options)

A widget does this in its background thread, so the kernel stays free while NDIF works; its Stop button
sets `cancel`, which the backend checks several times a second while it waits for the next status.
`submit` does the same for notebook code: it returns at once with a `RemoteCall` to poll, wait on or cancel.
"""

from __future__ import annotations

import contextvars
import threading
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from workbench.core import CancelToken
from workbench.errors import Cancelled
from workbench.remote.cache import RESULTS, ResultCache, Uncacheable, cache_key
from workbench.remote.config import DEFAULT_TIMEOUT
from workbench.remote.jobs import JobUpdate
from workbench.remote.service import version_drift

_ACTIVE: contextvars.ContextVar[tuple[RemoteRunner, ...]] = contextvars.ContextVar(
    "remote_runners", default=()
)


class VersionDriftWarning(UserWarning):
    """torch, transformers or nnsight differ between this machine and NDIF."""


class RemoteRunner:
    """Settings and reporting for the remote jobs of one run (an engine call, a widget's Run).

    Args:
        on_update: called with a `JobUpdate` at every status change of every job, and every
            `tick_interval` seconds while a job waits (to refresh the elapsed time). Runs in the thread that
            waits for the job. None: nnsight's own status line is printed instead.
        cancel: a `CancelToken`; when set, the runner stops waiting at once and raises `Cancelled`.
        timeout: seconds one job may take from submission to result (default `DEFAULT_TIMEOUT`, 30 minutes;
            None: wait as long as it takes).
        max_result_mb: refuse to download a larger result.
        cache: where `run` keeps results (default: the kernel-wide `workbench.remote.cache.RESULTS`).
        poll_interval: how often (seconds) the wait wakes to check `cancel` and `timeout`.
        tick_interval: how often (seconds) `on_update` hears the elapsed time while nothing changes.

    Attributes:
        updates: the updates reported so far (the last one per job is its outcome; the latest 10,000 kept).
        submitted: how many jobs this runner sent (cache hits send none).
    """

    def __init__(
        self,
        on_update: Callable[[JobUpdate], None] | None = None,
        *,
        cancel: CancelToken | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_result_mb: float = 1024,
        cache: ResultCache | None = RESULTS,
        poll_interval: float = 0.2,
        tick_interval: float = 0.5,
    ):
        self.on_update = on_update
        self.cancel = cancel if cancel is not None else CancelToken()
        self.timeout = timeout
        self.max_result_bytes = int(max_result_mb * 2**20)
        self.cache = cache
        self.poll_interval = poll_interval
        self.tick_interval = tick_interval
        self.updates: deque[JobUpdate] = deque(maxlen=10_000)
        self.submitted = 0
        self._lock = threading.Lock()

    # -- activation ----------------------------------------------------------------------------------
    def __enter__(self) -> RemoteRunner:
        """``with runner:``: remote traces in this context that name no `Run.reporter` report here."""
        self._tokens = getattr(self, "_tokens", [])
        self._tokens.append(_ACTIVE.set((*_ACTIVE.get(), self)))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())

    # -- what backends call --------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.cancel.cancelled

    def raise_if_cancelled(self) -> None:
        if self.cancel.cancelled:
            raise Cancelled("The run was stopped before its next NDIF job was sent.")

    def _next_number(self) -> int:
        with self._lock:
            self.submitted += 1
            return self.submitted

    def _report(self, update: JobUpdate) -> None:
        self.updates.append(update)
        if self.on_update is not None:
            self.on_update(update)

    def _check_versions(self, host: str) -> str | None:
        """Once per host and process: warn when torch/transformers/nnsight differ from the server's."""
        if host in _checked_hosts:
            return None
        _checked_hosts.add(host)
        try:
            drift = version_drift(host)
        except Exception:  # the job's own submission reports connection problems properly
            return None
        if not drift:
            return None
        message = (
            "Package versions differ from NDIF's: "
            + "; ".join(drift)
            + ". Interventions can behave differently remotely; install the server's versions to match."
        )
        warnings.warn(message, VersionDriftWarning, stacklevel=2)
        return message

    @property
    def last(self) -> JobUpdate | None:
        """The most recent update, if any."""
        return self.updates[-1] if self.updates else None

    # -- running engine calls ------------------------------------------------------------------------
    def run(self, fn: Callable, model, *args, **kwargs) -> Any:
        """``fn(model, *args, **kwargs)`` with this runner active; for remote models the result is cached by
        (model, fn, inputs, options), and a repeated call returns it without sending a job."""
        key = None
        if model.remote and self.cache is not None:
            try:
                key = cache_key(fn, model, args, kwargs)
            except Uncacheable:
                key = None
        if key is not None:
            hit = self.cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
        with self:
            result = fn(model, *args, **kwargs)
        if key is not None:
            self.cache.put(key, result)
        return result

    def submit(self, fn: Callable, model, *args, **kwargs) -> RemoteCall:
        """Start `run(fn, model, ...)` in a background thread and return at once."""
        return RemoteCall(self, fn, model, args, kwargs)


_MISSING = object()
_checked_hosts: set[str] = set()


def active_runner() -> RemoteRunner:
    """The innermost runner entered in this context (``with runner:``), or a new one that prints nnsight's own
    status line."""
    active = _ACTIVE.get()
    return active[-1] if active else RemoteRunner()


current_runner = active_runner  # its earlier name


def call(fn: Callable, model, *args, **kwargs) -> Any:
    """Run an engine, through the active `RemoteRunner` (and its cache) when the model is remote.

    ``remote.call(patching.sweep, model, clean, corrupt, progress=cb, cancel=token)`` is what widgets use:
    for local models it is just ``fn(model, ...)``; for remote ones a redraw finds the result in the cache.
    """
    if not model.remote:
        return fn(model, *args, **kwargs)
    return active_runner().run(fn, model, *args, **kwargs)


class RemoteCall:
    """An engine call running in a background thread (see `RemoteRunner.submit`)."""

    def __init__(self, runner: RemoteRunner, fn: Callable, model, args: tuple, kwargs: dict):
        self.runner = runner
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(fn, model, args, kwargs), daemon=True)
        self._thread.start()

    def _work(self, fn, model, args, kwargs) -> None:
        try:
            self._result = self.runner.run(fn, model, *args, **kwargs)
        except BaseException as err:  # handed to whoever asks for the result
            self._error = err
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def status(self) -> str:
        """The last job update as a line of text."""
        last = self.runner.last
        if self._done.is_set() and self._error is None:
            return f"done ({last.text()})" if last else "done"
        return last.text() if last else "starting"

    def cancel(self) -> None:
        """Stop waiting (the job may still finish on NDIF; its result is discarded)."""
        self.runner.cancel.cancel()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the result (re-raising the call's error); `TimeoutError` if `timeout` passes first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Still running after {timeout} s: {self.status}")
        if self._error is not None:
            raise self._error
        return self._result

    def __repr__(self) -> str:
        return f"RemoteCall({self.status})"


def submit(
    fn: Callable, model, *args, on_update=None, timeout: float | None = DEFAULT_TIMEOUT, **kwargs
) -> RemoteCall:
    """Start an engine call on a remote model without blocking: ``job = remote.submit(patching.sweep, model,
    ...)``, then ``job.status``, ``job.result()`` or ``job.cancel()``."""
    return RemoteRunner(on_update, timeout=timeout).submit(fn, model, *args, **kwargs)
