"""Run every benchmark case and print how the workbench compares, in ratios measured in the same run.

    python -m benchmarks.run                           # CPU sizes (GPT-2-small shapes, random weights)
    python -m benchmarks.run --size gpu                # GPT-2 small..XL shapes on a CUDA GPU
    python -m benchmarks.run --only patching memory --repeats 1
    python -m benchmarks.run --list                    # the case modules and what they measure

Each case module (`benchmarks/bench_<name>.py`, `run(size) -> list[row]`) runs in its own Python process, so
one case's memory (allocator caches, peak RSS) and thread settings cannot colour another's, and a case that
fails is reported without stopping the others. Results go to ``benchmarks/results/<timestamp>.json`` (or
``--out``) with the machine they were measured on. Compare ratios, never absolute seconds across machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"

CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (what it measures, the sizes it has)
    "patching": (
        "resid_pre layer x position sweep vs plain PyTorch and TransformerLens",
        ("cpu", "gpu", "smoke"),
    ),
    "patching_more": (
        "attn/mlp sweeps, per-head sweep, attribution vs exact, nnsight tutorial loops; GPU: small..XL shapes",
        ("cpu", "gpu", "smoke"),
    ),
    "lnfree": (
        "LayerNorm-removal preview: every single-norm freeze vs plain PyTorch",
        ("cpu", "gpu", "smoke"),
    ),
    "lnfree_more": (
        "LayerNorm-removal preview with the cumulative curve (singles + cumulative) vs plain PyTorch",
        ("cpu", "gpu", "smoke"),
    ),
    "plateau": ("plateau probe, directions x sizes, vs plain PyTorch", ("cpu", "gpu", "smoke")),
    "widgets": ("panel redraw from a stored result; rerun on the demo model", ("cpu", "gpu", "smoke")),
    "memory": (
        "peak memory of a sweep under a budget; growth over 200 repeated traces",
        ("cpu", "gpu", "smoke"),
    ),
    "circuits": (
        "path patching vs plain PyTorch; EAP, EAP-IG, AtP, AtP* and attribute() against exact on the demo model's IOI",
        ("cpu", "gpu", "smoke"),
    ),
}
SIZES = ("cpu", "gpu", "smoke")
ROW_KEYS = (
    "case",
    "median_s",
    "lower_bound_s",
    "ratio_to_lower_bound",
    "peers_s",
    "speedup_vs_peers",
    "peak_mem_mb",
    "agrees",
    "max_abs_diff",
    "target",
    "meets_target",
    "notes",
)


# -- machine -------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(size: str) -> dict:
    """What the numbers were measured on (the JSON's "machine")."""
    import torch

    gpu = torch.cuda.is_available()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": 2 if size != "gpu" else torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "cuda": torch.version.cuda if gpu else None,
        "versions": {
            "torch": str(torch.__version__),
            "transformers": _version("transformers"),
            "nnsight": _version("nnsight"),
            "transformer_lens": _version("transformer-lens"),
            "interp-workbench": _version("interp-workbench"),
        },
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "workbench", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# -- running one case module ---------------------------------------------------------------------------------
def run_module(name: str, size: str, repeats: int | None) -> list[dict]:
    """Import `benchmarks.bench_<name>` and return its rows (in this process)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # plain forwards of BOS-first random tokens warn about attention masks
    module = importlib.import_module(f"benchmarks.bench_{name}")
    kwargs = {}
    if repeats is not None and "repeats" in inspect.signature(module.run).parameters:
        kwargs["repeats"] = repeats
    with warnings.catch_warnings():
        # random-weight models draw the engines' advice about weak baselines; the numbers are the output here
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        rows = module.run(size, **kwargs)
    if repeats is not None and "repeats" not in kwargs:
        for r in rows:
            r["notes"] = (
                r.get("notes") or ""
            ) + f" [this case has fixed repeats; --repeats {repeats} ignored]"
    return rows


def _run_isolated(name: str, size: str, repeats: int | None) -> list[dict]:
    """Run one case module in a fresh interpreter; its rows come back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--worker",
            name,
            "--size",
            size,
            "--worker-out",
            str(out),
        ]
        if repeats is not None:
            cmd += ["--repeats", str(repeats)]
        proc = subprocess.run(cmd, cwd=ROOT.parent)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"bench_{name} exited with status {proc.returncode} (its traceback is above)")
        return json.loads(out.read_text())


def check_row(r: dict) -> None:
    """Raise if `r` does not follow `benchmarks.common.row`'s schema."""
    missing = [k for k in ROW_KEYS if k not in r]
    if missing:
        raise ValueError(f"row {r.get('case')!r} lacks {missing}")


# -- printing ------------------------------------------------------------------------------------------------
def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_bool(x) -> str:
    return {True: "yes", False: "NO", None: "-"}[x]


def _short_peer(name: str) -> str:
    return name if len(name) <= 28 else name[:27] + "…"


