"""AtP* (Kramar, Lieberum, Shah & Nanda 2024): attribution patching with its two false-negative fixes.

The nodes are every head's query, key and value at every position, and every MLP's output at every position.
Attribution patching (AtP) estimates the effect of patching node n from the source run into the base run as
(n_source - n_base) . dM/dn at the base run. Two failure modes make it miss important nodes:

- **Attention saturation.** A query or key acts through the softmax, whose linearisation is poor where attention
  is saturated. The *QK fix* recomputes the attention pattern exactly: for a query at position t, row t becomes
  softmax(q_source,t . K / sqrt(d)); for a key at position s, every row t >= s is renormalised with only its
  entry s changed. Only the pattern's effect on the metric stays linear: sum (A_new - A) . dM/dA, with
  dM/dA[t, s] = dM/dz[t] . v[s]. Where the metric is linear in the pattern and one key changes, this is exact.
- **Cancellation** between a node's direct and indirect effects. *GradDrop* reruns the backward pass once per
  layer l with the gradient through layer l's residual contribution stopped, and scores a node by
  (1 / (L - 1)) sum_l |estimate_l| (one term, its own layer's, is always 0).

AtP* = AtP + QK fix + GradDrop. Its score is a magnitude, for ranking: screen with it, then verify the top n
exactly (`verify`, a fixed budget of forward passes). ``exact=True`` patches every node exactly on the same grid,
to report AtP vs AtP* vs exact.

Queries and keys are compared after the rotary embedding where the model has one; the fix checks that its own
softmax(q k^T) reproduces the model's pattern and refuses a model whose attention it cannot reproduce.
"""

from __future__ import annotations

import dataclasses
import math

import nnsight
import torch

from workbench.circuits import guards
from workbench.circuits.results import AtPResult
from workbench.circuits.spec import CircuitSpec
from workbench.core import CancelToken, Run, chunks, concat
from workbench.errors import InputError, UnsupportedModelError
from workbench.models.prefix import bytes_per_row, enter_at
from workbench.models.sites import envoy_at

KINDS = ("q", "k", "v", "mlp")
_PATTERN_TOLERANCE = 1e-4


