"""LayerNorm-removal preview with the cumulative curve: every single-norm freeze plus freezing the sites one after
another in the paper's order (`bench_lnfree` times the single-norm sweep alone).

Case: GPT-2-small shapes (12 layers, d_model 768, vocab 50257, random weights, float32); the text set of
`bench_lnfree` (CPU: 2 rows of 48 tokens; GPU: 8 rows of 1024). `workbench.lnfree.preview(...)` with its default
``cumulative=True``: a statistics pass, 37 single-site passes (blocks below the frozen site reused) and 37
cumulative passes (all blocks run: the first step already freezes layer 0's MLP norm), each with per-token
cross-entropy over the full vocabulary.

Lower bound: the same 75 passes in plain PyTorch (`bench_lnfree.lower_bound` for the statistics and single-site
passes, and here the cumulative passes with every frozen site's hooks at once). Target <= 1.3x.

Run: ``python -m benchmarks.bench_lnfree_more [cpu|gpu|smoke]``.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.bench_lnfree import SIZES, _sigma, make_case
from benchmarks.bench_lnfree import lower_bound as single_lower_bound
from benchmarks.common import interleaved_medians, peak_memory_mb, prepare, row

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _frozen(ln, x, y, scale):
    """A LayerNorm's output with its per-token scale replaced by `scale` (about its bias)."""
    return ln.bias + (y - ln.bias) * (_sigma(x, ln.eps) / scale).unsqueeze(-1)


def _site_hooks(hf, site: str, scale: float) -> list:
    """Hooks freezing one site: "mlp.L" (ln_2), "qk.L" / "v.L" (ln_1 feeding those columns of c_attn), "final"."""
    tr = hf.transformer
    kind, _, layer = site.partition(".")
    if kind in ("mlp", "final"):
        ln = tr.ln_f if kind == "final" else tr.h[int(layer)].ln_2
        return [ln.register_forward_hook(lambda m, a, y: _frozen(m, a[0], y, scale))]
    block = tr.h[int(layer)]
    ln, attn = block.ln_1, block.attn.c_attn
    d = ln.weight.shape[0]
    cols = slice(0, 2 * d) if kind == "qk" else slice(2 * d, 3 * d)
    saved = {}

    def refeed(m, a, out):
        y = _frozen(ln, saved["x"], saved["y"], scale)
        out[..., cols] = y @ m.weight[:, cols] + m.bias[cols]
        return out

    return [
        ln.register_forward_hook(lambda m, a, y: saved.update(x=a[0], y=y)),
        attn.register_forward_hook(refeed),
    ]


@torch.no_grad()
def lower_bound(hf, tokens, scales: dict[str, float], order: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ([site] single-site losses, [step] cumulative losses), means over tokens."""
    single = single_lower_bound(hf, tokens, scales)
    device = next(hf.parameters()).device
    tokens = tokens.to(device)
    targets = tokens[:, 1:].reshape(-1)
    cumulative = []
    for k in range(len(order)):
        with contextlib.ExitStack() as stack:
            for site in order[: k + 1]:
                for h in _site_hooks(hf, site, scales[site]):
                    stack.callback(h.remove)
            logits = hf(tokens, use_cache=False).logits[:, :-1]
            cumulative.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)))
    return single, torch.tensor(cumulative, dtype=torch.float64)


def run(size: str = "cpu", repeats: int = 3) -> list[dict]:
    from workbench.lnfree import preview

    device = prepare(size, SIZES)
    model, tokens = make_case(size, device=device)
    model.dispatch()
    out: dict = {}

    def wb():
        r = preview(model, tokens, batch_size=len(tokens), progress=False)
        out["workbench"] = (r.single_loss, r.cumulative_loss)
        out["scales"], out["order"] = r.scales.as_dict(), list(r.order)

    def lb():
        out["lower bound"] = lower_bound(model.module, tokens, out["scales"], out["order"])

    peak = peak_memory_mb(wb)
    times = interleaved_medians({"workbench": wb, "lower bound": lb}, repeats=repeats, warmup=1)
    (s_wb, c_wb), (s_lb, c_lb) = out["workbench"], out["lower bound"]
    diff = max(float((s_wb - s_lb).abs().max()), float((c_wb - c_lb).abs().max()))
    ratio = times["workbench"] / times["lower bound"]
    rows, n_pos = tokens.shape
    n_sites = len(out["order"])
    shape = SIZES[size][0]
    return [
        row(
            f"lnfree/preview: {n_sites} single-norm freezes + {n_sites}-step cumulative curve, {shape}-shape "
            f"{rows}x{n_pos} tokens ({device})",
            median_s=times["workbench"],
            lower_bound_s=times["lower bound"],
            peak_mem_mb=peak,
            agrees=diff <= 1e-4,
            max_abs_diff=diff,
            target="<= 1.3x the plain-PyTorch passes it needs; agree to 1e-4",
            meets_target=ratio <= 1.3 and diff <= 1e-4,
            notes=f"{1 + 2 * n_sites} forward passes with full-vocabulary losses (the cumulative steps run every "
            "block)",
        )
    ]


if __name__ == "__main__":
    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(f"{r['case']}\n  workbench {r['median_s']:.2f} s, lower bound {r['lower_bound_s']:.2f} s, ratio "
              f"{r['ratio_to_lower_bound']:.2f}x (target <= 1.3x); max diff {r['max_abs_diff']:.2g}; "
              f"met: {r['meets_target']}")  # fmt: skip
