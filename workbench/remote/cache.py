"""Results of remote engine calls, kept by (model, engine, inputs, options) so that redrawing does not resubmit.

A key is a digest of the call: the model's identity (name, revision, where it runs), the engine function's
module and name, and every argument reduced to plain data (tensors by dtype, shape and a hash of their bytes).
Arguments that only steer the run — progress callbacks, cancel tokens — are left out. An argument the digest
cannot describe faithfully (an arbitrary object) makes the call uncacheable rather than risk a wrong hit.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workbench.runner import CancelToken

IGNORED_OPTIONS = frozenset({"progress", "cancel"})
"""Keyword arguments that do not change an engine's result and stay out of the cache key."""


class Uncacheable(TypeError):
    """An argument the cache key cannot describe."""


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return ("tensor", str(data.dtype), tuple(data.shape), digest)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_plain(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_plain(v)) for v in value)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(_plain(k)), _plain(v)) for k, v in value.items())))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _plain(getattr(value, f.name))) for f in dataclasses.fields(value))
        return ("dataclass", f"{type(value).__module__}.{type(value).__qualname__}", fields)
    if isinstance(value, torch.dtype | torch.device):
        return (type(value).__name__, str(value))
    if (
        callable(value)
        and getattr(value, "__qualname__", "<lambda>") != "<lambda>"
        and hasattr(value, "__code__")
    ):
        code = value.__code__
        body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
        return ("function", value.__module__, value.__qualname__, body)
    raise Uncacheable(f"cannot key a cache entry on a {type(value).__name__}")


def model_identity(model) -> tuple:
    """What names a model for the cache: its name, hub revision, and where it runs."""
    from nnsight import CONFIG

    remote = model.remote
    where = CONFIG.API.HOST if remote is True else str(remote)
    return (model.name, getattr(model.nnsight, "revision", None), where)


def cache_key(fn: Callable, model, args: tuple, kwargs: dict) -> str:
    """A hex digest naming the call ``fn(model, *args, **kwargs)``; `Uncacheable` if an argument cannot be
    described."""
    kept = {k: v for k, v in kwargs.items() if k not in IGNORED_OPTIONS and not isinstance(v, CancelToken)}
    described = (
        f"{fn.__module__}.{getattr(fn, '__qualname__', repr(fn))}",
        model_identity(model),
        _plain(tuple(args)),
        _plain(kept),
    )
    return hashlib.sha256(repr(described).encode()).hexdigest()


def _copy(value: Any) -> Any:
    """A deep copy in which tensors carry no autograd history (a graph cannot be copied, nor is it wanted)."""
    memo: dict[int, Any] = {}

    def seed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                memo[id(v)] = v.detach().clone()
        elif isinstance(v, dict):
            for item in v.values():
                seed(item)
        elif isinstance(v, (list, tuple, set, frozenset)):
            for item in v:
                seed(item)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                seed(getattr(v, f.name))

    seed(value)
    return copy.deepcopy(value, memo)


class ResultCache:
    """An in-memory LRU of engine results, optionally mirrored to a directory (results with `.save()`).

    Args:
        max_entries: how many results to keep in memory.
        directory: where to also write results, so that a new kernel finds them; None keeps them in memory.
    """

    def __init__(self, max_entries: int = 64, directory: str | Path | None = None):
        self.max_entries = max_entries
        self.directory = Path(directory).expanduser() if directory else None
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries or self._path(key) is not None and self._path(key).exists()

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory else None

    def get(self, key: str, default: Any = None) -> Any:
        """The cached result (a copy, so callers may change it freely), or `default`."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return _copy(self._entries[key])
        path = self._path(key)
        if path is not None and path.exists():
            from workbench.results import load_result

            value = load_result(path)
            self._remember(key, value)
            with self._lock:
                self.hits += 1
            return _copy(value)
        with self._lock:
            self.misses += 1
        return default

    def put(self, key: str, value: Any) -> None:
        self._remember(key, _copy(value))
        path = self._path(key)
        if path is not None and hasattr(value, "save"):
            try:
                value.save(path)
            except TypeError:  # a result holding something the safe format cannot store: memory only
                pass

    def _remember(self, key: str, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every result (in memory and on disk)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0
        if self.directory is not None and self.directory.exists():
            for path in self.directory.glob("*.pt"):
                path.unlink()


RESULTS = ResultCache()
"""The cache `workbench.remote.call` uses unless told otherwise (shared by every widget in a kernel)."""