def atp_star(
    model,
    clean,
    corrupt=None,
    answers=None,
    *,
    direction: str = "noising",
    qk_fix: bool = True,
    graddrop: bool = True,
    exact: bool = False,
    metric="logit_diff",
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    warn: bool = True,
) -> AtPResult:
    """AtP, AtP with the QK fix, and the AtP* (GradDrop) score of every node; optionally the exact grid.

    Args:
        model, clean, corrupt, answers: as for `workbench.patching.sweep`.
        direction: "noising" (default, as in Kramar et al.: corrupt values into the clean run) or "denoising".
        qk_fix, graddrop: the two fixes (both on for AtP*). exact: also patch every node exactly (one forward
            pass per node and pair).
        metric, memory_budget, batch_size, progress, cancel, run, warn: as for the other engines.

    Returns:
        `AtPResult` with per-pair grids [pair, kind (q, k, v, mlp), layer, pos, head].
    """
    spec = CircuitSpec.resolve(model, clean, corrupt, answers, direction=direction, metric=metric)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    c = model.cfg
    cache = _node_cache(model, spec, run)
    clean_m, corrupt_m, clean_lp = spec.baselines(cache["logits"])
    base_half, source_half = spec.halves()
    n = spec.n_pairs
    tokens = spec.base_tokens.to(model.device)
    metric_fn = spec.metrics[spec.metric_index()]
    drops = [None] + (list(range(c.n_layers)) if graddrop and c.n_layers > 1 else [])
    per_row = 3 * bytes_per_row(model, spec.pairs.n_pos) * (c.n_layers + 1)
    chunk = run.rows_per_chunk(per_row, model.device, 64)
    spans = chunks(n, chunk)
    shape = (n, len(KINDS), c.n_layers, spec.pairs.n_pos, c.n_heads)
    atp, atp_qk = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    gd = torch.zeros(shape) if len(drops) > 1 else None
    units = [(span, drop) for span in spans for drop in drops]

    def one(unit) -> None:
        (a, b), drop = unit
        pair = torch.arange(a, b)
        grads = _grads(
            model,
            tokens[a:b],
            metric_fn,
            spec.pairs.answers[a:b].to(model.device),
            clean_lp[a:b].to(model.device),
            drop,
            want_values=drop is None and qk_fix,
        )
        # the estimates run on the CPU, beside the gradients; the cache sits where the model ran
        base = {k: v[base_half][pair].cpu() for k, v in cache.items() if isinstance(k, tuple)}
        src = {k: v[source_half][pair].cpu() for k, v in cache.items() if isinstance(k, tuple)}
        plain, fixed = _estimates(model, grads, base, src, qk_fix, check=drop is None)
        if drop is None:
            atp[a:b], atp_qk[a:b] = plain, fixed
        else:
            gd[a:b] += fixed.abs().nan_to_num(0.0) / (c.n_layers - 1)

    run.map(units, one, desc="AtP*")
    if gd is not None:
        gd = gd.masked_fill(atp.isnan(), float("nan"))
    exact_grid = torch.full(shape, float("nan"))
    if exact:
        nodes = [tuple(i) for i in (~atp[0].isnan()).nonzero().tolist()]
        exact_grid = _exact_nodes(model, spec, cache, nodes, clean_m, corrupt_m, clean_lp, run, shape)
    messages = guards.checks(model, spec, clean_m, corrupt_m)
    result = AtPResult(
        direction=spec.direction,
        qk_fix=qk_fix,
        n_kv_heads=c.n_kv_heads,
        position_labels=_position_labels(spec.pairs),
        atp=atp,
        atp_qk=atp_qk,
        graddrop=gd,
        exact=exact_grid,
        **spec.rerun_fields(clean_m, corrupt_m),
        provenance=spec.provenance("atp_star", qk_fix=qk_fix, graddrop=graddrop, exact=exact),
        warnings=tuple(messages),
    )
    if warn:
        guards.issue(result.warnings)
    return result


