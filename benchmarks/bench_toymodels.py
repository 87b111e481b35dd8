"""Compressed-computation toy models: training steps and L/p evaluation against the critique's plain loops.

    python -m benchmarks.bench_toymodels            # CPU size (about a minute on 2 cores)
    python -m benchmarks.bench_toymodels smoke      # tiny: checks that the code runs

Compared, alternating in one process, one thread (the engine trains one model per thread):
- training: `workbench.toymodels.train` (all-zero inputs skipped, embedding-bag inputs and labels, fused AdamW)
  against the loop of the critique's `mlpinsoup.py` written plainly: dense inputs U(-1, 1) x Bernoulli(p),
  labels ReLU(x) + x M^T, mean squared error, AdamW, the same cosine schedule. Both at p = 0.01, batch 2048.
  Agreement: on the same batch the two losses and gradients are equal (the engine computes the same function).
- evaluation: `workbench.toymodels.evaluate` on 10^6 non-empty samples (stratified by the number of active
  features) against the critique's evaluation, 10^6 / (1 - 0.99^100) Bernoulli samples in batches of 10^5.
  Their standard errors are reported: the engine's is smaller for the same number of non-empty samples.
There is no GPU case: these models are too small for a GPU to help; "gpu" runs the CPU sizes.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from benchmarks.common import interleaved_medians, prepare, row

SIZES = {
    "smoke": dict(steps=20, n_samples=5_000, repeats=1),
    "cpu": dict(steps=1_000, n_samples=1_000_000, repeats=3),
    "gpu": dict(steps=1_000, n_samples=1_000_000, repeats=3),
}


def plain_training(M: torch.Tensor, steps: int, p: float = 0.01, seed: int = 0):
    """The critique's training loop, plainly: dense batches, MSE, AdamW, cosine schedule."""
    gen = torch.Generator().manual_seed(seed)
    n, d, batch = 100, 50, 2048
    W_in, W_out = torch.empty(n, d), torch.empty(d, n)
    torch.nn.init.kaiming_uniform_(W_in, generator=gen)
    torch.nn.init.kaiming_uniform_(W_out, generator=gen)
    W_in.requires_grad_()
    W_out.requires_grad_()
    opt = torch.optim.AdamW([W_in, W_out], lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        x = (torch.rand(batch, n, generator=gen) * 2 - 1) * (torch.rand(batch, n, generator=gen) < p)
        y = torch.relu(x) + x @ M.T
        loss = ((torch.relu(x @ W_in) @ W_out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return W_in, W_out


def plain_evaluation(W_in, W_out, M, n_nonempty: int, p: float = 0.01, seed: int = 0) -> tuple[float, float]:
    """The critique's evaluation: n_nonempty / (1 - (1 - p)^n) Bernoulli samples, batches of 10^5; (L/p, stderr)."""
    gen = torch.Generator().manual_seed(seed)
    total = int(n_nonempty / (1 - (1 - p) ** 100))
    losses = []
    with torch.no_grad():
        for start in range(0, total, 100_000):
            b = min(100_000, total - start)
            x = (torch.rand(b, 100, generator=gen) * 2 - 1) * (torch.rand(b, 100, generator=gen) < p)
            losses.append(((torch.relu(x @ W_in) @ W_out - torch.relu(x) - x @ M.T) ** 2).mean(1))
    per = torch.cat(losses).double()
    return float(per.mean()) / p, float(per.std() / math.sqrt(len(per))) / p


def same_function(cfg) -> float:
    """Largest difference between the engine's and the plain loop's loss and gradients on one batch (the engine's
    step, as in `workbench.toymodels.train._fit`: non-empty rows only, embedding bags)."""
    import torch.nn.functional as F

    from workbench.toymodels import build_task
    from workbench.toymodels.data import bernoulli_batch, generator

    M = build_task(cfg).mixing(cfg.sigma)
    b = bernoulli_batch(2048, 100, 0.01, generator(0, "data"))
    W_in = torch.randn(100, 50, generator=torch.Generator().manual_seed(1), requires_grad=True)
    W_out = torch.randn(50, 100, generator=torch.Generator().manual_seed(2), requires_grad=True)
    x = b.dense()
    plain = ((torch.relu(x @ W_in) @ W_out - (torch.relu(x) + x @ M.T)) ** 2).mean()
    g_plain = torch.autograd.grad(plain, [W_in, W_out])
    _, counts = torch.unique_consecutive(b.rows, return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    h = F.embedding_bag(b.cols, W_in, offsets, mode="sum", per_sample_weights=b.values)
    table = torch.cat([M.T, torch.eye(100)])
    idx = torch.stack([b.cols, b.cols + 100], 1).flatten()
    w = torch.stack([b.values, torch.relu(b.values)], 1).flatten()
    y = F.embedding_bag(idx, table, 2 * offsets, mode="sum", per_sample_weights=w)
    engine = ((torch.relu(h) @ W_out - y) ** 2).sum() / (2048 * 100)
    g_engine = torch.autograd.grad(engine, [W_in, W_out])
    return max(
        abs(float((plain - engine).detach())),
        *(float((a - c).abs().max()) for a, c in zip(g_plain, g_engine)),
    )


def run(size: str = "cpu") -> list[dict]:
    prepare(size, SIZES)
    torch.set_num_threads(1)
    from workbench.toymodels import ToyConfig, build_task, clear_cache, evaluate, train

    s = SIZES[size]
    cfg = ToyConfig(mixing="embed", embed_sign="G-I", steps=s["steps"])
    M = build_task(cfg).mixing(0.0)
    rows = []

    def engine_train():
        clear_cache()
        return train(cfg, progress=False, cache=False)

    cpu0 = time.process_time()
    times = interleaved_medians(
        {"engine": engine_train, "plain": lambda: plain_training(M, s["steps"])}, repeats=s["repeats"]
    )
    diff = same_function(cfg)
    rows.append(
        row(
            f"toy model training, {s['steps']:,} steps of batch 2048 (p = 0.01, embedding-like M)",
            median_s=times["engine"],
            peers={"critique's plain training loop": times["plain"]},
            agrees=diff < 1e-5,
            max_abs_diff=diff,
            target=">= 1.5x faster than the plain loop",
            meets_target=times["plain"] / times["engine"] >= 1.5,
            notes=f"{times['engine'] / s['steps'] * 1e3:.2f} ms/step vs {times['plain'] / s['steps'] * 1e3:.2f}; "
            f"process CPU {time.process_time() - cpu0:.1f} s",
        )
    )

    model = train(cfg, progress=False)
    stderr = {}

    def engine_eval():
        r = evaluate(model, 0.01, n_samples=s["n_samples"], progress=False)
        stderr["engine"] = (r.value, float(r.stderr))

    def plain_eval():
        stderr["plain"] = plain_evaluation(model.W_in, model.W_out, model.M, s["n_samples"])

    times = interleaved_medians({"engine": engine_eval, "plain": plain_eval}, repeats=s["repeats"])
    (le, se), (lp, sp) = stderr["engine"], stderr["plain"]
    rows.append(
        row(
            f"L/p at p = 0.01 on {s['n_samples']:,} non-empty samples",
            median_s=times["engine"],
            peers={"critique's plain evaluation": times["plain"]},
            agrees=abs(le - lp) <= 4 * math.hypot(se, sp),
            max_abs_diff=abs(le - lp),
            target=">= 1x the plain evaluation's speed",
            meets_target=times["plain"] >= times["engine"],
            notes=f"L/p {le:.4f} ± {se:.4f} (engine) vs {lp:.4f} ± {sp:.4f} (plain)",
        )
    )
    return rows


if __name__ == "__main__":
    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(r)
