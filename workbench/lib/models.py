"""Models re-expressed as a chain of node layers, the form LIB works on.

A `LibModel` names its node layers (activation sites, in forward order) and computes the sections between
consecutive ones. Every node layer but the logits carries a constant 1 as its last coordinate ("bias folding"):
biases multiply it, so a bias is a weight like any other and the mean of a layer is reachable by a linear map.
Activations have shape [N, pos, d] everywhere (pos = 1 for an MLP).

- `ModAddTransformer` (`load_modadd`): the authors' one-layer transformer on (x + y) mod 113, node layers
  ``ln1.0`` (token + position embedding, 3 positions), ``ln2.0`` (residual after attention, last position),
  ``unembed`` (residual after the MLP, last position), ``output`` (the 114 logits, never rotated). As in the
  authors' set-up, only the last position is kept from the attention block on, which is exact for the logits
  they score.
- `MnistMLP` (`load_mnist_mlp`): 784-100-100-10 ReLU MLP; node layers are the inputs of each layer
  (``layers.0`` pixels, ``layers.1``, ``layers.2`` hidden) and ``output``.
- `LanguageModelSections` (`lm_sections`): a GPT-2 family model (the demo model) at one or two blocks; node layers
  ``resid_pre.L``, ``resid_mid.L`` (and so on), ending at ``resid_post`` of the last block chosen. The blocks are
  recomputed from the model's own weights (attention written out, so that no mask is left to the caller); the rest
  of the model turns the last node layer into logits.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError, ModelLoadError, UnsupportedModelError
from workbench.lib import data
from workbench.models import WorkbenchModel


def _aug(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[d, k] weight and [k] bias -> [d + 1, k]: acting on an activation with the constant last, x W + c b."""
    return torch.cat([W, b[None]], 0)


def _pad_col(W: torch.Tensor) -> torch.Tensor:
    """[k, d] -> [k, d + 1] with a zero last column: writes nothing to the constant coordinate."""
    return torch.cat([W, W.new_zeros(W.shape[0], 1)], 1)


def _pad(b: torch.Tensor) -> torch.Tensor:
    """[d] -> [d + 1] with a zero for the constant coordinate."""
    return torch.cat([b, b.new_zeros(1)])


def _fold(x: torch.Tensor) -> torch.Tensor:
    """Append the constant coordinate: [..., d] -> [..., d + 1]."""
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


