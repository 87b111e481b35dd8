"""LN-free checkpoints: load the released ones, export ours in the same convention.

The released LN-free models (``schaeff/gpt2-small_LNFree300``, ``schaeff/gpt2-medium_LNFree500``,
``schaeff/gpt2-large_LNFree600``, ``schaeff/gpt2-xl_LNFree800`` and the 2024 ``apollo-research/gpt2_noLN``) are
ordinary ``GPT2LMHeadModel`` checkpoints that plain transformers loads without custom code. Their norms are made
linear by a convention:

- every LayerNorm has ``eps = 1e12`` (in the modules and in ``config.layer_norm_epsilon``), so
  ``sqrt(var + eps)`` is 1e6 for any realistic token (in float32, 1e12 + var rounds to 1e12 while var < 3e4);
- every weight is stored as ``w * 1e6 / s`` with ``s`` the frozen scale, so the module computes
  ``(x - mean(x)) * w / s + b``: the frozen-scale norm. (``apollo-research/gpt2_noLN`` folded ``w`` and ``b``
  of the block norms into the next weights: their stored weight is 1e6 and bias 0.)

`load_lnfree` loads such a checkpoint and replaces each norm by the exact linear `FrozenNorm` (scale 1, weight
``w_stored / sqrt(eps)``; our own exports also carry ``lnfree.json`` with the scales, so ``w`` and ``s`` come back
separately). Half precision is refused: the stored weights are ~1e6 (fp16's largest number is 65504) and an
LN-free residual stream is not normalised. `export_lnfree` writes an LN-free model in the same convention, so that
plain transformers, nnsight and TransformerLens users can load it as they load the released models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from workbench.errors import InputError, ModelLoadError, UnsupportedModelError
from workbench.lnfree.norms import (
    FrozenNorm,
    all_norms,
    is_lnfree_module,
    norm_class,
    norm_info,
    plain_copy,
    set_module,
)
from workbench.models import load_model
from workbench.models.adapters import adapter_for

HACK_EPS = 1e12
HACK_FACTOR = 1e6  # sqrt(HACK_EPS)
LARGE_EPS = 1e6
"""A norm whose eps is at least this is taken to be linear (the released convention)."""

EPS_ATTRS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
RELEASED = {
    "small": "schaeff/gpt2-small_LNFree300",
    "medium": "schaeff/gpt2-medium_LNFree500",
    "large": "schaeff/gpt2-large_LNFree600",
    "xl": "schaeff/gpt2-xl_LNFree800",
    "2024": "apollo-research/gpt2_noLN",
}
"""The released LN-free models (hub ids). Their fine-tuned-with-LN controls: ``schaeff/gpt2-<size>_vanilla<steps>``."""

INFO_FILE = "lnfree.json"


def config_eps(hf_config) -> float | None:
    """The norm epsilon a transformers config declares (None when it names none)."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    for attr in EPS_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return float(value)
    return None


def _refuse_half(dtype) -> None:
    if dtype is None:
        return
    name = str(dtype).removeprefix("torch.")
    if name in ("float16", "half", "fp16"):
        raise InputError(
            "LN-free models cannot run in float16: the released checkpoints store norm weights of order 1e6 "
            "(float16's largest number is 65504), and without normalisation the residual stream grows beyond "
            "float16's range. Load them in float32 (default) or bfloat16."
        )


def is_lnfree(model) -> bool:
    """Whether a `WorkbenchModel` has no per-token norm scale left (our `FrozenNorm`s, or the released
    ``eps = 1e12`` convention)."""
    if model.adapter is None:
        return False
    if model.remote is not True and is_lnfree_module(model.module, model.adapter):
        return True
    eps = config_eps(getattr(model.module, "config", None))
    return eps is not None and eps >= LARGE_EPS


def linearise_norms(module: torch.nn.Module, adapter, scales: dict[str, float] | None = None) -> None:
    """Replace every large-eps norm of a released-convention model by its exact linear `FrozenNorm`, in place.

    `scales` ({"ln1.0": s, ...}, from ``lnfree.json``) restores the frozen scale and the unscaled weight;
    without it the scale is 1 and the weight carries ``w / s``.
    """
    for label, norm in all_norms(module, adapter).items():
        info = norm_info(norm)
        if info.eps < LARGE_EPS:
            raise InputError(
                f"The norm {label} has eps={info.eps:g}: this is not an LN-free checkpoint in the released "
                f"convention (eps = {HACK_EPS:g}). Load ordinary models with workbench.models.load_model."
            )
        root = math.sqrt(info.eps)
        effective = (norm.weight.detach().double() + info.weight_offset) / root
        scale = float(scales[label]) if scales and label in scales else 1.0
        weight = (effective * scale).to(norm.weight.dtype)
        bias = getattr(norm, "bias", None)
        new = FrozenNorm.linear(
            weight,
            bias.detach() if bias is not None else None,
            scale,
            kind=info.kind,
            source_class=type(norm),
        )
        path = _module_path(adapter, label)
        set_module(module, path, new)


