"""The batched perturbed forward pass that every plateau experiment reduces to.

A *base* is one prompt truncated after the perturbed position p, so the perturbed activation is at the last
position: positions after p cannot influence the output at p (causal attention), and the model only has to
produce logits for one position (`logits_to_keep=1`). A *row* is one base with its activation at the site
replaced by a given vector. Rows of bases with equal token length run together as large batches, chunked to a
memory budget. The blocks below the write layer are identical to the clean run, so they are skipped: their
output is the cached clean residual (with the perturbed vector in place when the site is `resid_pre`). The
earlier positions are identical too: locally, their attention keys and values come from the clean run and only
the last position is computed (on NDIF, where a cache object cannot travel, the whole truncated prompt runs).

Output changes are measured against a reference row per base (the unperturbed activation through this same
path) and computed inside the trace, in float32: KL(reference || perturbed) of the next-token distribution in
nats, the L2 distance of the read site's activation, and the top-k tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from workbench.core import CancelToken, ProgressCallback, Run, chunks, concat, selectors
from workbench.core.measures import kl_divergence
from workbench.errors import InputError, SiteError
from workbench.models.prefix import bytes_per_row, enter_at, kv_cache, reuses_cache
from workbench.models.sites import SITES

WRITE_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
"""Sites a plateau probe can perturb: vectors in the residual basis, [batch, pos, d_model]."""
READ_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "ln_final")
MAX_CHUNK_TOKENS = 8192
"""At most this many positions (rows x positions each row runs) per trace; within it the memory budget decides.
Fewer, larger traces cost less per row (per-trace and per-op overheads dominate small models), while very
large batches of long rows gain nothing and use much memory."""


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a probe writes (site, layer) and where it reads the L2 distance (read_site, read_layer)."""

    site: str
    layer: int
    read_site: str
    read_layer: int | None

    @classmethod
    def resolve(cls, model, site: str, layer: int, read_site: str, read_layer: int | None) -> Where:
        if not model.is_transformer:
            raise SiteError("Plateau probes need a transformer language model with an architecture adapter.")
        if site not in WRITE_SITES:
            raise SiteError(
                f"Cannot perturb {site!r}; plateau probes write one of: {', '.join(WRITE_SITES)}."
            )
        if read_site not in READ_SITES:
            raise SiteError(f"Cannot read {read_site!r}; read sites: {', '.join(READ_SITES)}.")
        n = model.cfg.n_layers
        model.check_site(site, layer)
        layer %= n
        if read_site == "ln_final":
            read_layer = None
        else:
            model.check_site(read_site, read_layer)
            read_layer %= n
            if (read_layer, SITES[read_site].rank) <= (layer, SITES[site].rank):
                raise SiteError(
                    f"The read site ({read_site}, layer {read_layer}) must come after the perturbed site "
                    f"({site}, layer {layer}) in the forward pass."
                )
        return cls(site, layer, read_site, read_layer)

    def target(self, n_layers: int) -> tuple[str, int]:
        """The (site, layer) actually written: resid_post of a layer L below the last is resid_pre of L + 1, which
        lets block L be skipped too."""
        if self.site == "resid_post" and self.layer + 1 < n_layers:
            return "resid_pre", self.layer + 1
        return self.site, self.layer

    def label(self) -> str:
        return f"{self.site} {self.layer}"

    def read_label(self) -> str:
        return self.read_site if self.read_layer is None else f"{self.read_site} {self.read_layer}"


class SiteLabels:
    """`site_label` and `read_label` of a result that writes at (site, layer) and reads at (read_site, read_layer)."""

    @property
    def site_label(self) -> str:
        return f"{self.site} {self.layer}"

    @property
    def read_label(self) -> str:
        return self.read_site if self.read_layer is None else f"{self.read_site} {self.read_layer}"


@dataclasses.dataclass
class Base:
    """One base activation: a prompt truncated after the perturbed position, and what sits there.

    tokens: [pos] token ids ending at the perturbed position.
    resid_in: [pos, d_model] clean residual entering the write layer (None when no block is skipped).
    x0: [d_model] the (clean or synthetic) activation at the site and the last position, float32.
    clean_logp: [d_vocab] float32 log-probs of the full clean run at that position (None for synthetic bases).
    kv: per layer, the attention keys and values ([kv_head, pos - 1, d_head] each) of the positions before the
        last, or None. With them only the last position is run: the earlier positions are the same in every row.
    """

    tokens: torch.Tensor
    resid_in: torch.Tensor | None
    x0: torch.Tensor
    clean_logp: torch.Tensor | None
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None


