"""Activations at an SAE's site, streamed from token rows in chunks (training, evaluation, dashboards).

A chunk is a few token rows run through the model in one trace; its activations at the site (positions from
`skip_positions` on) come back as [n_tokens, d_in]. Chunks run through the caller's `Run`, so they report
progress and stop on cancel. ``z`` sites are read with their heads flattened, [.., n_heads * d_head].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.core import Run
from workbench.errors import InputError, SiteError
from workbench.results import Provenance

SAE_SITES = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mlp_post",
    "z",
    "ln1",
    "ln2",
    "ln_final",
    "embed",
)


def result_fields(model, sae, layer: int | None, **options) -> dict:
    """The fields an SAE result ends with: the SAE's site, `layer`, the SAE, and the provenance of the run (the
    model, the SAE, then `options`)."""
    return dict(
        site=sae.cfg.site,
        layer=layer,
        sae=repr(sae),
        provenance=Provenance.capture(model.name, sae=repr(sae), **options),
    )


def site_width(model, site: str) -> int:
    """The width of a site's vectors (d_in of an SAE there)."""
    cfg = model.cfg
    if site == "mlp_post":
        return cfg.d_mlp or 4 * cfg.d_model
    if site == "z":
        return cfg.n_heads * cfg.d_head
    return cfg.d_model


def check_site(model, site: str, layer: int | None) -> int | None:
    """Validate an SAE site on `model`; returns the layer as a non-negative index (None for model-level sites)."""
    if not model.is_transformer:
        raise SiteError("SAEs need a transformer language model with an architecture adapter.")
    if site not in SAE_SITES:
        raise SiteError(f"SAEs read one of the sites {', '.join(SAE_SITES)}; got {site!r}.")
    per_layer = site not in ("ln_final", "embed")
    model.check_site(site, layer if per_layer else None)
    return layer % model.cfg.n_layers if per_layer else None


def read(model, site: str, layer: int | None):
    """Inside a trace: the site's value as [batch, pos, d_in]."""
    value = model.site(site, layer).value
    return value.flatten(-2) if site == "z" else value


def write(model, site: str, layer: int | None, new) -> None:
    """Inside a trace: replace the site's value by `new` [batch, pos, d_in]."""
    if site == "z":
        new = new.view(*new.shape[:-1], model.cfg.n_heads, model.cfg.d_head)
    model.site(site, layer).value = new


Rows = list  # list[torch.Tensor]: 1-D LongTensors, one per row, lengths may differ


def token_rows(model, data, seq_len: int | None = None) -> Rows:
    """Token rows as a list of 1-D LongTensors (lengths may differ).

    data: a [row, pos] LongTensor (its rows), a list of 1-D token tensors, or texts: one row per text, BOS first
    (as the model saw documents in training), cut at `seq_len` tokens (default: the model's context).
    """
    if isinstance(data, torch.Tensor):
        tokens = model.to_tokens(data)
        if tokens.shape[0] < 1:
            raise InputError("No token rows given.")
        return list(tokens)
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or len(data) == 0:
        raise InputError("Give token rows as a [row, pos] LongTensor, a list of 1-D token tensors, or texts.")
    if all(isinstance(t, torch.Tensor) for t in data):
        return [model.to_tokens(t.reshape(1, -1))[0] for t in data]
    if not all(isinstance(t, str) for t in data):
        raise InputError("Give token rows as a [row, pos] LongTensor, a list of 1-D token tensors, or texts.")
    limit = min(seq_len or model.cfg.n_ctx, model.cfg.n_ctx)
    bos = (
        [model.tokenizer.bos_token_id]
        if model.default_prepend_bos and model.tokenizer.bos_token_id is not None
        else []
    )
    ids = model.tokenizer(list(data), add_special_tokens=False).input_ids
    return [torch.tensor((bos + x)[:limit], dtype=torch.long) for x in ids if len(bos + x) > 0]


def batches(rows: Rows, order: Sequence[int] | None = None, rows_per_chunk: int = 32) -> list[list[int]]:
    """Row indices (in `order`, default all) in chunks of at most `rows_per_chunk`, rows of similar length
    together (each chunk is padded to its longest row; see `padded`)."""
    order = sorted(range(len(rows)) if order is None else order, key=lambda i: len(rows[i]))
    return [order[j : j + rows_per_chunk] for j in range(0, len(order), rows_per_chunk)]


def padded(rows: Rows, span: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `span` as one batch [row, longest] padded on the right, and a mask [row, longest] of real tokens.

    Right padding is exact for causal models: a position only attends to itself and earlier ones, so the padding
    changes nothing at the real positions; whatever the model computes at padded positions is masked out."""
    length = max(len(rows[i]) for i in span)
    tokens = torch.zeros(len(span), length, dtype=torch.long)
    mask = torch.zeros(len(span), length, dtype=torch.bool)
    for j, i in enumerate(span):
        tokens[j, : len(rows[i])] = rows[i]
        mask[j, : len(rows[i])] = True
    return tokens, mask


def n_tokens(rows: Rows, skip_positions: int, order: Sequence[int] | None = None) -> int:
    """Positions at or after `skip_positions` in `rows` (those an SAE encodes)."""
    order = range(len(rows)) if order is None else order
    return sum(max(0, len(rows[i]) - skip_positions) for i in order)


@torch.no_grad()
def site_activations(
    model, tokens: torch.Tensor, site: str, layer: int | None, run: Run | None = None
) -> torch.Tensor:
    """[row, pos, d_in] activations of one batch of token rows [row, pos] at the site (float32, CPU); `run`
    reports a remote trace as its job."""
    with model.trace(tokens.to(model.device), run=run) as tracer:
        value = read(model, site, layer).save()
        tracer.stop()  # nothing after the site is needed
    return value.detach().float().cpu()


def stream(
    model,
    tokens,
    site: str,
    layer: int | None,
    *,
    rows: Sequence[int] | None = None,
    rows_per_chunk: int = 64,
    skip_positions: int = 1,
    run: Run | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """[n, d_in] activations at positions >= `skip_positions` of token rows (a [row, pos] tensor or a list of 1-D
    tensors), rows `rows` (default all), `rows_per_chunk` rows per trace (right-padded, `padded`) through `run`
    (progress, cancel). Rows come shortest first, each row's positions in order."""
    run = run or Run(progress=False)
    data = list(tokens) if isinstance(tokens, torch.Tensor) else tokens
    order = [i for i in (range(len(data)) if rows is None else rows) if len(data[i]) > skip_positions]
    spans = batches(data, order, rows_per_chunk)
    if not spans:
        raise InputError(f"No row has positions after the first {skip_positions}.")

    def one(span: list[int]) -> torch.Tensor:
        tokens, mask = padded(data, span)
        acts = site_activations(model, tokens, site, layer, run=run)
        return acts[:, skip_positions:][mask[:, skip_positions:]]

    parts = run.map(spans, one, desc=desc, weights=[len(s) for s in spans])
    return torch.cat(parts)
