"""The shared shape of every engine's result, and its file format.

Engines return frozen dataclasses that inherit from `Result`. Each carries its tensors, named axes with labels,
and a `Provenance` (model, inputs, options, package versions). `Result` gives them `.save()` / `load()` and
`.plot()`, which finds the figure builder registered for the result's type in `workbench.viz` (imported on the
first figure, so that engines never depend on plotly).

A result file is data only: one safetensors file whose tensors are the result's tensors and whose metadata holds
the rest as JSON (the class by its registered name, the fields, a format version). Loading parses that and builds
the class from an allow-list (`result_classes()`); nothing named in the file is imported or called. Loading then
checks every field is present and of its declared type, and that tensor shapes agree with the class's named axes
(`Result.shapes`). Saving writes a temporary file beside the target and renames it, so an interrupted save never
leaves a damaged file. Files of format 1 (``torch.save`` archives, before version 2) are still read, with
``torch.load(weights_only=True)`` and the same allow-list.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import platform
import uuid
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from workbench.errors import InputError

FORMAT_VERSION = 2
_FORMAT_KEY = "workbench_result_format"
_OLD_FORMAT = 1  # torch.save({"format": 1, "result": ...}) archives

# The built-in result classes, by the stable name a file uses, and the module that defines each. A file can only
# name one of these (or a Result subclass the running program has defined); the module string comes from here,
# never from the file. A new Result class in the package goes here (tests/test_results_files.py checks).
_BUILTIN: dict[str, str] = {
    "Provenance": "workbench.results",
    "PatchingResult": "workbench.patching.result",
    "AttributionComparison": "workbench.patching.result",
    "ScrubResult": "workbench.scrubbing.engine",
    "LossStats": "workbench.lnfree.evaluation",
    "DLAExactness": "workbench.lnfree.evaluation",
    "RemovalPreview": "workbench.lnfree.preview",
    "FrozenScales": "workbench.lnfree.calibration",
    "NormStatistics": "workbench.lnfree.calibration",
    "TrainingHistory": "workbench.lnfree.finetune",
    "ReplicaReport": "workbench.casper.pairs.replica",
    "RefStats": "workbench.plateau.stats",
    "InterpolationResult": "workbench.plateau.interpolation",
    "SliceResult": "workbench.plateau.interpolation",
    "PlateauResult": "workbench.plateau.probe",
    "PathPatchingResult": "workbench.circuits.results",
    "EdgeScores": "workbench.circuits.results",
    "Faithfulness": "workbench.circuits.results",
    "AtPResult": "workbench.circuits.results",
    "LogitLensResult": "workbench.circuits.results",
    "DLAResult": "workbench.circuits.results",
    "AttentionPatterns": "workbench.circuits.results",
    "LatentAttribution": "workbench.sae.attribution",
    "LatentContexts": "workbench.sae.dashboard",
    "LatentSweep": "workbench.sae.sweep",
    "SAEEvaluation": "workbench.sae.evaluate",
    "StableRegionsResult": "workbench.sae.stable",
    "SyntheticTestResult": "workbench.sae.synthetic",
    "ToyModel": "workbench.toymodels.models",
    "LossCurves": "workbench.toymodels.evaluate",
    "OffsetSweep": "workbench.toymodels.baselines",
    "SNMFSweep": "workbench.toymodels.baselines",
    "Mechanism": "workbench.toymodels.analysis",
    "FeatureResponse": "workbench.toymodels.analysis",
    "SigmaSweep": "workbench.toymodels.analysis",
    "Transplant": "workbench.toymodels.analysis",
    "LibGraph": "workbench.lib.build",
    "NodeAblation": "workbench.lib.ablations",
    "EdgeAblation": "workbench.lib.ablations",
    "FourierLabels": "workbench.lib.fourier",
    "GraphCommunities": "workbench.lib.clusters",
    "FeatureActivations": "workbench.lib.features",
    "EdgeAttributions": "workbench.lib.features",
}

# Named axes of the built-in classes' tensors (see `Result.shapes`); a class that declares `shapes` itself wins.
_BUILTIN_SHAPES: dict[str, dict[str, str]] = {
    "PatchingResult": {
        "raw": "metrics pair sites layers positions heads",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
    },
    "AttributionComparison": {"exact": "labels", "attribution": "labels"},
    "ScrubResult": {"kept": "names", "scores": "names input"},
    "LossStats": {"token_loss": "row token"},
    "DLAExactness": {"nmae_heads": "layer head", "nmae_mlps": "layer", "mean_abs_de_heads": "layer head"},
    "RemovalPreview": {"single_loss": "sites", "cumulative_loss": "step"},
    "FrozenScales": {"values": "sites"},
    "NormStatistics": {"tokens": "row pos", "scales": "norms row pos", "eot": "row pos", "loss": "row token"},
    "TrainingHistory": {
        **{name: "step" for name in ("step", "loss", "aux_loss", "lr", "grad_norm", "n_frozen")},
        "val_step": "eval",
        "val_loss": "eval",
    },
    "ReplicaReport": {
        name: "checkpoint"
        for name in ("epochs", "train_loss", "train_accuracy", "test_accuracy", "agreement")
    },
    "RefStats": {
        "mean": "d_model",
        "cov": "d_model d_model",
        "factor": "d_model d_model",
        "sample": "m d_model",
    },
    "InterpolationResult": {
        "alphas": "step",
        **{name: "prompts_a step" for name in ("kl", "l2", "distance", "logit_diff")},
        "top_ids": "prompts_a step k",
        "top_probs": "prompts_a step k",
        "answer_a": "prompts_a",
        "answer_b": "prompts_a",
    },
    "SliceResult": {
        "u": "u",
        "v": "v",
        "distance": "3 v u",
        "endpoint_distance": "3 3",
        **{name: "v u" for name in ("kl_to_a", "top1", "top1_prob")},
    },
    "PlateauResult": {
        "kl": "base_kind families sizes",
        "l2": "base_kind families sizes",
        "top_ids": "base_kind families sizes k",
        "top_probs": "base_kind families sizes k",
        "ref_top_ids": "base_kind k",
        "ref_top_probs": "base_kind k",
        "x0": "base_kind d_model",
        "directions": "base_kind families d_model",
        "noise_floor": "base_kind",
    },
}

_registered: dict[str, type] = {}


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    out = {"python": platform.python_version()}
    for name in ("workbench", "torch", "transformers", "nnsight"):
        try:
            if name == "workbench":
                out[name] = installed_version("interp-workbench")
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


_registered["Provenance"] = Provenance


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
    """Mixin for engine results. Subclasses are frozen dataclasses; `workbench.viz` registers their figures.

    `shapes` names the axes of tensor fields, checked when a file is loaded: ``{"raw": "metrics pair layers"}``
    says `raw` has three dimensions. An axis named after a field has that field's length (or value, for an int
    field; a field that is None means the axis is absent), a number is a fixed size, and any other name must have
    the same size wherever it appears in this result.
    """

    shapes: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls)

    def to_frame(self):  # pragma: no cover - every concrete result overrides it
        raise NotImplementedError

    def plot(self, **kwargs):
        """The default figure for this result (plotly): the builder `workbench.viz` registered for its type."""
        # plotly and every figure builder load on the first figure, not with the engines
        from workbench import viz

        return viz.default_figure(self, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to `path` (a safetensors file: tensors, plus JSON for the rest).

        The file is written beside `path` under a temporary name and renamed over it, so a failed save leaves any
        earlier file there unchanged. `InputError` when `path` is a folder, lies under a file or cannot be written;
        `TypeError` when a field holds something other than tensors, plain data and results.
        """
        path = Path(path).expanduser()
        write_atomic(path, to_bytes(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by `.save()`; checks that it is of this class."""
        obj = load_result(path)
        if not isinstance(obj, cls):
            raise InputError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj

    def check(self) -> None:
        """Raise `InputError` when a field has the wrong type or a tensor disagrees with `shapes` (run on load)."""
        _check_types(self)
        _check_shapes(self)


def _register(cls: type) -> None:
    name = cls.__name__
    builtin = _BUILTIN.get(name)
    if builtin is None or builtin == cls.__module__:
        _registered[name] = cls


def result_classes() -> dict[str, str]:
    """The classes a result file may name: {name: module}. Built-in ones, plus Result subclasses defined so far."""
    return {**_BUILTIN, **{name: cls.__module__ for name, cls in _registered.items()}}


def _class_named(name: Any) -> type:
    """The allow-listed class a file names. Imports only modules listed in this file, never one from the file."""
    if not isinstance(name, str) or (name not in _registered and name not in _BUILTIN):
        raise InputError(
            f"The file names an unknown result class {name!r} (workbench.results.result_classes() lists the "
            "known ones; a class defined outside the workbench loads once the code defining it has run)."
        )
    if name not in _registered:
        importlib.import_module(_BUILTIN[name])  # defining the class registers it
    if name not in _registered:
        raise InputError(f"The result class {name!r} is not defined in {_BUILTIN[name]}.")
    return _registered[name]


# -- writing -------------------------------------------------------------------------------------------------
def to_bytes(result: Any) -> bytes:
    """The file contents for `result` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(result, tensors)
    meta = {_FORMAT_KEY: str(FORMAT_VERSION), "result": json.dumps(tree, allow_nan=True)}
    return safetensors_bytes(tensors, metadata=meta)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _registered.get(name) is not type(value):
            raise TypeError(
                f"cannot save a {name} in a result: only Result classes and Provenance can be nested"
            )
        fields = {f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value)}
        return {"class": name, "fields": fields}
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cannot save a value of type {type(value).__name__} in a result")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename (`InputError` on failure;
    whatever was at `path` before stays as it was)."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name, e.g. {path / 'result.safetensors'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.is_file()), path.parent)
        raise InputError(f"Cannot save to {path}: {blocker} is a file, not a folder.") from err
    except OSError as err:
        raise InputError(f"Cannot create the folder {path.parent} ({err.strerror or err}).") from err
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        before = "the file already there is unchanged" if path.exists() else "nothing was written"
        raise InputError(
            f"Could not write {path} ({err.strerror or type(err).__name__}); {before}. "
            "Check the folder is writable and the disk has space."
        ) from err


