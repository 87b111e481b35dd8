"""Architecture adapters: where each model family keeps the parts that standard sites name.

An adapter is plain data: module paths (relative to the model, or to a block) and a few layout facts. The site
handles in `sites.py` read them; nothing else in the workbench knows a family's module names. Supported:

- GPT-2 (`gpt2`): fused `c_attn` (q|k|v), Conv1D weights stored [in, out], learned position embeddings.
- GPT-NeoX / Pythia (`gpt_neox`): fused `query_key_value` laid out per head as [q|k|v]; parallel attention and
  MLP when `use_parallel_residual` (then `resid_mid` does not exist).
- Llama-style (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma`, `olmo`, `olmo2`): separate q/k/v projections with
  grouped-query attention, RMSNorm.
- Gemma 2/3 (`gemma2`, `gemma3_text`): Llama-style with "sandwich" norms, so the attention and MLP outputs that
  reach the residual stream are the outputs of `post_attention_layernorm` / `post_feedforward_layernorm`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from workbench.errors import UnsupportedModelError

_KINDS = {"qk": ("q", "k"), "v": ("v",)}


@dataclasses.dataclass(frozen=True)
class QKVProjection:
    """One module that projects a block's attention input to queries, keys and/or values.

    `path` is block-relative. Its output features are `layout`, chunks of equal size in this order (``("q", "k",
    "v")`` for a fused projection, ``("v",)`` for a separate value projection); with `per_head` the layout repeats
    for every head (GPT-NeoX: [head, (q | k | v), d_head]). `transposed`: the weight is stored [in, out] (Conv1D)
    rather than [out, in] (nn.Linear).
    """

    path: str
    layout: tuple[str, ...]
    transposed: bool = False
    per_head: bool = False

    def has(self, kind: str) -> bool:
        """Whether some output features are `kind`: "qk" (queries or keys) or "v" (values)."""
        return any(name in _KINDS[kind] for name in self.layout)

    def weight(self, module) -> torch.Tensor:
        """The projection's weight as [in, out] (``x @ weight``): a view, so in-place changes reach the module."""
        return module.weight if self.transposed else module.weight.T

    def features(self, kind: str, module) -> slice | None:
        """The output features of `module` (this projection) that are `kind` ("qk" or "v"): a slice, None if none.

        Raises `UnsupportedModelError` for a per-head layout, whose features of one kind are not one range.
        """
        if self.per_head:
            raise UnsupportedModelError(
                f"{self.path} interleaves q, k and v per head: its features of one kind are not one range"
            )
        chunks = [i for i, name in enumerate(self.layout) if name in _KINDS[kind]]
        if not chunks:
            return None
        if chunks != list(range(chunks[0], chunks[-1] + 1)):
            raise UnsupportedModelError(
                f"{self.path} ({'|'.join(self.layout)}): its {kind} features are not one range"
            )
        size = self.weight(module).shape[1] // len(self.layout)
        return slice(chunks[0] * size, (chunks[-1] + 1) * size)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family. Block-relative paths start from a block (one layer)."""

    family: str
    blocks: str  # model-relative ModuleList of layers
    embed: str  # token embedding
    ln_final: str
    unembed: str
    ln1: str
    ln2: str
    attn: str
    mlp: str
    out_proj: str  # attention output projection; its input is z, the per-head outputs [B, T, H * d_head]
    mlp_out_proj: str  # MLP down projection; its input is the MLP's post-activation [B, T, d_mlp]
    qkv: Literal["gpt2_fused", "neox_fused", "separate"]
    qkv_paths: tuple[str, ...]  # one fused projection, or (q, k, v)
    weights_transposed: bool = False  # Conv1D stores [in, out]; nn.Linear stores [out, in]
    pos_embed: str | None = None
    attn_out_norm: str | None = None  # sandwich norm applied to the attention output before the residual add
    mlp_out_norm: str | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    rotary: str | None = None  # model-relative module whose output is the rotary (cos, sin), if any
    tuple_blocks_tf4: bool = False  # under transformers 4 its blocks return a tuple (hidden states first)

    @property
    def qkv_projections(self) -> tuple[QKVProjection, ...]:
        """The module(s) projecting a block's attention input, in the order they run (q, k, v when separate)."""
        if self.qkv == "separate":
            return tuple(
                QKVProjection(path, (name,), self.weights_transposed)
                for path, name in zip(self.qkv_paths, "qkv")
            )
        return (
            QKVProjection(
                self.qkv_paths[0], ("q", "k", "v"), self.weights_transposed, per_head=self.qkv == "neox_fused"
            ),
        )