def table(rows: list[dict]) -> str:
    """The results as a fixed-width text table, one line per case (peers on extra lines), notes below."""
    head = ["#", "case", "median", "x lower bound", "speed-up vs peers", "peak MB", "agrees", "met"]
    lines = []
    for i, r in enumerate(rows, 1):
        ratio = r.get("ratio_to_lower_bound")
        peers = [f"{_short_peer(k)} {v:.2f}x" for k, v in (r.get("speedup_vs_peers") or {}).items()]
        mem = r.get("peak_mem_mb")
        lines.append(
            [
                str(i),
                r["case"],
                _fmt_s(r.get("median_s")),
                "-" if ratio is None else f"{ratio:.2f}x",
                peers[0] if peers else "-",
                "-" if mem is None else f"{mem:.0f}",
                _fmt_bool(r.get("agrees")),
                {True: "met", False: "MISSED", None: "-"}[r.get("meets_target")],
            ]
        )
        for p in peers[1:]:
            lines.append(["", "", "", "", p, "", "", ""])
    widths = [max(len(h), *(len(line[j]) for line in lines)) if lines else len(h) for j, h in enumerate(head)]
    widths[1] = min(widths[1], 72)

    def fmt(cells):
        out = []
        for j, (c, w) in enumerate(zip(cells, widths)):
            c = c if len(c) <= w else c[: w - 1] + "…"
            out.append(c.ljust(w) if j in (1, 4) else c.rjust(w))
        return "  ".join(out).rstrip()

    text = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)]
    text.append("")
    for i, r in enumerate(rows, 1):
        text.append(f"[{i}] {r['case']}")
        text.append(f"    target: {r.get('target') or '-'}")
        if r.get("max_abs_diff") is not None:
            text.append(f"    max |diff| to the reference: {r['max_abs_diff']:.3g}")
        if r.get("notes"):
            text.append(f"    {r['notes'].strip()}")
    return "\n".join(text)


# -- entry point ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run the workbench's benchmark cases; print ratios to the plain-PyTorch lower bound and to "
        "peers measured in the same run; write JSON.",
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default="cpu",
        help="cpu: GPT-2-small shapes, a few minutes per case on 2 cores; gpu: GPT-2 small..XL shapes (needs "
        "CUDA); smoke: tiny models, to check that the harness runs (the numbers mean nothing)",
    )
    p.add_argument(
        "--only", nargs="+", metavar="NAME", choices=list(CASES), help=f"case modules: {list(CASES)}"
    )
    p.add_argument("--repeats", type=int, help="timed repeats per approach (default: each case's own)")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--list", action="store_true", help="list the case modules and exit")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the cases in this process (faster start; less isolated)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # a child process started by _run_isolated
        rows = run_module(args.worker, args.size, args.repeats)
        args.worker_out.write_text(json.dumps(rows))
        return 0
    if args.list:
        for name, (what, sizes) in CASES.items():
            print(f"{name:14s} {what} [sizes: {', '.join(sizes)}]")
        return 0

    import torch

    if args.size == "gpu" and not torch.cuda.is_available():
        print(
            f"--size gpu needs a CUDA GPU and none is visible to torch {torch.__version__} on this machine; "
            "nothing was run. Use --size cpu here, or run on a machine with a GPU.",
            file=sys.stderr,
        )
        return 2
    names = args.only or list(CASES)
    started = dt.datetime.now()
    out = args.out or RESULTS_DIR / f"{started:%Y%m%d-%H%M%S}-{args.size}.json"
    machine = machine_info(args.size)
    print(
        f"benchmarks: size {args.size} on {machine['device']} ({machine['cpu_count']} CPUs, {machine['cpu_model']}); "
        f"torch {machine['versions']['torch']}, transformers {machine['versions']['transformers']}, "
        f"nnsight {machine['versions']['nnsight']}, TransformerLens {machine['versions']['transformer_lens']}; "
        f"load average {_load()}",
        flush=True,
    )
    rows, errors, skipped = [], [], []
    for i, name in enumerate(names, 1):
        if args.size not in CASES[name][1]:
            skipped.append({"module": name, "reason": f"no {args.size} size"})
            print(f"[{i}/{len(names)}] {name}: skipped (it has no {args.size} size)", flush=True)
            continue
        print(f"[{i}/{len(names)}] {name}: {CASES[name][0]} ...", flush=True)
        load_before, t0 = _load(), time.perf_counter()
        try:
            if args.in_process:
                got = run_module(name, args.size, args.repeats)
            else:
                got = _run_isolated(name, args.size, args.repeats)
            for r in got:
                check_row(r)
        except Exception as err:  # report and go on with the other cases
            errors.append({"module": name, "error": f"{type(err).__name__}: {err}"})
            print(f"    FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        elapsed = time.perf_counter() - t0
        for r in got:
            r.update(module=name, size=args.size, load_avg_before=load_before, load_avg_after=_load())
            if args.size == "smoke":  # tiny models: timings mean nothing, agreement still does
                r["meets_target"] = None
        rows.extend(got)
        print(f"    {len(got)} case(s) in {elapsed:.0f} s; load average {_load()}", flush=True)

    print()
    print(table(rows))
    report = {
        "schema": 1,
        "created": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "repeats": args.repeats,
        "machine": machine,
        "cases": rows,
        "errors": errors,
        "skipped": skipped,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    missed = [r["case"] for r in rows if r.get("meets_target") is False]
    print()
    print(f"{len(rows)} case(s); {len(missed)} missed target(s); {len(errors)} failed module(s). JSON: {out}")
    for e in errors:
        print(f"  failed: {e['module']}: {e['error']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
