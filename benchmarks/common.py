"""Timing and memory helpers shared by the benchmark cases.

Every case module `benchmarks/bench_<name>.py` exposes ``run(size: str) -> list[dict]`` (size "cpu", "gpu" or
"smoke")
and returns one row per case with the keys of `row()`. Machines are noisy: cases time the workbench, the
plain-PyTorch lower bound and the peers in one process, alternating, and report ratios.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from unittest import mock

import torch


def prepare(size: str, sizes) -> str:
    """Check `size` against a case's `sizes`, seed torch, keep CPU sizes to 2 threads (the reference machine's
    cores); return the device to run on."""
    if size not in sizes:
        raise ValueError(f"size must be one of {list(sizes)}")
    torch.manual_seed(0)
    if size != "gpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    return "cuda" if size == "gpu" and torch.cuda.is_available() else "cpu"


def shared_prefix(clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """[pair] how many leading tokens each pair's prompts [pair, pos] share: a patch at an earlier position writes
    the value the patched run already has, so the workbench copies that run instead of running it."""
    return (clean == corrupt).int().cumprod(1).sum(1)


@contextlib.contextmanager
def causal_reuse_off(suffix: bool = True):
    """Sweeps inside run every patched run (no runs copied from the base run) and, with `suffix`, on every position
    (no suffix reuse): how sweeps ran before causal reuse."""
    from workbench.patching.spec import PatchSpec

    module = importlib.import_module("workbench.patching.sweep")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(PatchSpec, "unchanged", lambda self: frozenset()))
        if suffix:
            stack.enter_context(mock.patch.object(module, "suffix_reuse", lambda model, s: "switched off"))
        yield


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    return interleaved_medians({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Median times of several functions measured round-robin, so slow drifts of the machine hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak extra memory of `fn()` in MB: GPU allocator peak on CUDA, else sampled process RSS above baseline."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) / 2**20 - base / 2**20


def row(
    case: str,
    *,
    median_s: float,
    lower_bound_s: float | None = None,
    peers: dict[str, float] | None = None,
    peak_mem_mb: float | None = None,
    agrees: bool | None = None,
    max_abs_diff: float | None = None,
    target: str = "",
    meets_target: bool | None = None,
    notes: str = "",
) -> dict:
    """One benchmark result row (the JSON schema of benchmarks/results/*.json)."""
    peers = peers or {}
    return {
        "case": case,
        "median_s": median_s,
        "lower_bound_s": lower_bound_s,
        "ratio_to_lower_bound": median_s / lower_bound_s if lower_bound_s else None,
        "peers_s": peers,
        "speedup_vs_peers": {name: t / median_s for name, t in peers.items()},
        "peak_mem_mb": peak_mem_mb,
        "agrees": agrees,
        "max_abs_diff": max_abs_diff,
        "target": target,
        "meets_target": meets_target,
        "notes": notes,
    }
