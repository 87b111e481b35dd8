"""Results of remote engine calls, kept by (model, engine, inputs, options) so that redrawing does not resubmit.

A key is a digest of the call: the model's identity (name, revision, where it runs), the engine function's
module and name, and every argument reduced to plain data (tensors by dtype, shape and a hash of their bytes;
functions by value: code, defaults, captured values and the plain globals they read).
Arguments that only steer the run — progress callbacks, cancel tokens — are left out. An argument the digest
cannot describe faithfully (an arbitrary object) makes the call uncacheable rather than risk a wrong hit.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from nnsight import CONFIG

from workbench.core import CancelToken
from workbench.errors import WorkbenchError
from workbench.results import load_result

IGNORED_OPTIONS = frozenset({"progress", "cancel", "run"})
"""Keyword arguments that do not change an engine's result and stay out of the cache key."""


class Uncacheable(TypeError):
    """An argument the cache key cannot describe."""


def _plain(value: Any, seen: frozenset[int] = frozenset()) -> Any:
    """`value` as nested tuples of plain data that name it by value; `Uncacheable` when that is not possible."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return ("tensor", str(data.dtype), tuple(data.shape), digest)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_plain(v, seen) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_plain(v, seen)) for v in value)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(_plain(k, seen)), _plain(v, seen)) for k, v in value.items())))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _plain(getattr(value, f.name), seen)) for f in dataclasses.fields(value))
        return ("dataclass", f"{type(value).__module__}.{type(value).__qualname__}", fields)
    if isinstance(value, torch.dtype | torch.device):
        return (type(value).__name__, str(value))
    if isinstance(value, types.FunctionType):
        return _function(value, seen)
    if isinstance(value, types.MethodType):
        return ("method", _plain(value.__self__, seen), _plain(value.__func__, seen))
    if isinstance(value, functools.partial):
        return ("partial", _plain(value.func, seen), _plain(value.args, seen), _plain(value.keywords, seen))
    if isinstance(value, types.BuiltinFunctionType):  # C functions (len, torch.sum): fixed by the versions
        return ("builtin", getattr(value, "__module__", None), value.__qualname__)
    raise Uncacheable(f"cannot key a cache entry on a {type(value).__name__}")


_CODE_TYPES = (types.FunctionType, types.BuiltinFunctionType)


def _code(code: types.CodeType) -> tuple:
    """A code object by value: bytecode, constants (nested functions' code included) and the names it uses."""
    consts = tuple(_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    body = hashlib.sha256(code.co_code + repr((consts, code.co_names)).encode()).hexdigest()
    return ("code", body)


def _global_names(code: types.CodeType) -> set[str]:
    """Names a code object (and the functions nested in it) may read from its globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _function(fn: types.FunctionType, seen: frozenset[int]) -> tuple:
    """A Python function by value: its code, defaults, captured (closure) values and the globals it reads.

    Two closures with different captured values get different keys. Globals are keyed by value when they are plain
    data (or functions of the same module, recursively); modules, classes and functions of other modules by name.
    Anything else (a model, an open file) makes the function `Uncacheable`.
    """
    name = (fn.__module__, fn.__qualname__)
    if id(fn) in seen:  # recursion: the function is already being described
        return ("recursive", *name)
    seen = seen | {id(fn)}
    try:
        cells = tuple(_plain(cell.cell_contents, seen) for cell in fn.__closure__ or ())
    except ValueError:  # an empty cell: a variable not yet assigned when the function was made
        raise Uncacheable(f"{fn.__qualname__} captures a variable that has no value yet") from None
    used = []
    for global_name in sorted(_global_names(fn.__code__)):
        if global_name not in fn.__globals__:
            continue  # a builtin or an attribute name, both covered by the code's names
        value = fn.__globals__[global_name]
        if isinstance(value, types.ModuleType):
            used.append((global_name, ("module", value.__name__)))
        elif isinstance(value, type):
            used.append((global_name, ("class", value.__module__, value.__qualname__)))
        elif isinstance(value, _CODE_TYPES) and getattr(value, "__module__", None) not in (
            fn.__module__,
            None,
        ):
            used.append((global_name, ("named", value.__module__, getattr(value, "__qualname__", ""))))
        else:
            try:
                used.append((global_name, _plain(value, seen)))
            except Uncacheable:
                raise Uncacheable(
                    f"{fn.__qualname__} reads the global {global_name!r}, a {type(value).__name__} that a cache "
                    "key cannot describe"
                ) from None
    defaults = (_plain(fn.__defaults__, seen), _plain(fn.__kwdefaults__, seen))
    return ("function", *name, _code(fn.__code__), defaults, cells, tuple(used))


def model_identity(model) -> tuple:
    """What names a model for the cache: its name, hub revision, and where it runs."""
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

    Files in the directory use the data-only result format (`workbench.results`): reading one never runs code. An
    entry that cannot be read (half-written, damaged, from another version) counts as a miss and is replaced by
    the next result for that key. When the directory cannot be written, the result is still returned and kept in
    memory, with a warning.

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
        return self.directory / f"{key}{SUFFIX}" if self.directory else None

    def get(self, key: str, default: Any = None) -> Any:
        """The cached result (a copy, so callers may change it freely), or `default`."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return _copy(self._entries[key])
        value = self._read(key)
        if value is not _MISSING:
            self._remember(key, value)
            with self._lock:
                self.hits += 1
            return _copy(value)
        with self._lock:
            self.misses += 1
        return default

    def _read(self, key: str) -> Any:
        path = self._path(key)
        if path is None or not path.is_file():
            return _MISSING

        try:
            return load_result(path)
        except (WorkbenchError, OSError):  # unreadable: a miss; the next put for this key replaces the file
            return _MISSING

    def put(self, key: str, value: Any) -> None:
        """Keep `value` under `key` (in memory, and on disk when there is a directory and `value` can be saved)."""
        self._remember(key, _copy(value))
        path = self._path(key)
        if path is None or not hasattr(value, "save"):
            return
        try:
            value.save(path)
        except TypeError:  # a result holding something the data-only format cannot store: memory only
            pass
        except Exception as err:  # never lose a completed result to a cache problem
            warnings.warn(
                f"The result was not written to the cache folder {self.directory} ({err}); it is kept in memory "
                "for this kernel only.",
                CacheWriteWarning,
                stacklevel=2,
            )

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
        if self.directory is not None and self.directory.is_dir():
            for pattern in (f"*{SUFFIX}", "*.pt", f".*{SUFFIX}.*.tmp"):
                for path in self.directory.glob(pattern):
                    path.unlink(missing_ok=True)


class CacheWriteWarning(UserWarning):
    """A result could not be written to the cache folder (it is still returned, and kept in memory)."""


SUFFIX = ".safetensors"
_MISSING = object()


RESULTS = ResultCache()
"""The cache `workbench.remote.call` uses unless told otherwise (shared by every widget in a kernel)."""
