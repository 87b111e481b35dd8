"""`load_model`: the one way into a model.

    load_model("demo")                          # the bundled demo model (offline, CPU, < 2 s)
    load_model("openai-community/gpt2")         # a hub name, loaded lazily (weights on first trace)
    load_model("./checkpoints/my-gpt2")         # a local directory in Hugging Face format
    load_model(hf_model, tokenizer=tok)         # a transformers model you already built
    load_model(cnn)                             # any torch.nn.Module (no standard sites; use .nnsight)
    load_model("meta-llama/Llama-3.1-8B", remote=True)   # the same model on NDIF

Models are put in eval mode (dropout off, so patching is deterministic) and use eager attention by default so
that attention patterns can be read.

A local directory is checked before anything is built: config.json must be valid JSON, tokenizer files must be
there, every safetensors file's header must agree with the file's size (a truncated or overwritten file is
named), and the weights' shapes must match the config. The demo model's files are also checked against the
sha256 digests recorded in ``workbench/demo_model/model_digests.json``. Unsupported dtypes and devices this
machine does not have are refused with a sentence saying what to use instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from workbench import demo_model
from workbench.errors import ModelLoadError
from workbench.models.adapters import adapter_for, model_config
from workbench.models.model import WorkbenchModel

# transformers, nnsight, httpx and huggingface_hub are imported inside the functions that use them: importing
# workbench.models (sites, tokens, adapters) stays light, and hub_reachable's client loads only when asked.

_BIG_MODEL_PARAMS = 2e9  # above this, GPUs default to bfloat16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEMO_DIGESTS = Path(__file__).resolve().parents[1] / "demo_model" / "model_digests.json"


def default_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout` seconds (False at once when HF_HUB_OFFLINE is set).

    For notebooks that skip hub models offline: one quick check instead of the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def _resolve_dtype(dtype, device: torch.device, n_params: float) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and n_params > _BIG_MODEL_PARAMS else torch.float32
    resolved = dtype
    if not isinstance(dtype, torch.dtype):
        resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    names = ", ".join(repr(str(d).removeprefix("torch.")) for d in _DTYPES)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"dtype={dtype!r} is not a torch dtype; use one of {names}.")
    if resolved not in _DTYPES:
        raise ModelLoadError(
            f"dtype={dtype!r} is not supported: models load in {names} (quantised and integer types are not)."
        )
    return resolved


def _resolve_device(device) -> torch.device:
    """`device` as a torch device this machine has (default: the GPU when present); `ModelLoadError` otherwise."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(
            f"device={device!r} is not a torch device ({err}); use 'cpu' or 'cuda'."
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r}, but torch sees no GPU on this machine (torch.cuda.is_available() is False: "
                "no GPU, or a CPU-only torch build). Leave device unset, or use device='cpu'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={device!r}, but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ...)."
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device={device!r}, but Apple's MPS backend is not available here; use 'cpu'.")
    return resolved


def _approx_params(hf_config) -> float:
    cfg = getattr(hf_config, "text_config", None) or hf_config
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    return 12 * layers * d * d + 2 * getattr(cfg, "vocab_size", 0) * d


def load_model(
    model,
    tokenizer=None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    remote: bool | str = False,
    attn_implementation: str | None = "eager",
    revision: str | None = None,
    dispatch: bool = False,
    prepend_bos: bool | None = None,
) -> WorkbenchModel:
    """Load or wrap a model as a `WorkbenchModel`.

    Args:
        model: "demo", a hub id, a local directory, a `transformers.PreTrainedModel`, any `torch.nn.Module`, or
            a `WorkbenchModel` (returned unchanged).
        tokenizer: the tokenizer for a pre-built model (hub ids and directories load their own).
        device: default the GPU when present, else the CPU. Pre-built modules stay where they are unless given.
        dtype: default float32, or bfloat16 for models above 2B parameters on a GPU.
        remote: True runs every trace on NDIF (nothing is loaded locally); "local" runs nnsight's serialising
            dry run of the remote path on this machine.
        attn_implementation: "eager" (default) returns attention patterns; "sdpa" is faster but hides them.
        revision: hub revision (branch, tag or commit).
        dispatch: load hub/directory weights now instead of on the first trace.
        prepend_bos: whether `to_tokens` puts BOS first (default: when the tokenizer has a BOS token).
    """
    if isinstance(model, WorkbenchModel):
        return model
    settings = dict(
        device=device,
        dtype=dtype,
        remote=remote,
        attn_implementation=attn_implementation,
        prepend_bos=prepend_bos,
    )
    if isinstance(model, str) and model == "demo":
        check_digests(demo_model.DEMO_DIR, DEMO_DIGESTS)
        return _from_directory(str(demo_model.DEMO_DIR), name="demo", dispatch=True, quiet=True, **settings)
    if isinstance(model, (str, os.PathLike)):
        return _from_name(str(model), revision=revision, dispatch=dispatch, **settings)
    if isinstance(model, torch.nn.Module):
        return _from_module(model, tokenizer, **settings)
    raise ModelLoadError(
        f"Cannot load a model from {type(model).__name__}. Give 'demo', a hub id, a local directory, a "
        "transformers model (with tokenizer=...), or a torch.nn.Module."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "name" or "org/name"


def _from_name(name, *, revision, **settings):
    """A local directory, or else a hub id (`settings`: those of `_from_directory`)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(str(path), name=name, **settings)
    if _looks_like_path(name):
        raise ModelLoadError(f"No model directory at {name!r}. Check the path, or give a hub id like 'gpt2'.")
    return _from_directory(name, name=name, revision=revision, **settings)


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    text = str(err)
    if "valid JSON" in text or isinstance(err, json.JSONDecodeError):
        return ModelLoadError(
            f"Could not load {name!r}: its config.json is not valid JSON ({text.splitlines()[0]})."
        )
    offline = "connect" in text.lower() or "offline" in text.lower() or "cached" in text.lower()
    if offline:
        return ModelLoadError(
            f"Could not load {name!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1) and no local "
            f"copy is cached. On a machine with internet, run `hf download {name} --local-dir "
            f"./{name.split('/')[-1]}`, copy that directory here, and call load_model('./{name.split('/')[-1]}')."
        )
    return ModelLoadError(f"Could not load {name!r}: {text.splitlines()[0] if text else type(err).__name__}")


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' "Loading weights" progress bar for the duration (restored afterwards): for the demo
    model it is noise under every notebook cell that loads it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_directory(
    name_or_dir,
    *,
    name,
    device,
    dtype,
    remote,
    attn_implementation,
    dispatch,
    prepend_bos,
    revision=None,
    quiet=False,
):
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    local = Path(name_or_dir).is_dir()
    weights = check_directory(Path(name_or_dir)) if local else {}
    hub_kwargs = {"revision": revision} if revision else {}
    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, **hub_kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise ModelLoadError(f"Could not load the model in {name_or_dir}: {_first_line(err)}") from err
        raise _hub_error(name, err) from err
    if len(tokenizer) < 2:
        raise ModelLoadError(
            f"The tokenizer of {name!r} has {len(tokenizer)} token(s): its tokenizer files are missing or damaged "
            "(tokenizer.json, or vocab.json with merges.txt)."
        )
    adapter = adapter_for(hf_config)  # fail before loading anything if we cannot map the architecture
    if weights:
        _check_weight_shapes(hf_config, weights, name_or_dir)
    kwargs = dict(task="text-generation", tokenizer=tokenizer, **hub_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if remote is not True:
        device = _resolve_device(device)
        kwargs["dtype"] = _resolve_dtype(dtype, device, _approx_params(hf_config))
        kwargs["device_map"] = str(device)
        kwargs["dispatch"] = dispatch
    else:
        # The (meta) model's dtype is what engines cast the tensors they send to: guess NDIF's, which runs on
        # GPUs, with the local-GPU default (bfloat16 above 2B parameters); `dtype=` overrides.
        kwargs["dtype"] = _resolve_dtype(dtype, torch.device("cuda"), _approx_params(hf_config))
    try:
        with warnings.catch_warnings(), _no_loading_bar() if quiet else contextlib.nullcontext():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            nn_model = TransformersModel(name_or_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from err
    module = nn_model._module
    if hasattr(module, "eval"):
        module.eval()
    return WorkbenchModel(
        nn_model,
        name=name,
        tokenizer=tokenizer,
        adapter=adapter_for(hf_config, module),
        cfg=model_config(hf_config, adapter),
        remote=remote,
        prepend_bos=prepend_bos,
        device=device if remote is not True else None,
    )


def _from_module(
    module: torch.nn.Module, tokenizer, *, device, dtype, remote, attn_implementation, prepend_bos
):
    from nnsight import NNsight

    if device is not None or dtype is not None:
        device = _resolve_device(device) if device is not None else None
        module = module.to(device=device, dtype=_resolve_dtype(dtype, device or torch.device("cpu"), 0))
    module.eval()
    hf_config = getattr(module, "config", None)
    is_hf = hf_config is not None and hasattr(module, "can_generate")
    if not is_hf:
        return WorkbenchModel(
            NNsight(module),
            name=type(module).__name__,
            tokenizer=tokenizer,
            remote=remote,
            prepend_bos=prepend_bos,
        )
    adapter = adapter_for(hf_config, module)
    if attn_implementation and getattr(hf_config, "_attn_implementation", None) != attn_implementation:
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation(attn_implementation)
        else:  # transformers 4
            hf_config._attn_implementation = attn_implementation
    if tokenizer is not None:
        from nnsight import TransformersModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            nn_model = TransformersModel(module, tokenizer=tokenizer, task="text-generation")
    else:
        nn_model = NNsight(module)
    name = getattr(hf_config, "name_or_path", "") or type(module).__name__
    return WorkbenchModel(
        nn_model,
        name=name,
        tokenizer=tokenizer,
        adapter=adapter,
        cfg=model_config(hf_config, adapter),
        remote=remote,
        prepend_bos=prepend_bos,
    )


# -- checks of a model directory ---------------------------------------------------------------------------------
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_directory(path: Path) -> dict[str, tuple[int, ...]]:
    """Check a Hugging Face model directory before loading it; returns {tensor name: shape} of its safetensors
    weights. `ModelLoadError` naming the file for: a missing or invalid config.json, missing tokenizer files, a
    missing weight shard, a safetensors file whose header or size is wrong (truncated, overwritten)."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a Hugging Face model directory.")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config} is not a valid model config: not JSON ({err}).") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelLoadError(f'{config} is not a valid model config: it has no "model_type" entry.')
    if not any(all((path / f).is_file() for f in group) for group in _TOKENIZER_FILES):
        partial = [f for group in _TOKENIZER_FILES[1:2] for f in group if (path / f).is_file()]
        wanted = "merges.txt" if partial == ["vocab.json"] else "tokenizer.json"
        raise ModelLoadError(
            f"The tokenizer file {wanted} is missing from {path} (a model directory needs tokenizer.json, or "
            "vocab.json with merges.txt). Copy the tokenizer files from where the model came from."
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index} is not a valid weight index ({_first_line(err)}).") from None
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if not (path / name).is_file():
            raise ModelLoadError(f"The weight file {path / name} is missing (listed in {index.name}).")
        shapes.update(check_safetensors(path / name))
    return shapes


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file, after checking its header against the file's size."""

    def bad(reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"The weight file {path} is damaged: {reason}. Copy or download it again (it may be truncated)."
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise bad(f"its header claims {n:,} bytes but the file has {size:,}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a table of tensors")
    data_size, end, shapes = size - 8 - n, 0, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        except (KeyError, TypeError, ValueError):
            raise bad(f"the header entry of {name!r} is malformed") from None
        if stop > data_size:
            raise bad(f"tensor {name!r} ends at byte {stop:,} of the data, which has only {data_size:,}")
        if start < 0 or stop < start or (dtype in _DTYPE_BYTES and stop - start != expected):
            raise bad(f"tensor {name!r} ({dtype}, shape {list(shape)}) does not match its byte range")
        end = max(end, stop)
        shapes[name] = shape
    if end != data_size:
        raise bad(f"its tensors cover {end:,} of its {data_size:,} data bytes")
    return shapes


def _check_weight_shapes(hf_config, weights: dict[str, tuple[int, ...]], directory) -> None:
    """Compare the weights' shapes with the model the config describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {
                k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(hf_config).state_dict().items()
            }
    except Exception:  # a config transformers cannot build: the load below reports it
        return
    prefix = getattr(hf_config, "base_model_prefix", "") or ""
    wrong = []
    for name, shape in weights.items():
        want = expected.get(name, expected.get(f"{prefix}.{name}"))
        if want is not None and want != shape:
            wrong.append(f"{name}: {list(shape)} in the weights, {list(want)} from config.json")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ModelLoadError(
            f"config.json in {directory} does not describe its weights: {'; '.join(wrong[:3])}{more}. Use the "
            "config.json that came with these weights."
        )


def _digest(path: Path) -> str:
    """sha256 of a file; text (JSON) files with their line endings normalised, as a Windows checkout may change
    them."""
    data = path.read_bytes()
    return hashlib.sha256(data.replace(b"\r\n", b"\n") if path.suffix == ".json" else data).hexdigest()


def check_digests(directory: Path, digests_file: Path) -> None:
    """Check files against the sha256 digests a JSON file records ({file name: hex digest})."""
    recorded = json.loads(digests_file.read_text())["sha256"]
    for name, digest in recorded.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ModelLoadError(f"The demo model's file {path} is missing; reinstall the package.")
        if _digest(path) != digest:
            raise ModelLoadError(
                f"The demo model's file {path} does not match the sha256 digest recorded in {digests_file.name}: "
                "it is damaged or was changed. Reinstall the package (or, after retraining the demo model, "
                "record the new digests with `workbench.models.loading.record_demo_digests()`)."
            )


def record_demo_digests() -> None:
    """Write the demo model's digests (after retraining it)."""
    names = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    digests = {n: _digest(demo_model.DEMO_DIR / n) for n in names}
    DEMO_DIGESTS.write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
