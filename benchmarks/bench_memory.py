"""Memory: a sweep under a memory budget, and growth over 200 repeated traces in one process.

Cases:
1. Budget: a resid_pre patching sweep (GPT-2-small shapes) with ``memory_budget`` set well below what one
   unchunked layer needs. Peak memory above the loaded model (process RSS on CPU, the allocator's peak on CUDA)
   must stay within the budget; the grid must equal the unbudgeted sweep's.
2. Growth: 200 traces in a row in one process, as a notebook that reruns a cell does, with no `gc.collect()`
   between them (nobody calls it in a notebook). Memory is measured after 10 warm-up traces and after each
   trace; "growth" is the highest point above that baseline. Target < 50 MB. Three workloads:
   a. `model.trace`: read resid_pre and attn_out at every layer, edit one activation, save the logits;
      lower bound: the same forward passes with plain PyTorch hooks;
   b. the workbench's engines: `patching.sweep` and `patching.attribute` alternately (200 traces in all);
   c. a trace with a backward pass written with nnsight's ``with metric.backward():`` (attribution-style user
      code); lower bound: the same with `torch.autograd.grad`.
   Each growth row also reports the growth left at the end, after a `gc.collect()`, and how many more tensors
   the garbage collector tracks than at the start, to tell a leak (stays after collection) from memory that
   only a cyclic collection frees.

Run: ``python -m benchmarks.bench_memory [cpu|gpu|smoke]``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time

import torch

from benchmarks.common import peak_memory_mb, prepare, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_TRACES, WARMUP = 200, 10
GROWTH_TARGET_MB = 50.0
SIZES = {
    # budget case: model shape, pairs x positions, budget; growth cases: model shape and layer override, batch
    "smoke": dict(shape="tiny", n_pairs=2, n_pos=6, budget=2**20, growth=("tiny", None), batch=(2, 8), traces=8),
    "cpu": dict(shape="gpt2-small", n_pairs=4, n_pos=16, budget=32 * 2**20, growth=("gpt2-small", 2), batch=(4, 16), traces=N_TRACES),
    "gpu": dict(shape="gpt2-small", n_pairs=8, n_pos=16, budget=64 * 2**20, growth=("gpt2-small", None), batch=(8, 64), traces=N_TRACES),
}  # fmt: skip


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_mb(device: str) -> float:
    """What the growth cases watch: process RSS on CPU, memory held by tensors on CUDA."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return _rss_mb()


