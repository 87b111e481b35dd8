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


def token_rows(model, data, seq_len: int | None = None) -> torch.Tensor:
    """Token rows [row, pos]: a LongTensor as given, or texts packed into rows of `seq_len` tokens (BOS first,
    `workbench.tasks.pack`)."""
    if isinstance(data, torch.Tensor):
        tokens = model.to_tokens(data)
        if tokens.shape[0] < 1:
            raise InputError("No token rows given.")
        return tokens
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or not data or not all(isinstance(t, str) for t in data):
        raise InputError("Give token rows as a [row, pos] LongTensor or texts (a list of strings).")
    from workbench.tasks import pack

    seq_len = seq_len or min(model.cfg.n_ctx, 128)
    return pack(model, list(data), seq_len)


@torch.no_grad()
def site_activations(model, tokens: torch.Tensor, site: str, layer: int | None) -> torch.Tensor:
    """[row, pos, d_in] activations of one batch of token rows at the site (float32, CPU)."""
    with model.trace(tokens.to(model.device)) as tracer:
        value = read(model, site, layer).save()
        tracer.stop()  # nothing after the site is needed
    return value.detach().float().cpu()


def stream(
    model,
    tokens: torch.Tensor,
    site: str,
    layer: int | None,
    *,
    rows: Sequence[int] | None = None,
    rows_per_chunk: int = 32,
    skip_positions: int = 1,
    run: Run | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """[n, d_in] activations at positions >= `skip_positions` of token rows `rows` (default all), in row order,
    computed `rows_per_chunk` rows per trace through `run` (progress, cancel)."""
    run = run or Run(progress=False)
    order = list(range(tokens.shape[0])) if rows is None else list(rows)
    spans = [order[i : i + rows_per_chunk] for i in range(0, len(order), rows_per_chunk)]
    if tokens.shape[1] <= skip_positions:
        raise InputError(
            f"Rows of {tokens.shape[1]} tokens have no positions after the first {skip_positions}."
        )

    def one(span: list[int]) -> torch.Tensor:
        acts = site_activations(model, tokens[span], site, layer)
        return acts[:, skip_positions:].reshape(-1, acts.shape[-1])

    parts = run.map(spans, one, desc=desc, weights=[len(s) for s in spans])
    return torch.cat(parts) if parts else torch.empty(0, site_width(model, site))
