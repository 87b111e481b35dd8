"""Plateau probe: 64 directions x 32 sizes at resid_pre of layer 1, last position, on a GPT-2-small-shaped model.

    python -m benchmarks.bench_plateau            # CPU size (about two minutes on 2 cores)
    python -m benchmarks.bench_plateau gpu
    python -m benchmarks.bench_plateau smoke      # a tiny model: checks that the code runs

Compared, alternating in one process:
- `workbench.plateau.probe` (nnsight): 2048 perturbed runs, the earlier positions' keys and values reused, the
  block below the write layer skipped, logits at one position.
- the lower bound: the same forward passes written in plain PyTorch (Hugging Face modules, the block below
  swapped for its cached output, the same KV cache reuse, the same chunks), with KL and L2 computed alike.
- a peer: plain batched forward passes of the full prompt with a forward pre-hook (what a hand-rolled sweep
  does), logits at the last position only. On CPU it is timed on one chunk and scaled to all rows (noted).

The row reports wall-time medians; the notes add the ratio of process CPU time, which is the steadier measure of
the work done when other jobs share the machine.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings

import torch

from benchmarks.common import interleaved_medians, peak_memory_mb, prepare, row

N_PER_FAMILY, FAMILIES, N_SIZES, LAYER = 16, ("isotropic", "cov_random", "cov_mixture", "toward_real"), 32, 1
SIZES = {
    "smoke": dict(shape="tiny", n_tokens=8, repeats=1),  # checks that the code runs; the numbers mean nothing
    "cpu": dict(shape="gpt2-small", n_tokens=16, repeats=2),
    "gpu": dict(shape="gpt2-small", n_tokens=32, repeats=5),
}
BUDGET = "1GB"  # memory budget per chunk of rows, for the engine and (as the same chunk size) the lower bound


class _Cached(torch.nn.Module):
    """Stands in for a block whose output is known: returns it without computing anything."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


def plain_probe(hf, tokens, layer, vecs, chunk):
    """KL(unperturbed || perturbed) [n] and last-block L2 [n] for each row of vecs written at resid_pre `layer`."""
    from transformers import DynamicCache

    blocks = hf.transformer.h
    with torch.no_grad():
        out = hf(tokens, use_cache=True, output_hidden_states=True)
    t = tokens.shape[1]
    kv = [(lay.keys[:, :, : t - 1], lay.values[:, :, : t - 1]) for lay in out.past_key_values.layers]
    x0 = out.hidden_states[layer][:, -1]  # resid_pre of `layer` at the last position
    captured = {}

    def capture(mod, args, output):
        captured["read"] = output[0] if isinstance(output, tuple) else output

    def run(v):
        n = len(v)
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(n, -1, -1, -1), w.expand(n, -1, -1, -1)) for k, w in kv],
            config=hf.config,
        )
        saved = [blocks[i] for i in range(layer)]
        for i in range(layer):
            blocks[i] = _Cached(v[:, None])
        try:
            logits = hf(tokens[:, -1:].expand(n, 1), past_key_values=cache, use_cache=True).logits[:, -1]
        finally:
            for i in range(layer):
                blocks[i] = saved[i]
        return torch.log_softmax(logits.float(), -1), captured["read"][:, -1].float()

    hook = blocks[-1].register_forward_hook(capture)
    kls, l2s = [], []
    try:
        with torch.no_grad():
            ref_logp, ref_read = run(x0)
            for start in range(0, len(vecs), chunk):
                logp, read = run(vecs[start : start + chunk])
                kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
                l2s.append((read - ref_read).norm(dim=-1))
    finally:
        hook.remove()
    return torch.cat(kls), torch.cat(l2s)


def plain_full_forward(hf, tokens, layer, vecs, chunk):
    """The hand-rolled sweep: full prompt per perturbed copy, a pre-hook on block `layer`, last-position logits."""
    block = hf.transformer.h[layer]
    current = {}

    def pre(mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, -1] = current["v"]
        if args:
            return (h, *args[1:]), kwargs
        kwargs["hidden_states"] = h
        return args, kwargs

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(vecs), chunk):
                v = vecs[start : start + chunk]
                current["v"] = v
                logits = hf(tokens.expand(len(v), -1), use_cache=False, logits_to_keep=1).logits[:, -1]
                out.append(torch.log_softmax(logits.float(), -1)[:, 0])
    finally:
        handle.remove()
    return torch.cat(out)


def wall_and_cpu_medians(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process CPU seconds of each function, measured round-robin. On a shared machine the CPU
    time (all threads of this process) is the steadier measure of work; wall time is what a user waits."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return (
        {k: statistics.median(v) for k, v in wall.items()},
        {k: statistics.median(v) for k, v in cpu.items()},
    )