class LibModel(nn.Module):
    """A model as a chain of node layers. Subclasses set `kind`, `metric`, `node_layers` and implement
    `node_input`, `section` and (when the last node layer is not ``"output"``) `head`.

    Attributes:
        node_layers: node-layer names in forward order; ``"output"`` (the logits) may come last.
        code: a Python expression that recreates the model (for "show code").
        kind: "modadd", "mnist" or "lm" (picks the node profiles a panel shows).
        metric: "accuracy" (higher is better) or "loss" (next-token cross-entropy, lower is better).
        default_sources: stochastic position sources used by default (None: exact, one pass per position).
    """

    kind: ClassVar[str] = "generic"
    metric: ClassVar[str] = "accuracy"
    default_sources: ClassVar[int | None] = None
    node_layers: tuple[str, ...] = ()
    code: str = "model"

    def node_input(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs -> activation at ``node_layers[0]`` [N, pos, d]."""
        raise NotImplementedError

    def section(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Activation at ``node_layers[i]`` -> activation at ``node_layers[i + 1]``."""
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Activation at the last node layer -> logits. The identity when that layer is ``"output"``."""
        if self.node_layers[-1] == "output":
            return f
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def index(self, name: str) -> int:
        try:
            return self.node_layers.index(name)
        except ValueError:
            raise InputError(
                f"{name!r} is not a node layer of {type(self).__name__}; its node layers are {list(self.node_layers)}"
            ) from None

    def has_const(self, name: str) -> bool:
        """Every node layer but the logits carries the constant coordinate (last)."""
        return name != "output"

    def run(self, f: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """From node layer `start` to node layer `stop` (indices into `node_layers`)."""
        for i in range(start, stop):
            f = self.section(i, f)
        return f

    def acts(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Activations at every node layer up to index `upto` (inclusive; all by default)."""
        upto = len(self.node_layers) - 1 if upto is None else upto
        out = [self.node_input(x)]
        for i in range(upto):
            out.append(self.section(i, out[-1]))
        return out

    def logits_from(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Run the rest of the model from node layer `i`: logits."""
        return self.head(self.run(f, i, len(self.node_layers) - 1))

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example score [N]: 1/0 correct (accuracy) or mean next-token loss per row (loss)."""
        logits = logits.reshape(len(y), -1, logits.shape[-1])[:, -1]
        return (logits.argmax(-1) == y).to(torch.float64)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(node_layers={list(self.node_layers)})"


# ---------------------------------------------------------------------------------------------------------------
# modular addition


class _Attn(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int):
        super().__init__()
        self.W_Q = nn.Parameter(torch.zeros(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.zeros(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.zeros(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.zeros(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))


class _Mlp(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Parameter(torch.zeros(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.zeros(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int):
        super().__init__()
        self.attn = _Attn(d_model, n_heads, d_head)
        self.mlp = _Mlp(d_model, d_mlp)


class _Param(nn.Module):
    def __init__(self, **shapes):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(*shape)))


class ModAddTransformer(LibModel):
    """The authors' modular-addition transformer: 1 layer, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no
    LayerNorm, vocabulary 114 (0..112 and "=" = 113), context 3. Parameters are named as in TransformerLens,
    so the authors' state dicts load as they are.

    `forward(tokens [N, 3])` gives logits [N, 3, 114] with full causal attention (the plain model, for checks);
    the LIB sections keep only the last position after attention.
    """

    kind = "modadd"
    node_layers = ("ln1.0", "ln2.0", "unembed", "output")

    def __init__(
        self,
        d_model: int = 128,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 512,
        d_vocab: int = 114,
        n_ctx: int = 3,
    ):
        super().__init__()
        self.d_head = d_head
        self.embed = _Param(W_E=(d_vocab, d_model))
        self.pos_embed = _Param(W_pos=(n_ctx, d_model))
        self.blocks = nn.ModuleList([_Block(d_model, n_heads, d_head, d_mlp)])
        self.unembed = _Param(W_U=(d_model, d_vocab), b_U=(d_vocab,))
        self.code = "model"

    # -- plain forward ------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, pos] -> logits [N, pos, 114] (causal attention at every position)."""
        x = self.embed.W_E[tokens] + self.pos_embed.W_pos[: tokens.shape[1]]
        a = self.blocks[0].attn
        q = torch.einsum("npd,hde->nhpe", x, a.W_Q) + a.b_Q[None, :, None]
        k = torch.einsum("npd,hde->nhpe", x, a.W_K) + a.b_K[None, :, None]
        v = torch.einsum("npd,hde->nhpe", x, a.W_V) + a.b_V[None, :, None]
        scores = torch.einsum("nhqe,nhke->nhqk", q, k) / math.sqrt(self.d_head)
        p = tokens.shape[1]
        mask = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        z = torch.einsum("nhqk,nhke->nhqe", pattern, v)
        x = x + torch.einsum("nhqe,hed->nqd", z, a.W_O) + a.b_O
        m = self.blocks[0].mlp
        x = x + torch.relu(x @ m.W_in + m.b_in) @ m.W_out + m.b_out
        return x @ self.unembed.W_U + self.unembed.b_U

    # -- LIB sections -------------------------------------------------------------------------------
    def node_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype.is_floating_point or x.ndim != 2:
            raise InputError("the mod-add model takes token ids [N, 3]; build them with modadd_data(...)")
        return _fold(self.embed.W_E[x] + self.pos_embed.W_pos[: x.shape[1]])

    def section(self, i: int, f: torch.Tensor) -> torch.Tensor:
        # Biases are folded into the weights as a last row that multiplies the constant coordinate, so that the
        # activation is rarely sliced: each slice costs a full-size zero-fill and copy in every backward pass.
        if i == 0:  # ln1.0 [N, 3, 129] -> ln2.0 [N, 1, 129]: attention, read at the last query only
            a = self.blocks[0].attn
            n_heads, d_model, d_head = a.W_Q.shape
            k = (f @ _aug(a.W_K.permute(1, 0, 2).reshape(d_model, -1), a.b_K.reshape(-1))).reshape(
                *f.shape[:2], n_heads, d_head
            )
            v = (f @ _aug(a.W_V.permute(1, 0, 2).reshape(d_model, -1), a.b_V.reshape(-1))).reshape(
                *f.shape[:2], n_heads, d_head
            )
            last = f[:, -1]
            q = (last @ _aug(a.W_Q.permute(1, 0, 2).reshape(d_model, -1), a.b_Q.reshape(-1))).reshape(
                len(f), 1, n_heads, d_head
            )
            # with three key positions, elementwise products beat batched 1 x d_head matmuls
            pattern = ((q * k).sum(-1) / math.sqrt(d_head)).softmax(1)  # [N, key pos, head]
            z = (pattern[..., None] * v).sum(1).reshape(len(f), n_heads * d_head)
            out = z @ _pad_col(a.W_O.reshape(n_heads * d_head, d_model)) + last[:, -1:] * _pad(a.b_O)
            return (last + out)[:, None]
        if i == 1:  # ln2.0 -> unembed: the MLP block
            m = self.blocks[0].mlp
            h = torch.relu(f @ _aug(m.W_in, m.b_in))
            return f + h @ _pad_col(m.W_out) + f[..., -1:] * _pad(m.b_out)
        if i == 2:  # unembed -> output: logits
            return f @ _aug(self.unembed.W_U, self.unembed.b_U)
        raise InputError(f"section {i} does not exist (the mod-add model has 3)")


def _where(path, data_dir) -> str:
    """The location arguments of a loader call, for its code string."""
    if path is not None:
        return f", path={str(path)!r}"
    return f", data_dir={str(data_dir)!r}" if data_dir is not None else ""


_MODADD_SKIP = {"blocks.0.attn.mask", "blocks.0.attn.IGNORE"}


def load_modadd(seed: int = 0, *, path=None, data_dir=None, download: bool = True) -> ModAddTransformer:
    """The authors' mod-add transformer trained with seed `seed` (0..4), float32, in eval mode.

    The checkpoint is found as `workbench.lib.data.locate` says: `path`, `data_dir` or ``$WORKBENCH_LIB_DIR``,
    the cache, else a download checked against its sha256.
    """
    if seed not in data.MODADD_SEEDS:
        raise InputError(f"seed must be one of {data.MODADD_SEEDS} (the authors' checkpoints), got {seed!r}")
    p = data.locate(
        f"modadd/seed{seed}.pt", path=path, data_dir=data_dir, download=download, verify_digest=path is None
    )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which
        raise ModelLoadError(f"{p} could not be read as a torch state dict: {exc}") from exc
    model = ModAddTransformer()
    keep = {k: v for k, v in state.items() if k not in _MODADD_SKIP}
    try:
        model.load_state_dict(keep)
    except RuntimeError as exc:
        raise ModelLoadError(f"{p} is not a mod-add checkpoint of the authors' shape: {exc}") from exc
    model.code = f"load_modadd(seed={seed}{_where(path, data_dir)})"
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# MNIST MLP


class _Linear(nn.Module):
    """A layer stored as the authors store it: ``W`` [in, out], ``b`` [out]."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(d_in, d_out))
        self.b = nn.Parameter(torch.zeros(d_out))


class MnistMLP(LibModel):
    """The authors' MNIST MLP 784-100-100-10: ReLU(x W0 + b0) -> ReLU(. W1 + b1) -> . W2 + b2."""

    kind = "mnist"
    node_layers = ("layers.0", "layers.1", "layers.2", "output")

    def __init__(self, sizes: tuple[int, ...] = (784, 100, 100, 10)):
        super().__init__()
        self.layers = nn.ModuleList([_Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.code = "model"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pixels [N, 784] -> logits [N, 10]."""
        x = x.to(self.dtype)
        for i, layer in enumerate(self.layers):
            x = x @ layer.W + layer.b
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def node_input(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point or x.shape[-1] != self.layers[0].W.shape[0]:
            raise InputError(
                f"the MLP takes pixels [N, {self.layers[0].W.shape[0]}] in [0, 1]; build them with mnist_data(...)"
            )
        return _fold(x.to(self.dtype).reshape(len(x), 1, -1))

    def section(self, i: int, f: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        x, c = f[..., :-1], f[..., -1:]
        out = x @ layer.W + c * layer.b
        if i == len(self.layers) - 1:
            return out
        return _fold(torch.relu(out))


def load_mnist_mlp(*, path=None, data_dir=None, download: bool = True) -> MnistMLP:
    """The authors' MNIST MLP checkpoint (12 epochs), float32, in eval mode."""
    p = data.locate(
        "mnist_mlp/model_epoch_12.pt",
        path=path,
        data_dir=data_dir,
        download=download,
        verify_digest=path is None,
    )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
        model = MnistMLP()
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelLoadError(f"{p} is not the authors' MNIST MLP state dict: {exc}") from exc
    model.code = f"load_mnist_mlp({_where(path, data_dir).removeprefix(', ')})"
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# language models


class LanguageModelSections(LibModel):
    """Blocks `layers` of a GPT-2 family model as LIB sections (attention block, MLP block, ...).

    Node layers: ``resid_pre.L`` and ``resid_mid.L`` for each chosen block L, then ``resid_post`` of the last
    one. The model before the first chosen block makes the first node layer; the model after the last one
    (remaining blocks, final LayerNorm, unembedding) makes the logits. Scored by next-token cross-entropy.
    """

    kind = "lm"
    metric = "loss"
    default_sources = 1

    def __init__(self, wb_model, layers: tuple[int, ...]):
        super().__init__()
        hf = wb_model.module
        cfg = wb_model.cfg
        if cfg is None or cfg.family != "gpt2":
            raise UnsupportedModelError(
                f"LIB sections are written for GPT-2 family models (like the demo model); {wb_model.name} is "
                f"{getattr(cfg, 'family', 'not a transformer')}."
            )
        if wb_model.remote is True:
            raise UnsupportedModelError("LIB needs the weights locally; load the model without remote=True.")
        layers = tuple(sorted(set(layers)))
        if (
            not layers
            or layers[0] < 0
            or layers[-1] >= cfg.n_layers
            or list(layers) != list(range(layers[0], layers[-1] + 1))
        ):
            raise InputError(
                f"layers={layers}: give consecutive blocks in 0..{cfg.n_layers - 1}, e.g. (1,) or (1, 2)"
            )
        self.hf = hf
        self.layers = layers
        self.n_heads = cfg.n_heads
        self.tokenizer = wb_model.tokenizer
        names: list[str] = []
        for layer in layers:
            names += [f"resid_pre.{layer}", f"resid_mid.{layer}"]
        names.append(f"resid_post.{layers[-1]}")
        self.node_layers = tuple(names)
        self.code = f"lm_sections(lm, layers={layers})"

    def _blocks(self):
        return self.hf.transformer.h

    def _ln(self, ln: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:], ln.weight, None, ln.eps)
        return h + (ln.bias if c is None else c * ln.bias)

    def _attn_block(self, block, x, c=None):
        """x + attention(ln_1(x)), causal; biases multiply the constant coordinate `c` when given."""
        one = 1 if c is None else c
        h = self._ln(block.ln_1, x, c)
        qkv = h @ block.attn.c_attn.weight + one * block.attn.c_attn.bias
        n, p, three_d = qkv.shape
        d = three_d // 3
        q, k, v = (t.reshape(n, p, self.n_heads, d // self.n_heads).transpose(1, 2) for t in qkv.split(d, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads)
        mask = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        z = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        z = z.transpose(1, 2).reshape(n, p, d)
        return x + z @ block.attn.c_proj.weight + one * block.attn.c_proj.bias

    def _mlp_block(self, block, x, c=None):
        one = 1 if c is None else c
        h = self._ln(block.ln_2, x, c)
        h = block.mlp.act(h @ block.mlp.c_fc.weight + one * block.mlp.c_fc.bias)
        return x + h @ block.mlp.c_proj.weight + one * block.mlp.c_proj.bias

    def node_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype.is_floating_point or x.ndim != 2:
            raise InputError("a language model takes token ids [N, pos]; build them with lm_data(...)")
        t = self.hf.transformer
        h = t.wte.weight[x] + t.wpe.weight[: x.shape[1]]
        for layer in range(self.layers[0]):
            block = self._blocks()[layer]
            h = self._mlp_block(block, self._attn_block(block, h))
        return _fold(h)

    def section(self, i: int, f: torch.Tensor) -> torch.Tensor:
        block = self._blocks()[self.layers[i // 2]]
        x, c = f[..., :-1], f[..., -1:]
        out = self._attn_block(block, x, c) if i % 2 == 0 else self._mlp_block(block, x, c)
        return torch.cat([out, c], dim=-1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        h = f[..., :-1]
        for layer in range(self.layers[-1] + 1, len(self._blocks())):
            block = self._blocks()[layer]
            h = self._mlp_block(block, self._attn_block(block, h))
        t = self.hf.transformer
        return t.ln_f(h) @ self.hf.lm_head.weight.T

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy per row (positions with target -100 are skipped)."""
        loss = F.cross_entropy(
            logits.flatten(0, 1).to(torch.float64), y.flatten(), reduction="none", ignore_index=-100
        )
        loss = loss.reshape(y.shape)
        valid = (y != -100).to(loss.dtype)
        return (loss * valid).sum(1) / valid.sum(1).clamp(min=1)


def lm_sections(model, layers: int | tuple[int, ...] = (1,)) -> LanguageModelSections:
    """A language model (a `WorkbenchModel` of the GPT-2 family, e.g. ``load_model("demo")``) at one or two
    blocks, as LIB sections. The negative-result experiment of the paper, at a size a CPU can run."""
    if not isinstance(model, WorkbenchModel):
        raise InputError("lm_sections takes a WorkbenchModel, e.g. load_model('demo')")
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    out = LanguageModelSections(model, layers)
    out.code = f"lm_sections(lm, layers={layers!r})"
    return out.eval()
