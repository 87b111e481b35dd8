"""A small latent dashboard: the contexts on a corpus where chosen latents fire most, and how often they fire.

`top_contexts` streams token rows through the model a chunk at a time, encodes the SAE's site, and keeps, per
latent, the `k` largest activations with the tokens around each and the latent's activation on those tokens
(so the dashboard can colour them); it also counts how often each latent fires and histograms its nonzero
activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError
from workbench.results import Provenance, Result
from workbench.sae import activations as acts
from workbench.sae.model import SAE


@dataclasses.dataclass(frozen=True)
class LatentContexts(Result):
    """Top-activating contexts of some latents on a corpus.

    Attributes:
        latents: [latent] the latents' indices in the SAE.
        values: [latent, k] their largest activations, descending (0 where a latent fired fewer than k times).
        row, position: [latent, k] where each occurs (index of the row in the data, position in it; -1 when
            unused).
        context_ids: [latent, k, window] token ids around each occurrence (-1 pads past a row's ends).
        context_acts: [latent, k, window] the latent's activation on those tokens.
        center: index in the window of the occurrence itself.
        frequency: [latent] fraction of the corpus tokens (positions >= skip) on which each fires.
        mean_active: [latent] mean activation where it fires.
        histogram: [latent, bins] counts of nonzero activations in `bin_edges` [bins + 1] (per latent, from 0 to
            its maximum).
        bin_edges: [latent, bins + 1].
        token_strings: {id: string} for every id in the contexts.
        n_tokens: corpus tokens encoded.
        site, layer, sae: where and what.
    """

    latents: torch.Tensor
    values: torch.Tensor
    row: torch.Tensor
    position: torch.Tensor
    context_ids: torch.Tensor
    context_acts: torch.Tensor
    center: int
    frequency: torch.Tensor
    mean_active: torch.Tensor
    histogram: torch.Tensor
    bin_edges: torch.Tensor
    token_strings: dict[int, str]
    n_tokens: int
    site: str
    layer: int | None
    sae: str
    provenance: Provenance

    viz_module: ClassVar[str] = "workbench.viz.sae"
    shapes: ClassVar[dict[str, str]] = {
        "latents": "latents",
        "values": "latents k",
        "row": "latents k",
        "position": "latents k",
        "context_ids": "latents k window",
        "context_acts": "latents k window",
        "frequency": "latents",
        "mean_active": "latents",
        "histogram": "latents bins",
        "bin_edges": "latents edges",
    }

    def index_of(self, latent: int) -> int:
        hits = torch.nonzero(self.latents == latent).flatten()
        if len(hits) == 0:
            raise InputError(f"Latent {latent} is not in this dashboard ({self.latents.tolist()}).")
        return int(hits[0])

    def context_text(self, latent: int, j: int = 0, mark: str = "[[{}]]") -> str:
        """The j-th top context of `latent` as text, with the firing token marked."""
        i = self.index_of(latent)
        out = []
        for w, t in enumerate(self.context_ids[i, j].tolist()):
            if t < 0:
                continue
            s = self.token_strings.get(t, str(t))
            out.append(mark.format(s) if w == self.center else s)
        return "".join(out)

    def to_frame(self):
        """One row per (latent, rank): the activation, where it is, and the context text."""
        import pandas as pd

        rows = []
        for i, latent in enumerate(self.latents.tolist()):
            for j in range(self.values.shape[1]):
                if int(self.row[i, j]) < 0:
                    continue
                rows.append(
                    {
                        "latent": latent,
                        "rank": j,
                        "activation": float(self.values[i, j]),
                        "row": int(self.row[i, j]),
                        "position": int(self.position[i, j]),
                        "context": self.context_text(latent, j),
                        "frequency": float(self.frequency[i]),
                    }
                )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"LatentContexts({len(self.latents)} latents x top {self.values.shape[1]}, {self.n_tokens} tokens, {self.sae})"


def top_contexts(
    model,
    sae: SAE,
    data,
    latents: Sequence[int] | None = None,
    *,
    k: int = 8,
    before: int = 8,
    after: int = 3,
    seq_len: int | None = None,
    rows_per_chunk: int = 64,
    bins: int = 20,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> LatentContexts:
    """The `k` top-activating contexts of `latents` on `data` (token rows, or texts: one row each, BOS first), with
    `before` tokens before and `after` after each occurrence.

    latents: indices (at most 512), or None for the 16 most frequent latents (needs `sae.firing_frequency`).
    """
    layer = acts.check_site(model, sae.cfg.site, sae.cfg.layer)
    if latents is None:
        if sae.firing_frequency is None:
            raise InputError("Name the latents to show (this SAE has no firing frequencies to pick from).")
        latents = sae.firing_frequency.topk(min(16, sae.d_sae)).indices.tolist()
    latents = [sae._index(int(i)) for i in latents]
    if not latents or len(latents) > 512:
        raise InputError("Give between 1 and 512 latents.")
    for name, value in (("k", k), ("bins", bins)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive whole number.")
    if before < 0 or after < 0:
        raise InputError("before and after must be >= 0.")
    run = Run.of(run, progress=progress, cancel=cancel)
    tokens = acts.token_rows(model, data, seq_len)
    skip = sae.cfg.skip_positions
    n_rows = len(tokens)
    n_tok = acts.n_tokens(tokens, skip)
    if n_tok == 0:
        raise InputError(f"The rows leave nothing after {skip} skipped positions.")
    idx = torch.tensor(latents)
    L, W = len(latents), before + 1 + after
    best_val = torch.zeros(L, k)
    best_row = torch.full((L, k), -1, dtype=torch.long)
    best_pos = torch.full((L, k), -1, dtype=torch.long)
    best_ids = torch.full((L, k, W), -1, dtype=torch.long)
    best_acts = torch.zeros(L, k, W)
    fires = torch.zeros(L, dtype=torch.float64)
    total = torch.zeros(L, dtype=torch.float64)
    nz_latent: list[torch.Tensor] = []
    nz_value: list[torch.Tensor] = []
    sae_cpu = sae.to("cpu")
    spans = acts.batches(tokens, rows_per_chunk=rows_per_chunk)
    offsets = torch.arange(-before, after + 1)

    def one(span: list[int]) -> None:
        nonlocal best_val, best_row, best_pos, best_ids, best_acts
        toks, mask = acts.padded(tokens, span)
        n_pos = toks.shape[1]
        x = acts.site_activations(model, toks, sae.cfg.site, layer)
        with torch.no_grad():
            f = sae_cpu.encode(x)[..., idx]  # [rows, pos, L]
        f[:, :skip] = 0
        f[~mask] = 0  # padding
        toks = torch.where(mask, toks, torch.full_like(toks, -1))
        fires.add_((f > 0).sum((0, 1)).double())
        total.add_(f.sum((0, 1)).double())
        flat = f.reshape(-1, L)  # [rows * pos, L]
        on = torch.nonzero(flat > 0)
        nz_latent.append(on[:, 1])
        nz_value.append(flat[on[:, 0], on[:, 1]])
        vals, where = flat.topk(min(k, flat.shape[0]), dim=0)  # [k', L]
        r, p = where // n_pos, where % n_pos
        cols = (p[..., None] + offsets).clamp(0, n_pos - 1)  # [k', L, W]
        inside = ((p[..., None] + offsets) >= 0) & ((p[..., None] + offsets) < n_pos)
        ids = torch.where(inside, toks[r[..., None], cols], torch.full_like(cols, -1))  # padding stays -1
        lat = torch.arange(L)[None, :, None].expand_as(cols)
        ctx = torch.where(inside, f[r[..., None], cols, lat], torch.zeros(cols.shape))
        all_val = torch.cat([best_val, vals.T], dim=1)
        all_row = torch.cat([best_row, (torch.tensor(span)[r]).T], dim=1)
        all_pos = torch.cat([best_pos, p.T], dim=1)
        all_ids = torch.cat([best_ids, ids.permute(1, 0, 2)], dim=1)
        all_acts = torch.cat([best_acts, ctx.permute(1, 0, 2)], dim=1)
        keep = all_val.topk(k, dim=1).indices
        best_val = all_val.gather(1, keep)
        best_row = all_row.gather(1, keep)
        best_pos = all_pos.gather(1, keep)
        best_ids = all_ids.gather(1, keep[..., None].expand(-1, -1, W))
        best_acts = all_acts.gather(1, keep[..., None].expand(-1, -1, W))

    run.map(spans, one, desc="latent contexts", weights=[len(s) for s in spans])
    unused = best_val <= 0
    best_row[unused], best_pos[unused], best_ids[unused] = -1, -1, -1
    nz_l, nz_v = torch.cat(nz_latent), torch.cat(nz_value)
    top = best_val[:, 0].clamp(min=1e-12)
    edges = torch.stack([torch.linspace(0, float(t), bins + 1) for t in top])
    hist = torch.stack([torch.histc(nz_v[nz_l == i], bins=bins, min=0, max=float(top[i])) for i in range(L)])
    ids = torch.unique(best_ids[best_ids >= 0]).tolist()
    strings = {i: model.tokenizer.decode([i]) for i in ids} if model.tokenizer is not None else {}
    return LatentContexts(
        latents=idx,
        values=best_val,
        row=best_row,
        position=best_pos,
        context_ids=best_ids,
        context_acts=best_acts,
        center=before,
        frequency=(fires / n_tok).float(),
        mean_active=(total / fires.clamp(min=1)).float(),
        histogram=hist,
        bin_edges=edges,
        token_strings=strings,
        n_tokens=n_tok,
        site=sae.cfg.site,
        layer=layer,
        sae=repr(sae),
        provenance=Provenance.capture(
            model.name,
            sae=repr(sae),
            latents=latents,
            k=k,
            before=before,
            after=after,
            n_rows=n_rows,
            seq_len=seq_len,
        ),
    )
