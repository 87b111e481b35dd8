"""Activation patching: a full resid_pre layer x position denoising sweep.

Cases: GPT-2-small shapes (12 layers, d_model 768, vocab 50257, random weights, float32), 8 clean/corrupt pairs of
16 tokens, and of 64 tokens (the corrupt prompt differs at 2 random positions after the first), metric = logit
difference at the last position averaged over pairs: 12 x 16 = 192 (12 x 64 = 768) patched runs of 8 pairs.

Columns:
- workbench: `workbench.patching.sweep(..., site="resid_pre")` (also computes logprob, prob and KL per pair), with
  causal reuse: a run patched at a position inside the prefix its two prompts share is the corrupt run (its
  values are copied), and a run patched at position p runs only positions >= p, on the base run's keys and values.
- lower bound: hand-written plain PyTorch on the same module doing the same work: the same runs copied, then per
  layer and bucket of start positions, the corrupt run's cached keys and values for the earlier positions (the
  model's own KV cache), the blocks below the patched layer replaced by their cached output, logits at the last
  position.
- notes: the prefix bound (the bound without causal reuse: all runs, all positions; batch 128 per layer), the
  workbench without causal reuse ("full path", how sweeps ran before it: the ratio workbench / full path is what
  reuse saves) and, on the short case, with suffix reuse alone (no runs copied).
- TransformerLens: `get_act_patch_resid_pre` on a `TransformerBridge` over a copy of the same weights (skipped
  when transformer_lens is not installed; 16 tokens only).

Run: ``python -m benchmarks.bench_patching [cpu|gpu|smoke]`` (smoke: a tiny model, to check the code runs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from functools import partial

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

SIZES = {
    "smoke": ("tiny", 2, 6),
    "cpu": ("gpt2-small", 8, 16),
    "gpu": ("gpt2-small", 8, 16),
}  # shape, pairs, pos
LONG = {"smoke": 10, "cpu": 64, "gpu": 64}
"""Prompt length of the second case, where skipping the positions before the patch saves more."""


def make_case(size: str = "cpu", seed: int = 0, device=None, n_pos: int | None = None):
    from workbench.models.toy import random_model

    shape, n_pairs, default_pos = SIZES[size]
    n_pos = n_pos or default_pos
    model = random_model("gpt2", shape=shape, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(1, vocab, (n_pairs, n_pos), generator=g)
    clean[:, 0] = 0  # BOS
    corrupt = clean.clone()
    for i in range(n_pairs):
        where = torch.randperm(n_pos - 2, generator=g)[:2] + 1
        corrupt[i, where] = torch.randint(1, vocab, (2,), generator=g)
    answers = torch.stack(
        [torch.randperm(vocab - 1, generator=g)[:2] + 1 for _ in range(n_pairs)]
    )  # distinct
    return model, clean, corrupt, answers


def workbench_sweep(model, clean, corrupt, answers) -> torch.Tensor:
    """[layer, pos] mean logit difference of the patched runs."""
    from workbench.patching import sweep

    with warnings.catch_warnings():  # random weights answer nothing: the baseline warnings are expected
        warnings.simplefilter("ignore")
        result = sweep(model, clean, corrupt, answers, site="resid_pre", progress=False)
    return result.values("logit_diff", normalize=False)[0]


class _Cached(torch.nn.Module):
    """Stands in for a block: returns a fixed tensor (the residual the block would have produced)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


def _replace_input(value, _module, args):
    return (value, *args[1:])


