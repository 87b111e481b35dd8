"""The benchmark harness: one command runs the chosen cases and writes JSON in the documented schema.

Smoke size only (tiny models, one repeat): this checks that the harness and the cases run, not how fast
anything is (timing belongs to `python -m benchmarks.run`, never to tests).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `benchmarks/` is not installed with the package
from benchmarks import run as harness  # noqa: E402

ROW_TYPES = {
    "case": str,
    "median_s": float,
    "target": str,
    "notes": str,
    "peers_s": dict,
    "speedup_vs_peers": dict,
}
OPTIONAL_NUMBERS = ("lower_bound_s", "ratio_to_lower_bound", "peak_mem_mb", "max_abs_diff")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    code = harness.main(
        ["--size", "smoke", "--only", "memory", "--repeats", "1", "--in-process", "--out", str(out)]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_report_has_the_machine_and_the_run(report):
    assert report["schema"] == 1 and report["size"] == "smoke" and report["repeats"] == 1
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["device"]
    for package in ("torch", "transformers", "nnsight"):
        assert machine["versions"][package], package
    assert report["errors"] == [] and report["skipped"] == []
    assert "--size smoke" in report["command"]


def test_rows_follow_the_schema(report):
    rows = report["cases"]
    assert len(rows) == 4  # the budget case and three growth cases
    for r in rows:
        assert set(harness.ROW_KEYS) <= set(r), r["case"]
        for key, kind in ROW_TYPES.items():
            assert isinstance(r[key], kind), (r["case"], key)
        for key in OPTIONAL_NUMBERS:
            assert r[key] is None or isinstance(r[key], float), (r["case"], key)
        assert r["median_s"] > 0
        assert r["meets_target"] in (True, False, None) and r["agrees"] in (True, False, None)
        assert r["module"] == "memory" and r["size"] == "smoke"
        for name, t in r["peers_s"].items():
            assert r["speedup_vs_peers"][name] == pytest.approx(t / r["median_s"])
        if r["lower_bound_s"]:
            assert r["ratio_to_lower_bound"] == pytest.approx(r["median_s"] / r["lower_bound_s"])
    budget = rows[0]
    assert budget["case"].startswith("memory/resid_pre sweep under a")
    assert budget["agrees"] is True  # the budgeted grid equals the unbudgeted one


def test_every_timing_case_runs_and_agrees_with_its_references(tmp_path):
    """The timing cases at smoke size (tiny models): the harness runs each and every workbench result equals
    its plain-PyTorch lower bound and peers."""
    out = tmp_path / "smoke.json"
    names = ["patching", "patching_more", "lnfree", "lnfree_more", "plateau"]
    code = harness.main(
        ["--size", "smoke", "--only", *names, "--repeats", "1", "--in-process", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == [] and report["skipped"] == []
    assert {r["module"] for r in report["cases"]} == set(names)
    for r in report["cases"]:
        assert r["agrees"] is True and r["max_abs_diff"] < 1e-4, r["case"]
        assert r["meets_target"] is None  # smoke timings mean nothing: no verdict
        assert r["median_s"] > 0 and r["lower_bound_s"] > 0, r["case"]


def test_table_prints_every_case(report):
    text = harness.table(report["cases"])
    for i, r in enumerate(report["cases"], 1):
        assert f"[{i}] {r['case']}" in text


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        harness.main(["--only", "no_such_case"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        harness.main(["--repeats", "0"])


def test_gpu_size_without_a_gpu_says_so(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.main(["--size", "gpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_failing_case_is_reported_and_the_others_run(monkeypatch, tmp_path):
    def fake(name, size, repeats):
        if name == "widgets":
            raise RuntimeError("boom")
        return [
            {k: None for k in harness.ROW_KEYS} | {"case": name, "median_s": 1.0, "notes": "", "target": ""}
        ]

    monkeypatch.setattr(harness, "run_module", fake)
    out = tmp_path / "r.json"
    code = harness.main(["--size", "smoke", "--only", "widgets", "memory", "--in-process", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1
    assert report["errors"] == [{"module": "widgets", "error": "RuntimeError: boom"}]
    assert [r["case"] for r in report["cases"]] == ["memory"]
