"""Activation patching beyond the resid_pre sweep: full block sweeps, per-head sweeps, attribution vs exact.

Cases (GPT-2 shapes, random weights, float32; clean/corrupt pairs of random tokens, the corrupt prompt differs at
2 positions; metric = logit difference at the last position, averaged over pairs):

1. Block sweep: resid_pre, attn_out and mlp_out at every layer and position (TransformerLens'
   `get_act_patch_block_every`).
2. Per-head sweep: every head's output (z) at every layer, all positions at once
   (`get_act_patch_attn_head_out_all_pos`).
3. Attribution patching (attn_out and mlp_out, every layer and position) against exact patching of the same grid.

Columns, timed in one process:
- workbench: `workbench.patching.sweep` / `attribute` (nnsight traces).
- lower bound: the same forward passes hand-written in plain PyTorch with hooks on the Hugging Face modules:
  one batch per (site, layer), the blocks below the patched layer replaced by their cached output, logits at the
  last position only; for attribution, one forward and the same four backward passes (one per metric the
  workbench reports).
- peers: TransformerLens 4 (`TransformerBridge` + its patching functions), and nnsight loops as in nnsight's
  tutorials: one trace per patch (batch = the pairs) and one trace per layer (every patched copy of that layer
  in one batch, full logits); for attribution, a hand-written nnsight trace with one backward pass.

``--size gpu`` runs the block sweep on GPT-2 small, medium, large and XL shapes (per-head and attribution cases
on the small shape). Run: ``python -m benchmarks.bench_patching_more [cpu|gpu|smoke]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys

import torch

from benchmarks.common import (
    causal_reuse_off,
    interleaved_medians,
    median_time,
    peak_memory_mb,
    prepare,
    row,
    shared_prefix,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SITES = ("resid_pre", "attn_out", "mlp_out")
SIZES = {
    "smoke": dict(shapes=("tiny",), n_pairs=2, n_pos=6),
    "cpu": dict(shapes=("gpt2-small",), n_pairs=4, n_pos=8),
    "gpu": dict(shapes=("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"), n_pairs=8, n_pos=16),
}
TOL = 1e-4  # float32 grids of identical computations agree to ~1e-6; batching changes summation order


@dataclasses.dataclass
class Case:
    model: object  # WorkbenchModel
    clean: torch.Tensor  # [pair, pos]
    corrupt: torch.Tensor
    answers: torch.Tensor  # [pair, 2]

    @property
    def hf(self):
        return self.model.module

    @property
    def device(self):
        return self.model.device

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers


def make_case(shape: str, n_pairs: int, n_pos: int, seed: int = 0, device=None) -> Case:
    from workbench.models.toy import random_model

    model = random_model("gpt2", shape=shape, seed=seed, device=device)
    model.module.eval()
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(1, vocab, (n_pairs, n_pos), generator=g)
    clean[:, 0] = 0  # BOS
    corrupt = clean.clone()
    for i in range(n_pairs):
        where = torch.randperm(n_pos - 2, generator=g)[:2] + 1
        corrupt[i, where] = torch.randint(1, vocab, (2,), generator=g)
    answers = torch.stack([torch.randperm(vocab - 1, generator=g)[:2] + 1 for _ in range(n_pairs)])
    return Case(model, clean, corrupt, answers)


def logit_diff(last: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[row] logit(correct) - logit(incorrect) from last-position logits [row, vocab]."""
    return last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:])[:, 0]


