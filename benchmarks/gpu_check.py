"""Correctness of the engines' GPU paths on the bundled demo model (not a timing benchmark).

    python -m benchmarks.gpu_check                           # CUDA when visible, else the CPU
    python -m benchmarks.gpu_check --tiny --out check.json   # fewer pairs and rows: seconds on a CPU

On the chosen device, for the demo model's IOI task (one template, so all prompts share a token length):

- `patching.sweep` over resid_pre, attn_out, mlp_out and resid_post, and over every head's z, with causal reuse
  (suffix reuse where the device uses it, runs inside the shared prefix copied) on and switched off: the grids must
  agree to 1e-4 (float32);
- `patching.attribute` over the same block grid against the exact sweep: Pearson correlation (all cells and per
  site), Spearman, top-10 agreement; reported, not judged (it is the model's property);
- `lnfree.preview` on the demo corpus and `plateau.probe` on IOI prompts (with reference statistics of the
  corpus): that they run, and their key numbers;
- `circuits.path_patch`, `edge_attribution` (EAP) and `atp_star`: that they run on the device;
- every tensor a result holds is on the CPU (results are saved, tabulated and drawn from there);
- where the device is not the CPU: the same numbers from a fresh process that sees no GPU must agree to 1e-3
  (relative above 1), and a demo model loaded with ``device="cpu"`` next to the GPU model must sit and compute
  on the CPU.

Prints one JSON object (also written to ``--out``) with ``ok`` true when every judged check passed; exits 1
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.common import causal_reuse_off

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK_SITES = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
SUFFIX_TOL = 1e-4  # the same computation in float32, batched differently
DEVICE_TOL = 1e-3  # the same computation on another device (other kernels, other summation orders)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        return float("inf")
    both_nan = a.isnan() & b.isnan()
    return float((a - b).abs().masked_fill(both_nan, 0).max()) if a.numel() else 0.0


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|): absolute for small values, relative for large ones (KL of 20 nats, say)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    d = ((a - b).abs() / (1 + b.abs())).masked_fill(a.isnan() & b.isnan(), 0)
    return float(d.max()) if d.numel() else 0.0


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    keep = x.isfinite() & y.isfinite()
    return float(torch.corrcoef(torch.stack([x[keep], y[keep]]))[0, 1])


def _off_cpu(value, name: str = "", depth: int = 0) -> list[str]:
    """Paths of the tensors inside a result (its fields, nested results, dicts, lists) that are not on the CPU."""
    if isinstance(value, torch.Tensor):
        return [] if value.device.type == "cpu" else [f"{name} on {value.device}"]
    if depth > 4:
        return []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return []
    return [bad for k, v in items for bad in _off_cpu(v, f"{name}.{k}" if name else str(k), depth + 1)]


@contextlib.contextmanager
def _timed(out: dict, key: str):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out[key] = round(time.perf_counter() - t0, 3)


def _sweeps(model, pairs, seconds: dict, tag: str) -> dict:
    from workbench.patching import sweep

    kw = dict(progress=False, warn=False)
    with _timed(seconds, f"sweep_blocks_{tag}"):
        blocks = sweep(model, pairs, site=BLOCK_SITES, **kw)
    with _timed(seconds, f"sweep_heads_{tag}"):
        heads = sweep(model, pairs, site="z", **kw)
    with causal_reuse_off():
        with _timed(seconds, f"sweep_blocks_full_path_{tag}"):
            blocks_full = sweep(model, pairs, site=BLOCK_SITES, **kw)
        heads_full = sweep(model, pairs, site="z", **kw)
    return dict(blocks=blocks, heads=heads, blocks_full=blocks_full, heads_full=heads_full)


def check_patching(model, pairs, seconds: dict) -> tuple[dict, dict]:
    from workbench.patching import attribute, compare_attribution

    r = _sweeps(model, pairs, seconds, "device")
    suffix = {
        "suffix_reuse_on": [
            r["blocks"].provenance.options["suffix_reuse"],
            r["heads"].provenance.options["suffix_reuse"],
        ],
        "suffix_reuse_off": [
            r["blocks_full"].provenance.options["suffix_reuse"],
            r["heads_full"].provenance.options["suffix_reuse"],
        ],
        "max_abs_diff_blocks": _max_diff(r["blocks"].raw, r["blocks_full"].raw),
        "max_abs_diff_heads": _max_diff(r["heads"].raw, r["heads_full"].raw),
        "grid_blocks": list(r["blocks"].raw.shape),
        "grid_heads": list(r["heads"].raw.shape),
        "clean_minus_corrupt_logit_diff": float(
            r["blocks"].baseline("clean") - r["blocks"].baseline("corrupt")
        ),
    }
    suffix["max_abs_diff"] = max(suffix["max_abs_diff_blocks"], suffix["max_abs_diff_heads"])
    suffix["ok"] = (
        suffix["max_abs_diff"] < SUFFIX_TOL
        and all(suffix["suffix_reuse_on"])
        and not any(suffix["suffix_reuse_off"])
    )
    with _timed(seconds, "attribute_device"):
        approx = attribute(model, pairs, site=BLOCK_SITES, progress=False)
    cmp = compare_attribution(r["blocks"], approx, metric="logit_diff")
    exact_v, approx_v = r["blocks"].values("logit_diff"), approx.values("logit_diff")  # [site, layer, pos]
    attribution = {
        "pearson": cmp.pearson,
        "spearman": cmp.spearman,
        "top_k": cmp.top_k,
        "top_k_agreement": cmp.top_k_agreement,
        "pearson_per_site": {s: _pearson(exact_v[i], approx_v[i]) for i, s in enumerate(BLOCK_SITES)},
        "top_exact": list(cmp.top_exact[:5]),
        "top_attribution": list(cmp.top_attribution[:5]),
    }
    results = {"sweep": r["blocks"], "sweep_heads": r["heads"], "attribute": approx}
    return {"suffix_reuse": suffix, "attribution": attribution}, results


def check_lnfree(model, docs, n_rows: int, seconds: dict, tag: str):
    from workbench.lnfree import preview

    with _timed(seconds, f"lnfree_preview_{tag}"):
        res = preview(model, docs, n_rows=n_rows, progress=False)
    delta = res.single_delta
    worst = int(delta.argmax())
    summary = {
        "sites": len(res.sites),
        "rows_x_positions": list(res.statistics.tokens.shape),
        "base_loss": res.base_loss,
        "max_single_delta": float(delta[worst]),
        "max_single_delta_site": res.sites[worst],
        "all_frozen_delta": float(res.cumulative_delta[-1]),
        "finite": bool(torch.isfinite(res.single_loss).all() and torch.isfinite(res.cumulative_loss).all()),
    }
    return summary, res


def check_plateau(model, prompts, docs, n_directions: int, seconds: dict, tag: str):
    from workbench.plateau import probe as plateau_probe
    from workbench.plateau import reference_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _timed(seconds, f"plateau_reference_{tag}"):
            ref = reference_stats(model, docs, layer=1, progress=False)
        with _timed(seconds, f"plateau_probe_{tag}"):
            res = plateau_probe(model, prompts, reference=ref, n_directions=n_directions, progress=False)
    lengths = res.plateau_length("kl")  # [base, direction]
    per_family = {}
    for fam in dict.fromkeys(res.families):
        cols = [i for i, f in enumerate(res.families) if f == fam]
        v = lengths[:, cols].flatten()
        finite = v[v.isfinite()]
        per_family[fam] = {
            "median_plateau_length": float(finite.median()) if len(finite) else None,
            "fraction_finite": float(v.isfinite().float().mean()),
        }
    summary = {
        "kl_shape": list(res.kl.shape),
        "scale": res.scale,
        "max_kl": float(res.kl.nan_to_num(0).max()),
        "max_noise_floor": float(res.noise_floor.nan_to_num(0).max()),
        "families": per_family,
        "warnings": list(res.warnings),
        "finite": bool(torch.isfinite(res.kl).all()),
    }
    return summary, res


def cpu_reference(tiny: bool) -> dict[str, torch.Tensor]:
    """The compared numbers from this script run on the CPU in a fresh process that sees no GPU, so that no state
    of the GPU run (a loaded model, a default device) can leak into the reference."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpu.pt"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tensors-out", str(path)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(
            cmd + (["--tiny"] if tiny else []),
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        if not path.exists():
            raise RuntimeError(
                f"the CPU reference run exited with status {proc.returncode} (traceback above)"
            )
        return torch.load(path, weights_only=True)


