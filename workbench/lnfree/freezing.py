"""Freezing norms inside an nnsight trace: the one forward pass every preview and evaluation is made of.

`frozen_forward` runs one trace over a batch and can, in forward order: read every norm's per-token scale, freeze
any set of norm sites (replacing the norm's output by the frozen-scale output, computed from the real output and
the token's own scale), skip the blocks below the first frozen site (reusing their cached outputs), save the
block outputs for later skips, and compute the per-token cross-entropy. Everything it returns is saved inside the
trace, so the same code runs on a local model and on a remote (NDIF) one.

How a site is frozen inside a trace:
- ``mlp.L`` and ``final``: the norm's output is rescaled, ``b + (y - b) * sigma(x) / s`` (exact, see
  `rescale_output`).
- ``qk.L`` and ``v.L`` together: the same for the pre-attention norm.
- only one of them: the pre-attention norm stays real and the frozen output is fed to that path's projection
  only: GPT-2 and GPT-NeoX recompute their part of the fused q|k|v projection, Llama-style models replace the
  input of ``q_proj``/``k_proj`` or ``v_proj``.
"""

from __future__ import annotations

import nnsight
import torch
import torch.nn.functional as F

from workbench.errors import UnsupportedModelError
from workbench.lnfree.norms import norm_info, rescale_output, token_scale
from workbench.lnfree.sites import split_site
from workbench.models.prefix import enter_at
from workbench.models.sites import envoy_at


def norm_infos(model) -> dict[str, tuple[str, float]]:
    """(kind, eps) of every norm module by label ("ln1.L", "ln2.L", "ln_final"); weights are not needed."""
    if model.adapter is None:
        raise UnsupportedModelError(
            f"LayerNorm removal needs a transformer with an architecture adapter; {model.name} is a plain module."
        )
    out = {}
    for layer in range(model.cfg.n_layers):
        for label, part in ((f"ln1.{layer}", "ln1"), (f"ln2.{layer}", "ln2")):
            info = norm_info(model.torch_submodule(part, layer))
            out[label] = (info.kind, info.eps)
    info = norm_info(model.torch_submodule("ln_final"))
    out["ln_final"] = (info.kind, info.eps)
    return out


def _frozen_by_layer(freeze: dict[str, float], n_layers: int):
    """{layer: {"qk": s, "v": s, "mlp": s}} and the final scale."""
    per_layer: dict[int, dict[str, float]] = {}
    final = None
    for site, scale in freeze.items():
        kind, layer = split_site(site)
        if kind == "final":
            final = float(scale)
        else:
            per_layer.setdefault(layer, {})[kind] = float(scale)
    return per_layer, final


def _bias(envoy):
    return getattr(envoy, "bias", None)


def _freeze_paths(model, layer: int, y_qk, y_v) -> None:
    """Feed frozen pre-attention outputs to the q/k projections (`y_qk`) and/or the v projection (`y_v`) only;
    None leaves a path real."""
    a, cfg = model.adapter, model.cfg
    block = model.submodule("block", layer)
    if a.qkv == "separate":  # q_proj, k_proj, v_proj run in this order
        for path, y in zip(a.qkv_paths, (y_qk, y_qk, y_v)):
            if y is not None:
                envoy_at(block, path).input = y
        return
    proj = envoy_at(block, a.qkv_paths[0])
    out = proj.output
    weight, bias = proj.weight, proj.bias
    if a.qkv == "gpt2_fused":  # Conv1D, weight [d_model, 3 * H * d_head], output [q | k | v]
        d = cfg.n_heads * cfg.d_head
        for cols, y in ((slice(0, 2 * d), y_qk), (slice(2 * d, 3 * d), y_v)):
            if y is not None:
                out[..., cols] = y.to(weight.dtype) @ weight[:, cols] + bias[cols]
        return
    # GPT-NeoX: Linear, weight [H * 3 * d_head, d_model], output laid out per head as [q | k | v]
    view = out.view(*out.shape[:-1], cfg.n_heads, 3, cfg.d_head)
    for part, y in ((slice(0, 2), y_qk), (slice(2, 3), y_v)):
        if y is not None:
            new = F.linear(y.to(weight.dtype), weight, bias)
            view[..., part, :] = new.view(*new.shape[:-1], cfg.n_heads, 3, cfg.d_head)[..., part, :]


def frozen_forward(
    model,
    tokens: torch.Tensor,
    *,
    infos: dict[str, tuple[str, float]],
    freeze: dict[str, float] | None = None,
    read_scales: bool = False,
    cache_blocks: bool = False,
    skip_cache: list | None = None,
    loss: bool = True,
    run=None,
) -> dict:
    """One trace over `tokens` [batch, pos]. Returns a dict of saved tensors:

    - ``"loss"``: per-token next-token cross-entropy [batch, pos - 1] (when `loss`);
    - ``"scale.<norm>"``: per-token scale [batch, pos] of every norm module (when `read_scales`);
    - ``"block.<L>"``: block outputs (when `cache_blocks`), to pass back as `skip_cache`.

    `freeze` maps sites ("mlp.3", "qk.0", "final", ...) to frozen scales. With `skip_cache`, blocks below the
    first frozen site are not run; their cached outputs are used.
    """
    freeze = freeze or {}
    n_layers = model.cfg.n_layers
    per_layer, final_scale = _frozen_by_layer(freeze, n_layers)
    first = min(per_layer) if per_layer else n_layers
    skip_below = first if skip_cache is not None else 0
    targets = tokens[:, 1:]
    with torch.no_grad(), model.trace(tokens, run=run):
        out = {}
        if skip_below > 0:
            enter_at(model, skip_below, skip_cache[skip_below - 1])
        for layer in range(skip_below, n_layers):
            frozen = per_layer.get(layer, {})
            if read_scales or "qk" in frozen or "v" in frozen:
                kind, eps = infos[f"ln1.{layer}"]
                ln1 = model.submodule("ln1", layer)
                sigma = token_scale(ln1.input, kind, eps)
                if read_scales:
                    out[f"scale.ln1.{layer}"] = sigma
                qk, v = frozen.get("qk"), frozen.get("v")
                if qk is not None and v is not None and qk == v:
                    ln1.output = rescale_output(ln1.output, _bias(ln1), sigma, qk)
                elif qk is not None or v is not None:
                    y, b = ln1.output, _bias(ln1)
                    _freeze_paths(
                        model,
                        layer,
                        rescale_output(y, b, sigma, qk) if qk is not None else None,
                        rescale_output(y, b, sigma, v) if v is not None else None,
                    )
            if read_scales or "mlp" in frozen:
                kind, eps = infos[f"ln2.{layer}"]
                ln2 = model.submodule("ln2", layer)
                sigma = token_scale(ln2.input, kind, eps)
                if read_scales:
                    out[f"scale.ln2.{layer}"] = sigma
                if "mlp" in frozen:
                    ln2.output = rescale_output(ln2.output, _bias(ln2), sigma, frozen["mlp"])
            if cache_blocks:
                out[f"block.{layer}"] = model.submodule("block", layer).output
        if read_scales or final_scale is not None:
            kind, eps = infos["ln_final"]
            lnf = model.submodule("ln_final")
            sigma = token_scale(lnf.input, kind, eps)
            if read_scales:
                out["scale.ln_final"] = sigma
            if final_scale is not None:
                lnf.output = rescale_output(lnf.output, _bias(lnf), sigma, final_scale)
        if loss:
            logits = model.site("logits").value[:, :-1]
            out["loss"] = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1).to(logits.device),
                reduction="none",
            ).view(targets.shape)
        out = nnsight.save(out)
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