# -- reading -------------------------------------------------------------------------------------------------
def load_result(path: str | os.PathLike):
    """Read any result written by `Result.save()`, whatever its class (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a saved result.")
    if not path.exists():
        raise InputError(f"No saved result at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # a zip archive: format 1, written by torch.save
        return _load_format_1(path)
    tree, tensors = _read_safetensors(path)
    return _decode(tree, tensors, path)


def _damaged(path: Path, reason: str) -> InputError:
    return InputError(
        f"{path} is not a readable workbench result ({reason}). It may be truncated or damaged, or another kind "
        "of file; save the result again."
    )


def _read_safetensors(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # SafetensorError, OSError: the file is not a complete safetensors file
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    version = meta.get(_FORMAT_KEY)
    if version is None:
        raise _damaged(path, "a safetensors file without workbench metadata")
    if version != str(FORMAT_VERSION):
        raise InputError(
            f"{path} was written in result format {version}; this version of the workbench reads formats "
            f"{_OLD_FORMAT} and {FORMAT_VERSION}. Update the workbench to read it."
        )
    try:
        return json.loads(meta["result"]), tensors
    except (KeyError, ValueError) as err:
        raise _damaged(path, f"its description is not valid JSON: {err}") from None


def _decode(value: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"tensor"}:
        if value["tensor"] not in tensors:
            raise _damaged(path, f"tensor {value['tensor']!r} is missing")
        return tensors[value["tensor"]]
    if set(value) == {"tuple"}:
        return tuple(_decode(v, tensors, path) for v in value["tuple"])
    if set(value) == {"dict"}:
        return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in value["dict"]}
    if set(value) == {"class", "fields"} and isinstance(value["fields"], dict):
        cls = _class_named(value["class"])
        return _build(cls, {k: _decode(v, tensors, path) for k, v in value["fields"].items()}, path)
    raise _damaged(path, f"an entry with keys {sorted(value)} is not part of the format")


def _load_format_1(path: Path):
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated archives, miniz errors, objects outside weights_only's allow-list
        raise _damaged(
            path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != _OLD_FORMAT:
        raise _damaged(path, "a torch file that is not a workbench result")
    return _decode_format_1(data.get("result"), path)


def _decode_format_1(value: Any, path: Path) -> Any:
    if isinstance(value, list):
        return [_decode_format_1(v, path) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dataclass__" in value:
        module, _, qualname = str(value["__dataclass__"]).partition(":")
        name = qualname.rsplit(".", 1)[-1]
        known = result_classes().get(name)
        if known != module:  # only a class of the allow-list, named where it is defined
            raise InputError(
                f"{path} names {value['__dataclass__']!r}, which is not a workbench result class."
            )
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise _damaged(path, f"{name} has no fields")
        return _build(_class_named(name), {k: _decode_format_1(v, path) for k, v in fields.items()}, path)
    if "__dict__" in value:
        return {_decode_format_1(k, path): _decode_format_1(v, path) for k, v in value["__dict__"]}
    if "__tuple__" in value:
        return tuple(_decode_format_1(v, path) for v in value["__tuple__"])
    return value


def _build(cls: type, fields: dict[str, Any], path: Path):
    """``cls(**fields)`` after checking the field names; then the class's own `check` (types and shapes)."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(declared))
    if unknown:
        raise InputError(f"{path}: {cls.__name__} has no field(s) {', '.join(unknown)}; the file is not one.")
    missing = [
        name
        for name, f in declared.items()
        if name not in fields
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{path}: the saved {cls.__name__} lacks the field(s) {', '.join(missing)}.")
    obj = cls(**fields)
    try:
        obj.check() if isinstance(obj, Result) else _check_types(obj)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return obj


# -- validation ----------------------------------------------------------------------------------------------
_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "torch.Tensor": (torch.Tensor,),
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "tuple": (tuple,),
    "list": (list,),
    "dict": (dict,),
    "None": (type(None),),
}