def check_cpu_placement(pairs) -> dict:
    """`load_model("demo", device="cpu")` in a process that already holds a GPU model: where its weights sit and
    where a trace's outputs come back (both must be the CPU)."""
    from workbench.models import load_model

    m = load_model("demo", device="cpu")
    tokens = m.to_tokens(list(pairs.clean)[:2])
    with torch.no_grad(), m.trace(tokens):
        logits = m.site("logits").value.save()
    params = sorted({str(p.device) for p in m.module.parameters()})
    out = {"model_device": str(m.device), "parameters_on": params, "trace_logits_on": str(logits.device)}
    out["ok"] = params == ["cpu"] and logits.device.type == "cpu" and m.device.type == "cpu"
    return out


def check_circuits(model, pairs, seconds: dict) -> dict:
    """Path patching, EAP and AtP* run on the model's device (each: ran, or its error)."""
    from workbench.circuits import atp_star, edge_attribution, path_patch

    kw = dict(progress=False, warn=False)
    calls = {
        "path_patch": lambda: path_patch(
            model, pairs, senders=["L1H0"], receivers=["L2H0.q", "L3H1.v"], **kw
        ),
        "edge_attribution_eap": lambda: edge_attribution(model, pairs, **kw),
        "atp_star": lambda: atp_star(model, pairs, **kw),
    }
    out: dict = {}
    for name, fn in calls.items():
        try:
            with _timed(seconds, f"circuits_{name}"):
                res = fn()
            off = _off_cpu(res)
            out[name] = "ran" + (f"; off the CPU: {off}" if off else "")
        except Exception as err:  # reported: the other checks still run
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
            out[name] = f"{type(err).__name__}: {err} (at {where})"
    out["ok"] = all(v == "ran" for v in out.values())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when visible, else cpu)")
    p.add_argument("--tiny", action="store_true", help="fewer pairs, rows and directions (seconds on a CPU)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument(
        "--against-cpu",
        action="store_true",
        help="compare with a CPU run even when the device is the CPU (a self-check of this script)",
    )
    p.add_argument("--tensors-out", type=Path, help=argparse.SUPPRESS)  # the CPU reference's numbers
    args = p.parse_args(argv)

    from workbench.models import load_model
    from workbench.tasks import demo_corpus, ioi_pairs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the CPU reference runs beside other work
    n_pairs, n_docs, n_rows, n_dirs = (4, 60, 8, 4) if args.tiny else (16, 300, 32, 16)
    seconds: dict = {}
    with _timed(seconds, "load_model"):
        model = load_model("demo", device=device)
    pairs = ioi_pairs(n_pairs, templates=0)
    docs = demo_corpus("validation", n_docs)
    prompts = list(pairs.clean)[:4]
    report: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_device": str(model.device),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "sizes": dict(pairs=n_pairs, docs=n_docs, lnfree_rows=n_rows, plateau_directions=n_dirs),
        "seconds": seconds,
    }
    try:
        from importlib.metadata import version

        report["versions"] = {d: version(d) for d in ("transformers", "nnsight")}
    except Exception as err:  # metadata missing for a path-installed package: say so, go on
        report["versions"] = repr(err)

    checks, results = check_patching(model, pairs, seconds)
    checks["lnfree_preview"], results["lnfree_preview"] = check_lnfree(model, docs, n_rows, seconds, "device")
    checks["plateau_probe"], results["plateau_probe"] = check_plateau(
        model, prompts, docs, n_dirs, seconds, "device"
    )
    if device.type == "cuda":
        report["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    off = {name: _off_cpu(res) for name, res in results.items()}
    checks["results_on_cpu"] = {"off_cpu": {k: v for k, v in off.items() if v}, "ok": not any(off.values())}
    checks["model_on_device"] = {"ok": model.device.type == device.type}

    compared = {
        "sweep_blocks": results["sweep"].raw,
        "sweep_heads": results["sweep_heads"].raw,
        "lnfree_single_loss": results["lnfree_preview"].single_loss,
        "lnfree_cumulative_loss": results["lnfree_preview"].cumulative_loss,
        "plateau_kl": results["plateau_probe"].kl,
    }
    if args.tensors_out:
        torch.save({k: v.detach().cpu() for k, v in compared.items()}, args.tensors_out)
    if device.type != "cpu":
        checks["cpu_model_after_gpu_model"] = check_cpu_placement(pairs)
    if device.type != "cpu" or args.against_cpu:
        with _timed(seconds, "cpu_reference"):
            ref = cpu_reference(args.tiny)
        rel = {k: _rel_diff(v, ref[k]) for k, v in compared.items()}
        checks["device_vs_cpu"] = {
            "reference": "the same checks in a fresh process with no GPU visible (CUDA_VISIBLE_DEVICES='')",
            "max_abs_diff": {k: _max_diff(v, ref[k]) for k, v in compared.items()},
            "max_rel_diff": rel,
            "tolerance": f"|device - cpu| / (1 + |cpu|) < {DEVICE_TOL}",
            "ok": max(rel.values()) < DEVICE_TOL,
        }
    if not args.tensors_out:
        checks["circuits"] = check_circuits(model, pairs, seconds)

    judged = {k: v["ok"] for k, v in checks.items() if isinstance(v, dict) and "ok" in v}
    for k in ("lnfree_preview", "plateau_probe"):
        judged[f"{k}_finite"] = checks[k]["finite"]
    report["checks"] = checks
    report["judged"] = judged
    report["ok"] = all(judged.values())
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
