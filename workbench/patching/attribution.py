"""Attribution patching: a first-order estimate of a whole patching grid from one backward pass per metric.

For an activation a with base value a_base (the run being patched) and source value a_source,

    M(patched) ~ M(base) + (a_source - a_base) . dM/da |_base

summed over the patched positions (Nanda 2023). Per-head outputs use z; an attention pattern acts through
z = pattern @ v, so its gradient is dM/dpattern[q, k] = dM/dz[q] . v[k]. The estimate is exact when M is linear
in the activation and poor for large changes (the residual stream, layer 0's MLP) and saturated attention
(Kramar et al. 2024): use it to screen, then confirm the strongest cells with `sweep`, and measure the agreement
with `compare_attribution`. For noising with the KL metric the estimate is 0 everywhere: KL(clean || clean) is a
minimum, where the gradient vanishes.
"""

from __future__ import annotations

import nnsight
import torch

from workbench.core import CancelToken, Run, chunks
from workbench.core.measures import pearson, spearman
from workbench.errors import InputError
from workbench.patching.result import AttributionComparison, PatchingResult
from workbench.patching.spec import plain_versions
from workbench.patching.sweep import (
    _rank,
    baselines,
    bytes_per_row,
    make_result,
    read_caches,
    setup,
    warn_baselines,
)
from workbench.results import Provenance


def _grad_key(site: str) -> str:
    # z and pattern both take their gradient at the attention output projection's input (z, flat)
    return "z" if site in ("z", "pattern") else site


def gradients(
    model, s, tokens: torch.Tensor, clean_lp: torch.Tensor, answers: torch.Tensor, run: Run | None = None
) -> dict:
    """dM/da at the run of `tokens` for every metric M and every (site, layer): {(metric index, site, layer):
    grad}, with z gradients as [pair, pos, head, d_head]."""
    keys = sorted(
        {(layer, _grad_key(site)) for site in s.sites for layer in s.layers},
        key=lambda k: (k[0], _rank(k[1])),
    )
    kwargs = {} if s.all_positions else {"logits_to_keep": 1}
    cfg, metrics = model.cfg, s.metrics
    # Gradients flow to the activations only, never into the model's parameters: the backward passes stop
    # at the embedding output. A metric that does not depend on the activations keeps zero gradients.
    # (No comments inside the trace body: remote serialisation drops them, which shifts the line numbers
    # that nnsight's `with tensor.backward():` blocks rely on.)
    with torch.enable_grad(), model.trace(tokens, run=run, **kwargs):
        embed = model.site("embed").value
        embed.requires_grad_(True)
        acts = []
        for layer, name in keys:
            value = model.submodule("out_proj", layer).input if name == "z" else model.site(name, layer).value
            acts.append(((name, layer), value))
        logits = model.site("logits").value
        last = logits[:, -1]
        values = [m(logits if m.all_positions else last, answers, clean_lp) for m in metrics]
        grads = {}
        for i, value in enumerate(values):
            if not value.requires_grad:
                continue
            with value.sum().backward(retain_graph=i < len(values) - 1, inputs=[embed]):
                for (name, layer), act in reversed(acts):
                    grad = act.grad.clone()
                    if name == "z":
                        grad = grad.view(*grad.shape[:-1], cfg.n_heads, cfg.d_head)
                    grads[(i, name, layer)] = grad
        nnsight.save(grads)
    return grads


def _sum_groups(contrib: torch.Tensor, groups) -> torch.Tensor:
    """[pair, pos, ...] -> [pair, group, ...]: effects of patching positions together add up to first order."""
    return torch.stack([contrib[:, list(g)].sum(1) for g in groups], 1)


