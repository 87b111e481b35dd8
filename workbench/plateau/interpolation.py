"""Interpolation between real activations (Janiak et al. 2024): walk from prompt A's activation to prompt B's.

The model runs on A's tokens; at the site and position, A's activation x_A is replaced by
(1 - alpha) x_A + alpha x_B. Stable regions show as curves of the read-site distance that stay flat, then jump.
`slice_2d` colours a plane through three activations by which endpoint each point's output is closest to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError
from workbench.plateau import metrics
from workbench.plateau.core import (
    SiteLabels,
    Where,
    clean_bases,
    kl_divergence,
    reference_rows,
    resolve_positions,
    run_rows,
)
from workbench.plateau.stats import as_token_rows, row_texts
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


def _one_position(model, rows, position: int, what: str) -> list[list[int]]:
    out = []
    for r in rows:
        if not isinstance(position, int) or isinstance(position, bool):
            raise InputError(f"{what} must be one integer position.")
        pos, _ = resolve_positions(position, r.shape[-1])
        out.append(pos)
    return out


def _pairs(model, prompts_a, prompts_b):
    rows_a, rows_b = as_token_rows(model, prompts_a), as_token_rows(model, prompts_b)
    if len(rows_a) == 1 and len(rows_b) > 1:
        rows_a = rows_a * len(rows_b)
    if len(rows_b) == 1 and len(rows_a) > 1:
        rows_b = rows_b * len(rows_a)
    if len(rows_a) != len(rows_b):
        raise InputError(
            f"Give as many B prompts as A prompts (or one of either): got {len(rows_a)} and {len(rows_b)}."
        )
    return rows_a, rows_b


def _decode(model, ids) -> dict[int, str]:
    ids = torch.unique(torch.as_tensor(ids).flatten()).tolist()
    return {i: model.tokenizer.decode([i]) for i in ids} if model.tokenizer is not None else {}


@dataclasses.dataclass(frozen=True)
class InterpolationResult(SiteLabels, Result):
    """Output along straight paths x_A -> x_B, run in prompt A's context.

    Attributes:
        alphas: [step] interpolation fractions from 0 (A's own activation) to 1 (B's activation).
        kl: [pair, step] KL(A unperturbed || path point) of the next-token distribution, nats, float32.
        l2: [pair, step] L2 distance of the read site from A's unperturbed run.
        distance: [pair, step] l2 / l2 at alpha = 1 (Janiak et al.'s normalised d(alpha)/d(1)).
        logit_diff: [pair, step] log p(A's top token) - log p(B's top token) (equal to the logit difference).
        top_ids, top_probs: [pair, step, k] the most likely next tokens along the path.
        answer_a, answer_b: [pair] the top token of A's clean run and of B's clean run.
        prompts_a, prompts_b, position_a, position_b: the pairs.
        token_strings: {token id: string}.
    """

    alphas: torch.Tensor
    kl: torch.Tensor
    l2: torch.Tensor
    distance: torch.Tensor
    logit_diff: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    answer_a: torch.Tensor
    answer_b: torch.Tensor
    prompts_a: tuple[str, ...]
    prompts_b: tuple[str, ...]
    position_a: tuple[int, ...]
    position_b: tuple[int, ...]
    token_strings: dict[int, str]
    site: str
    layer: int
    read_site: str
    read_layer: int | None
    provenance: Provenance

    def token(self, token_id: int) -> str:
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def sharpness(self) -> torch.Tensor:
        """[pair] max d'(alpha) / d(1) of the normalised distance: 1 for a straight line, large for a step."""
        return metrics.sharpness(self.distance, self.alphas)

    def max_slope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([pair] steepest slope of the normalised distance, [pair] alpha where it happens)."""
        return metrics.max_slope(self.distance, self.alphas)

    def tokens_along(self, pair: int = 0, k: int = 3):
        """A DataFrame, one row per alpha: the top-k tokens and their probabilities."""
        import pandas as pd

        rows = []
        for j, a in enumerate(self.alphas.tolist()):
            row: dict[str, Any] = {
                "alpha": a,
                "kl": float(self.kl[pair, j]),
                "distance": float(self.distance[pair, j]),
            }
            for i in range(min(k, self.top_ids.shape[-1])):
                row[f"top{i + 1}"] = self.token(self.top_ids[pair, j, i])
                row[f"p{i + 1}"] = float(self.top_probs[pair, j, i])
            rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self):
        """Tidy table: one row per (pair, alpha)."""
        import pandas as pd

        n_p, n_s = self.kl.shape
        pair = torch.arange(n_p).repeat_interleave(n_s)
        step = torch.arange(n_s).repeat(n_p)
        return pd.DataFrame(
            {
                "pair": pair.numpy(),
                "prompt_a": [self.prompts_a[i] for i in pair.tolist()],
                "prompt_b": [self.prompts_b[i] for i in pair.tolist()],
                "alpha": self.alphas[step].numpy(),
                "kl": self.kl.flatten().numpy(),
                "l2": self.l2.flatten().numpy(),
                "distance": self.distance.flatten().numpy(),
                "logit_diff": self.logit_diff.flatten().numpy(),
                "top1": [self.token(t) for t in self.top_ids[..., 0].flatten()],
                "top1_prob": self.top_probs[..., 0].flatten().numpy(),
            }
        )


def interpolate(
    model,
    prompts_a,
    prompts_b,
    *,
    layer: int = 1,
    site: str = "resid_pre",
    position: int = -1,
    position_b: int | None = None,
    n_steps: int = 21,
    read_site: str = "resid_post",
    read_layer: int | None = -1,
    top_k: int = 5,
    memory_budget: int | float | str | None = None,
    progress: bool | ProgressCallback = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> InterpolationResult:
    """Walk from prompt A's activation to prompt B's at one site and record the output along the way.

    Args:
        prompts_a, prompts_b: texts or [batch, pos] tokens; pairs are (a_i, b_i), and one of either side pairs
            with every prompt of the other. Prompts may differ in length.
        position: the position in A (default: last); `position_b` the position in B (default: the same).
        n_steps: alphas from 0 to 1 inclusive.
        Other arguments as in `probe`.
    """
    where = Where.resolve(model, site, layer, read_site, read_layer)
    if not isinstance(n_steps, int) or n_steps < 2:
        raise InputError("n_steps must be an integer >= 2.")
    rows_a, rows_b = _pairs(model, prompts_a, prompts_b)
    pos_a = _one_position(model, rows_a, position, "position")
    pos_b = _one_position(model, rows_b, position if position_b is None else position_b, "position_b")
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    bases_a = clean_bases(model, where, rows_a, pos_a, run=run)
    bases_b = clean_bases(model, where, rows_b, pos_b, run=run)
    x_a = torch.stack([b.x0 for b in bases_a])
    x_b = torch.stack([b.x0 for b in bases_b])
    answer_a = torch.stack([b.clean_logp.argmax() for b in bases_a])
    answer_b = torch.stack([b.clean_logp.argmax() for b in bases_b])
    watch = torch.stack([answer_a, answer_b], dim=1)

    ref_logp, ref_read = reference_rows(model, where, bases_a, top_k=top_k, run=run.quiet())
    alphas = torch.linspace(0, 1, n_steps)
    n_p = len(bases_a)
    order = sorted(range(n_p), key=lambda j: len(bases_a[j].tokens))
    base_of_row = torch.tensor(order).repeat_interleave(n_steps)

    def vectors(start: int, stop: int) -> torch.Tensor:
        r = torch.arange(start, stop)
        b, a = base_of_row[r], alphas[r % n_steps, None]
        return (1 - a) * x_a[b] + a * x_b[b]

    out = run_rows(
        model,
        where,
        bases_a,
        base_of_row,
        vectors,
        reference=(ref_logp, ref_read),
        watch=watch,
        top_k=top_k,
        run=run,
        desc="interpolation",
    )
    inv = torch.empty(n_p, dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(n_p)

    def grid(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(n_p, n_steps, *v.shape[1:])[inv]

    kl, l2 = grid(out["kl"]), grid(out["l2"])
    # alpha = 0 is the unperturbed run itself: exact zeros rather than batch-shape rounding noise
    kl[:, 0], l2[:, 0] = 0.0, 0.0
    end = l2[:, -1:].clamp(min=torch.finfo(torch.float32).tiny)
    w = grid(out["watch"])
    top_ids = grid(out["top_ids"])
    texts_a, texts_b = row_texts(model, rows_a), row_texts(model, rows_b)
    return InterpolationResult(
        alphas=alphas,
        kl=kl,
        l2=l2,
        distance=l2 / end,
        logit_diff=w[..., 0] - w[..., 1],
        top_ids=top_ids,
        top_probs=grid(out["top_probs"]),
        answer_a=answer_a,
        answer_b=answer_b,
        prompts_a=texts_a,
        prompts_b=texts_b,
        position_a=tuple(p[0] for p in pos_a),
        position_b=tuple(p[0] for p in pos_b),
        token_strings=_decode(model, torch.cat([top_ids.flatten(), answer_a, answer_b])),
        **dataclasses.asdict(where),
        provenance=Provenance.capture(
            model.name,
            prompts_a=list(texts_a),
            prompts_b=list(texts_b),
            layer=where.layer,
            site=where.site,
            position=position,
            position_b=position_b,
            n_steps=n_steps,
            read_site=where.read_site,
            read_layer=where.read_layer,
        ),
    )


@dataclasses.dataclass(frozen=True)
class SliceResult(SiteLabels, Result):
    """Outputs over a plane through three activations x(u, v) = x_A + u (x_B - x_A) + v (x_C - x_A), in A's context.

    Attributes:
        u, v: [n] grid coordinates (u along A->B, v along A->C; the endpoints sit at (0,0), (1,0), (0,1)).
        distance: [3, v, u] L2 distance of the read site from its value at each endpoint A, B, C.
        endpoint_distance: [3, 3] the same between the endpoints.
        kl_to_a: [v, u] KL(A unperturbed || point), nats.
        top1, top1_prob: [v, u] the most likely next token and its probability.
        prompts: (A, B, C); token_strings: {token id: string}.
    """

    u: torch.Tensor
    v: torch.Tensor
    distance: torch.Tensor
    endpoint_distance: torch.Tensor
    kl_to_a: torch.Tensor
    top1: torch.Tensor
    top1_prob: torch.Tensor
    prompts: tuple[str, str, str]
    token_strings: dict[int, str]
    site: str
    layer: int
    read_site: str
    read_layer: int | None
    provenance: Provenance

    def nearest(self) -> torch.Tensor:
        """[v, u] index (0 = A, 1 = B, 2 = C) of the endpoint whose output each point's output is closest to."""
        return self.distance.argmin(0)

    def to_frame(self):
        import pandas as pd

        vv, uu = torch.meshgrid(self.v, self.u, indexing="ij")
        return pd.DataFrame(
            {
                "u": uu.flatten().numpy(),
                "v": vv.flatten().numpy(),
                "dist_a": self.distance[0].flatten().numpy(),
                "dist_b": self.distance[1].flatten().numpy(),
                "dist_c": self.distance[2].flatten().numpy(),
                "kl_to_a": self.kl_to_a.flatten().numpy(),
                "top1": [self.token_strings.get(int(t), str(int(t))) for t in self.top1.flatten()],
                "top1_prob": self.top1_prob.flatten().numpy(),
            }
        )


def slice_2d(
    model,
    prompt_a,
    prompt_b,
    prompt_c,
    *,
    layer: int = 1,
    site: str = "resid_pre",
    position: int = -1,
    n: int = 25,
    span: tuple[float, float] = (-0.25, 1.25),
    read_site: str = "resid_post",
    read_layer: int | None = -1,
    memory_budget: int | float | str | None = None,
    progress: bool | ProgressCallback = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> SliceResult:
    """Outputs over the plane through three prompts' activations (n x n runs in prompt A's context).

    `span` is the range of both grid coordinates; (0, 1) puts the endpoints in corners. Costs n * n + 3 runs.
    """
    where = Where.resolve(model, site, layer, read_site, read_layer)
    if not isinstance(n, int) or n < 2:
        raise InputError("n must be an integer >= 2.")
    lo, hi = span
    if not lo < hi:
        raise InputError("span must be (low, high) with low < high.")
    rows = [as_token_rows(model, p) for p in (prompt_a, prompt_b, prompt_c)]
    if any(len(r) != 1 for r in rows):
        raise InputError("slice_2d takes exactly one prompt for each of A, B and C.")
    rows = [r[0] for r in rows]
    pos = _one_position(model, rows, position, "position")
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    bases = clean_bases(model, where, rows, pos, run=run)
    x = torch.stack([b.x0 for b in bases])
    u = torch.linspace(lo, hi, n)
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    points = x[0] + uu.flatten()[:, None] * (x[1] - x[0]) + vv.flatten()[:, None] * (x[2] - x[0])
    vecs = torch.cat([x, points])  # endpoints first, all in A's context
    base_of_row = torch.zeros(len(vecs), dtype=torch.long)
    out = run_rows(model, where, [bases[0]], base_of_row, lambda a, b: vecs[a:b], desc="2-D slice", run=run)
    logp, read = out["logp"], out["read"]
    ends, grid_read = read[:3], read[3:]
    distance = torch.cdist(grid_read.double(), ends.double()).float().T.reshape(3, n, n)
    kl = kl_divergence(logp[:1], logp[3:]).reshape(n, n)
    top = logp[3:].max(-1)
    texts = row_texts(model, rows)
    return SliceResult(
        u=u,
        v=u.clone(),
        distance=distance,
        endpoint_distance=torch.cdist(ends.double(), ends.double()).float(),
        kl_to_a=kl,
        top1=top.indices.reshape(n, n),
        top1_prob=top.values.exp().reshape(n, n),
        prompts=texts,
        token_strings=_decode(model, top.indices),
        **dataclasses.asdict(where),
        provenance=Provenance.capture(
            model.name,
            prompts=list(texts),
            layer=where.layer,
            site=where.site,
            position=position,
            n=n,
            span=list(span),
        ),
    )