def verify(
    model,
    result: AtPResult,
    n: int = 20,
    *,
    by: str = "atp*",
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> AtPResult:
    """Patch the `n` nodes that `by` ranks highest exactly (n forward passes per pair); returns the result with
    those nodes' `exact` values filled in (already measured ones are kept)."""
    if not isinstance(result, AtPResult):
        raise InputError("verify takes the AtPResult that atp_star returns.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n={n!r}: the budget is a positive number of nodes to patch exactly.")
    spec = CircuitSpec.rerun(model, result)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    order = result.ranking(by)
    nodes = [node for node in order if result.exact[(0, *node)].isnan()][:n]
    cache = _node_cache(model, spec, run)
    clean_m, corrupt_m, clean_lp = spec.baselines(cache["logits"])
    grid = _exact_nodes(
        model, spec, cache, nodes, clean_m, corrupt_m, clean_lp, run, tuple(result.exact.shape)
    )
    merged = torch.where(grid.isnan(), result.exact, grid)

    return dataclasses.replace(result, exact=merged)


# -- caches and gradients ---------------------------------------------------------------------------------------


def _node_cache(model, spec: CircuitSpec, run) -> dict:
    """Per layer: q, k, v [2n, pos, head, d_head], mlp_out [2n, pos, d_model], the residual entering it; logits."""
    tokens = torch.cat([spec.pairs.clean, spec.pairs.corrupt])
    chunk = run.rows_per_chunk(2 * bytes_per_row(model, tokens.shape[1]), model.device, 128)
    parts = []
    for a in range(0, len(tokens), chunk):
        with torch.no_grad(), model.trace(tokens[a : a + chunk].to(model.device), logits_to_keep=1):
            out = {}
            for layer in range(model.cfg.n_layers):
                out[("resid", layer)] = model.site("resid_pre", layer).value.clone()
                for which in "qkv":
                    out[(which, layer)] = model.site(which, layer).value.clone()
                out[("mlp", layer)] = model.site("mlp_out", layer).value.clone()
            out["logits"] = model.site("logits").value[:, -1].clone()
            nnsight.save(out)
        parts.append({k: v.detach() for k, v in out.items()})
    return concat(parts)


def _grads(model, tokens, metric, answers, clean_lp, drop, *, want_values: bool) -> dict:
    """Gradients of the metric at q, k, v (projection outputs), z and mlp_out of every layer; with `drop` the
    gradient through that layer's residual contribution is stopped. With `want_values`: also the rotary
    (cos, sin) and every layer's attention pattern."""
    c, a = model.cfg, model.adapter
    with torch.enable_grad(), model.trace(tokens, logits_to_keep=1):
        start = model.site("embed").value
        start.requires_grad_(True)
        saved = {}
        if want_values and a.rotary is not None:
            cos, sin = envoy_at(model.nnsight, a.rotary).output
            saved["cos"], saved["sin"] = cos.detach().clone(), sin.detach().clone()
        acts = []
        for layer in range(c.n_layers):
            if drop == layer:
                x_in = model.site("resid_pre", layer).value
            for i, path in enumerate(a.qkv_paths):
                acts.append(((f"proj{i}", layer), envoy_at(model.submodule("block", layer), path).output))
            acts.append((("z", layer), model.submodule("out_proj", layer).input))
            if want_values:
                saved[("pattern", layer)] = model.site("pattern", layer).value.detach().clone()
            acts.append((("mlp", layer), model.site("mlp_out", layer).value))
            if drop == layer:
                handle = model.site("resid_post", layer)
                out = handle.value
                handle.value = x_in + (out - x_in).detach()
        logits = model.site("logits").value
        value = metric(logits[:, -1], answers, clean_lp)
        grads = {}
        with value.sum().backward(inputs=[start]):
            for key, act in reversed(acts):
                if key[1] != drop:
                    grads[key] = act.grad.clone()
        for key, g in grads.items():
            saved[key] = g.detach().float()
        saved = nnsight.save({k: v.cpu() for k, v in saved.items()})
    out = dict(saved)
    for key, act in acts_shapes(model, tokens).items():
        if key not in out:  # the dropped layer: no gradient reaches its own nodes
            out[key] = torch.zeros(act)
    for layer in range(c.n_layers):
        z = out[("z", layer)]
        out[("z", layer)] = z.view(*z.shape[:-1], c.n_heads, c.d_head)
        for which in "qkv":
            out[(which, layer)] = _split_qkv(
                model, [out[(f"proj{i}", layer)] for i in range(len(a.qkv_paths))], which
            )
    return out


def acts_shapes(model, tokens) -> dict:
    """The shapes of the activations `_grads` differentiates, by key."""
    c, a = model.cfg, model.adapter
    b, t = tokens.shape
    widths = (
        [c.n_heads * c.d_head * 3]
        if len(a.qkv_paths) == 1
        else [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head]
    )
    out = {}
    for layer in range(c.n_layers):
        for i, w in enumerate(widths):
            out[(f"proj{i}", layer)] = (b, t, w)
        out[("z", layer)] = (b, t, c.n_heads * c.d_head)
        out[("mlp", layer)] = (b, t, c.d_model)
    return out


def _split_qkv(model, outputs: list[torch.Tensor], which: str) -> torch.Tensor:
    """q, k or v [.., head, d_head] of projection output(s) (one fused, or three), laid out as the sites are."""
    c, layout = model.cfg, model.adapter.qkv
    idx = "qkv".index(which)
    if layout == "separate":
        out = outputs[idx]
        return out.view(*out.shape[:-1], c.n_heads if which == "q" else c.n_kv_heads, c.d_head)
    out = outputs[0]
    if layout == "gpt2_fused":
        return out.view(*out.shape[:-1], 3, c.n_heads, c.d_head)[..., idx, :, :]
    return out.view(*out.shape[:-1], c.n_heads, 3, c.d_head)[..., idx, :]


def _rotate(x: torch.Tensor, cos, sin) -> torch.Tensor:
    """The rotary embedding applied to x [pair, pos, head, d_head] (rotate-half convention, first dims)."""
    if cos is None:
        return x
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = x_rot.shape[-1] // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], -1)


def _scaling(model, layer: int) -> float:
    attn = model.torch_submodule("attn", layer)
    scaling = getattr(attn, "scaling", None)
    return float(scaling) if scaling is not None else model.cfg.d_head**-0.5


def _estimates(model, grads, base, src, qk_fix: bool, check: bool):
    """(AtP, AtP with the QK fix) [pair, kind, layer, pos, head] from one backward pass's gradients."""
    c = model.cfg
    n, n_pos = base[("q", 0)].shape[:2]
    plain = torch.full((n, len(KINDS), c.n_layers, n_pos, c.n_heads), float("nan"))
    group = c.n_heads // c.n_kv_heads
    for layer in range(c.n_layers):
        for ki, which in enumerate("qkv"):
            d = (src[(which, layer)] - base[(which, layer)]).float()
            est = (d * grads[(which, layer)]).sum(-1)  # [pair, pos, head]
            plain[:, ki, layer, :, : est.shape[-1]] = est
        d = (src[("mlp", layer)] - base[("mlp", layer)]).float()
        plain[:, 3, layer, :, 0] = (d * grads[("mlp", layer)]).sum(-1)
    fixed = plain.clone()
    if not qk_fix:
        return plain, fixed
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    cos = grads.get("cos")
    sin = grads.get("sin")
    if cos is not None:
        cos, sin = cos.double().expand(n, -1, -1), sin.double().expand(n, -1, -1)
    for layer in range(c.n_layers):
        scale = _scaling(model, layer)
        kv = [g // group for g in range(c.n_heads)]
        q = _rotate(base[("q", layer)].double(), cos, sin)
        k = _rotate(base[("k", layer)].double(), cos, sin)[:, :, kv]
        q_src = _rotate(src[("q", layer)].double(), cos, sin)
        k_src = _rotate(src[("k", layer)].double(), cos, sin)[:, :, kv]
        v = base[("v", layer)].double()[:, :, kv]
        logits = torch.einsum("pthd,pshd->phts", q, k) * scale
        logits = logits.masked_fill(~causal, -math.inf)
        pattern = logits.softmax(-1)
        if check and ("pattern", layer) in grads:
            err = (pattern - grads[("pattern", layer)].double()).abs().max()
            if err > _PATTERN_TOLERANCE:
                raise UnsupportedModelError(
                    f"The QK fix recomputes attention as softmax(q k^T * scale) after the rotary embedding, but for "
                    f"layer {layer} of {model.name} that differs from the model's pattern by {float(err):.2g} (query "
                    "or key norms, soft-capping or sliding windows are not modelled). Run atp_star with "
                    "qk_fix=False."
                )
        d_pattern = torch.einsum("pthd,pshd->phts", grads[("z", layer)].double(), v)  # dM/dA
        base_term = (pattern * d_pattern).sum(-1)  # [pair, head, t]
        # queries: row t recomputed with the source query
        new_q = (
            (torch.einsum("pthd,pshd->phts", q_src, k) * scale).masked_fill(~causal, -math.inf).softmax(-1)
        )
        est_q = (new_q * d_pattern).sum(-1) - base_term  # [pair, head, t]
        fixed[:, 0, layer] = est_q.transpose(1, 2).float()
        # keys: every row t >= s renormalised with only entry s changed
        key_logits = torch.einsum("pthd,pshd->phts", q, k_src) * scale  # entry [t, s]: query t, source key s
        est_k = _key_fix(logits, key_logits, d_pattern, pattern, causal)  # [pair, head, s]
        per_kv = est_k.view(n, c.n_kv_heads, group, n_pos).sum(2)
        fixed[:, 1, layer, :, : c.n_kv_heads] = per_kv.transpose(1, 2).float()
    return plain, fixed


def _key_fix(logits, key_logits, d_pattern, pattern, causal) -> torch.Tensor:
    """[pair, head, s]: sum over rows t >= s of the change of sum_s' A[t, s'] dM/dA[t, s'] when only entry (t, s)
    of the attention logits changes to key_logits[t, s] (each row renormalised exactly, in log space)."""
    n_pos = logits.shape[-1]
    eye = torch.eye(n_pos, dtype=torch.bool)
    out = torch.zeros(logits.shape[0], logits.shape[1], n_pos, dtype=logits.dtype)
    for p in range(logits.shape[0]):
        for h in range(logits.shape[1]):
            row = logits[p, h]  # [t, s']
            others = row.unsqueeze(1).expand(n_pos, n_pos, n_pos).masked_fill(eye.unsqueeze(0), -math.inf)
            lse_others = torch.logsumexp(others, -1)  # [t, s]
            new = key_logits[p, h].masked_fill(~causal, -math.inf)
            lse = torch.logaddexp(lse_others, new)
            w_others = torch.exp(others - lse.unsqueeze(-1)).nan_to_num(0.0)
            change = (w_others * d_pattern[p, h].unsqueeze(1)).sum(-1)
            change = change + torch.exp(new - lse).nan_to_num(0.0) * d_pattern[p, h]
            change = change - (pattern[p, h] * d_pattern[p, h]).sum(-1, keepdim=True)
            out[p, h] = (change * causal).sum(0)
    return out


# -- exact node patching ----------------------------------------------------------------------------------------


def _exact_nodes(model, spec, cache, nodes, clean_m, corrupt_m, clean_lp, run, shape) -> torch.Tensor:
    """[pair, kind, layer, pos, head] exact change of the metric when each node in `nodes` (kind index, layer,
    pos, head) is patched alone (NaN elsewhere)."""
    n = spec.n_pairs
    base_half, source_half = spec.halves()
    tokens = torch.cat([spec.pairs.clean, spec.pairs.corrupt])
    base_level = spec.base_run(clean_m, corrupt_m)[spec.metric_index()]
    grid = torch.full(shape, float("nan"))
    default = 512 if torch.device(model.device).type == "cuda" else 128
    chunk = run.rows_per_chunk(bytes_per_row(model, spec.pairs.n_pos), model.device, default)
    units = []
    for key in sorted({(ki, layer) for ki, layer, _, _ in nodes}):
        mine = [node for node in nodes if (node[0], node[1]) == key]
        rows = [(p, node) for node in mine for p in range(n)]
        units += [(key, rows[a : a + chunk]) for a in range(0, len(rows), chunk)]

    def one(unit) -> None:
        (ki, layer), rows = unit
        pair = torch.tensor([p for p, _ in rows])
        pos = torch.tensor([node[2] for _, node in rows])
        head = torch.tensor([node[3] for _, node in rows])
        name = KINDS[ki] if ki < 3 else "mlp"
        act = cache[(name, layer)]
        src = act[source_half][pair, pos] if ki == 3 else act[source_half][pair, pos, head]
        enter = cache[("resid", layer)][base_half][pair] if model.remote is False else None
        logits = _node_trace(
            model, tokens[base_half][pair].to(model.device), layer, enter, ki, pos, head, src
        )
        values = spec.evaluate(logits, pair, clean_lp)[spec.metric_index()].cpu() - base_level[pair]
        for (p, node), value in zip(rows, values.tolist()):
            grid[(p, *node)] = value

    run.map(units, one, desc="exact node patching", weights=[len(r) for _, r in units])
    return grid


def _node_trace(model, tokens, layer, enter, kind, pos, head, src):
    rows = torch.arange(len(tokens))
    with torch.no_grad(), model.trace(tokens, logits_to_keep=1):
        if enter is not None:
            enter_at(model, layer, enter.to(model.device))
        if kind == 3:
            act = model.site("mlp_out", layer).value
            act[rows, pos] = src.to(act.dtype)
        else:
            act = model.site(KINDS[kind], layer).value
            act[rows, pos, head] = src.to(act.dtype)
        out = model.site("logits").value[:, -1].save()
    return out


def _position_labels(pairs) -> tuple[str, ...]:
    clean, corrupt = pairs.clean_tokens[0], pairs.corrupt_tokens[0]
    return tuple(f"{t}:{a}" if a == b else f"{t}:{a}/{b}" for t, (a, b) in enumerate(zip(clean, corrupt)))
