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

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


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
    latents = _check_latents(sae, latents)
    for name, value in (("k", k), ("bins", bins)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive whole number.")
    if before < 0 or after < 0:
        raise InputError("before and after must be >= 0.")
    run = Run.of(run, progress=progress, cancel=cancel)
    tokens = acts.token_rows(model, data, seq_len)
    n_tok = acts.n_tokens(tokens, sae.cfg.skip_positions)
    if n_tok == 0:
        raise InputError(f"The rows leave nothing after {sae.cfg.skip_positions} skipped positions.")
    best = _Best(model, sae, layer, tokens, latents, k, before, after)
    spans = acts.batches(tokens, rows_per_chunk=rows_per_chunk)
    run.map(spans, best.add, desc="latent contexts", weights=[len(s) for s in spans])
    return best.result(model, n_tok, bins, seq_len)


def _check_latents(sae: SAE, latents) -> list[int]:
    """The latents to show as indices (None: the 16 most frequent)."""
    if latents is None:
        if sae.firing_frequency is None:
            raise InputError("Name the latents to show (this SAE has no firing frequencies to pick from).")
        latents = sae.firing_frequency.topk(min(16, sae.d_sae)).indices.tolist()
    latents = [sae._index(int(i)) for i in latents]
    if not latents or len(latents) > 512:
        raise InputError("Give between 1 and 512 latents.")
    return latents


class _Best:
    """The `k` largest activations of each latent seen so far, with their contexts, merged chunk by chunk (`add`),
    and how often each latent fires; `result` gives the `LatentContexts`."""

    def __init__(self, model, sae: SAE, layer, tokens, latents: list[int], k: int, before: int, after: int):
        self.model, self.sae, self.layer, self.tokens = model, sae, layer, tokens
        self.sae_cpu = sae.to("cpu")
        self.latents, self.k, self.before, self.after = latents, k, before, after
        self.idx = torch.tensor(latents)
        L, W = len(latents), before + 1 + after
        self.val = torch.zeros(L, k)
        self.row = torch.full((L, k), -1, dtype=torch.long)
        self.pos = torch.full((L, k), -1, dtype=torch.long)
        self.ids = torch.full((L, k, W), -1, dtype=torch.long)
        self.acts = torch.zeros(L, k, W)
        self.fires = torch.zeros(L, dtype=torch.float64)
        self.total = torch.zeros(L, dtype=torch.float64)
        self.nz_latent: list[torch.Tensor] = []
        self.nz_value: list[torch.Tensor] = []
        self.offsets = torch.arange(-before, after + 1)

    def add(self, span: list[int]) -> None:
        """Encode the rows `span` and merge their top activations into the best so far."""
        skip, L, W, k = self.sae.cfg.skip_positions, len(self.latents), self.before + 1 + self.after, self.k
        toks, mask = acts.padded(self.tokens, span)
        n_pos = toks.shape[1]
        x = acts.site_activations(self.model, toks, self.sae.cfg.site, self.layer)
        with torch.no_grad():
            f = self.sae_cpu.encode(x)[..., self.idx]  # [rows, pos, L]
        f[:, :skip] = 0
        f[~mask] = 0  # padding
        toks = torch.where(mask, toks, torch.full_like(toks, -1))
        self.fires.add_((f > 0).sum((0, 1)).double())
        self.total.add_(f.sum((0, 1)).double())
        flat = f.reshape(-1, L)  # [rows * pos, L]
        on = torch.nonzero(flat > 0)
        self.nz_latent.append(on[:, 1])
        self.nz_value.append(flat[on[:, 0], on[:, 1]])
        vals, where = flat.topk(min(k, flat.shape[0]), dim=0)  # [k', L]
        r, p = where // n_pos, where % n_pos
        cols = (p[..., None] + self.offsets).clamp(0, n_pos - 1)  # [k', L, W]
        inside = ((p[..., None] + self.offsets) >= 0) & ((p[..., None] + self.offsets) < n_pos)
        ids = torch.where(inside, toks[r[..., None], cols], torch.full_like(cols, -1))  # padding stays -1
        lat = torch.arange(L)[None, :, None].expand_as(cols)
        ctx = torch.where(inside, f[r[..., None], cols, lat], torch.zeros(cols.shape))
        all_val = torch.cat([self.val, vals.T], dim=1)
        keep = all_val.topk(k, dim=1).indices
        self.val = all_val.gather(1, keep)
        self.row = torch.cat([self.row, (torch.tensor(span)[r]).T], dim=1).gather(1, keep)
        self.pos = torch.cat([self.pos, p.T], dim=1).gather(1, keep)
        keep_w = keep[..., None].expand(-1, -1, W)
        self.ids = torch.cat([self.ids, ids.permute(1, 0, 2)], dim=1).gather(1, keep_w)
        self.acts = torch.cat([self.acts, ctx.permute(1, 0, 2)], dim=1).gather(1, keep_w)

    def result(self, model, n_tok: int, bins: int, seq_len: int | None) -> LatentContexts:
        unused = self.val <= 0
        self.row[unused], self.pos[unused], self.ids[unused] = -1, -1, -1
        nz_l, nz_v = torch.cat(self.nz_latent), torch.cat(self.nz_value)
        top = self.val[:, 0].clamp(min=1e-12)
        edges = torch.stack([torch.linspace(0, float(t), bins + 1) for t in top])
        hist = torch.stack(
            [
                torch.histc(nz_v[nz_l == i], bins=bins, min=0, max=float(top[i]))
                for i in range(len(self.latents))
            ]
        )
        ids = torch.unique(self.ids[self.ids >= 0]).tolist()
        strings = {i: model.tokenizer.decode([i]) for i in ids} if model.tokenizer is not None else {}
        sae = self.sae
        return LatentContexts(
            latents=self.idx,
            values=self.val,
            row=self.row,
            position=self.pos,
            context_ids=self.ids,
            context_acts=self.acts,
            center=self.before,
            frequency=(self.fires / n_tok).float(),
            mean_active=(self.total / self.fires.clamp(min=1)).float(),
            histogram=hist,
            bin_edges=edges,
            token_strings=strings,
            n_tokens=n_tok,
            **acts.result_fields(
                model,
                sae,
                self.layer,
                latents=self.latents,
                k=self.k,
                before=self.before,
                after=self.after,
                n_rows=len(self.tokens),
                seq_len=seq_len,
            ),
        )