@torch.no_grad()
def lower_bound(hf_model, clean, corrupt, answers) -> torch.Tensor:
    """Plain PyTorch: [layer, pos] mean logit difference, batched per layer, blocks below L not recomputed."""
    blocks = hf_model.transformer.h
    n_layers, (n_pairs, n_pos) = len(blocks), clean.shape
    device = next(hf_model.parameters()).device
    clean, corrupt, answers = clean.to(device), corrupt.to(device), answers.to(device)
    resid: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[layer].register_forward_pre_hook(
            lambda _m, args, layer=layer: resid.__setitem__(layer, args[0])
        )
        for layer in range(n_layers)
    ]
    try:
        hf_model(torch.cat([clean, corrupt]), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    rows = torch.arange(n_pairs * n_pos, device=device)
    pair, pos = rows // n_pos, rows % n_pos
    tokens = corrupt[pair]
    out = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        x = resid[layer][n_pairs:][pair].clone()  # corrupt run's residual, one copy per patched run
        x[rows, pos] = resid[layer][:n_pairs][pair, pos]  # clean activation at the patched position
        if layer:
            originals = [blocks[i] for i in range(layer)]
            for i in range(layer):
                blocks[i] = _Cached(x)
            try:
                logits = hf_model(tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
            finally:
                for i, block in enumerate(originals):
                    blocks[i] = block
        else:  # nothing below layer 0: replace the embedding output entering block 0
            hook = blocks[0].register_forward_pre_hook(partial(_replace_input, x))
            try:
                logits = hf_model(tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
            finally:
                hook.remove()
        a = answers[pair]
        diff = logits.gather(-1, a[:, :1])[:, 0] - logits.gather(-1, a[:, 1:])[:, 0]
        out[layer] = diff.view(n_pairs, n_pos).mean(0).cpu()
    return out


def workbench_full_path(model, clean, corrupt, answers) -> torch.Tensor:
    """The workbench sweep as it ran before causal reuse: every patched run computes every position, none is
    left out (no suffix reuse, no copying of runs the shared prefix leaves unchanged)."""
    with causal_reuse_off():
        return workbench_sweep(model, clean, corrupt, answers)


def workbench_suffix_only(model, clean, corrupt, answers) -> torch.Tensor:
    """The workbench sweep with suffix reuse but without copying unchanged runs."""
    with causal_reuse_off(suffix=False):
        return workbench_sweep(model, clean, corrupt, answers)


def _buckets(shared: torch.Tensor, n_pos: int, bucket_rows: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """[(first position, [(pair, position)])]: the patched runs left after the shared prefix, position by position,
    about `bucket_rows` a bucket (the workbench's rule)."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    for pos in range(n_pos):
        runs = [(pair, pos) for pair in range(len(shared)) if pos >= shared[pair]]
        if not runs:
            continue
        if not out or len(out[-1][1]) >= bucket_rows:
            out.append((pos, []))
        out[-1][1].extend(runs)
    return out


@torch.no_grad()
def suffix_lower_bound(hf_model, clean, corrupt, answers, bucket_rows: int = 32) -> torch.Tensor:
    """Plain PyTorch with causal reuse: [layer, pos] mean logit difference. Patched runs at a position inside the
    prompts' shared prefix are the corrupt run (its logit difference is copied). The others, per layer and bucket
    of patched positions (about `bucket_rows` runs), run positions s.. (s: the bucket's first position) on the
    corrupt run's keys and values of positions < s (the model's own DynamicCache), blocks below the layer replaced
    by the patched residual, logits at the last position."""
    from transformers import DynamicCache

    blocks = hf_model.transformer.h
    n_layers, (n_pairs, n_pos) = len(blocks), clean.shape
    device = next(hf_model.parameters()).device
    clean, corrupt, answers = clean.to(device), corrupt.to(device), answers.to(device)
    resid: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[layer].register_forward_pre_hook(
            lambda _m, args, layer=layer: resid.__setitem__(layer, args[0])
        )
        for layer in range(n_layers)
    ]
    try:
        base = hf_model(torch.cat([clean, corrupt]), use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()

    def logit_diff(logits, pair):
        a = answers[pair]
        return logits.gather(-1, a[:, :1])[:, 0] - logits.gather(-1, a[:, 1:])[:, 0]

    kv = [(layer.keys[n_pairs:], layer.values[n_pairs:]) for layer in base.past_key_values.layers]
    shared = shared_prefix(clean, corrupt).cpu()
    corrupt_diff = logit_diff(base.logits[n_pairs:, -1], torch.arange(n_pairs, device=device)).cpu()
    copied = torch.zeros(n_pos)
    for pair, n in enumerate(shared.tolist()):
        copied[:n] += corrupt_diff[pair] / n_pairs
    out = copied.repeat(n_layers, 1)
    buckets = _buckets(shared, n_pos, bucket_rows)
    for layer in range(n_layers):
        for s, runs in buckets:
            pair = torch.tensor([r[0] for r in runs], device=device)
            pos = torch.tensor([r[1] for r in runs], device=device)
            rows = torch.arange(len(pair), device=device)
            x = resid[layer][n_pairs:][pair, s:].clone()
            x[rows, pos - s] = resid[layer][:n_pairs][pair, pos]
            cache = DynamicCache(
                ddp_cache_data=[(k[pair, :, :s], v[pair, :, :s]) for k, v in kv], config=hf_model.config
            )
            kwargs = (
                dict(past_key_values=cache, use_cache=True, logits_to_keep=1)
                if s
                else dict(use_cache=False, logits_to_keep=1)
            )
            originals = [blocks[i] for i in range(layer)]
            hook = None
            if layer:
                for i in range(layer):
                    blocks[i] = _Cached(x)
            else:
                hook = blocks[0].register_forward_pre_hook(partial(_replace_input, x))
            try:
                logits = hf_model(corrupt[pair, s:], **kwargs).logits[:, -1]
            finally:
                for i, block in enumerate(originals):
                    blocks[i] = block
                if hook is not None:
                    hook.remove()
            out[layer].index_add_(0, pos.cpu(), logit_diff(logits, pair).cpu() / n_pairs)
    return out


def make_bridge(hf_model):
    """A TransformerLens bridge over a copy of the weights (it rewrites the model it is given)."""
    from transformer_lens.model_bridge import TransformerBridge

    from workbench.models.toy import toy_tokenizer

    tok = toy_tokenizer()  # token ids are passed directly; the bridge only needs a tokenizer object
    tok.init_kwargs.update(name_or_path="toy", add_bos_token=True)
    device = next(hf_model.parameters()).device
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=copy.deepcopy(hf_model), tokenizer=tok, device=str(device)
    )


@torch.no_grad()
def transformer_lens_sweep(bridge, clean, corrupt, answers) -> torch.Tensor:
    from transformer_lens import patching

    device = next(bridge.parameters()).device
    clean, corrupt, answers = clean.to(device), corrupt.to(device), answers.to(device)
    _, clean_cache = bridge.run_with_cache(clean)

    def logit_diff(logits):
        last = logits[:, -1]
        return (last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:])[:, 0]).mean()

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        return patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, logit_diff).cpu()


def run(size: str = "cpu", repeats: int = 3) -> list[dict]:
    device = prepare(size, SIZES)
    rows = [_case(size, device, SIZES[size][2], repeats, peers=True)]
    # the long case is slow without reuse (about 4 minutes a pass on 2 cores): one timed repeat
    rows.append(_case(size, device, LONG[size], 1 if size == "cpu" else repeats, peers=False))
    return rows


def _case(size: str, device: str, n_pos: int, repeats: int, peers: bool) -> dict:
    model, clean, corrupt, answers = make_case(size, device=device, n_pos=n_pos)
    fns = {
        "workbench": lambda: workbench_sweep(model, clean, corrupt, answers),
        "lower bound": lambda: suffix_lower_bound(model.module, clean, corrupt, answers),
        "full path": lambda: workbench_full_path(model, clean, corrupt, answers),
        "prefix bound": lambda: lower_bound(model.module, clean, corrupt, answers),
    }
    if peers:  # what each part of the reuse saves, on the short case only (the long one is slow without it)
        fns["suffix reuse only"] = lambda: workbench_suffix_only(model, clean, corrupt, answers)
    tl_note = ""
    if peers:
        try:
            bridge = make_bridge(model.module)
            fns["TransformerLens"] = lambda: transformer_lens_sweep(bridge, clean, corrupt, answers)
        except ImportError:
            tl_note = "TransformerLens not installed: its column is skipped. "
    # the first run of each is the warm-up and gives the grids compared for agreement
    grids: dict[str, torch.Tensor] = {}
    peak = peak_memory_mb(lambda: grids.__setitem__("workbench", fns["workbench"]()))
    grids.update({name: fn() for name, fn in fns.items() if name != "workbench"})
    diffs = {name: float((g - grids["workbench"]).abs().max()) for name, g in grids.items()}
    # the targets are tight: time the workbench, its bounds and its own full path alternately; TransformerLens
    # (several times slower) once, to keep the case near a few minutes on 2 cores
    timed = [k for k in fns if k != "TransformerLens"]
    times = interleaved_medians({k: fns[k] for k in timed}, repeats=repeats, warmup=0)
    if "TransformerLens" in fns:
        times["TransformerLens"] = median_time(fns["TransformerLens"], repeats=1, warmup=0)
    ratio = times["workbench"] / times["lower bound"]
    saved = times["workbench"] / times["full path"]
    peer_times = {k: v for k, v in times.items() if k == "TransformerLens"}
    tl_speedup = times["TransformerLens"] / times["workbench"] if peer_times else None
    saved_target = 0.65 if n_pos <= 16 else 0.55
    meets = (
        ratio <= 1.15
        and saved <= saved_target
        and max(diffs.values()) <= 1e-4
        and (tl_speedup is None or tl_speedup >= 5)
    )
    shared = shared_prefix(clean, corrupt)
    copied = int(shared.sum()) * model.cfg.n_layers
    only = times.get("suffix reuse only")
    notes = (
        tl_note
        + f"workbench / its full path (no causal reuse) = {saved:.2f}x (target <= {saved_target}); "
        + f"{copied} of {clean.numel() * model.cfg.n_layers} patched runs copied from the corrupt run (positions "
        + f"inside the prompts' shared prefix, {shared.tolist()} tokens per pair)"
        + (
            f", suffix reuse alone {only:.2f} s ({only / times['full path']:.2f}x the full path); "
            if only
            else "; "
        )
        + f"full path {times['full path']:.2f} s; prefix-skipping bound {times['prefix bound']:.2f} s "
        + f"(workbench = {times['workbench'] / times['prefix bound']:.2f}x it); "
        + "; ".join(f"max |{k} - workbench| = {v:.2g}" for k, v in diffs.items() if k != "workbench")
    )
    target = f"<= 1.15x the suffix-reusing bound, <= {saved_target}x the full path, agree to 1e-4"
    if peers:
        target += ", >= 5x faster than TransformerLens"
    return row(
        f"patching/resid_pre sweep {SIZES[size][0]}-shape {len(clean)}x{clean.shape[1]} tokens ({device})",
        median_s=times["workbench"],
        lower_bound_s=times["lower bound"],
        peers=peer_times,
        peak_mem_mb=peak,
        agrees=max(diffs.values()) <= 1e-4,
        max_abs_diff=max(diffs.values()),
        target=target,
        meets_target=meets,
        notes=notes,
    )


def main(argv: list[str]) -> None:
    size = argv[1] if len(argv) > 1 else "cpu"
    for r in run(size):
        print(r["case"])
        print(f"  workbench      {r['median_s']:.2f} s")
        print(f"  lower bound    {r['lower_bound_s']:.2f} s   ratio {r['ratio_to_lower_bound']:.2f}x")
        for name, t in r["peers_s"].items():
            print(f"  {name:14s} {t:.2f} s   workbench is {r['speedup_vs_peers'][name]:.1f}x faster")
        print(
            f"  peak memory {r['peak_mem_mb']:.0f} MB; max abs diff {r['max_abs_diff']:.2g}; meets target: {r['meets_target']}"
        )
        print(f"  {r['notes']}")


if __name__ == "__main__":
    main(sys.argv)