def use_prefix_cache(model) -> bool:
    """Whether to reuse the earlier positions' keys and values (`workbench.models.prefix.reuses_cache`)."""
    return reuses_cache(model)


def clean_bases(
    model,
    where: Where,
    rows: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    run: Run | None = None,
) -> list[Base]:
    """Run each prompt once and cut one `Base` per (prompt, position), in order. rows: [1, pos] token tensors."""
    site, layer = where.target(model.cfg.n_layers)
    cached = use_prefix_cache(model)
    bases: list[Base] = []
    for row, pos_list in zip(rows, positions):
        # nnsight hands back only values saved inside the trace: set the others before it
        resid_in = out = None
        kw = {"use_cache": True} if cached else {}
        with torch.no_grad(), model.trace(row.to(model.device), run=run, **kw):
            if layer > 0:
                resid_in = model.site("resid_pre", layer).value.save()
            if site == "resid_pre" and layer > 0:
                x = resid_in
            else:
                x = model.site(site, layer).value.save()
            logits = model.site("logits").value.save()
            if cached:
                out = model.nnsight.output.save()
        layers = out.past_key_values.layers if cached else None
        for p in pos_list:
            kv = None
            if layers is not None and p > 0:
                kv = tuple((lay.keys[0, :, :p].detach(), lay.values[0, :, :p].detach()) for lay in layers)
            bases.append(
                Base(
                    tokens=row[0, : p + 1].cpu(),
                    resid_in=None if resid_in is None else resid_in[0, : p + 1].detach().cpu(),
                    x0=x[0, p].detach().float().cpu(),
                    clean_logp=torch.log_softmax(logits[0, p].detach().float().cpu(), -1),
                    kv=kv,
                )
            )
    return bases


