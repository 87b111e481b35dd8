"""The shared shape of every engine's result.

Engines return frozen dataclasses that inherit from `Result`. Each carries its tensors, named axes with labels,
and a `Provenance` (model, inputs, options, package versions). `Result` gives them `.save()` / `load()` in a
safe format (``torch.load(weights_only=True)`` reads it back, no pickled code), and `.plot()`, which imports the
matching figure builder from `workbench.viz` lazily so that engines never depend on plotly.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import platform
from pathlib import Path
from typing import Any, ClassVar

import torch

from workbench.errors import InputError

_FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {"python": platform.python_version()}
    for name in ("workbench", "torch", "transformers", "nnsight"):
        try:
            if name == "workbench":
                from importlib.metadata import version

                out[name] = version("interp-workbench")
            else:
                out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # a missing optional package is not an error here
            out[name] = "unknown"
    return out


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a result came from: enough to rerun it."""

    model: str
    options: dict[str, Any]
    versions: dict[str, str]
    created: str

    @classmethod
    def capture(cls, model: str, **options: Any) -> Provenance:
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(model=model, options=_plain(options), versions=package_versions(), created=created)


def _plain(value: Any) -> Any:
    """Options as plain data (callables and objects become their names) so they can be saved and shown."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return value
    return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)


class Result:
    """Mixin for engine results. Subclasses are frozen dataclasses and set `viz_module`."""

    viz_module: ClassVar[str | None] = None

    def to_frame(self):  # pragma: no cover - every concrete result overrides it
        raise NotImplementedError

    def plot(self, **kwargs):
        """The default figure for this result (plotly), built by `workbench.viz`."""
        if self.viz_module is None:
            raise NotImplementedError(f"{type(self).__name__} has no default figure")
        return importlib.import_module(self.viz_module).plot(self, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to `path` (a torch file holding only tensors and plain data)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": _FORMAT_VERSION, "result": _encode(self)}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by `.save()`; checks that it is of this class."""
        obj = load_result(path)
        if not isinstance(obj, cls):
            raise InputError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj


def load_result(path: str | os.PathLike):
    """Read any result written by `Result.save()`, whatever its class."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"No saved result at {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != _FORMAT_VERSION:
        raise InputError(f"{path} is not a workbench result file (or was written by an incompatible version)")
    return _decode(data["result"])


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot save a value of type {type(value).__name__} in a result")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__dataclass__" in value:
            module, qualname = value["__dataclass__"].split(":")
            if not module.startswith("workbench."):
                raise InputError(f"refusing to load a result class from outside workbench: {module}")
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            return cls(**{k: _decode(v) for k, v in value["fields"].items()})
        if "__dict__" in value:
            return {_decode(k): _decode(v) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
