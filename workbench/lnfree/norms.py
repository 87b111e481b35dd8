"""The frozen-scale norm and the model surgery that puts it in place.

A LayerNorm computes ``(x - mean(x)) / sigma(x) * w + b`` with ``sigma(x) = sqrt(var(x) + eps)`` per token; an
RMSNorm computes ``x / sigma(x) * w`` with ``sigma(x) = sqrt(mean(x^2) + eps)``. `FrozenNorm` keeps everything
but the division by the token's own sigma, which it replaces by a fixed scalar: the paper's FakeLN. Centring (for
LayerNorm only), the weight and the bias are linear and stay.

The pre-attention norm feeds queries, keys and values; the paper removes its scale separately for the query/key
path and the value path. `FrozenNorm` therefore has *paths* (``("main",)`` for ordinary norms, ``("qk", "v")``
for a split pre-attention norm), each real or frozen with its own scale, and `install_frozen_norms` rewires the
attention input so that each path reaches its part of the projection(s), as the architecture adapter describes
them (`Adapter.qkv_projections`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError, UnsupportedModelError
from workbench.models.adapters import QKVProjection

MAIN, QK, V = "main", "qk", "v"


# ---------------------------------------------------------------------------------------------------------------
# norm facts and math


@dataclasses.dataclass(frozen=True)
class NormInfo:
    """What a norm module computes: ``kind`` ("layernorm" or "rmsnorm"), ``eps`` inside the root, and the
    offset added to the stored weight (Gemma stores ``w - 1``)."""

    kind: str
    eps: float
    weight_offset: float = 0.0


def norm_info(module: nn.Module) -> NormInfo:
    """The `NormInfo` of a LayerNorm, an RMSNorm of a supported family, or a `FrozenNorm`."""
    if isinstance(module, FrozenNorm):
        return NormInfo(module.kind, module.eps, module.weight_offset)
    if isinstance(module, nn.LayerNorm):
        return NormInfo("layernorm", float(module.eps))
    name = type(module).__name__
    if "RMSNorm" in name:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is not None:
            return NormInfo("rmsnorm", float(eps), 1.0 if "Gemma" in name else 0.0)
    raise UnsupportedModelError(
        f"Cannot read the normalisation of a {name}: LayerNorm removal knows nn.LayerNorm and the RMSNorm "
        "classes of Llama-style models (Llama, Mistral, Qwen, Gemma)."
    )


def norm_class(module: nn.Module) -> type:
    """The original norm class behind `module` (itself unless it is a `FrozenNorm`)."""
    if isinstance(module, FrozenNorm):
        return module.source_class or nn.LayerNorm
    return type(module)


def token_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The per-token scale a norm divides by: [..., d_model] -> [...] (float32).

    LayerNorm: ``sqrt(var(x) + eps)`` (biased variance, as `F.layer_norm`); RMSNorm: ``sqrt(mean(x^2) + eps)``.
    """
    x = x.float()
    var = x.var(-1, unbiased=False) if kind == "layernorm" else x.pow(2).mean(-1)
    return (var + eps).sqrt()


def rescale_output(
    y: torch.Tensor, bias: torch.Tensor | None, sigma: torch.Tensor, frozen_scale: float
) -> torch.Tensor:
    """The frozen norm's output from the real one: ``b + (y - b) * sigma / frozen_scale``.

    `y` [..., d_model] is the real norm output and `sigma` [...] the token's own scale. Exact for LayerNorm and
    RMSNorm whatever the weight convention, because the real output is linear in ``1 / sigma``.
    """
    ratio = (sigma / frozen_scale).to(y.dtype).unsqueeze(-1)
    if bias is None:
        return y * ratio
    bias = bias.to(y.dtype)
    return bias + (y - bias) * ratio


# ---------------------------------------------------------------------------------------------------------------
# the module