def _module_path(adapter, label: str) -> str:
    if label == "ln_final":
        return adapter.ln_final
    part, layer = label.split(".")
    return f"{adapter.blocks}.{layer}.{adapter.ln1 if part == 'ln1' else adapter.ln2}"


def load_lnfree(
    name_or_path: str,
    *,
    device=None,
    dtype=None,
    remote: bool | str = False,
    revision: str | None = None,
):
    """Load an LN-free checkpoint in the released convention (a hub id such as
    ``"schaeff/gpt2-small_LNFree300"`` or a directory written by `export_lnfree`) as a `WorkbenchModel`.

    Locally the norms become exact linear `FrozenNorm`s. A remote (NDIF) model runs as stored (float32 on the
    server, where the eps convention is already linear to float precision). float16 is refused (see the module
    docstring).
    """
    _refuse_half(dtype)
    if remote is True:
        model = load_model(name_or_path, remote=True, revision=revision)
        _check_convention(name_or_path, model.module.config)
        return model
    try:
        kwargs = {"revision": revision} if revision else {}
        hf_config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        _check_convention(name_or_path, hf_config)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        module = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch.float32, attn_implementation="eager", **kwargs
        )
    except OSError as err:
        raise ModelLoadError(
            f"Could not load {name_or_path!r}: {str(err).splitlines()[0]}. Hub checkpoints need the network (or "
            f"the local cache); download one elsewhere with `hf download {name_or_path} --local-dir DIR` and "
            "call load_lnfree(DIR)."
        ) from err

    adapter = adapter_for(hf_config, module)
    info_path = Path(name_or_path) / INFO_FILE
    scales = json.loads(info_path.read_text()).get("scales") if info_path.exists() else None
    linearise_norms(module, adapter, scales)
    model = load_model(module, tokenizer, device=device, dtype=dtype, remote=remote)
    model.name = str(name_or_path)
    return model


def _check_convention(name, hf_config) -> None:
    eps = config_eps(hf_config)
    if eps is None or eps < LARGE_EPS:
        raise InputError(
            f"{name} declares a norm eps of {eps}: it is not an LN-free checkpoint in the released convention "
            f"(eps = {HACK_EPS:g}). Load it with workbench.models.load_model; make it LN-free with "
            "workbench.lnfree.finetune."
        )


def export_lnfree(model, path: str | Path, *, tokenizer=None) -> Path:
    """Write an LN-free `WorkbenchModel` (from `finetune` or `load_lnfree`) as a transformers checkpoint in the
    released convention (``eps = 1e12``, weights ``w * 1e6 / s``), float32, with its tokenizer and
    ``lnfree.json`` (the frozen scales). Plain ``AutoModelForCausalLM.from_pretrained(path)`` loads it."""
    if model.remote is not False:
        raise UnsupportedModelError("Export needs the weights on this machine; load the model locally.")
    if model.adapter is None:
        raise UnsupportedModelError(f"{model.name} is a plain module, not a transformer.")
    model.dispatch()
    if not is_lnfree_module(model.module, model.adapter):
        raise InputError(
            f"{model.name} still has norms with a per-token scale; export needs an LN-free model: run "
            "workbench.lnfree.finetune to the end of its schedule (or load one with load_lnfree)."
        )
    module = plain_copy(model.module).float().cpu()
    scales = {}
    for label, norm in all_norms(module, model.adapter).items():
        cls = norm_class(norm)
        d_model = norm.weight.shape[0]
        new = (
            cls(d_model, eps=HACK_EPS)
            if cls is not torch.nn.LayerNorm
            else cls(d_model, eps=HACK_EPS, bias=norm.bias is not None)
        )
        offset = norm_info(new).weight_offset
        s = float(norm.scale[0])
        with torch.no_grad():
            effective = norm.weight.double() + norm.weight_offset
            new.weight.copy_((effective * HACK_FACTOR / s - offset).float())
            if norm.bias is not None:
                new.bias.copy_(norm.bias)
        set_module(module, _module_path(model.adapter, label), new)
        scales[label] = s
    cfg = getattr(module.config, "text_config", None) or module.config
    attr = next((a for a in EPS_ATTRS if getattr(cfg, a, None) is not None), None)
    if attr is None:
        raise UnsupportedModelError(f"{type(cfg).__name__} declares no norm epsilon to set to {HACK_EPS:g}.")
    setattr(cfg, attr, HACK_EPS)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(path)
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is not None:
        tok.save_pretrained(path)
    info = {
        "convention": f"norm eps = {HACK_EPS:g}; stored weight = w * {HACK_FACTOR:g} / scale; bias unchanged",
        "scales": scales,
        "source_model": model.name,
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path