def _alternatives(annotation: str) -> list[str]:
    """The top-level ``|`` alternatives of an annotation string, each without its ``[...]`` part."""
    parts, depth, current = [], 0, ""
    for ch in annotation:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip().split("[", 1)[0] for p in parts]


def _check_types(obj: Any) -> None:
    """Each field against its annotation, where that is a simple type (others are not checked)."""
    for f in dataclasses.fields(obj):
        annotation = f.type if isinstance(f.type, str) else ""  # modules here use string annotations
        allowed: tuple[type, ...] = ()
        for alt in _alternatives(annotation):
            if alt in _SIMPLE_TYPES:
                allowed += _SIMPLE_TYPES[alt]
            elif alt in _registered:
                allowed += (_registered[alt],)
            else:
                allowed = ()  # an annotation this check does not understand: leave the field unchecked
                break
        value = getattr(obj, f.name)
        bad_bool = isinstance(value, bool) and bool not in allowed
        if allowed and (not isinstance(value, allowed) or bad_bool):
            raise InputError(
                f"{type(obj).__name__}.{f.name} should be {annotation}, found {type(value).__name__}"
            )


def _axis_size(result: Any, axis: str) -> int | None | str:
    """The size an axis name fixes: a number, a field's length (or int value), None for an absent axis, or
    "free" for a name that is not a field."""
    if axis.isdigit():
        return int(axis)
    if axis not in {f.name for f in dataclasses.fields(result)}:
        return "free"
    value = getattr(result, axis)
    if value is None:
        return None
    if isinstance(value, bool):
        return "free"
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else "free"
    try:
        return len(value)
    except TypeError:
        return "free"


def _check_shapes(result: Any) -> None:
    spec = type(result).shapes or _BUILTIN_SHAPES.get(type(result).__name__, {})
    bound: dict[str, tuple[int, str]] = {}
    name = type(result).__name__
    for field, axes in spec.items():
        value = getattr(result, field, None)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}.{field} should be a tensor, found {type(value).__name__}")
        wanted = [(axis, _axis_size(result, axis)) for axis in axes.split()]
        wanted = [(axis, size) for axis, size in wanted if size is not None]
        labels = ", ".join(axis for axis, _ in wanted)
        if value.dim() != len(wanted):
            raise InputError(
                f"{name}.{field} has shape {tuple(value.shape)}, but its axes [{labels}] need {len(wanted)} "
                "dimension(s)"
            )
        for dim, (axis, size) in enumerate(wanted):
            actual = value.shape[dim]
            if size == "free":
                size, where = bound.setdefault(axis, (actual, field))
                if actual != size:
                    raise InputError(
                        f"{name}.{field} has {actual} along axis {axis!r}, but {where} has {size} there"
                    )
            elif actual != size:
                raise InputError(
                    f"{name}.{field} has shape {tuple(value.shape)}: axis {axis!r} should have {size} entries "
                    f"(axes [{labels}])"
                )