GPT2 = Adapter(
    family="gpt2",
    tuple_blocks_tf4=True,
    blocks="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    ln_final="transformer.ln_f",
    unembed="lm_head",
    ln1="ln_1",
    ln2="ln_2",
    attn="attn",
    mlp="mlp",
    out_proj="attn.c_proj",
    mlp_out_proj="mlp.c_proj",
    qkv="gpt2_fused",
    qkv_paths=("attn.c_attn",),
    weights_transposed=True,
)

NEOX = Adapter(
    family="gpt_neox",
    tuple_blocks_tf4=True,
    blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    ln_final="gpt_neox.final_layer_norm",
    unembed="embed_out",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="attention",
    mlp="mlp",
    out_proj="attention.dense",
    mlp_out_proj="mlp.dense_4h_to_h",
    qkv="neox_fused",
    qkv_paths=("attention.query_key_value",),
    rotary="gpt_neox.rotary_emb",
)

LLAMA = Adapter(
    family="llama",
    blocks="model.layers",
    embed="model.embed_tokens",
    ln_final="model.norm",
    unembed="lm_head",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="self_attn",
    mlp="mlp",
    out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
    qkv="separate",
    qkv_paths=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    norm="rmsnorm",
    rotary="model.rotary_emb",
)

GEMMA2 = dataclasses.replace(
    LLAMA,
    family="gemma2",
    ln2="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    tuple_blocks_tf4=True,
)

ADAPTERS: dict[str, Adapter] = {
    "gpt2": GPT2,
    "gpt_neox": NEOX,
    **{
        name: dataclasses.replace(LLAMA, family=name)
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2")
    },
    "gemma2": GEMMA2,
    "gemma3_text": dataclasses.replace(GEMMA2, family="gemma3_text"),
}


def adapter_for(hf_config, module=None) -> Adapter:
    """The adapter for a transformers config; raises `UnsupportedModelError` naming the supported families."""
    model_type = getattr(hf_config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"No architecture adapter for model_type={model_type!r}. Supported: {', '.join(sorted(ADAPTERS))}. "
            "You can still use nnsight directly through `model.nnsight` (module paths as in `print(model.module)`)."
        )
    if adapter.family == "gpt_neox" and module is not None and not hasattr(module, "embed_out"):
        adapter = dataclasses.replace(adapter, unembed="lm_head")
    return adapter


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape facts engines need, the same for every family (names as in TransformerLens)."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: str
    parallel_residual: bool = False
    logit_softcap: float | None = None  # Gemma 2: logits = cap * tanh(unembed / cap)

    @property
    def has_resid_mid(self) -> bool:
        return not self.parallel_residual


def _first(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def model_config(hf_config, adapter: Adapter) -> ModelConfig:
    """Read a transformers config into a `ModelConfig`."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    d_model = _first(cfg, "hidden_size", "n_embd", "d_model")
    n_heads = _first(cfg, "num_attention_heads", "n_head")
    d_head = _first(cfg, "head_dim", default=None) or d_model // n_heads
    return ModelConfig(
        family=adapter.family,
        n_layers=_first(cfg, "num_hidden_layers", "n_layer"),
        n_heads=n_heads,
        n_kv_heads=_first(cfg, "num_key_value_heads", default=n_heads),
        d_model=d_model,
        d_head=d_head,
        d_mlp=_first(cfg, "intermediate_size", "n_inner", default=None) or 4 * d_model,
        d_vocab=cfg.vocab_size,
        n_ctx=_first(cfg, "max_position_embeddings", "n_positions", "n_ctx", default=2048),
        norm=adapter.norm,
        parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)) and adapter.family == "gpt_neox",
        logit_softcap=getattr(cfg, "final_logit_softcapping", None),
    )
