"""Running a batch from a cached prefix of the base run, and what one row of such a batch costs.

Most interventions change nothing below the layer they write to, and (in a causal model) nothing at positions
before the first one they touch. A batch of intervened runs can therefore start from the base run's state:

- the residual stream entering layer L: blocks 0..L-1 are *skipped* and fed that residual (`enter_at`);
- the keys and values of the positions before p: only positions >= p are run, on top of a KV cache
  (`kv_cache`). This needs a cache object in the model call, which cannot travel to NDIF: `reuses_cache`
  says where cached state is used (local models).

`bytes_per_row` is the one memory estimate engines use to size their chunks.
"""

from __future__ import annotations

import torch
import transformers
from transformers import DynamicCache

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
"""Under transformers 4 some families' blocks return a tuple (hidden states first); under 5 all return a
tensor (`Adapter.tuple_blocks_tf4` says which)."""


def reuses_cache(model) -> bool:
    """Whether runs of `model` start from state cached on this machine (keys and values, block outputs): only
    locally. A cache object does not travel to NDIF (nor through the serialising dry run), and uploading
    cached activations with every job would cost more than recomputing them there."""
    return model.remote is False


def enter_at(model, layer: int, resid) -> None:
    """Inside a trace: do not run blocks 0..layer-1; feed `resid` [batch, pos, d_model] (the residual they would
    compute) to block `layer`, cast to the dtype the model runs in (on NDIF it may differ from the client's)."""
    if layer <= 0:
        return
    if isinstance(resid, tuple):  # a block's output as transformers 4 returns it
        resid = resid[0]
    value = resid.to(model.submodule("block", 0).input.dtype)
    if TRANSFORMERS_4 and model.adapter.tuple_blocks_tf4:
        value = (value,)
    for below in range(layer):
        model.submodule("block", below).skip(value)


def kv_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers cache holding per-layer (keys, values) [batch, kv_head, pos, d_head] for a model call
    that runs only the later positions (the model appends to it)."""
    return DynamicCache(ddp_cache_data=kv, config=model.module.config)


def bytes_per_row(
    model,
    n_pos: int,
    *,
    n_run: int | None = None,
    logit_pos: int = 1,
    kv_pos: int = 0,
    extra: int = 0,
) -> int:
    """A generous estimate of the peak memory of one row of a batch (inference, no gradients).

    n_pos: positions each attention attends over; n_run: positions the blocks compute (default n_pos);
    logit_pos: positions whose logits are computed; kv_pos: cached key/value positions the row carries (copied
    into the batch's cache); extra: bytes of whatever else the engine keeps per row.
    """
    c = model.cfg
    n_run = n_pos if n_run is None else n_run
    item = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    d_mlp = c.d_mlp or 4 * c.d_model
    activations = n_run * (12 * c.d_model + 3 * d_mlp + 4 * c.n_heads * n_pos)
    kv = 4 * c.n_layers * c.n_kv_heads * c.d_head * kv_pos
    return item * (activations + kv) + 4 * 5 * logit_pos * c.d_vocab + extra