def attribute(
    model,
    clean,
    corrupt=None,
    answers=None,
    *,
    site: str | list[str] = "resid_pre",
    direction: str = "denoising",
    layers: int | list[int] | None = None,
    positions="each",
    heads: int | list[int] | None = None,
    metric="logit_diff",
    memory_budget: int | str | None = "auto",
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> PatchingResult:
    """Attribution-patching estimate of the grid that `sweep` computes with the same arguments.

    Cost: one forward pass over [clean; corrupt] and one forward plus one backward pass per metric over the
    base run, whatever the size of the grid. Returns a `PatchingResult` with method="attribution" whose raw
    values are the estimated metric values of the patched runs (same axes, baselines and views as `sweep`).
    """
    s = setup(model, clean, corrupt, answers, site, direction, layers, positions, heads, metric)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    # a backward pass keeps every activation of the forward pass: about three times an inference row
    chunk = run.rows_per_chunk(
        3 * bytes_per_row(model, s) * (len(s.layers) + 1), model.device, s.pairs.n_pairs
    )
    cache = read_caches(model, s, extra=("v",) if "pattern" in s.sites else (), chunk=chunk, run=run)
    clean_m, corrupt_m, clean_lp = baselines(s, cache["logits"])
    base_half, source_half = s.halves()
    base_m = s.base_run(clean_m, corrupt_m)
    n = s.pairs.n_pairs
    tokens = s.base_tokens.to(model.device)
    answers_t = s.pairs.answers.to(model.device)
    spans = chunks(n, chunk)
    parts = run.map(
        spans,
        lambda span: gradients(
            model, s, *(x[span[0] : span[1]] for x in (tokens, clean_lp, answers_t)), run=run
        ),
        desc="attribution patching",
        weights=[b - a for a, b in spans],
    )
    grads = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    group = model.cfg.n_heads // model.cfg.n_kv_heads
    n_heads = len(s.heads) if s.heads is not None else 1
    raw = torch.zeros(len(s.metrics), n, len(s.sites), len(s.layers), len(s.groups), n_heads)
    for mi in range(len(s.metrics)):
        for si, site in enumerate(s.sites):
            for li, layer in enumerate(s.layers):
                grad = grads.get((mi, _grad_key(site), layer))
                if grad is None:  # the metric does not depend on the activations
                    raw[mi, :, si, li] = base_m[mi].view(n, 1, 1)
                    continue
                act = cache[(site, layer)]
                delta = (act[source_half] - act[base_half]).float()
                grad = grad.float()
                if site == "pattern":
                    v = cache[("v", layer)][base_half].float().repeat_interleave(group, dim=2)
                    d_pattern = torch.einsum("pqhd,pkhd->phqk", grad, v)
                    contrib = (d_pattern * delta).sum(-1).transpose(1, 2)  # [pair, query, head]
                else:
                    contrib = (delta * grad).sum(-1)  # [pair, pos] or [pair, pos, head]
                contrib = _sum_groups(contrib, s.groups)
                if s.heads is not None:
                    contrib = contrib[..., list(s.heads)]
                else:
                    contrib = contrib.unsqueeze(-1)
                raw[mi, :, si, li] = base_m[mi].view(n, 1, 1) + contrib.cpu()
    if s.heads is None:
        raw = raw.squeeze(-1)
    return warn_baselines(
        make_result(model, s, "attribution", raw, clean_m, corrupt_m, {"memory_budget": run.memory_budget})
    )


def compare_attribution(
    exact: PatchingResult,
    approx: PatchingResult,
    *,
    metric: str | None = None,
    top_k: int = 10,
    normalize: bool = True,
) -> AttributionComparison:
    """How well an attribution grid matches the exact grid of the same sweep: Pearson and Spearman correlation
    over all cells and the share of the exact top-k cells (by absolute change from the unpatched run) that the
    attribution grid also ranks in its top k."""
    if not isinstance(exact, PatchingResult) or not isinstance(approx, PatchingResult):
        raise InputError("compare_attribution takes two PatchingResults: sweep(...) and attribute(...).")
    for field in ("direction", "sites", "layers", "positions", "heads", "metrics"):
        if getattr(exact, field) != getattr(approx, field):
            raise InputError(
                f"The two results differ in {field} ({getattr(exact, field)!r} vs {getattr(approx, field)!r}); "
                "run sweep and attribute with the same arguments."
            )
    metric = exact.metric if metric is None else metric
    e = exact.values(metric, normalize).flatten()
    a = approx.values(metric, normalize).flatten()
    base = exact.base_level(metric, normalize)
    cells = list(exact._cells())
    k = max(1, min(int(top_k), len(e)))
    top_e = (e - base).abs().argsort(descending=True)[:k].tolist()
    top_a = (a - base).abs().argsort(descending=True)[:k].tolist()
    labels = tuple(exact.cell_label(*c) for c in cells)
    return AttributionComparison(
        metric=metric,
        normalize=normalize,
        direction=exact.direction,
        sites=exact.sites,
        exact=e,
        attribution=a,
        labels=labels,
        cell_sites=tuple(c[0] for c in cells),
        base_level=base,
        pearson=pearson(e, a),
        spearman=spearman(e, a),
        top_k=k,
        top_k_agreement=len(set(top_e) & set(top_a)) / k,
        top_exact=tuple(labels[i] for i in top_e),
        top_attribution=tuple(labels[i] for i in top_a),
        provenance=plain_versions(
            Provenance.capture(exact.provenance.model, metric=metric, top_k=k, normalize=normalize)
        ),
    )
