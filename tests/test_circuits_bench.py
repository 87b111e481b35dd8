"""The circuits benchmark module runs through the harness at smoke size (tiny models, one repeat): its rows follow
the schema, and path patching equals its hand-written plain-PyTorch bound. Timing belongs to the benchmark run,
never to tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `benchmarks/` is not installed with the package
from benchmarks import run as harness  # noqa: E402


def test_circuit_cases_run_and_path_patching_equals_its_bound(tmp_path):
    out = tmp_path / "smoke.json"
    code = harness.main(
        ["--size", "smoke", "--only", "circuits", "--repeats", "1", "--in-process", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == [] and report["skipped"] == []
    rows = report["cases"]
    for r in rows:
        assert set(harness.ROW_KEYS) <= set(r), r["case"]
        assert r["module"] == "circuits" and r["median_s"] > 0 and r["meets_target"] is None
    path = rows[0]
    assert path["case"].startswith("circuits/path patching")
    assert path["agrees"] is True and path["max_abs_diff"] < 1e-4 and path["lower_bound_s"] > 0
    kinds = [r["case"].split(",")[0] for r in rows[1:]]
    assert kinds == [
        "circuits/EAP vs exact edge patching",
        "circuits/AtP* vs AtP vs exact nodes",
        "circuits/patching.attribute vs sweep resid_pre",
    ]
    for r in rows[1:]:  # agreement reports: the exact method's time is a peer, the agreement is in the notes
        assert r["peers_s"] and "Pearson" in r["notes"] or "recall" in r["notes"], r["case"]
