"""`load_model`: the one way into a model.

    load_model("demo")                          # the bundled demo model (offline, CPU, < 2 s)
    load_model("openai-community/gpt2")         # a hub name, loaded lazily (weights on first trace)
    load_model("./checkpoints/my-gpt2")         # a local directory in Hugging Face format
    load_model(hf_model, tokenizer=tok)         # a transformers model you already built
    load_model(cnn)                             # any torch.nn.Module (no standard sites; use .nnsight)
    load_model("meta-llama/Llama-3.1-8B", remote=True)   # the same model on NDIF

Models are put in eval mode (dropout off, so patching is deterministic) and use eager attention by default so
that attention patterns can be read.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from workbench.errors import ModelLoadError
from workbench.models.adapters import adapter_for, model_config
from workbench.models.model import WorkbenchModel

_BIG_MODEL_PARAMS = 2e9  # above this, GPUs default to bfloat16


def default_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype, device: torch.device, n_params: float) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and n_params > _BIG_MODEL_PARAMS else torch.float32
    try:
        resolved = getattr(torch, str(dtype).removeprefix("torch."))
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'.")
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
    if isinstance(model, str) and model == "demo":
        from workbench.demo_model import DEMO_DIR

        if not (Path(DEMO_DIR) / "config.json").exists():
            raise ModelLoadError(
                f"The demo model's files are missing from {DEMO_DIR}; reinstall the package."
            )
        return _from_directory(
            str(DEMO_DIR),
            name="demo",
            device=device,
            dtype=dtype,
            remote=remote,
            attn_implementation=attn_implementation,
            dispatch=True,
            prepend_bos=prepend_bos,
            quiet=True,
        )
    if isinstance(model, (str, os.PathLike)):
        return _from_name(
            str(model),
            device=device,
            dtype=dtype,
            remote=remote,
            attn_implementation=attn_implementation,
            revision=revision,
            dispatch=dispatch,
            prepend_bos=prepend_bos,
        )
    if isinstance(model, torch.nn.Module):
        return _from_module(
            model,
            tokenizer,
            device=device,
            dtype=dtype,
            remote=remote,
            attn_implementation=attn_implementation,
            prepend_bos=prepend_bos,
        )
    raise ModelLoadError(
        f"Cannot load a model from {type(model).__name__}. Give 'demo', a hub id, a local directory, a "
        "transformers model (with tokenizer=...), or a torch.nn.Module."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "name" or "org/name"


def _from_name(name, *, device, dtype, remote, attn_implementation, revision, dispatch, prepend_bos):
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(
            str(path),
            name=name,
            device=device,
            dtype=dtype,
            remote=remote,
            attn_implementation=attn_implementation,
            dispatch=dispatch,
            prepend_bos=prepend_bos,
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"No model directory at {name!r}. Check the path, or give a hub id like 'gpt2'.")
    return _from_directory(
        name,
        name=name,
        device=device,
        dtype=dtype,
        remote=remote,
        attn_implementation=attn_implementation,
        dispatch=dispatch,
        prepend_bos=prepend_bos,
        revision=revision,
    )


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    text = str(err)
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in text.lower() or "offline" in text.lower()
    )
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

    hub_kwargs = {"revision": revision} if revision else {}
    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from err
    adapter = adapter_for(hf_config)  # fail before loading anything if we cannot map the architecture
    kwargs = dict(task="text-generation", tokenizer=tokenizer, **hub_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if remote is not True:
        device = torch.device(device) if device is not None else default_device()
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
        module = module.to(device=device, dtype=_resolve_dtype(dtype, torch.device(device or "cpu"), 0))
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