def _bytes_per_row(model, n_pos: int, cached: bool) -> int:
    """Memory of one row: with `cached`, only the last position runs, on top of n_pos - 1 cached positions."""
    return bytes_per_row(model, n_pos, n_run=1 if cached else n_pos, kv_pos=n_pos if cached else 0)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows; rows that are all the same tensor become a broadcast view (no copy)."""
    first = tensors[0]
    if all(t is first for t in tensors):
        return first.unsqueeze(0).expand(len(tensors), *first.shape)
    return torch.stack(tensors)


def _batch_cache(model, rows: list[Base], device):
    """A fresh KV cache for a batch of rows (the model appends the new position to it)."""
    kv = [
        (_stack([b.kv[layer][0] for b in rows]).to(device), _stack([b.kv[layer][1] for b in rows]).to(device))
        for layer in range(len(rows[0].kv))
    ]
    return kv_cache(model, kv)


def _trace_rows(
    model,
    where: Where,
    rows: list[Base],
    vecs,
    ref_logp,
    ref_read,
    top_k: int,
    watch=None,
    run: Run | None = None,
):
    """One trace over rows (bases of equal token length): vecs [n, d] to write at the last position, reference
    log-probs [n or 1, d_vocab] / read [n or 1, d_read] (or None; one row broadcasts to all), watch [n, m] token
    ids whose log-probs to return."""
    site, layer = where.target(model.cfg.n_layers)
    device = model.device
    # model.dtype is the client's: an NDIF model's meta weights say float32 where the server runs bfloat16, so
    # what enters the trace is cast there, to the dtype of the activation it replaces
    vecs = vecs.to(device=device, dtype=model.dtype)
    cached = rows[0].kv is not None
    tokens = _stack([b.tokens for b in rows])
    kw: dict = {"logits_to_keep": 1}
    if cached:  # run the last position only, on top of the earlier positions' keys and values
        tokens = tokens[:, -1:]
        kw = {"past_key_values": _batch_cache(model, rows, device), "use_cache": True}
    resid_in = None
    if layer > 0:
        resid_in = torch.stack([b.resid_in[-tokens.shape[1] :] for b in rows]).to(
            device=device, dtype=model.dtype
        )
        if site == "resid_pre":
            resid_in[:, -1] = vecs
    with torch.no_grad(), model.trace(tokens.to(device), run=run, **kw):
        if resid_in is not None:
            enter_at(model, layer, resid_in)
        if resid_in is None or site != "resid_pre":
            target = model.site(site, layer).value
            target[:, -1] = vecs.to(target.dtype)
        read = model.site(where.read_site, where.read_layer).value[:, -1].float()
        logp = torch.log_softmax(model.site("logits").value[:, -1].float(), dim=-1)
        # nnsight hands back saved tensors, not containers: one name per output
        if ref_logp is None:
            logp_out, read_out = logp.save(), read.save()
        else:
            ref_logp, ref_read = ref_logp.to(device), ref_read.to(device)
            kl = kl_divergence(ref_logp, logp).save()
            l2 = (read - ref_read).norm(dim=-1).save()
            top = logp.topk(top_k, dim=-1)
            top_ids, top_probs = top.indices.save(), top.values.exp().save()
        if watch is not None:
            watched = logp.gather(-1, watch.to(device)).save()
    if ref_logp is None:
        out = {"logp": logp_out, "read": read_out}
    else:
        out = {"kl": kl, "l2": l2, "top_ids": top_ids, "top_probs": top_probs}
    if watch is not None:
        out["watch"] = watched
    return {k: v.detach().cpu() for k, v in out.items()}


def run_rows(
    model,
    where: Where,
    bases: Sequence[Base],
    base_of_row: torch.Tensor,
    vectors: Callable[[int, int], torch.Tensor],
    *,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    watch: torch.Tensor | None = None,
    top_k: int = 5,
    memory_budget: int | float | str | None = None,
    progress: bool | ProgressCallback = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    desc: str = "perturbed runs",
) -> dict[str, torch.Tensor]:
    """Run every row and return per-row outputs, in row order.

    Args:
        base_of_row: LongTensor [n_rows], the base of each row. Rows of one token length must be contiguous.
        vectors: `vectors(start, stop)` -> [stop - start, d_model], the activation to write for those rows.
        reference: (log-probs [n_bases, d_vocab], read activations [n_bases, d_read]) of the unperturbed bases.
            With it, returns kl [n], l2 [n], top_ids [n, k], top_probs [n, k]; without it, logp [n, d_vocab]
            and read [n, d_read] (used to compute the reference itself).
        watch: LongTensor [n_bases, m] token ids per base; adds `watch` [n, m], their log-probs.
        memory_budget, progress, cancel: the run's settings, or `run` carrying them.
    """
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    n = len(base_of_row)
    lengths = torch.tensor([len(b.tokens) for b in bases])[base_of_row]
    breaks = [0, *(torch.nonzero(lengths.diff()).flatten() + 1).tolist(), n]
    if len(set(lengths[breaks[:-1]].tolist())) != len(breaks) - 1:
        raise InputError("internal: rows of one token length must be contiguous")  # pragma: no cover
    spans = []
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        cached = bases[int(base_of_row[lo])].kv is not None
        n_run = 1 if cached else int(lengths[lo])
        chunk = run.rows_per_chunk(
            _bytes_per_row(model, int(lengths[lo]), cached), model.device, max(1, MAX_CHUNK_TOKENS // n_run)
        )
        spans += [(lo + a, lo + b) for a, b in chunks(hi - lo, chunk)]

    def one(span: tuple[int, int]) -> dict[str, torch.Tensor]:
        start, stop = span
        idx = base_of_row[start:stop]
        rows = [bases[i] for i in idx.tolist()]
        ref_logp = ref_read = None
        if reference is not None:
            # rows of one base (the usual case) share one reference row: broadcast, do not copy
            ref_idx = idx[:1] if bool((idx == idx[0]).all()) else idx
            ref_logp, ref_read = reference[0][ref_idx], reference[1][ref_idx]
        w = None if watch is None else watch[idx]
        return _trace_rows(model, where, rows, vectors(start, stop), ref_logp, ref_read, top_k, w, run=run)

    return concat(run.map(spans, one, desc=desc, weights=[b - a for a, b in spans]))


def reference_rows(model, where: Where, bases: Sequence[Base], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n_bases, d_vocab], read activations [n_bases, d_read]) of each base left unperturbed."""
    order = sorted(range(len(bases)), key=lambda i: len(bases[i].tokens))
    idx = torch.tensor(order, dtype=torch.long)
    x0 = torch.stack([b.x0 for b in bases])
    out = run_rows(model, where, bases, idx, lambda a, b: x0[idx[a:b]], desc="reference runs", **kw)
    inverse = torch.empty_like(idx)
    inverse[idx] = torch.arange(len(idx))
    return out["logp"][inverse], out["read"][inverse]


def resolve_positions(positions, n_tokens: int) -> tuple[list[int], bool]:
    """Positions as sorted non-negative indices for a prompt of `n_tokens`; also whether position 0 is among
    them. `positions`: an int (negative counts from the end), a list of ints, or a word of
    `workbench.core.selectors` ("all-but-first", "each", "last"; the old "all" means "all-but-first")."""
    groups = selectors.resolve_positions(positions, n_tokens, legacy_all="all-but-first")
    if any(len(g) > 1 for g in groups):
        raise InputError(
            f"positions={positions!r}: a plateau probe perturbs one position at a time; give positions, not "
            "groups or 'together'."
        )
    out = sorted(g[0] for g in groups)
    return out, 0 in out