def _release_freed_heap() -> None:
    """Hand memory that Python and torch have freed, but glibc's allocator keeps cached, back to the OS (CPU,
    Linux): what stays in RSS after this is memory still in use, which is what a leak is."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes the allocator's cache
        pass


def _tracked_tensors() -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some objects trips deprecation warnings
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _random_tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, shape, generator=g)
    tokens[:, 0] = 0
    return tokens


# -- 1. a sweep under a memory budget ------------------------------------------------------------------------
def budget_case(size: str, device: str) -> dict:
    from workbench.models.toy import random_model
    from workbench.patching import sweep
    from workbench.patching.sweep import bytes_per_row, setup

    opts = SIZES[size]
    model = random_model("gpt2", shape=opts["shape"], seed=0, device=device)
    vocab = model.cfg.d_vocab
    clean = _random_tokens(vocab, (opts["n_pairs"], opts["n_pos"]))
    corrupt = clean.clone()
    corrupt[:, 1:3] = _random_tokens(vocab, (opts["n_pairs"], 2), seed=1)
    g = torch.Generator().manual_seed(2)
    answers = torch.stack([torch.randperm(vocab - 1, generator=g)[:2] + 1 for _ in range(opts["n_pairs"])])
    budget = opts["budget"]
    grids = {}

    def run(name, memory_budget):
        r = sweep(
            model, clean, corrupt, answers, site="resid_pre", memory_budget=memory_budget, progress=False
        )
        grids[name] = r.values("logit_diff", normalize=False)
        return r

    run("warm-up", None)  # first-call costs (imports, allocator growth) stay out of both measurements
    peaks, times = {}, {}
    for name, memory_budget in (("budget", budget), ("auto", "auto")):
        t0 = time.perf_counter()
        peaks[name] = peak_memory_mb(lambda name=name, memory_budget=memory_budget: run(name, memory_budget))
        times[name] = time.perf_counter() - t0  # one run each: the sampling thread costs little
    s = setup(model, clean, corrupt, answers, "resid_pre", "denoising", None, "each", None, "logit_diff")
    per_row = bytes_per_row(model, s)
    rows_layer = opts["n_pairs"] * opts["n_pos"]
    rows_budget = min(max(1, budget // per_row), rows_layer)
    diff = float((grids["budget"] - grids["auto"]).abs().max())
    budget_mb = budget / 2**20
    unit = "allocator peak (CUDA)" if device == "cuda" else "process RSS"
    return row(
        f"memory/resid_pre sweep under a {budget_mb:g} MB budget, {opts['shape']}-shape "
        f"{opts['n_pairs']}x{opts['n_pos']} tokens ({device})",
        median_s=times["budget"],
        peers={"unbudgeted (auto)": times["auto"]},
        peak_mem_mb=peaks["budget"],
        agrees=diff <= 1e-5,
        max_abs_diff=diff,
        target=f"peak memory above the loaded model <= the {budget_mb:g} MB budget; same grid as unbudgeted",
        meets_target=peaks["budget"] <= budget_mb and diff <= 1e-5,
        notes=f"peak {peaks['budget']:.1f} MB ({unit}) with the budget ({rows_budget} of {rows_layer} rows per "
        f"trace; the engine estimates {per_row / 2**20:.2f} MB per row) vs {peaks['auto']:.1f} MB unbudgeted "
        f"(all {rows_layer} rows of a layer in one trace); 'speed-up vs unbudgeted' < 1 is the time the "
        "budget costs",
    )


# -- 2. growth over repeated traces --------------------------------------------------------------------------
def _growth(fn, device: str, n: int, traces_per_call: int = 1) -> dict:
    """Call `fn` until `n` traces have run (after a warm-up); memory above the post-warm-up baseline."""
    calls = -(-n // traces_per_call)
    warmup = WARMUP if n >= 10 * WARMUP else 2
    for _ in range(-(-warmup // traces_per_call)):
        fn()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    base, tensors0 = _memory_mb(device), _tracked_tensors()
    peak, times = base, []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / traces_per_call)
        peak = max(peak, _memory_mb(device))
    end = _memory_mb(device)
    tensors_end = _tracked_tensors()
    gc.collect()
    after_gc = _memory_mb(device)
    if device != "cuda":
        _release_freed_heap()
    return {
        "peak": peak - base,
        "end": end - base,
        "after_gc": after_gc - base,
        "retained": _memory_mb(device) - base,
        "tensors": tensors_end - tensors0,
        "tensors_after_gc": _tracked_tensors() - tensors0,
        "per_trace_s": statistics.median(times),
    }


def _growth_row(case: str, g: dict, plain: dict | None, n: int, notes: str = "") -> dict:
    text = (
        f"growth: peak {g['peak']:.1f} MB, at the end {g['end']:.1f} MB, after gc.collect() {g['after_gc']:.1f} "
        f"MB, retained after the allocator's cache is released {g['retained']:.1f} MB; tensors tracked by gc: "
        f"+{g['tensors']} at the end, +{g['tensors_after_gc']} after collection"
    )
    if plain is not None:
        text += f"; plain PyTorch loop: peak {plain['peak']:.1f} MB, end {plain['end']:.1f} MB"
    if notes:
        text += f"; {notes}"
    return row(
        case,
        median_s=g["per_trace_s"],
        lower_bound_s=plain["per_trace_s"] if plain else None,
        peak_mem_mb=g["peak"],
        agrees=None,
        target=f"memory retained after {n} traces < {GROWTH_TARGET_MB:g} MB above the baseline (a leak); the peak "
        "(working memory of a trace) is reported",
        meets_target=g["retained"] < GROWTH_TARGET_MB,
        notes=text + "; median_s is per trace",
    )


def growth_model(size: str, device: str):
    from workbench.models.toy import random_model

    shape, n_layer = SIZES[size]["growth"]
    overrides = {} if n_layer is None else {"n_layer": n_layer}
    model = random_model("gpt2", shape=shape, seed=0, device=device, **overrides)
    model.module.eval()
    tokens = _random_tokens(model.cfg.d_vocab, SIZES[size]["batch"]).to(device)
    return model, tokens


def trace_growth_case(model, tokens, device: str, label: str, n: int) -> dict:
    n_layers = model.cfg.n_layers

    def traced():
        acts = []
        with torch.no_grad(), model.trace(tokens):
            for layer in range(n_layers):
                acts.append(model.site("resid_pre", layer).value.clone().save())
                if layer == n_layers - 1:
                    model.site("resid_pre", layer).value[:, 1] = 0
                acts.append(model.site("attn_out", layer).value.clone().save())
            logits = model.site("logits").value.save()
        return acts, logits

    hf = model.module
    blocks = hf.transformer.h

    def plain():
        acts = []
        handles = []
        for layer, block in enumerate(blocks):
            last = layer == len(blocks) - 1

            def pre(_m, args, last=last):
                acts.append(args[0].clone())
                if last:
                    args[0][:, 1] = 0

            handles.append(block.register_forward_pre_hook(pre))
            handles.append(block.attn.register_forward_hook(lambda _m, _a, out: acts.append(out[0].clone())))
        try:
            with torch.no_grad():
                logits = hf(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return acts, logits

    g_plain = _growth(plain, device, n)
    g = _growth(traced, device, n)
    return _growth_row(
        f"memory/growth over {n} traces: read + edit + save logits, {label} ({device})",
        g,
        g_plain,
        n,
        notes="lower bound: the same passes with plain PyTorch hooks",
    )


def engine_growth_case(model, tokens, device: str, label: str, n: int) -> dict:
    from workbench.patching import attribute, sweep

    clean, corrupt = tokens, tokens.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % model.cfg.d_vocab
    answers = torch.tensor([[1, 2]] * len(tokens))
    layers = [0, model.cfg.n_layers - 1] if model.cfg.n_layers > 1 else [0]
    positions = [1, 2]
    per_call = (1 + len(layers)) + 2  # sweep: cache + one trace per layer; attribute: cache + gradient trace

    def engines():
        sweep(model, clean, corrupt, answers, layers=layers, positions=positions, progress=False)
        attribute(model, clean, corrupt, answers, site="attn_out", layers=layers, progress=False)

    g = _growth(engines, device, n, traces_per_call=per_call)
    return _growth_row(
        f"memory/growth over {n} traces: patching.sweep + patching.attribute, {label} ({device})",
        g,
        None,
        n,
        notes=f"{-(-n // per_call)} calls of each engine ({per_call} traces per pair of calls)",
    )


def backward_growth_case(model, tokens, device: str, label: str, n: int) -> dict:
    n_layers = model.cfg.n_layers

    def traced():
        grads = [None] * n_layers
        with model.trace(tokens):
            acts = [model.site("attn_out", layer).value for layer in range(n_layers)]
            logits = model.site("logits").value
            metric = logits[:, -1, 1].sum() - logits[:, -1, 2].sum()
            with metric.backward():
                for layer in reversed(range(n_layers)):
                    grads[layer] = acts[layer].grad.save()
        return grads

    hf = model.module

    def plain():
        acts = []
        handles = [
            b.attn.register_forward_hook(lambda _m, _a, out: acts.append(out[0])) for b in hf.transformer.h
        ]
        try:
            logits = hf(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        metric = logits[:, -1, 1].sum() - logits[:, -1, 2].sum()
        return torch.autograd.grad(metric, acts)

    g_plain = _growth(plain, device, n)
    g = _growth(traced, device, n)
    return _growth_row(
        f"memory/growth over {n} traces with a backward pass (nnsight `with metric.backward():`), "
        f"{label} ({device})",
        g,
        g_plain,
        n,
        notes="lower bound: the same passes with torch.autograd.grad",
    )


def run(size: str = "cpu") -> list[dict]:
    """The budget case times each sweep once; the growth cases time every one of their 200 traces."""
    device = prepare(size, SIZES)
    rows = [budget_case(size, device)]
    gc.collect()
    model, tokens = growth_model(size, device)
    shape, n_layer = SIZES[size]["growth"]
    b, t = tokens.shape
    n = SIZES[size]["traces"]
    label = f"{shape}-shape" + (f" with {n_layer} layers" if n_layer else "") + f", batch {b}x{t}"
    rows.append(trace_growth_case(model, tokens, device, label, n))
    rows.append(engine_growth_case(model, tokens, device, label, n))
    rows.append(backward_growth_case(model, tokens, device, label, n))
    return rows


if __name__ == "__main__":
    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(r["case"])
        print(
            f"  median {r['median_s']:.3f} s; peak {r['peak_mem_mb']:.1f} MB; meets target: {r['meets_target']}"
        )
        print(f"  {r['notes']}")
