"""LayerNorm-removal preview: the full single-norm sweep.

Case: GPT-2-small shapes (12 layers, d_model 768, vocab 50257, random weights, float32); a text set of random
tokens (CPU: 2 rows of 48 tokens; GPU: 8 rows of 1024). The preview measures the per-token scales of all 25 norms
and the loss with each of the 37 sites (12 MLP, 12 q/k, 12 v, final) frozen alone: 38 forward passes with
per-token cross-entropy over the full vocabulary.

Columns:
- workbench: `workbench.lnfree.preview(..., cumulative=False)` (nnsight traces; blocks below each frozen site
  are skipped and their cached outputs reused).
- lower bound: hand-written plain PyTorch on the same module doing the same passes: forward hooks read the
  norm inputs and rescale the norm outputs (recomputing the q/k or v columns of ``c_attn`` for a split site),
  blocks below the frozen site replaced by their cached output.
- plain full forwards: the same without skipping blocks, i.e. the 38 plain forward passes the sweep needs.

Run: ``python -m benchmarks.bench_lnfree [cpu|gpu|smoke]`` (smoke: a tiny model, to check the code runs).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, peak_memory_mb, prepare, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {  # model shape, (rows, tokens per row)
    "smoke": ("tiny", (2, 12)),
    "cpu": ("gpt2-small", (2, 48)),
    "gpu": ("gpt2-small", (8, 1024)),
}


def make_case(size: str, seed: int = 0, device=None):
    from workbench.models.toy import random_model

    shape, (rows, n_pos) = SIZES[size]
    model = random_model("gpt2", shape=shape, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.cfg.d_vocab, (rows, n_pos), generator=g)
    tokens[:, 0] = model.cfg.d_vocab - 1 if shape.startswith("gpt2-") else 0  # end-of-text first
    return model, tokens


def workbench_preview(model, tokens):
    from workbench.lnfree import preview

    result = preview(model, tokens, cumulative=False, batch_size=len(tokens), progress=False)
    return result.single_loss, result.scales


class _Cached(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


def _sigma(x, eps):
    return (x.float().var(-1, unbiased=False) + eps).sqrt()


@torch.no_grad()
def lower_bound(hf_model, tokens, scales: dict[str, float], skip: bool = True) -> torch.Tensor:
    """Plain PyTorch: [site] mean loss with each site frozen alone (paper order), plus the statistics pass."""
    tr = hf_model.transformer
    blocks, n_layers = tr.h, len(tr.h)
    device = next(hf_model.parameters()).device
    tokens = tokens.to(device)
    targets = tokens[:, 1:].reshape(-1)

    def loss() -> float:
        logits = hf_model(tokens, use_cache=False).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets))

    # statistics pass: every norm's per-token scale, the base loss, the block outputs for skips
    sigmas, cache, hooks = {}, [], []
    norms = [(f"ln1.{i}", b.ln_1) for i, b in enumerate(blocks)] + [
        (f"ln2.{i}", b.ln_2) for i, b in enumerate(blocks)
    ]
    norms.append(("ln_final", tr.ln_f))
    for label, ln in norms:
        hooks.append(
            ln.register_forward_pre_hook(
                lambda m, a, label=label: sigmas.__setitem__(label, _sigma(a[0], m.eps))
            )
        )
    for b in blocks:
        hooks.append(b.register_forward_hook(lambda m, a, out: cache.append(out)))
    try:
        loss()
    finally:
        for h in hooks:
            h.remove()

    def frozen_output(ln, x, y, scale):
        return ln.bias + (y - ln.bias) * (_sigma(x, ln.eps) / scale).unsqueeze(-1)

    out = []
    sites = [f"{k}.{i}" for k in ("mlp", "qk", "v") for i in range(n_layers)] + ["final"]
    for site in sites:
        kind, _, layer = site.partition(".")
        layer = int(layer) if layer else n_layers
        hooks, saved = [], {}
        if kind in ("mlp", "final"):
            ln = tr.ln_f if kind == "final" else blocks[layer].ln_2
            hooks.append(
                ln.register_forward_hook(lambda m, a, y, s=scales[site]: frozen_output(m, a[0], y, s))
            )
        else:
            ln, attn = blocks[layer].ln_1, blocks[layer].attn.c_attn
            hooks.append(ln.register_forward_hook(lambda m, a, y, saved=saved: saved.update(x=a[0], y=y)))
            d = ln.weight.shape[0]
            cols = slice(0, 2 * d) if kind == "qk" else slice(2 * d, 3 * d)

            def refeed(m, a, out, ln=ln, cols=cols, s=scales[site], saved=saved):
                y = frozen_output(ln, saved["x"], saved["y"], s)
                out[..., cols] = y @ m.weight[:, cols] + m.bias[cols]
                return out

            hooks.append(attn.register_forward_hook(refeed))
        originals = list(blocks[: layer if skip else 0])
        for i in range(len(originals)):
            blocks[i] = _Cached(cache[i])
        try:
            out.append(loss())
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
            for h in hooks:
                h.remove()
    return torch.tensor(out, dtype=torch.float64)


def run(size: str = "cpu", repeats: int = 3) -> list[dict]:
    device = prepare(size, SIZES)
    model, tokens = make_case(size, device=device)
    model.dispatch()
    losses, scales = {}, {}

    def wb():
        losses["workbench"], s = workbench_preview(model, tokens)
        scales.update(s.as_dict())

    peak = peak_memory_mb(wb)
    fns = {
        "workbench": wb,
        "lower bound": lambda: losses.__setitem__("lower bound", lower_bound(model.module, tokens, scales)),
        "plain full forwards": lambda: losses.__setitem__(
            "plain full forwards", lower_bound(model.module, tokens, scales, skip=False)
        ),
    }
    times = interleaved_medians(fns, repeats=repeats, warmup=1)
    diff = max(
        float((losses[k] - losses["workbench"]).abs().max()) for k in ("lower bound", "plain full forwards")
    )
    rows, n_pos = tokens.shape
    n_sites = 3 * model.cfg.n_layers + 1
    case = (
        f"lnfree/single-norm preview {SIZES[size][0]}-shape {rows}x{n_pos} tokens, {n_sites} sites ({device})"
    )
    ratio = times["workbench"] / times["lower bound"]
    full_ratio = times["workbench"] / times["plain full forwards"]
    return [
        row(
            case,
            median_s=times["workbench"],
            lower_bound_s=times["lower bound"],
            peak_mem_mb=peak,
            agrees=diff <= 1e-4,
            max_abs_diff=diff,
            target="<= 1.3x the plain-PyTorch passes it needs; agree to 1e-4",
            meets_target=ratio <= 1.3 and diff <= 1e-4,
            notes=f"vs {n_sites + 1} plain full forward passes (no block skipping): {full_ratio:.2f}x "
            f"({times['plain full forwards']:.2f} s)",
        )
    ]


def main(argv: list[str]) -> None:
    size = argv[1] if len(argv) > 1 else "cpu"
    for r in run(size):
        print(r["case"])
        print(f"  workbench      {r['median_s']:.2f} s")
        print(
            f"  lower bound    {r['lower_bound_s']:.2f} s   ratio {r['ratio_to_lower_bound']:.2f}x (target <= 1.3x)"
        )
        print(f"  {r['notes']}")
        print(
            f"  peak memory {r['peak_mem_mb']:.0f} MB; max abs diff {r['max_abs_diff']:.2g}; meets target: {r['meets_target']}"
        )


if __name__ == "__main__":
    main(sys.argv)
