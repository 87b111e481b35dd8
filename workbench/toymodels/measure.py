"""Measure the reproduction's spread over seeds: the numbers behind `paper.TOLERANCE`.

    python -m workbench.toymodels.measure ci 0 1 2 3 4 > ci.json        # about 6 minutes on 2 cores
    python -m workbench.toymodels.measure cpu 0 1 2 > cpu.json          # about 7 minutes per seed
    python -m workbench.toymodels.measure --write ci.json cpu.json      # rewrites workbench/toymodels/measured.py

Each seed reruns `reproduce(profile, seed=s)`: every model's initialisation, data stream and mixing matrix, and
every evaluation, are drawn from that seed. The JSON printed is ``{"profile", "seeds", "values": {quantity:
[value per seed]}}``; `workbench/toymodels/measured.py` holds the committed runs, and `paper.derive_tolerance`
turns them into `paper.TOLERANCE`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from workbench.toymodels import paper
from workbench.toymodels.reproduce import quantities, reproduce
from workbench.toymodels.train import clear_cache


def measure(profile: str, seeds: Sequence[int], *, n_workers: int = 2, log=None) -> dict:
    """`reproduce(profile, seed=s)` for every seed: {"profile", "seeds", "values": {quantity: [per seed]}}."""
    names = [n for n in quantities(profile) if paper.PAPER[n].source != "analytic" or n == "naive"]
    values: dict[str, list[float]] = {n: [] for n in names}
    for seed in seeds:
        started = time.perf_counter()
        out = reproduce(profile, seed=seed, n_workers=n_workers, progress=False)
        clear_cache()  # models of one seed are never reused by another: free the memory
        for n in names:
            values[n].append(float(out.values[n]))
        if log is not None:
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=log, flush=True)
    return {"profile": profile, "seeds": list(seeds), "values": values}


def render(runs: Sequence[dict]) -> str:
    """The source of `workbench/toymodels/measured.py` for `measure` outputs (one per profile)."""
    lines = [
        '"""Values of the reproduction over seeds, per profile, written by `python -m workbench.toymodels.measure',
        '--write` (do not edit by hand): `paper.TOLERANCE` is derived from them (`paper.derive_tolerance`)."""',
        "",
        "RUNS: dict[str, dict] = {",
    ]
    for r in runs:
        lines += [f"    {r['profile']!r}: {{", f'        "seeds": {r["seeds"]!r},', '        "values": {']
        for name, values in r["values"].items():
            lines.append(f"            {name!r}: [{', '.join(_number(v) for v in values)}],")
        lines += ["        },", "    },"]
    lines.append("}")
    text = "\n".join(lines).replace("'", '"') + "\n"
    return text.replace('"""\n\nRUNS', '"""\n\nimport math\n\nRUNS') if "math.nan" in text else text


def _number(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else "math.nan"  # a crossing that never happened at that size


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", choices=["ci", "cpu", "full"])
    parser.add_argument("seeds", type=int, nargs="*")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", nargs="+", metavar="JSON", help="write measured.py from measure outputs")
    args = parser.parse_args(argv)
    if args.write:
        runs = [json.loads(Path(f).read_text()) for f in args.write]
        Path(__file__).with_name("measured.py").write_text(render(runs))
        return
    if args.profile is None or not args.seeds:
        parser.error("give a profile and at least one seed (or --write)")
    torch.set_num_threads(1)
    result = measure(args.profile, args.seeds, n_workers=args.workers, log=sys.stderr)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
