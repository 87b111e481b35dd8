"""Standard sites: one way to read and write a model's internals, whatever its family.

Site names follow TransformerLens' hook names. Inside a trace, ``model.site(name, layer).value`` reads the
activation and ``model.site(name, layer).value = x`` replaces it; per-head sites are views of shape
[batch, pos, head, d_head] that can also be edited in place. Sites must be touched in forward order within one
trace (nnsight runs the model once); `SiteSpec.rank` gives that order inside a block.

Version quirks are absorbed here and nowhere else: a block's output is a tensor in transformers 5 and a tuple in
transformers 4; attention modules return tuples in both.
"""

from __future__ import annotations

import dataclasses
from functools import reduce

import torch

from workbench.errors import SiteError
from workbench.models.adapters import Adapter, ModelConfig


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    name: str
    shape: str
    description: str
    rank: float  # forward order inside a block; -1 before the blocks, 100 after them
    per_layer: bool = True
    per_head: bool = False
    writable: bool = True


SITES: dict[str, SiteSpec] = {
    s.name: s
    for s in [
        SiteSpec("embed", "[batch, pos, d_model]", "token embedding", -1, per_layer=False),
        SiteSpec(
            "pos_embed", "[batch, pos, d_model]", "learned position embedding (GPT-2)", -1, per_layer=False
        ),
        SiteSpec("resid_pre", "[batch, pos, d_model]", "residual stream entering the block", 0),
        SiteSpec("ln1", "[batch, pos, d_model]", "output of the norm before attention", 1),
        SiteSpec(
            "q_input",
            "[batch, pos, head, d_model]",
            "residual stream as each head's query reads it (before the norm); a write changes that head's query only",
            0.9,
            per_head=True,
        ),
        SiteSpec(
            "k_input",
            "[batch, pos, kv_head, d_model]",
            "residual stream as each head's key reads it (before the norm); a write changes that key only",
            0.9,
            per_head=True,
        ),
        SiteSpec(
            "v_input",
            "[batch, pos, kv_head, d_model]",
            "residual stream as each head's value reads it (before the norm); a write changes that value only",
            0.9,
            per_head=True,
        ),
        SiteSpec(
            "q", "[batch, pos, head, d_head]", "queries per head (before rotary embedding)", 2, per_head=True
        ),
        SiteSpec(
            "k", "[batch, pos, kv_head, d_head]", "keys per head (before rotary embedding)", 2, per_head=True
        ),
        SiteSpec("v", "[batch, pos, kv_head, d_head]", "values per head", 2, per_head=True),
        SiteSpec(
            "z", "[batch, pos, head, d_head]", "per-head attention output, before W_O", 3, per_head=True
        ),
        SiteSpec(
            "pattern",
            "[batch, head, query_pos, key_pos]",
            "attention pattern (eager attention)",
            3.5,
            per_head=True,
        ),
        SiteSpec("attn_out", "[batch, pos, d_model]", "attention output added to the residual stream", 4),
        SiteSpec(
            "result",
            "[batch, pos, head, d_model]",
            "per-head output in the residual basis (z @ W_O)",
            3.1,
            per_head=True,
            writable=False,
        ),
        SiteSpec("resid_mid", "[batch, pos, d_model]", "residual stream between attention and MLP", 5),
        SiteSpec(
            "mlp_in",
            "[batch, pos, d_model]",
            "residual stream as the MLP reads it (before its norm); a write changes the MLP's input only",
            5.5,
        ),
        SiteSpec("ln2", "[batch, pos, d_model]", "output of the norm before the MLP", 6),
        SiteSpec("mlp_post", "[batch, pos, d_mlp]", "MLP neurons after the activation function", 7),
        SiteSpec("mlp_out", "[batch, pos, d_model]", "MLP output added to the residual stream", 8),
        SiteSpec("resid_post", "[batch, pos, d_model]", "residual stream leaving the block", 9),
        SiteSpec("ln_final", "[batch, pos, d_model]", "output of the final norm", 100, per_layer=False),
        SiteSpec(
            "logits",
            "[batch, pos, d_vocab]",
            "the model's output logits (after Gemma 2's soft-cap)",
            101,
            per_layer=False,
        ),
    ]
}