def run(size: str = "cpu") -> list[dict]:
    from workbench.core import chunk_size, parse_budget
    from workbench.models.toy import random_model
    from workbench.plateau import probe, reference_stats
    from workbench.plateau.core import _bytes_per_row

    device = prepare(size, SIZES)
    opts = SIZES[size]
    model = random_model("gpt2", opts["shape"], seed=0, device=device, dtype=torch.float32)
    hf = model.module.eval()
    vocab, d_model = model.cfg.d_vocab, model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (1, opts["n_tokens"]), generator=g)
    tokens[0, 0] = 0
    corpus = torch.randint(1, vocab, (32, 33), generator=g)  # 1024 activations: enough for a baseline here
    corpus[:, 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_stats(model, corpus, layer=LAYER, progress=False)
    sizes = torch.linspace(0, 1, N_SIZES + 1)  # 0 is the unperturbed run itself: 32 perturbed sizes

    def engine():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return probe(
                model, tokens, layer=LAYER, families=FAMILIES, n_directions=N_PER_FAMILY, sizes=sizes,
                reference=ref, memory_budget=BUDGET, progress=False,
            )  # fmt: skip

    first = {}
    mem = peak_memory_mb(lambda: first.update(res=engine()))  # also the warm-up
    res = first["res"]
    n_rows = res.kl[..., 1:].numel()
    vecs = (
        (res.x0[0] + sizes[1:, None, None] * res.scale * res.directions[0])
        .transpose(0, 1)
        .reshape(-1, d_model)
    )
    vecs = vecs.to(device)
    tok = tokens.to(device)

    # the engine's chunk size for these rows, so that both run the same batches
    chunk = chunk_size(
        _bytes_per_row(model, opts["n_tokens"], cached=True), parse_budget(BUDGET, device), 8192
    )

    def lower_bound():
        return plain_probe(hf, tok, LAYER, vecs, chunk)

    kl_plain, l2_plain = lower_bound()
    kl_engine = res.kl[0, :, 1:].reshape(-1)
    diff = float((kl_plain.cpu() - kl_engine).abs().max())
    l2_diff = float((l2_plain.cpu() - res.l2[0, :, 1:].reshape(-1)).abs().max())

    times, cpu = wall_and_cpu_medians({"engine": engine, "lower": lower_bound}, repeats=opts["repeats"])
    peer_rows = min(256, n_rows) if device == "cpu" else n_rows
    peer_t = interleaved_medians(
        {"peer": lambda: plain_full_forward(hf, tok, LAYER, vecs[:peer_rows], 256)}, repeats=1, warmup=0
    )
    peer_s = peer_t["peer"] * n_rows / peer_rows
    ratio = times["engine"] / times["lower"]
    note = (
        f"{n_rows} perturbed runs ({len(FAMILIES)} families x {N_PER_FAMILY} directions x {N_SIZES} sizes), prompt of "
        f"{opts['n_tokens']} tokens, {device}, chunks of {chunk} rows; max |KL diff| {diff:.2g}, max |L2 diff| {l2_diff:.2g}"
    )
    note += (
        f"; CPU-time ratio {cpu['engine'] / cpu['lower']:.2f} ({cpu['engine']:.1f} s vs {cpu['lower']:.1f} s)"
    )
    if peer_rows < n_rows:
        note += f"; full-forward peer timed on {peer_rows} rows and scaled x{n_rows // peer_rows}"
    return [
        row(
            f"plateau/probe {N_PER_FAMILY * len(FAMILIES)} directions x {N_SIZES} sizes {opts['shape']}-shape "
            f"{opts['n_tokens']} tokens ({device})",
            median_s=times["engine"],
            lower_bound_s=times["lower"],
            peers={"plain full-prompt forward (hooks)": peer_s},
            peak_mem_mb=mem,
            agrees=diff < 1e-4 and l2_diff < 1e-3,
            max_abs_diff=diff,
            target="<= 1.2x the plain-PyTorch batched forward passes",
            meets_target=ratio <= 1.2,
            notes=note,
        )
    ]


if __name__ == "__main__":
    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(f"{r['case']}: {r['median_s']:.2f} s, lower bound {r['lower_bound_s']:.2f} s, "
              f"ratio {r['ratio_to_lower_bound']:.2f} (target {r['target']}, met: {r['meets_target']})")  # fmt: skip
        for name, s in r["peers_s"].items():
            print(f"  {name}: {s:.2f} s ({r['speedup_vs_peers'][name]:.1f}x slower than the engine)")
        print(f"  peak memory {r['peak_mem_mb']:.0f} MB; agrees: {r['agrees']}; {r['notes']}")