class FrozenNorm(nn.Module):
    """A LayerNorm / RMSNorm whose per-token scale can be frozen to a scalar, one switch per path.

    Call as ``norm(x)`` for a one-path norm or ``norm(x, "qk")`` / ``norm(x, "v")`` for a split one. While any
    path is real and the module is training, it keeps a moving average of the batch-mean per-token scale
    (``running = m * running + (1 - m) * batch_mean``, as the paper's code does on every micro-batch); `freeze`
    copies that average (or a given value) into the path's scale. A frozen path computes
    ``centre(x) / scale * (w + offset) + b``.

    Buffers (saved with checkpoints): ``scale`` [path], ``frozen`` [path] (bool), ``running_scale`` [] (NaN until
    the first update).
    """

    def __init__(
        self,
        d_model: int,
        *,
        kind: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
        weight_offset: float = 0.0,
        paths: tuple[str, ...] = (MAIN,),
        momentum: float = 0.9,
    ):
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise InputError(f"kind={kind!r}: a norm is 'layernorm' or 'rmsnorm'")
        self.kind, self.eps, self.weight_offset = kind, float(eps), float(weight_offset)
        self.paths, self.momentum = tuple(paths), float(momentum)
        self.weight = nn.Parameter(torch.full((d_model,), 1.0 - weight_offset))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.register_buffer("scale", torch.ones(len(self.paths)))
        self.register_buffer("frozen", torch.zeros(len(self.paths), dtype=torch.bool))
        self.register_buffer("running_scale", torch.tensor(float("nan")))
        self.source_class: type | None = None  # the norm class this replaces (export rebuilds it)

    @classmethod
    def from_norm(
        cls, module: nn.Module, *, paths: tuple[str, ...] = (MAIN,), momentum: float = 0.9
    ) -> FrozenNorm:
        """A real (not yet frozen) `FrozenNorm` with the weight and bias of `module`."""
        info = norm_info(module)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        d_model = weight.shape[0] if weight is not None else module.normalized_shape[0]
        new = cls(
            d_model,
            kind=info.kind,
            eps=info.eps,
            bias=bias is not None,
            weight_offset=info.weight_offset,
            paths=paths,
            momentum=momentum,
        )
        new.source_class = norm_class(module)
        ref = weight if weight is not None else bias
        new.to(device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        with torch.no_grad():
            if weight is not None:
                new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    @classmethod
    def linear(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        *,
        kind: str = "layernorm",
        source_class: type | None = None,
    ) -> FrozenNorm:
        """A fully frozen norm computing ``centre(x) / scale * weight + bias``."""
        new = cls(weight.shape[0], kind=kind, bias=bias is not None)
        new.source_class = source_class
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        new.freeze(scale=scale)
        return new

    def extra_repr(self) -> str:
        state = ", ".join(
            f"{p}: {'frozen at ' + format(float(s), '.4g') if f else 'real'}"
            for p, s, f in zip(self.paths, self.scale, self.frozen)
        )
        return f"{self.weight.shape[0]}, {self.kind}, eps={self.eps:g}, {state}"

    # -- state ---------------------------------------------------------------------------------------------
    def _index(self, path: str) -> int:
        try:
            return self.paths.index(path)
        except ValueError:
            raise InputError(f"this norm has paths {self.paths}, not {path!r}") from None

    def is_frozen(self, path: str | None = None) -> bool:
        """Whether `path` (default: every path) is frozen."""
        if path is None:
            return bool(self.frozen.all())
        return bool(self.frozen[self._index(path)])

    def frozen_scale(self, path: str = MAIN) -> float | None:
        i = self._index(path)
        return float(self.scale[i]) if bool(self.frozen[i]) else None

    @torch.no_grad()
    def set_running_scale(self, value: float) -> None:
        """Start the moving average at `value` (e.g. a calibrated scale)."""
        self.running_scale.fill_(float(value))

    @torch.no_grad()
    def freeze(self, path: str | None = None, scale: float | None = None) -> float:
        """Freeze `path` (default: all) at `scale` (default: the running average); returns the scale used."""
        if scale is None:
            scale = float(self.running_scale)
            if math.isnan(scale):
                raise InputError(
                    "This norm has no running scale yet: run some training batches through it, call "
                    "set_running_scale(), or pass scale=..."
                )
        if not scale > 0 or not math.isfinite(scale):
            raise InputError(f"A frozen scale must be a positive number, got {scale}")
        for i in [self._index(path)] if path is not None else range(len(self.paths)):
            self.scale[i] = scale
            self.frozen[i] = True
        return float(scale)

    # -- forward -------------------------------------------------------------------------------------------
    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.kind == "layernorm" else x

    def _affine(self, normed: torch.Tensor) -> torch.Tensor:
        w = self.weight + self.weight_offset if self.weight_offset else self.weight
        out = normed * w
        return out + self.bias if self.bias is not None else out

    def forward(self, x: torch.Tensor, path: str = MAIN, *, track: bool = True) -> torch.Tensor:
        i = self._index(path) if len(self.paths) > 1 else 0
        frozen = bool(self.frozen[i])
        # The running scale is updated once per forward: by the first path's call.
        if self.training and track and i == 0 and not bool(self.frozen.all()):
            with torch.no_grad():
                batch = token_scale(x.detach(), self.kind, self.eps).mean()
                if torch.isnan(self.running_scale):
                    self.running_scale.copy_(batch)
                else:
                    self.running_scale.mul_(self.momentum).add_((1 - self.momentum) * batch)
        if frozen:
            return self._affine(self._centre(x) / self.scale[i].to(x.dtype))
        if self.kind == "layernorm":
            w = self.weight + self.weight_offset if self.weight_offset else self.weight
            return F.layer_norm(x, (x.shape[-1],), w, self.bias, self.eps)
        sigma = token_scale(x, self.kind, self.eps).unsqueeze(-1)
        return self._affine((x.float() / sigma).to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# split attention input


class NormedProjection(nn.Module):
    """Stands in for a q/k/v projection whose input norm, the block's pre-attention norm, has been moved inside it.

    The block's own norm is replaced by `nn.Identity`, so this module receives the raw residual stream, normalises
    it with the path(s) of the shared norm that its output features need (``"qk"`` for queries and keys, ``"v"``
    for values; the adapter's `QKVProjection` says which features are which) and projects. A fused projection
    (GPT-2's ``c_attn``, [q | k | v]) uses both paths: while they are the same it projects once, else each path
    feeds its own columns. Output: exactly the original projection's shape.

    One norm serves all of a block's projections (q_proj, k_proj and v_proj when separate). Only the first
    registers it (so it is saved once); the others use it without updating its running scale a second time.
    """

    def __init__(self, proj: nn.Module, norm: FrozenNorm, spec: QKVProjection, *, owner: bool):
        super().__init__()
        self.proj, self.spec, self.owner = proj, spec, owner
        self.qk, self.v = spec.features(QK, proj), spec.features(V, proj)  # output feature ranges, or None
        if owner:
            self.norm = norm
        else:
            object.__setattr__(self, "_shared_norm", norm)

    def shared_norm(self) -> FrozenNorm:
        return self.norm if self.owner else self._shared_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.shared_norm()
        if self.v is None or self.qk is None:
            return self.proj(norm(x, QK if self.v is None else V, track=self.owner))
        x_qk = norm(x, QK, track=self.owner)
        same = bool(norm.frozen[0]) == bool(norm.frozen[1]) and (
            not bool(norm.frozen[0]) or bool(norm.scale[0] == norm.scale[1])
        )
        if same:
            return self.proj(x_qk)
        x_v = norm(x, V, track=self.owner)
        w, b = self.spec.weight(self.proj), self.proj.bias  # [in, out], [out]
        parts = sorted(((self.qk, x_qk), (self.v, x_v)), key=lambda part: part[0].start)
        return torch.cat([y @ w[:, cols] + (b[cols] if b is not None else 0) for cols, y in parts], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# surgery


def get_module(root: nn.Module, path: str) -> nn.Module:
    return reduce(getattr, path.split("."), root)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a model's torch module without nnsight's instrumentation (nnsight installs its own
    ``forward`` on every submodule it wraps; a copy must run as plain PyTorch)."""
    new = copy.deepcopy(module)
    for sub in new.modules():
        forward = sub.__dict__.get("forward")
        if forward is not None and type(forward).__module__.startswith("nnsight"):
            del sub.__dict__["forward"]
        sub.__dict__.pop("__nnsight__", None)
    return new


def _blocks(module: nn.Module, adapter) -> nn.ModuleList:
    return get_module(module, adapter.blocks)


def check_surgery(adapter) -> None:
    """Raise `UnsupportedModelError` unless `install_frozen_norms` can rewire this architecture."""
    if any(spec.per_head for spec in adapter.qkv_projections):
        raise UnsupportedModelError(
            "Removal fine-tuning supports models whose q/k/v projections are separate or fused as [q | k | v] "
            "(GPT-2, Llama-style); a projection fused per head, as GPT-NeoX's, is not supported. The zero-shot "
            "preview (`workbench.lnfree.preview`) works on it."
        )
    if adapter.attn_out_norm or adapter.mlp_out_norm:
        raise UnsupportedModelError(
            "Removal fine-tuning does not handle the extra 'sandwich' norms of Gemma 2/3; use the zero-shot "
            "preview on these models."
        )


def install_frozen_norms(module: nn.Module, adapter, *, momentum: float = 0.9) -> dict[str, FrozenNorm]:
    """Replace every norm of a transformers model by a real `FrozenNorm`, in place; returns them by site.

    Sites: ``"mlp.L"`` (the norm before the MLP), ``"qk.L"`` and ``"v.L"`` (the two paths of the norm before
    attention, the same module), ``"final"``. The pre-attention norm moves into the q/k/v projection(s): each
    becomes a `NormedProjection`.
    """
    check_surgery(adapter)
    sites: dict[str, FrozenNorm] = {}
    for layer, block in enumerate(_blocks(module, adapter)):
        ln1 = get_module(block, adapter.ln1)
        ln2 = get_module(block, adapter.ln2)
        if isinstance(ln1, FrozenNorm) or isinstance(ln2, FrozenNorm) or isinstance(ln1, nn.Identity):
            raise InputError("This model already has frozen-scale norms installed.")
        norm1 = FrozenNorm.from_norm(ln1, paths=(QK, V), momentum=momentum)
        set_module(block, adapter.ln1, nn.Identity())
        for i, spec in enumerate(adapter.qkv_projections):
            proj = get_module(block, spec.path)
            set_module(block, spec.path, NormedProjection(proj, norm1, spec, owner=i == 0))
        sites[f"qk.{layer}"] = sites[f"v.{layer}"] = norm1
        norm2 = FrozenNorm.from_norm(ln2, momentum=momentum)
        set_module(block, adapter.ln2, norm2)
        sites[f"mlp.{layer}"] = norm2
    final = FrozenNorm.from_norm(get_module(module, adapter.ln_final), momentum=momentum)
    set_module(module, adapter.ln_final, final)
    sites["final"] = final
    return sites


def site_path(site: str) -> str:
    """The `FrozenNorm` path a site uses: "qk", "v" or "main"."""
    kind = site.split(".")[0]
    return kind if kind in (QK, V) else MAIN


@torch.no_grad()
def consolidate(module: nn.Module, adapter) -> None:
    """Turn a model whose installed norms are all frozen back into the family's standard layout, in place.

    The pre-attention norm returns to its place as a one-path `FrozenNorm` at the q/k scale; the value path's
    different scale ``s_v`` is folded into the value projection: with ``y`` the consolidated output,
    ``v = (y - b) * (s_qk / s_v) @ W_v + b @ W_v + b_v``, i.e. ``W_v *= s_qk / s_v`` and
    ``b_v += (1 - s_qk / s_v) * (b @ W_v)``. Exact.
    """
    for block in _blocks(module, adapter):
        wrappers = {spec.path: get_module(block, spec.path) for spec in adapter.qkv_projections}
        if not all(isinstance(w, NormedProjection) for w in wrappers.values()):
            continue
        norm = next(iter(wrappers.values())).shared_norm()
        if not norm.is_frozen():
            raise InputError(
                "Consolidation needs every norm frozen; some pre-attention paths are still real."
            )
        s_qk, s_v = float(norm.scale[0]), float(norm.scale[1])
        ratio = s_qk / s_v
        bias = norm.bias
        for path, wrapper in wrappers.items():
            proj, cols = wrapper.proj, wrapper.v
            if cols is not None:
                w_v = wrapper.spec.weight(proj)[:, cols]  # [in, n_v], a view of the weight
                if bias is not None:
                    if proj.bias is None:
                        proj.bias = nn.Parameter(w_v.new_zeros(wrapper.spec.weight(proj).shape[1]))
                    proj.bias[cols] += (1 - ratio) * (bias @ w_v)
                w_v *= ratio
            set_module(block, path, proj)
        single = FrozenNorm.linear(
            norm.weight.detach() + norm.weight_offset,
            bias,
            s_qk,
            kind=norm.kind,
            source_class=norm.source_class,
        )
        set_module(block, adapter.ln1, single)
    for norm in all_norms(module, adapter).values():
        if not norm.is_frozen():
            raise InputError("Consolidation needs every norm frozen; some norms are still real.")


def all_norms(module: nn.Module, adapter) -> dict[str, nn.Module]:
    """Every norm module in the standard layout by module label: "ln1.L", "ln2.L", "ln_final"."""
    out = {}
    for layer, block in enumerate(_blocks(module, adapter)):
        out[f"ln1.{layer}"] = get_module(block, adapter.ln1)
        out[f"ln2.{layer}"] = get_module(block, adapter.ln2)
    out["ln_final"] = get_module(module, adapter.ln_final)
    return out


def is_lnfree_module(module: nn.Module, adapter) -> bool:
    """Whether every norm of a standard-layout model is a fully frozen `FrozenNorm`."""
    try:
        norms = all_norms(module, adapter)
    except AttributeError:
        return False
    return all(isinstance(n, FrozenNorm) and n.is_frozen() for n in norms.values())