HEAD_INPUTS = ("q_input", "k_input", "v_input")


def envoy_at(root, path: str):
    """The nnsight envoy (or torch module) at a dotted module path below `root`."""
    return reduce(getattr, path.split("."), root)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(envoy, value, new) -> None:
    if isinstance(value, tuple):
        envoy.output = (new, *value[1:])
    else:
        envoy.output = new


class SiteHandle:
    """Read (``.value``) or write (``.value = x``) one site of one layer inside a trace."""

    def __init__(
        self, root, module: torch.nn.Module, adapter: Adapter, cfg: ModelConfig, name: str, layer: int | None
    ):
        self.root, self.module, self.adapter, self.cfg = root, module, adapter, cfg
        self.name, self.layer = name, layer
        self.spec = SITES[name]

    def __repr__(self) -> str:
        where = f", layer={self.layer}" if self.layer is not None else ""
        return f"SiteHandle({self.name!r}{where}, {self.spec.shape})"

    # -- module lookup -------------------------------------------------------------------------------
    def _block(self):
        return envoy_at(self.root, self.adapter.blocks)[self.layer]

    def _in_block(self, path: str):
        return envoy_at(self._block(), path)

    def _heads(self, flat: torch.Tensor, n_heads: int) -> torch.Tensor:
        return flat.view(*flat.shape[:-1], n_heads, self.cfg.d_head)

    def _qkv(self, which: str) -> torch.Tensor:
        """q, k or v as a [batch, pos, head, d_head] view of the projection output."""
        a, cfg = self.adapter, self.cfg
        idx = "qkv".index(which)
        if a.qkv == "separate":
            n = cfg.n_heads if which == "q" else cfg.n_kv_heads
            return self._heads(self._in_block(a.qkv_paths[idx]).output, n)
        out = self._in_block(a.qkv_paths[0]).output
        if a.qkv == "gpt2_fused":  # [q | k | v], each [H * d_head]
            return out.view(*out.shape[:-1], 3, cfg.n_heads, cfg.d_head)[..., idx, :, :]
        # NeoX: per head [q | k | v]
        return out.view(*out.shape[:-1], cfg.n_heads, 3, cfg.d_head)[..., idx, :]

    def _attn_out_envoy(self):
        a = self.adapter
        return self._in_block(a.attn_out_norm) if a.attn_out_norm else self._in_block(a.attn)

    def _mlp_out_envoy(self):
        a = self.adapter
        return self._in_block(a.mlp_out_norm) if a.mlp_out_norm else self._in_block(a.mlp)

    # -- read ----------------------------------------------------------------------------------------
    @property
    def value(self) -> torch.Tensor:
        name, a = self.name, self.adapter
        if name == "embed":
            return envoy_at(self.root, a.embed).output
        if name == "pos_embed":
            return envoy_at(self.root, a.pos_embed).output
        if name == "ln_final":
            return envoy_at(self.root, a.ln_final).output
        if name == "logits":
            logits = envoy_at(self.root, a.unembed).output
            cap = self.cfg.logit_softcap
            return logits if cap is None else cap * torch.tanh(logits / cap)
        if name == "resid_pre":
            return self._block().input
        if name == "resid_post":
            return _first(self._block().output)
        if name == "ln1":
            return self._in_block(a.ln1).output
        if name == "ln2":
            return self._in_block(a.ln2).output
        if name in ("q", "k", "v"):
            return self._qkv(name)
        if name in HEAD_INPUTS:
            x = self._in_block(a.ln1).input
            n = self.cfg.n_heads if name == "q_input" else self.cfg.n_kv_heads
            return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
        if name == "mlp_in":
            return self._in_block(a.ln2).input
        if name == "z":
            return self._heads(self._in_block(a.out_proj).input, self.cfg.n_heads)
        if name == "pattern":
            pattern = self._in_block(a.attn).output[1]
            if pattern is None:
                raise SiteError(
                    "This model's attention implementation does not return attention patterns. Load it with "
                    "attn_implementation='eager' (the default of load_model) to read `pattern`."
                )
            return pattern
        if name == "attn_out":
            return _first(self._attn_out_envoy().output)
        if name == "result":
            z = self._heads(self._in_block(a.out_proj).input, self.cfg.n_heads)
            return torch.einsum("bphd,hdm->bphm", z, self.W_O().to(z.dtype))
        if name == "resid_mid":
            return self._in_block(a.ln2).input
        if name == "mlp_post":
            return self._in_block(a.mlp_out_proj).input
        if name == "mlp_out":
            return _first(self._mlp_out_envoy().output)
        raise SiteError(f"unknown site {name!r}")  # pragma: no cover - names are validated by the model

    # -- write ---------------------------------------------------------------------------------------
    @value.setter
    def value(self, new: torch.Tensor) -> None:
        name, a = self.name, self.adapter
        if not self.spec.writable:
            raise SiteError(f"`{name}` is computed from other sites and cannot be written; write `z` instead")
        if (
            name == "logits" and self.cfg.logit_softcap is not None
        ):  # undo the soft-cap the model applies next
            cap = self.cfg.logit_softcap
            envoy_at(self.root, a.unembed).output = cap * torch.atanh((new / cap).clamp(-1 + 1e-7, 1 - 1e-7))
        elif name in ("embed", "pos_embed", "ln_final", "logits"):
            path = {"embed": a.embed, "pos_embed": a.pos_embed, "ln_final": a.ln_final, "logits": a.unembed}[
                name
            ]
            envoy_at(self.root, path).output = new
        elif name == "resid_pre":
            self._block().input = new
        elif name == "resid_post":
            block = self._block()
            _replace_first(block, block.output, new)
        elif name in ("ln1", "ln2"):
            self._in_block(a.ln1 if name == "ln1" else a.ln2).output = new
        elif name in ("q", "k", "v"):
            view = self._qkv(name)
            view[...] = new
        elif name in HEAD_INPUTS:
            self.set_head_inputs(new)
        elif name == "mlp_in":
            ln2 = self._in_block(a.ln2)
            ln2.output = ln2(new)
        elif name == "z":
            self._in_block(a.out_proj).input = new.reshape(*new.shape[:-2], -1)
        elif name == "pattern":
            self.set_pattern(new)
        elif name == "attn_out":
            envoy = self._attn_out_envoy()
            _replace_first(envoy, envoy.output, new)
        elif name == "resid_mid":
            # No module outputs resid_mid. The norm before the MLP receives the very tensor that the MLP's
            # residual add uses, so an in-place copy sets resid_mid exactly for everything downstream.
            self._in_block(a.ln2).input[...] = new
        elif name == "mlp_post":
            self._in_block(a.mlp_out_proj).input = new
        elif name == "mlp_out":
            envoy = self._mlp_out_envoy()
            _replace_first(envoy, envoy.output, new)

    def set_pattern(self, pattern: torch.Tensor, heads: list[int] | None = None) -> None:
        """Replace the attention pattern of `heads` (all by default): [batch, len(heads), query_pos, key_pos].

        The pattern only acts through z = pattern @ v, so it is written as that z (exact, and independent of
        the attention implementation).
        """
        heads = list(range(self.cfg.n_heads)) if heads is None else list(heads)
        v = self._qkv("v")
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        v_heads = v[:, :, [h // group for h in heads]]  # [batch, key_pos, len(heads), d_head]
        z_new = torch.einsum("bhqk,bkhd->bqhd", pattern.to(v.dtype), v_heads)
        z = self._heads(self._in_block(self.adapter.out_proj).input, self.cfg.n_heads)
        z[:, :, heads] = z_new

    def set_head_inputs(self, new: torch.Tensor, heads: list[int] | None = None) -> None:
        """Give `heads` (all by default) of a q/k/v input site their own residual input [batch, pos, len(heads),
        d_model]: each is normalised by the block's attention norm and projected by that head's weights, and the
        result replaces the head's query (key, value) only. Other heads, and the residual stream, are untouched.
        """
        which = self.name[0]
        n = self.cfg.n_heads if which == "q" else self.cfg.n_kv_heads
        heads = list(range(n)) if heads is None else list(heads)
        weight, bias = self.qkv_weights(which)
        weight, bias = weight[heads], None if bias is None else bias[heads]
        normed = self._in_block(self.adapter.ln1)(new)  # an ad hoc call: the real one is not disturbed
        out = torch.einsum("bphm,hmd->bphd", normed.to(weight.dtype), weight)
        if bias is not None:
            out = out + bias
        view = self._qkv(which)
        view[:, :, heads] = out.to(view.dtype)

    def set_head_inputs_at(self, rows: torch.Tensor, heads: torch.Tensor, new: torch.Tensor) -> None:
        """Like `set_head_inputs`, for single (row, head) entries: entry e gives head `heads[e]` of batch row
        `rows[e]` the residual input new[e] [pos, d_model]; every other row and head is untouched."""
        which = self.name[0]
        weight, bias = self.qkv_weights(which)
        normed = self._in_block(self.adapter.ln1)(new)  # an ad hoc call: the real one is not disturbed
        out = torch.einsum("epm,emd->epd", normed.to(weight.dtype), weight[heads])
        if bias is not None:
            out = out + bias[heads].unsqueeze(1)
        view = self._qkv(which)
        view[rows, :, heads] = out.to(view.dtype)

    def qkv_weights(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's query, key or value weights [head, d_model, d_head] and bias [head, d_head] (or None),
        whatever the storage layout (GPT-2's fused Conv1D, NeoX's per-head fused Linear, separate Linears)."""
        a, cfg = self.adapter, self.cfg
        idx = "qkv".index(which)
        n = cfg.n_heads if which == "q" else cfg.n_kv_heads
        if a.qkv == "separate":
            proj = self._in_block(a.qkv_paths[idx])
            weight = proj.weight.view(n, cfg.d_head, cfg.d_model).transpose(1, 2)
            bias = getattr(proj, "bias", None)
            return weight, None if bias is None else bias.view(n, cfg.d_head)
        proj = self._in_block(a.qkv_paths[0])
        bias = getattr(proj, "bias", None)
        width = cfg.n_heads * cfg.d_head
        if a.qkv == "gpt2_fused":  # Conv1D: [d_model, q | k | v]
            weight = proj.weight[:, idx * width : (idx + 1) * width].reshape(cfg.d_model, n, cfg.d_head)
            weight = weight.permute(1, 0, 2)
            bias = None if bias is None else bias[idx * width : (idx + 1) * width].view(n, cfg.d_head)
            return weight, bias
        # NeoX: Linear [head * (q | k | v), d_model]
        weight = proj.weight.view(n, 3, cfg.d_head, cfg.d_model)[:, idx].transpose(1, 2)
        bias = None if bias is None else bias.view(n, 3, cfg.d_head)[:, idx]
        return weight, bias

    # -- weights -------------------------------------------------------------------------------------
    def W_O(self) -> torch.Tensor:
        """[head, d_head, d_model] output weights of this layer's heads."""
        return output_weights(self.module, self.adapter, self.cfg, self.layer)


def output_weights(module: torch.nn.Module, adapter: Adapter, cfg: ModelConfig, layer: int) -> torch.Tensor:
    """W_O of `layer` as [head, d_head, d_model], whatever the storage layout (Conv1D or Linear)."""
    weight = envoy_at(envoy_at(module, adapter.blocks)[layer], adapter.out_proj).weight
    w = weight if adapter.weights_transposed else weight.T  # [H * d_head, d_model]
    return w.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)