# -- plain PyTorch: the lower bound ---------------------------------------------------------------------------
class _Cached(torch.nn.Module):
    """Stands in for a block: returns the residual the block would have produced."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


@contextlib.contextmanager
def _below_replaced(hf, layer: int, x: torch.Tensor):
    """Run with `x` as the residual entering block `layer`, the blocks below it not computed."""
    blocks = hf.transformer.h
    if layer == 0:
        handle = blocks[0].register_forward_pre_hook(lambda _m, args: (x, *args[1:]))
        try:
            yield
        finally:
            handle.remove()
        return
    originals = [blocks[i] for i in range(layer)]
    for i in range(layer):
        blocks[i] = _Cached(x)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextlib.contextmanager
def _hooks(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def plain_cache(hf, tokens: torch.Tensor, *, grad: bool = False) -> tuple[dict, torch.Tensor]:
    """Activations {(site, layer): [batch, pos, ...]} for resid_pre, attn_out, mlp_out and z (the input of the
    attention's output projection), and the last-position logits [batch, vocab]."""
    acts: dict = {}
    handles = []
    for layer, block in enumerate(hf.transformer.h):
        handles += [
            block.register_forward_pre_hook(lambda _m, a, L=layer: acts.__setitem__(("resid_pre", L), a[0])),
            block.attn.c_proj.register_forward_pre_hook(
                lambda _m, a, L=layer: acts.__setitem__(("z", L), a[0])
            ),
            block.attn.register_forward_hook(
                lambda _m, _a, o, L=layer: acts.__setitem__(("attn_out", L), o[0])
            ),
            block.mlp.register_forward_hook(lambda _m, _a, o, L=layer: acts.__setitem__(("mlp_out", L), o)),
        ]
    with _hooks(*handles), torch.set_grad_enabled(grad):
        logits = hf(tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
    return acts, logits


def _patch_hook(module, site: str, rows, pos, source, heads=None, d_head=None):
    """A hook on `module` writing source entries into the rows of the patched batch."""
    if site == "attn_out":

        def hook(_m, _a, out):
            out[0][rows, pos] = source

        return module.register_forward_hook(hook)
    if site == "mlp_out":

        def hook(_m, _a, out):
            out[rows, pos] = source

        return module.register_forward_hook(hook)
    if site == "z":  # module = c_proj; its input is z with heads flattened

        def pre(_m, args):
            z = args[0].view(*args[0].shape[:2], -1, d_head)
            z[rows, :, heads] = source

        return module.register_forward_pre_hook(pre)
    raise ValueError(site)


@torch.no_grad()
def lower_bound_sweep(case: Case, sites=SITES) -> torch.Tensor:
    """Plain PyTorch: [site, layer, pos] mean logit difference, one batch per (site, layer). A run patched inside
    the prefix a pair's prompts share is the corrupt run: its logit difference is copied (as the workbench does)."""
    hf, dev = case.hf, case.device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n_pairs, n_pos = clean.shape
    acts, base = plain_cache(hf, torch.cat([clean, corrupt]))
    shared = shared_prefix(clean, corrupt)
    pair, pos = (
        torch.arange(n_pairs, device=dev).repeat_interleave(n_pos),
        torch.arange(n_pos, device=dev).repeat(n_pairs),
    )
    copied = pos < shared[pair]
    base_diff = logit_diff(base[n_pairs:][pair[copied]], answers[pair[copied]])
    copied_diff = torch.zeros(n_pairs, n_pos).index_put_(
        (pair[copied].cpu(), pos[copied].cpu()), base_diff.cpu()
    )
    pair, pos = pair[~copied], pos[~copied]
    rows = torch.arange(len(pair), device=dev)
    tokens = corrupt[pair]
    out = copied_diff.mean(0).repeat(len(sites), case.n_layers, 1)
    for si, site in enumerate(sites):
        for layer in range(case.n_layers):
            x = acts[("resid_pre", layer)][n_pairs:][pair].clone()
            source = acts[(site, layer)][:n_pairs][pair, pos]
            handles = []
            if site == "resid_pre":
                x[rows, pos] = source
            else:
                block = hf.transformer.h[layer]
                handles.append(
                    _patch_hook(block.attn if site == "attn_out" else block.mlp, site, rows, pos, source)
                )
            with _below_replaced(hf, layer, x), _hooks(*handles):
                last = hf(tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
            out[si, layer].index_add_(0, pos.cpu(), logit_diff(last, answers[pair]).cpu() / n_pairs)
    return out


@torch.no_grad()
def lower_bound_heads(case: Case) -> torch.Tensor:
    """Plain PyTorch: [layer, head] mean logit difference, each head's z patched at all positions."""
    hf, dev, cfg = case.hf, case.device, case.model.cfg
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n_pairs, n_pos = clean.shape
    acts, _ = plain_cache(hf, torch.cat([clean, corrupt]))
    rows = torch.arange(n_pairs * cfg.n_heads, device=dev)
    pair, head = rows // cfg.n_heads, rows % cfg.n_heads
    tokens = corrupt[pair]
    out = torch.zeros(case.n_layers, cfg.n_heads)
    for layer in range(case.n_layers):
        x = acts[("resid_pre", layer)][n_pairs:][pair]
        z_clean = acts[("z", layer)][:n_pairs].view(n_pairs, n_pos, cfg.n_heads, cfg.d_head)
        source = z_clean[pair, :, head]  # [row, pos, d_head]
        c_proj = hf.transformer.h[layer].attn.c_proj
        handle = _patch_hook(c_proj, "z", rows, None, source, heads=head, d_head=cfg.d_head)
        with _below_replaced(hf, layer, x), _hooks(handle):
            last = hf(tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
        out[layer] = logit_diff(last, answers[pair]).view(n_pairs, cfg.n_heads).mean(0).cpu()
    return out


def lower_bound_attribution(case: Case, sites=("attn_out", "mlp_out"), n_metrics: int = 4) -> torch.Tensor:
    """Plain PyTorch attribution patching: [site, layer, pos] estimated mean logit difference.

    One no-grad forward over [clean; corrupt], one forward with gradients over the corrupt prompts, and one
    backward pass per metric (`n_metrics` = 4: the workbench's logit_diff, logprob, prob and KL; 1: logit_diff
    only). Only the logit-difference estimate is returned."""
    hf, dev = case.hf, case.device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n = len(clean)
    with torch.no_grad():
        cache, base_logits = plain_cache(hf, torch.cat([clean, corrupt]))
    clean_lp = torch.log_softmax(base_logits[:n].float(), -1)
    acts, last = plain_cache(hf, corrupt, grad=True)
    keys = [(site, layer) for site in sites for layer in range(case.n_layers)]
    logp = torch.log_softmax(last.float(), -1)
    lp = logp.gather(-1, answers[:, :1])[:, 0]
    metrics = [logit_diff(last.float(), answers), lp, lp.exp(), (clean_lp.exp() * (clean_lp - logp)).sum(-1)]
    metrics = metrics[:n_metrics]
    for i, value in enumerate(metrics):
        grads = torch.autograd.grad(value.sum(), [acts[k] for k in keys], retain_graph=i < len(metrics) - 1)
        if i == 0:
            ld_grads = grads
    base = metrics[0].detach()
    out = torch.zeros(len(sites), case.n_layers, clean.shape[1])
    for (site, layer), g in zip(keys, ld_grads):
        delta = cache[(site, layer)][:n] - cache[(site, layer)][n:]
        est = base[:, None] + (delta * g).sum(-1)  # [pair, pos]
        out[sites.index(site), layer] = est.mean(0).detach().cpu()
    return out


# -- the workbench -------------------------------------------------------------------------------------------
def workbench_sweep(case: Case, sites=SITES) -> torch.Tensor:
    from workbench.patching import sweep

    r = sweep(case.model, case.clean, case.corrupt, case.answers, site=list(sites), progress=False)
    return r.values("logit_diff", normalize=False)


def workbench_heads(case: Case) -> torch.Tensor:
    from workbench.patching import sweep

    r = sweep(
        case.model, case.clean, case.corrupt, case.answers, site="z", positions="together", progress=False
    )
    return r.values("logit_diff", normalize=False)[0, :, 0]


def workbench_attribution(case: Case, sites=("attn_out", "mlp_out")):
    from workbench.patching import attribute

    return attribute(case.model, case.clean, case.corrupt, case.answers, site=list(sites), progress=False)


# -- peers: nnsight loops as in its tutorials -----------------------------------------------------------------
def _nnsight_site(nn, site: str, layer: int):
    block = nn.transformer.h[layer]
    return {
        "resid_pre": lambda: block.input,
        "attn_out": lambda: block.attn.output[0],
        "mlp_out": lambda: block.mlp.output,
    }[site]()


def nnsight_clean_cache(nn, clean: torch.Tensor, n_layers: int) -> dict:
    """One trace over the clean prompts saving every site's activation."""
    cache = {}
    with torch.no_grad(), nn.trace(clean, use_cache=False):
        for layer in range(n_layers):
            cache[("resid_pre", layer)] = nn.transformer.h[layer].input.save()
            cache[("z", layer)] = nn.transformer.h[layer].attn.c_proj.input.save()
            cache[("attn_out", layer)] = nn.transformer.h[layer].attn.output[0].save()
            cache[("mlp_out", layer)] = nn.transformer.h[layer].mlp.output.save()
    return cache


def nnsight_per_patch(case: Case, sites=SITES) -> torch.Tensor:
    """One trace per (site, layer, position), the batch being the pairs; full logits (tutorial style)."""
    nn, dev = case.model.nnsight, case.device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n_pos = clean.shape[1]
    cache = nnsight_clean_cache(nn, clean, case.n_layers)
    out = torch.zeros(len(sites), case.n_layers, n_pos)
    for si, site in enumerate(sites):
        for layer in range(case.n_layers):
            for p in range(n_pos):
                with torch.no_grad(), nn.trace(corrupt, use_cache=False):
                    _nnsight_site(nn, site, layer)[:, p] = cache[(site, layer)][:, p]
                    last = nn.lm_head.output[:, -1].save()
                out[si, layer, p] = logit_diff(last, answers).mean().cpu()
    return out


def nnsight_per_layer(case: Case, sites=SITES) -> torch.Tensor:
    """One trace per (site, layer) holding every patched copy of that layer; full logits, all blocks run."""
    nn, dev = case.model.nnsight, case.device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n_pairs, n_pos = clean.shape
    cache = nnsight_clean_cache(nn, clean, case.n_layers)
    rows = torch.arange(n_pairs * n_pos, device=dev)
    pair, pos = rows // n_pos, rows % n_pos
    out = torch.zeros(len(sites), case.n_layers, n_pos)
    for si, site in enumerate(sites):
        for layer in range(case.n_layers):
            with torch.no_grad(), nn.trace(corrupt[pair], use_cache=False):
                _nnsight_site(nn, site, layer)[rows, pos] = cache[(site, layer)][pair, pos]
                last = nn.lm_head.output[:, -1].save()
            out[si, layer].index_add_(0, pos.cpu(), logit_diff(last, answers[pair]).cpu() / n_pairs)
    return out


def nnsight_heads_per_patch(case: Case) -> torch.Tensor:
    """One trace per (layer, head): that head's z patched at all positions."""
    nn, dev, cfg = case.model.nnsight, case.device, case.model.cfg
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    cache = nnsight_clean_cache(nn, clean, case.n_layers)
    out = torch.zeros(case.n_layers, cfg.n_heads)
    for layer in range(case.n_layers):
        for h in range(cfg.n_heads):
            cols = slice(h * cfg.d_head, (h + 1) * cfg.d_head)
            with torch.no_grad(), nn.trace(corrupt, use_cache=False):
                nn.transformer.h[layer].attn.c_proj.input[:, :, cols] = cache[("z", layer)][:, :, cols]
                last = nn.lm_head.output[:, -1].save()
            out[layer, h] = logit_diff(last, answers).mean().cpu()
    return out


def nnsight_heads_per_layer(case: Case) -> torch.Tensor:
    """One trace per layer holding every (pair, head) copy; full logits, all blocks run."""
    nn, dev, cfg = case.model.nnsight, case.device, case.model.cfg
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    n_pairs, n_pos = clean.shape
    cache = nnsight_clean_cache(nn, clean, case.n_layers)
    rows = torch.arange(n_pairs * cfg.n_heads, device=dev)
    pair, head = rows // cfg.n_heads, rows % cfg.n_heads
    out = torch.zeros(case.n_layers, cfg.n_heads)
    for layer in range(case.n_layers):
        source = cache[("z", layer)].view(n_pairs, n_pos, cfg.n_heads, cfg.d_head)[pair, :, head]
        with torch.no_grad(), nn.trace(corrupt[pair], use_cache=False):
            z = nn.transformer.h[layer].attn.c_proj.input.view(len(rows), n_pos, cfg.n_heads, cfg.d_head)
            z[rows, :, head] = source
            last = nn.lm_head.output[:, -1].save()
        out[layer] = logit_diff(last, answers[pair]).view(n_pairs, cfg.n_heads).mean(0).cpu()
    return out


def nnsight_attribution(case: Case, sites=("attn_out", "mlp_out")) -> torch.Tensor:
    """Attribution patching as in nnsight's tutorial: a clean trace, then one corrupt trace with one backward
    pass of the logit difference, reading each activation's gradient."""
    nn, dev = case.model.nnsight, case.device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    cache = nnsight_clean_cache(nn, clean, case.n_layers)
    keys = [(site, layer) for layer in range(case.n_layers) for site in sites]
    saved, grads = [], [None] * len(keys)
    with nn.trace(corrupt, use_cache=False):
        acts = [_nnsight_site(nn, site, layer) for site, layer in keys]
        for a in acts:
            saved.append(a.detach().save())
        ld = logit_diff(nn.lm_head.output[:, -1], answers)
        base = ld.detach().save()
        with ld.sum().backward():
            for i in reversed(range(len(acts))):
                grads[i] = acts[i].grad.save()
    out = torch.zeros(len(sites), case.n_layers, clean.shape[1])
    for (site, layer), act, g in zip(keys, saved, grads):
        est = base[:, None] + ((cache[(site, layer)] - act) * g).sum(-1)
        out[sites.index(site), layer] = est.mean(0).detach().cpu()
    return out


# -- peer: TransformerLens ------------------------------------------------------------------------------------
def make_bridge(case: Case):
    """A TransformerLens bridge over a copy of the weights (it rewrites the model it is given), or None."""
    try:
        from benchmarks.bench_patching import make_bridge as build
    except ImportError:
        return None
    try:
        return build(case.hf)
    except ImportError:
        return None


def _tl_metric(answers):
    def metric(logits):
        return logit_diff(logits[:, -1], answers).mean()

    return metric


@torch.no_grad()
def tl_block_every(bridge, case: Case) -> torch.Tensor:
    from transformer_lens import patching

    dev = next(bridge.parameters()).device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    _, clean_cache = bridge.run_with_cache(clean)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        return torch.as_tensor(
            patching.get_act_patch_block_every(bridge, corrupt, clean_cache, _tl_metric(answers))
        ).cpu()


@torch.no_grad()
def tl_heads(bridge, case: Case) -> torch.Tensor:
    from transformer_lens import patching

    dev = next(bridge.parameters()).device
    clean, corrupt, answers = case.clean.to(dev), case.corrupt.to(dev), case.answers.to(dev)
    _, clean_cache = bridge.run_with_cache(clean)
    with contextlib.redirect_stderr(io.StringIO()):
        out = patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt, clean_cache, _tl_metric(answers))
    return torch.as_tensor(out).cpu()


# -- measuring -----------------------------------------------------------------------------------------------
def _measure(name_wb, fns: dict, peers: dict, repeats: int) -> tuple[dict, dict, float]:
    """Run every approach once (the warm-up; its output is compared), then time the workbench and the lower
    bound alternately `repeats` times and each peer once. Returns (times, outputs, workbench peak memory)."""
    outputs = {}
    peak = peak_memory_mb(lambda: outputs.__setitem__(name_wb, fns[name_wb]()))
    for name, fn in fns.items():
        if name != name_wb:
            outputs[name] = fn()
    times = interleaved_medians(fns, repeats=repeats, warmup=0)
    for name, fn in peers.items():
        t0 = {}
        times[name] = median_time(lambda fn=fn, t0=t0: t0.__setitem__("out", fn()), repeats=1, warmup=0)
        outputs[name] = t0["out"]
    return times, outputs, peak


def _diffs(outputs: dict, ref: str) -> dict[str, float]:
    return {k: float((v.float() - outputs[ref].float()).abs().max()) for k, v in outputs.items() if k != ref}


def _row(case_name: str, times, outputs, peak, *, tl_missing: bool, target: str, speedup_target: float | None,
         ratio_target: float, extra_notes: str = "") -> dict:  # fmt: skip
    diffs = _diffs(outputs, "workbench")
    max_diff = max(diffs.values()) if diffs else 0.0
    peers = {k: v for k, v in times.items() if k not in ("workbench", "lower bound")}
    ratio = times["workbench"] / times["lower bound"]
    meets = ratio <= ratio_target and max_diff <= TOL
    if speedup_target is not None and "TransformerLens" in peers:
        meets = meets and peers["TransformerLens"] / times["workbench"] >= speedup_target
    notes = "; ".join(f"max |{k} - workbench| = {v:.2g}" for k, v in diffs.items())
    if tl_missing:
        notes = "TransformerLens not installed: its column is skipped. " + notes
    notes += "; peers timed once" + (f"; {extra_notes}" if extra_notes else "")
    return row(
        case_name,
        median_s=times["workbench"],
        lower_bound_s=times["lower bound"],
        peers=peers,
        peak_mem_mb=peak,
        agrees=max_diff <= TOL,
        max_abs_diff=max_diff,
        target=target,
        meets_target=meets,
        notes=notes,
    )


def block_sweep_case(case: Case, shape: str, repeats: int, per_patch: bool = True) -> dict:
    bridge = make_bridge(case)
    fns = {"workbench": lambda: workbench_sweep(case), "lower bound": lambda: lower_bound_sweep(case)}
    peers = {}
    if bridge is not None:
        peers["TransformerLens"] = lambda: tl_block_every(bridge, case)
    if per_patch:
        peers["nnsight, trace per patch"] = lambda: nnsight_per_patch(case)
    peers["nnsight, trace per layer"] = lambda: nnsight_per_layer(case)
    times, outputs, peak = _measure("workbench", fns, peers, repeats)
    n_pairs, n_pos = case.clean.shape
    r = _row(
        f"patching/block sweep resid_pre+attn_out+mlp_out {shape}-shape {n_pairs}x{n_pos} tokens ({case.device.type})",
        times,
        outputs,
        peak,
        tl_missing=bridge is None,
        target="<= 1.25x lower bound, >= 3x faster than TransformerLens, agree to 1e-4",
        speedup_target=3.0,
        ratio_target=1.25,
        extra_notes=f"{3 * case.n_layers * n_pos} patched runs x {n_pairs} pairs",
    )
    return r


def heads_case(case: Case, shape: str, repeats: int) -> dict:
    bridge = make_bridge(case)
    fns = {"workbench": lambda: workbench_heads(case), "lower bound": lambda: lower_bound_heads(case)}
    peers = {}
    if bridge is not None:
        peers["TransformerLens"] = lambda: tl_heads(bridge, case)
    peers["nnsight, trace per patch"] = lambda: nnsight_heads_per_patch(case)
    peers["nnsight, trace per layer"] = lambda: nnsight_heads_per_layer(case)
    times, outputs, peak = _measure("workbench", fns, peers, repeats)
    n_pairs, n_pos = case.clean.shape
    cfg = case.model.cfg
    return _row(
        f"patching/per-head z sweep, all positions, {shape}-shape {n_pairs}x{n_pos} tokens ({case.device.type})",
        times,
        outputs,
        peak,
        tl_missing=bridge is None,
        target="<= 1.25x lower bound, >= 3x faster than TransformerLens, agree to 1e-4",
        speedup_target=3.0,
        ratio_target=1.25,
        extra_notes=f"{cfg.n_layers * cfg.n_heads} patched runs x {n_pairs} pairs",
    )


def attribution_case(case: Case, shape: str, repeats: int) -> dict:
    from workbench.patching import compare_attribution, sweep

    results = {}

    def wb():
        results["attribution"] = workbench_attribution(case)
        return results["attribution"].values("logit_diff", normalize=False)

    def exact():
        results["exact"] = sweep(
            case.model, case.clean, case.corrupt, case.answers, site=["attn_out", "mlp_out"], progress=False
        )
        return results["exact"].values("logit_diff", normalize=False)

    fns = {"workbench": wb, "lower bound": lambda: lower_bound_attribution(case)}
    peers = {
        "plain PyTorch, logit diff only (1 backward)": lambda: lower_bound_attribution(case, n_metrics=1),
        "nnsight tutorial trace (1 backward)": lambda: nnsight_attribution(case),
        "exact sweep (workbench)": exact,
    }
    times, outputs, peak = _measure("workbench", fns, peers, repeats)
    outputs.pop("exact sweep (workbench)")  # a different quantity: compared below, not required to agree
    cmp = compare_attribution(results["exact"], results["attribution"], metric="logit_diff")
    n_pairs, n_pos = case.clean.shape
    return _row(
        f"patching/attribution attn_out+mlp_out {shape}-shape {n_pairs}x{n_pos} tokens ({case.device.type})",
        times,
        outputs,
        peak,
        tl_missing=False,
        target="<= 1.25x the plain-PyTorch attribution with the same 4 backward passes; agree to 1e-4",
        speedup_target=None,
        ratio_target=1.25,
        extra_notes="the workbench computes 4 metrics (logit_diff, logprob, prob, KL): 4 backward passes; "
        f"vs exact patching of the same grid: Pearson {cmp.pearson:.3f}, Spearman {cmp.spearman:.3f}, "
        f"top-{cmp.top_k} agreement {cmp.top_k_agreement:.0%}",
    )


def reuse_case(case: Case, shape: str, repeats: int, site) -> dict:
    """Causal reuse on a per-position sweep of `site`: the workbench against its own full path (every patched run
    run, computing every position), same process, alternating."""
    from workbench.patching import sweep

    def wb():
        r = sweep(case.model, case.clean, case.corrupt, case.answers, site=site, progress=False, warn=False)
        return r.values("logit_diff", normalize=False)

    def full():
        with causal_reuse_off():
            return wb()

    times, outputs, peak = _measure("workbench", {"workbench": wb, "lower bound": full}, {}, repeats)
    n_pairs, n_pos = case.clean.shape
    name = site if isinstance(site, str) else "+".join(site)
    return _row(
        f"patching/{name} per-position sweep, causal reuse vs full path, {shape}-shape {n_pairs}x{n_pos} tokens "
        f"({case.device.type})",
        times,
        outputs,
        peak,
        tl_missing=False,
        target="<= 1.0x its full path (the 'lower bound' column here): reuse never costs time; agree to 1e-4",
        speedup_target=None,
        ratio_target=1.0,
        extra_notes="the lower-bound column is the workbench with causal reuse switched off (no suffix reuse, no "
        "runs copied from the base run)",
    )


def run(size: str = "cpu", repeats: int = 2) -> list[dict]:
    device = prepare(size, SIZES)
    opts = SIZES[size]
    rows = []
    for i, shape in enumerate(opts["shapes"]):
        case = make_case(shape, opts["n_pairs"], opts["n_pos"], device=device)
        rows.append(block_sweep_case(case, shape, repeats, per_patch=i == 0))
        if i == 0:
            rows.append(heads_case(case, shape, repeats))
            rows.append(attribution_case(case, shape, repeats))
            rows.append(reuse_case(case, shape, repeats, "z"))
            rows.append(reuse_case(case, shape, repeats, ["attn_out", "mlp_out"]))
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> None:
    size = argv[1] if len(argv) > 1 else "cpu"
    for r in run(size):
        print(r["case"])
        print(f"  workbench    {r['median_s']:.2f} s; lower bound {r['lower_bound_s']:.2f} s; ratio "
              f"{r['ratio_to_lower_bound']:.2f}x")  # fmt: skip
        for name, t in r["peers_s"].items():
            print(f"  {name}: {t:.2f} s (workbench {r['speedup_vs_peers'][name]:.2f}x faster)")
        print(f"  peak {r['peak_mem_mb']:.0f} MB; agrees {r['agrees']}; meets target {r['meets_target']}")
        print(f"  {r['notes']}")


if __name__ == "__main__":
    main(sys.argv)
