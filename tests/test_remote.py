"""Remote execution: NDIF's job lifecycle and error flows against a mock server on 127.0.0.1, the result cache,
the widget parts, and the ``remote="local"`` dry run.

The mock (tests/ndif_mock.py) runs in its own process, cannot import the workbench (like NDIF), and really
executes the traces it is sent against the same tiny model, so a completed job's numbers can be compared with a
local run. nnsight is pointed at it through its host setting (``nnsight.CONFIG.API.HOST``).
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
import time
import warnings

import pytest
import torch
from ndif_mock import MockNDIF

from workbench import remote
from workbench.core import Run
from workbench.errors import Cancelled, RemoteError
from workbench.models import load_model
from workbench.models.toy import random_model
from workbench.remote import RemoteRunner
from workbench.remote import runner as runner_module
from workbench.remote.cache import CacheWriteWarning, ResultCache
from workbench.remote.config import DEFAULT_TIMEOUT, check_host
from workbench.results import Result
from workbench.widgets.base import Panel
from workbench.widgets.remote import ModelPicker, RemoteStatus, tracked

SERVED = "mock/tiny-gpt2"
SERVED_BF16 = "mock/tiny-gpt2-bf16"
KEY = "mock-key"
PROMPT = "When Mary and John went to the store , John gave a drink to"


# -- engines used in these tests (trace bodies must live in a file: nnsight reads their source) ----------
def resid(model, tokens, layer: int):
    """[batch, pos, d_model] residual stream entering `layer`: one trace, one job."""
    with model.trace(tokens):
        value = model.site("resid_pre", layer).value.save()
    return value


def ablate_and_compare(model, tokens, layer: int):
    """Two traces (two jobs): clean logits, then logits with `layer`'s attention output zeroed."""
    with model.trace(tokens):
        clean = model.site("logits").value[:, -1].save()
    with model.trace(tokens):
        model.site("attn_out", layer).value[:] = 0
        ablated = model.site("logits").value[:, -1].save()
    return clean - ablated


def out_of_range(model, tokens):
    with model.trace(tokens):
        value = model.site("resid_pre", 0).value[:, 500].save()
    return value


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(2)
    model = random_model("gpt2", seed=3)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.module.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir_bf16(tiny_dir, tmp_path_factory):
    """The same weights under another name, served in bfloat16 (as NDIF serves large models)."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-gpt2-bf16")
    shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def mock(tiny_dir, tiny_dir_bf16, tmp_path_factory):
    log = tmp_path_factory.mktemp("mock") / "server.log"
    models = {SERVED: tiny_dir, SERVED_BF16: f"{tiny_dir_bf16}::bfloat16"}
    server = MockNDIF(models, api_key=KEY, log_path=str(log)).start()
    yield server
    server.stop()


@pytest.fixture
def ndif(mock, tiny_dir, tiny_dir_bf16, monkeypatch):
    """nnsight pointed at the mock, with a valid key; the tiny model's directory named as its hub id."""
    from nnsight import CONFIG
    from nnsight.modeling.huggingface import _ID_CACHE

    monkeypatch.setattr(CONFIG.API, "HOST", mock.url)
    monkeypatch.setattr(CONFIG.API, "APIKEY", KEY)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setitem(_ID_CACHE, tiny_dir, SERVED)
    monkeypatch.setitem(_ID_CACHE, tiny_dir_bf16, SERVED_BF16)
    monkeypatch.setattr(runner_module, "_checked_hosts", {mock.url})  # the drift test checks on purpose
    mock.scenario()
    remote.RESULTS.clear()
    yield mock
    mock.release()
    mock.scenario()


@pytest.fixture(scope="module")
def local_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def remote_model(tiny_dir):
    return load_model(tiny_dir, remote=True)


@pytest.fixture(scope="module")
def tokens(local_model):
    return local_model.to_tokens(PROMPT)


def states(updates, log=False):
    return [u.state for u in updates if u.log == log]


def wait_for(predicate, what: str, deadline_s: float = 120.0) -> None:
    """Poll until `predicate()`; the deadline only turns a hang into a failure."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


# -- completed jobs ----------------------------------------------------------------------------------------
def test_completed_job_matches_local_run_and_reports_lifecycle(ndif, remote_model, local_model, tokens):
    updates = []
    with RemoteRunner(updates.append) as runner:
        got = resid(remote_model, tokens, 1)
    assert torch.allclose(got, resid(local_model, tokens, 1), atol=1e-6)
    lifecycle = states(updates)
    assert lifecycle[0] == "RECEIVED" and lifecycle[-1] == "COMPLETED"
    assert [s for s in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED") if s in lifecycle] == [
        "RECEIVED",
        "QUEUED",
        "RUNNING",
        "COMPLETED",
    ]
    job_ids = {u.job_id for u in updates}
    assert len(job_ids) == 1 and len(job_ids.pop()) >= 8
    assert runner.submitted == 1 and updates[-1].meta == {"gpu_seconds": 0.01}
    assert all(b.elapsed >= a.elapsed for a, b in zip(updates, updates[1:]))
    assert f'"repo_id": "{SERVED}"' in ndif.stats()["model_keys"][-1]


def test_result_by_download_url(ndif, remote_model, local_model, tokens):
    ndif.scenario(result="url")
    with RemoteRunner() as runner:
        got = resid(remote_model, tokens, 0)
    assert torch.allclose(got, resid(local_model, tokens, 0), atol=1e-6)
    assert runner.last.state == "COMPLETED"


def test_an_engine_call_with_two_traces_is_two_numbered_jobs(ndif, remote_model, local_model, tokens):
    updates = []
    with RemoteRunner(updates.append) as runner:
        got = ablate_and_compare(remote_model, tokens, 1)
    assert torch.allclose(got, ablate_and_compare(local_model, tokens, 1), atol=1e-5)
    assert runner.submitted == 2
    done = [u for u in updates if u.state == "COMPLETED"]
    assert [u.number for u in done] == [1, 2] and done[0].job_id != done[1].job_id
    assert "(job 2)" in done[1].text()


def test_server_log_lines_are_reported_without_changing_state(ndif, remote_model, tokens):
    ndif.scenario(log="loading weights onto 1 GPU")
    updates = []
    with RemoteRunner(updates.append):
        resid(remote_model, tokens, 0)
    logs = [u for u in updates if u.log]
    assert logs and logs[0].description == "loading weights onto 1 GPU" and logs[0].state == "RUNNING"


# -- job errors, disconnects, timeouts, cancel ------------------------------------------------------------
def test_job_error_shows_the_servers_message(ndif, remote_model, tokens):
    ndif.scenario(fail="CUDA out of memory. Tried to allocate 80.00 GiB")
    updates = []
    with pytest.raises(
        RemoteError, match="failed on the server: CUDA out of memory. Tried to allocate 80.00 GiB"
    ):
        with RemoteRunner(updates.append):
            resid(remote_model, tokens, 0)
    assert updates[-1].state == "ERROR" and "80.00 GiB" in updates[-1].text()
    assert updates[-1].meta == {"gpu_seconds": 0.1}


def test_an_intervention_that_fails_on_the_server_reports_its_exception(ndif, remote_model, tokens):
    with pytest.raises(RemoteError, match="IndexError"):
        with RemoteRunner():
            out_of_range(remote_model, tokens)


def test_disconnect_while_queued_is_a_clear_error(ndif, remote_model, tokens):
    ndif.scenario(disconnect_after="QUEUED")
    updates = []
    with pytest.raises(RemoteError, match="Lost the connection to NDIF while job .* was QUEUED"):
        with RemoteRunner(updates.append):
            resid(remote_model, tokens, 0)
    assert updates[-1].state == "DISCONNECTED"


def test_disconnect_while_running(ndif, remote_model, tokens):
    ndif.scenario(disconnect_after="RUNNING")
    with pytest.raises(RemoteError, match="was RUNNING"):
        with RemoteRunner():
            resid(remote_model, tokens, 0)


def test_timeout_while_the_job_waits(ndif, remote_model, tokens):
    ndif.scenario(gate=True)
    updates = []
    with pytest.raises(RemoteError, match=r"did not finish within timeout=0.5 s \(last state: RUNNING\)"):
        with RemoteRunner(updates.append, timeout=0.5):
            resid(remote_model, tokens, 0)
    assert updates[-1].state == "TIMEOUT"


def test_submit_returns_at_once_and_cancel_stops_the_wait(ndif, remote_model, tokens):
    ndif.scenario(gate=True)
    job = remote.submit(resid, remote_model, tokens, 0)
    wait_for(lambda: job.runner.last is not None and job.runner.last.state == "RUNNING", "RUNNING")
    assert not job.done() and "RUNNING" in job.status
    job.cancel()
    with pytest.raises(Cancelled, match="Stopped waiting for NDIF job"):
        job.result(timeout=60)
    assert job.runner.last.state == "CANCELLED"


def test_submit_result(ndif, remote_model, local_model, tokens):
    job = remote.submit(resid, remote_model, tokens, 1)
    got = job.result(timeout=120)
    assert torch.allclose(got, resid(local_model, tokens, 1), atol=1e-6)
    assert job.done() and job.status.startswith("done")


# -- the kernel stays free: a widget's background run against a gated job ----------------------------------
class RemoteEcho(Panel):
    def code(self):
        return "resid(model, tokens, 1)"


def test_widget_run_leaves_the_main_thread_free_and_shows_the_lifecycle(
    ndif, remote_model, local_model, tokens
):
    ndif.scenario(gate=True)
    panel = RemoteEcho()
    status = RemoteStatus()
    drawn = []
    compute = tracked(lambda progress, cancel: remote.call(resid, remote_model, tokens, 1), status.runner)
    panel.start(compute, drawn.append)
    wait_for(
        lambda: status.last is not None and status.last.state == "RUNNING", "the status line to show RUNNING"
    )
    # The job is held on the server: whatever the main thread does now, it does while the job runs.
    seen_job_line = status.text
    work = [torch.randn(64, 64) @ torch.randn(64, 64) for _ in range(50)]
    assert len(work) == 50 and panel.busy and not drawn
    assert "NDIF job" in seen_job_line and " s" in seen_job_line and not status.cancel_button.disabled
    ndif.release()
    panel.wait(120)
    assert not panel.busy and len(drawn) == 1
    assert torch.allclose(panel.result, resid(local_model, tokens, 1), atol=1e-6)
    assert "COMPLETED" in status.text and status.cancel_button.disabled
    assert panel.status_text.startswith("Done in")


def test_widget_cancel_button_stops_the_wait_and_keeps_the_last_result(ndif, remote_model, tokens):
    panel = RemoteEcho()
    status = RemoteStatus()
    compute = tracked(lambda p, cancel: resid(remote_model, tokens, 0), lambda token: status.runner(token))
    panel.start(compute, lambda r: None)
    panel.wait(120)
    first, first_job = panel.result, status.last.job_id
    ndif.scenario(gate=True)
    panel.start(compute, lambda r: None)
    wait_for(
        lambda: status.last.state == "RUNNING" and status.last.job_id != first_job, "the second job RUNNING"
    )
    status.cancel_button.click()
    panel.wait(120)
    assert "Stopped" in panel.status_text and panel.result is first
    assert "CANCELLED" in status.text


def test_panel_stop_button_also_stops_the_wait(ndif, remote_model, tokens):
    ndif.scenario(gate=True)
    panel = RemoteEcho()
    status = RemoteStatus()
    panel.start(tracked(lambda p, c: resid(remote_model, tokens, 0), status.runner), lambda r: None)
    wait_for(lambda: status.last is not None and status.last.state == "RUNNING", "RUNNING")
    panel.stop_button.click()
    panel.wait(120)
    assert "Stopped" in panel.status_text and panel.result is None


# -- the result cache --------------------------------------------------------------------------------------
def test_cache_hits_do_not_resubmit(ndif, remote_model, tokens):
    before = ndif.stats()["requests"]
    first = remote.call(resid, remote_model, tokens, 1)
    again = remote.call(resid, remote_model, tokens, 1, progress=lambda done, total: None)
    assert ndif.stats()["requests"] == before + 1
    assert torch.equal(first, again) and remote.RESULTS.hits == 1
    again.zero_()  # callers get copies: changing one does not change the cache
    assert torch.equal(remote.call(resid, remote_model, tokens, 1), first)
    remote.call(resid, remote_model, tokens, 0)  # other options: a new job
    remote.call(resid, remote_model, tokens[:, :-1], 1)  # other inputs: a new job
    assert ndif.stats()["requests"] == before + 3


def test_failed_and_cancelled_runs_are_not_cached(ndif, remote_model, tokens):
    ndif.scenario(fail="boom")
    with pytest.raises(RemoteError):
        remote.call(resid, remote_model, tokens, 1)
    ndif.scenario()
    before = ndif.stats()["requests"]
    remote.call(resid, remote_model, tokens, 1)
    assert ndif.stats()["requests"] == before + 1


def test_local_models_are_never_cached(local_model, tokens):
    remote.RESULTS.clear()
    remote.call(resid, local_model, tokens, 1)
    remote.call(resid, local_model, tokens, 1)
    assert len(remote.RESULTS) == 0 and remote.RESULTS.hits == 0


def test_cache_keeps_copies_without_autograd_history(tmp_path):
    cache = remote.ResultCache(max_entries=2)
    value = {"x": torch.ones(3, requires_grad=True) * 2, "n": [1, 2]}
    cache.put("a", value)
    got = cache.get("a")
    assert not got["x"].requires_grad and torch.equal(got["x"], torch.full((3,), 2.0)) and got["n"] == [1, 2]
    got["n"].append(3)
    assert cache.get("a")["n"] == [1, 2]
    cache.put("b", 1)
    cache.put("c", 2)
    assert "a" not in cache and cache.get("a", "gone") == "gone" and len(cache) == 2


def test_cache_key_names_model_inputs_and_options(remote_model, local_model, tokens):
    key = remote.cache_key
    assert key(resid, remote_model, (tokens, 1), {}) == key(resid, remote_model, (tokens.clone(), 1), {})
    assert key(resid, remote_model, (tokens, 1), {}) != key(resid, local_model, (tokens, 1), {})
    assert key(resid, remote_model, (tokens, 1), {}) != key(resid, remote_model, (tokens, 1.0), {})
    assert key(resid, remote_model, (tokens,), {"layer": 1}) != key(
        resid, remote_model, (tokens,), {"layer": 2}
    )
    with pytest.raises(remote.cache.Uncacheable):
        key(resid, remote_model, (object(),), {})


# -- configuration and clear errors -------------------------------------------------------------------------
def test_no_api_key(ndif, remote_model, tokens, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    before = ndif.stats()["requests"]
    with pytest.raises(RemoteError, match="No NDIF API key.*NDIF_API_KEY.*nnsight login.*not paste the key"):
        resid(remote_model, tokens, 0)
    assert ndif.stats()["requests"] == before
    assert not remote.settings().has_key and "no API key" in str(remote.settings())
    with pytest.raises(RemoteError, match="No NDIF API key"):
        remote.check_api_key()


def test_key_source_is_reported_never_the_key(ndif, remote_model, tokens, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setenv("NDIF_API_KEY", KEY)
    assert remote.settings().key_source == "environment" and KEY not in str(remote.settings())
    assert remote.check_api_key().has_key
    monkeypatch.delenv("NDIF_API_KEY")
    assert remote.settings().key_source == "nnsight config"
    # a key exported after nnsight read its configuration is used
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    assert resid(remote_model, tokens, 0).shape == (1, tokens.shape[1], 32)


def test_rejected_api_key(ndif, remote_model, tokens, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", "wrong-key")
    with pytest.raises(RemoteError, match="NDIF rejected the API key"):
        resid(remote_model, tokens, 0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ndif(ndif, remote_model, tokens, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{_closed_port()}")
    updates = []
    with pytest.raises(RemoteError, match="NDIF is unreachable at http://127.0.0.1"):
        with RemoteRunner(updates.append):
            resid(remote_model, tokens, 0)
    assert updates[-1].state == "ERROR" and "unreachable" in updates[-1].text()
    with pytest.raises(RemoteError, match="unreachable"):
        remote.served_models()
    picker = ModelPicker()
    assert "unreachable" in picker.info_text and picker.name.options == ()


def test_model_not_served(ndif, remote_model, tokens, tiny_dir, monkeypatch):
    from nnsight.modeling.huggingface import _ID_CACHE

    monkeypatch.setitem(_ID_CACHE, tiny_dir, "someone/not-served")
    with pytest.raises(
        RemoteError, match=f"does not serve someone/not-served.*serves: {SERVED}, {SERVED_BF16}"
    ):
        resid(remote_model, tokens, 0)


def test_refused_submission(ndif, remote_model, tokens):
    ndif.scenario(reject=[503, "Scheduled maintenance until 14:00 UTC"])
    with pytest.raises(RemoteError, match="could not take the job right now.*Scheduled maintenance"):
        resid(remote_model, tokens, 0)
    ndif.scenario(reject=[400, "Request too large"])
    with pytest.raises(RemoteError, match="refused the job \\(HTTP 400\\): Request too large"):
        resid(remote_model, tokens, 0)


def test_a_request_refused_as_too_large_is_job_too_large(ndif, remote_model, tokens):
    from workbench.errors import JobTooLarge

    ndif.scenario(reject=[413, "Payload too large"])
    with pytest.raises(JobTooLarge, match="too large \\(HTTP 413\\): Payload too large"):
        resid(remote_model, tokens, 0)


@pytest.mark.parametrize("delivery", ["inline", "url"])
def test_result_too_large(ndif, remote_model, tokens, delivery):
    ndif.scenario(pad_result_mb=1.5, result=delivery)
    with pytest.raises(RemoteError, match="above the limit of 1 MB \\(max_result_mb\\)"):
        with RemoteRunner(max_result_mb=1):
            resid(remote_model, tokens, 0)


def test_in_memory_models_cannot_go_to_ndif(tokens):
    model = random_model("gpt2")
    model.remote = True
    with pytest.raises(RemoteError, match="Cannot name .* for NDIF"):
        resid(model, tokens, 0)


def test_version_drift_warns_once(ndif, remote_model, tokens, monkeypatch):
    monkeypatch.setattr(runner_module, "_checked_hosts", set())
    ndif.scenario(packages={"torch": "1.0.0"})
    updates = []
    with pytest.warns(remote.VersionDriftWarning, match=r"torch \S+ here, 1.0.0 on NDIF"):
        with RemoteRunner(updates.append):
            resid(remote_model, tokens, 0)
    assert any(u.log and "1.0.0 on NDIF" in u.description for u in updates)
    with warnings.catch_warnings():
        warnings.simplefilter("error", remote.VersionDriftWarning)
        resid(remote_model, tokens, 0)  # checked once per host
    assert [line.split()[0] for line in remote.version_drift()] == ["torch"]


# -- what NDIF serves; the model picker ---------------------------------------------------------------------
def test_served_models_and_picker(ndif):
    models = remote.served_models()
    assert [(m.repo_id, m.level, m.state, m.task) for m in models] == [
        (SERVED, "HOT", "RUNNING", "text-generation"),
        (SERVED_BF16, "HOT", "RUNNING", "text-generation"),
    ]
    assert models[0].ready and models[0].label() == f"{SERVED} (HOT, RUNNING)"
    picker = ModelPicker()
    assert (
        picker.name.options == (SERVED, SERVED_BF16) and "serves 2 text-generation models" in picker.info_text
    )
    picker.name.value = SERVED
    assert picker.code() == f"model = load_model({SERVED!r}, remote=True)"


def test_picker_loads_a_dry_run_model(tiny_dir):
    picker = ModelPicker(tiny_dir, remote="local", fetch=False)
    model = picker.load()
    assert model.remote == "local" and model.cfg.n_layers == 2


# -- the remote="local" dry run reports like a job -----------------------------------------------------------
def test_dry_run_reports_and_matches(tiny_dir, local_model, tokens):
    dry = load_model(tiny_dir, remote="local")
    updates = []
    with RemoteRunner(updates.append):
        got = ablate_and_compare(dry, tokens, 0)
    assert torch.allclose(got, ablate_and_compare(local_model, tokens, 0), atol=1e-5)
    assert states(updates) == ["RECEIVED", "RUNNING", "COMPLETED"] * 2
    assert updates[0].where == "local dry run" and updates[-1].job_id == "local-2"


def test_the_mock_speaks_nnsights_non_blocking_protocol(ndif, remote_model, tokens):
    """nnsight's own client (submit, then poll GET /response/{id}) against the mock: the mock is faithful."""
    nn = remote_model.nnsight
    with nn.trace(tokens, remote=True, blocking=False) as tracer:
        hidden = nn.transformer.h[0].output.save()  # noqa: F841
    backend = tracer.backend
    assert backend.job_id
    result = None
    end = time.monotonic() + 120
    while result is None and time.monotonic() < end:
        result = backend()
        time.sleep(0.05)
    assert result is not None and result["hidden"].shape == (1, tokens.shape[1], 32)


def test_status_line_renders_each_state():
    status = RemoteStatus()
    assert status.text == "No remote job yet." and status.cancel_button.disabled
    runner = status.runner()
    update = remote.JobUpdate("abcdef0123", "QUEUED", 3.25, number=2)
    status.update(update)
    assert status.text.startswith("NDIF job abcdef01 · QUEUED · 3.2 s (job 2)")
    assert "RECEIVED › QUEUED › RUNNING › COMPLETED" in status.text
    status.cancel()
    assert runner.cancelled and status.cancel_button.disabled


def test_every_panel_shows_remote_jobs_in_its_status_line(ndif, remote_model, tokens):
    """Panels need no remote code: `Panel.start` reports remote jobs in the status line."""
    ndif.scenario(gate=True)
    panel = RemoteEcho()
    panel.start(lambda progress, cancel: remote.call(resid, remote_model, tokens, 1), lambda r: None)
    wait_for(lambda: "RUNNING" in panel.status_text, "the panel's status line to show RUNNING")
    assert panel.status_text.startswith("NDIF job ") and panel.busy
    panel.stop_button.click()
    panel.wait(120)
    assert "Stopped" in panel.status_text


# -- panels: a repeated remote run is served from the cache ------------------------------------------------
def _patching_panel(model):
    from workbench.widgets.patching import PatchingExplorer

    return PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS)


def _plateau_panel(model):
    from workbench.widgets.plateau import PlateauProbe

    panel = PlateauProbe(model, DOCS[0], prompt_b=DOCS[1])
    panel.n_directions_box.value, panel.n_sizes_box.value = 2, 4
    return panel


def _lnfree_panel(model):
    from workbench.widgets.lnfree import LNRemovalPreview

    return LNRemovalPreview(model, DOCS, n_rows=None, seq_len=16)


PANELS = {  # name: (build, second action, what the panel shows)
    "patching": (_patching_panel, lambda p: p.drill(1, 0), lambda p: (p.grid, p.heads)),
    "plateau": (
        _plateau_panel,
        lambda p: (setattr(p.view_box, "value", "Interpolation"), p.run()),
        lambda p: (p.plateau, p.interpolation),
    ),
    "lnfree": (_lnfree_panel, lambda p: p.select(["final"]), lambda p: (p.preview, p.selection_loss)),
}


@pytest.mark.filterwarnings("ignore:The covariance", "ignore:The clean and corrupt logit differences")
@pytest.mark.parametrize("name", PANELS)
def test_panel_reruns_on_a_remote_model_come_from_the_cache(name, ndif, remote_model, local_model):
    """Run and a second action (drill-down, interpolation, frozen selection), twice: the repeat sends no job
    and shows the same results, which are the local model's."""
    build, second, shown = PANELS[name]
    panels = [build(remote_model), build(remote_model), build(local_model)]
    jobs, results = [], []
    for panel in panels:
        panel.background = False
        before = ndif.stats()["requests"]
        panel.run()
        second(panel)
        assert panel.status_text.startswith("Done"), panel.status_text
        jobs.append(ndif.stats()["requests"] - before)
        results.append(shown(panel))
    assert jobs[0] >= 2 and jobs[1:] == [0, 0], jobs
    assert remote.RESULTS.hits >= 2 and len(remote.RESULTS) >= 2
    assert all(r is not None for r in results[0])
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


@pytest.mark.filterwarnings("ignore:The covariance", "ignore:The clean and corrupt logit differences")
@pytest.mark.parametrize("name", PANELS)
def test_panel_reruns_on_a_local_model_run_again(name, local_model, monkeypatch):
    """Local models are never cached: each panel's run calls its engine again."""
    import importlib

    remote.RESULTS.clear()
    build, second, _ = PANELS[name]
    module = importlib.import_module(f"workbench.widgets.{name}")
    engine = {"patching": "sweep", "plateau": "probe", "lnfree": "preview"}[name]
    real, calls = getattr(module, engine), []
    monkeypatch.setattr(module, engine, lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        panel = build(local_model)
        panel.background = False
        panel.run()
        second(panel)
        assert panel.status_text.startswith("Done"), panel.status_text
    assert len(remote.RESULTS) == 0 and remote.RESULTS.hits == 0
    assert len(calls) == (4 if name == "patching" else 2), calls  # patching: the sweep and the drill-down


# -- every engine, unchanged, through the dry run and through (mock) NDIF ------------------------------------
CLEAN = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Mary gave a drink to"
ANSWERS = (" Mary", " John")
DOCS = [
    "When Mary and John went to the store , John gave a drink to Mary . " * 3,
    "The capital of France is Paris . Then Tom and Anna had fun at school . " * 3,
    "The cat sat on the mat . The dog ran quickly to the park after lunch . " * 3,
]


def _engine(module: str, name: str):
    return getattr(pytest.importorskip(module), name)


ENGINES = {
    "patching.sweep": lambda m: _engine("workbench.patching", "sweep")(
        m, CLEAN, CORRUPT, ANSWERS, progress=False
    ),
    "patching.sweep[z]": lambda m: _engine("workbench.patching", "sweep")(
        m, CLEAN, CORRUPT, ANSWERS, site="z", progress=False
    ),
    "patching.sweep[pattern,noising]": lambda m: _engine("workbench.patching", "sweep")(
        m, CLEAN, CORRUPT, ANSWERS, site="pattern", direction="noising", layers=[1], progress=False
    ),
    "patching.attribute": lambda m: _engine("workbench.patching", "attribute")(
        m, CLEAN, CORRUPT, ANSWERS, site="z", progress=False
    ),
    "plateau.reference_stats": lambda m: _engine("workbench.plateau", "reference_stats")(
        m, DOCS, layer=1, progress=False
    ),
    "plateau.probe": lambda m: _engine("workbench.plateau", "probe")(
        m, DOCS[:2], layer=1, n_directions=2, sizes=torch.linspace(0, 2, 5), progress=False
    ),
    "plateau.interpolate": lambda m: _engine("workbench.plateau", "interpolate")(
        m, DOCS[0], DOCS[1], n_steps=5, progress=False
    ),
    "lnfree.norm_statistics": lambda m: _engine("workbench.lnfree.calibration", "norm_statistics")(
        m, DOCS, seq_len=16, progress=False
    ),
    "lnfree.preview": lambda m: _engine("workbench.lnfree.preview", "preview")(
        m, DOCS, seq_len=16, progress=False
    ),
    "lnfree.evaluate_loss": lambda m: _engine("workbench.lnfree.evaluation", "evaluate_loss")(
        m, DOCS, seq_len=16, progress=False
    ),
    "lnfree.dla_exactness": lambda m: _engine("workbench.lnfree.evaluation", "dla_exactness")(
        m, DOCS, seq_len=16, progress=False
    ),
}


def assert_same(a, b, path: str = "result") -> None:
    """Results equal field by field (tensors to float32 rounding); provenance (time stamps) is not compared."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a).__name__ == type(b).__name__, path
        for f in dataclasses.fields(a):
            if f.name != "provenance":
                assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True), f"{path} differs"
        else:
            assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def local_results(local_model):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ENGINES[name](local_model)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def dry_model(tiny_dir):
    return load_model(tiny_dir, remote="local")


@pytest.mark.filterwarnings("ignore:The covariance", "ignore:The clean and corrupt logit differences")
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_dry_run_gives_the_local_numbers(engine, dry_model, local_results):
    with RemoteRunner() as runner:
        got = ENGINES[engine](dry_model)
    assert runner.submitted >= 1 and runner.last.state == "COMPLETED"
    assert_same(local_results(engine), got)


@pytest.mark.filterwarnings("ignore:The covariance", "ignore:The clean and corrupt logit differences")
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_on_ndif_gives_the_local_numbers(engine, ndif, remote_model, local_results):
    """Through the mock NDIF server: the real protocol, and a server without the workbench installed."""
    before = ndif.stats()["requests"]
    with RemoteRunner() as runner:
        got = ENGINES[engine](remote_model)
    assert runner.submitted >= 1 and ndif.stats()["requests"] == before + runner.submitted
    assert_same(local_results(engine), got)


@pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences")
def test_a_remote_sweep_is_one_job_unless_the_batch_size_splits_it(
    ndif, remote_model, local_model, monkeypatch
):
    """The patched rows ride in one batch with the clean and corrupt runs (no cache job, no activations sent);
    a smaller batch splits the rows into the jobs `remote_jobs` predicts, with the same numbers. The panel
    states that count before it runs."""
    from workbench.patching import sweep
    from workbench.patching.spec import PatchSpec
    from workbench.patching.sweep import remote_jobs

    sites = ["resid_pre", "attn_out", "resid_mid"]
    local = sweep(local_model, CLEAN, CORRUPT, ANSWERS, site=sites, progress=False)
    counts, results = [], []
    for batch_size in (None, 24):
        before = ndif.stats()["requests"]
        with RemoteRunner():
            results.append(
                sweep(
                    remote_model, CLEAN, CORRUPT, ANSWERS, site=sites, batch_size=batch_size, progress=False
                )
            )
        counts.append(ndif.stats()["requests"] - before)
    spec = PatchSpec.resolve(
        remote_model, CLEAN, CORRUPT, ANSWERS, site=sites, direction="denoising", layers=None, positions="each",
        heads=None, metric="logit_diff",
    )  # fmt: skip
    rows = 2 + (len(spec.groups) - len(spec.unchanged())) * remote_model.cfg.n_layers * len(sites)
    assert counts[0] == 1 and results[0].provenance.options["in_batch"], counts
    assert counts[1] == remote_jobs(remote_model, spec, Run(batch_size=24)) >= -(-rows // 24), counts
    for got in results:
        torch.testing.assert_close(got.raw, local.raw, atol=1e-5, rtol=1e-5)
    # pattern patching runs per layer (with a cache job first), and says so in the count
    pattern = PatchSpec.resolve(
        remote_model, CLEAN, CORRUPT, ANSWERS, site="pattern", direction="denoising", layers=None,
        positions="together", heads=None, metric="logit_diff",
    )  # fmt: skip
    assert remote_jobs(remote_model, pattern) == 1 + remote_model.cfg.n_layers
    panel = _patching_panel(remote_model)
    assert panel._cost(panel._sweep_kwargs()).endswith("; 1 NDIF job)")


def test_a_sweep_splits_a_job_the_server_cannot_hold(ndif, remote_model, local_model, monkeypatch):
    """Out of memory on the server is `JobTooLarge`; a sweep then sends the job's rows again as two jobs of half
    as many (down to one patched run, where it gives up and says so)."""
    import sys

    from workbench.errors import JobTooLarge
    from workbench.patching import sweep

    # (positions after the prompts' shared prefix: a patch inside it is copied from the corrupt run, never sent)
    kwargs = {"site": "resid_pre", "layers": [1], "positions": [10, -1], "progress": False}
    ndif.scenario(fail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB")
    before = ndif.stats()["requests"]
    with pytest.raises(JobTooLarge, match="out of memory.*with one patched run are the smallest job"):
        with RemoteRunner():
            sweep(remote_model, CLEAN, CORRUPT, ANSWERS, **kwargs)
    assert ndif.stats()["requests"] - before == 2  # the two-row job, then its first row alone
    ndif.scenario()
    engine = sys.modules["workbench.patching.sweep"]
    real, sizes = engine.job_logits, []

    def refuse_more_than_one_row(model, s, job, run=None):
        sizes.append(sum(len(unit.cells) for unit, _ in job))
        if sizes[-1] > 1:
            raise JobTooLarge("the server ran out of memory")
        return real(model, s, job, run)

    monkeypatch.setattr(engine, "job_logits", refuse_more_than_one_row)
    with RemoteRunner():
        got = sweep(remote_model, CLEAN, CORRUPT, ANSWERS, site=["resid_pre", "mlp_out"], progress=False)
    want = sweep(local_model, CLEAN, CORRUPT, ANSWERS, site=["resid_pre", "mlp_out"], progress=False)
    torch.testing.assert_close(got.raw, want.raw, atol=1e-5, rtol=1e-5)
    # runs patched inside the prompts' shared prefix are the corrupt run: copied, never sent
    copied = got.provenance.options["unchanged_cells"] * 2 * remote_model.cfg.n_layers
    assert copied > 0 and sizes[0] > 1
    assert got.provenance.options["jobs"] == sizes.count(1) == got.raw[0].numel() - copied


@pytest.fixture(scope="module")
def remote_model_bf16(tiny_dir_bf16):
    return load_model(tiny_dir_bf16, remote=True)


@pytest.mark.filterwarnings("ignore:The covariance", "ignore:The clean and corrupt logit differences")
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_runs_on_a_bfloat16_server(engine, ndif, remote_model_bf16):
    """NDIF serves large models in bfloat16 while the client's (meta) model says float32: tensors an engine
    brings into a trace must take the dtype of the activation they meet."""
    with RemoteRunner() as runner:
        ENGINES[engine](remote_model_bf16)
    assert runner.last.state == "COMPLETED"


@pytest.mark.filterwarnings("ignore:The covariance")
@pytest.mark.parametrize("engine", ["plateau.probe", "plateau.interpolate"])
def test_plateau_on_a_bfloat16_server_is_close_to_the_float32_run(
    engine, ndif, remote_model_bf16, local_results
):
    """The perturbed rows and the skipped blocks' residual are cast on the server, to bfloat16: the measured
    changes stay within bfloat16 rounding of the local float32 ones."""
    with RemoteRunner():
        got = ENGINES[engine](remote_model_bf16)
    want = local_results(engine)
    for field in ("kl", "l2"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.allclose(a, b, rtol=0.05, atol=2e-3), f"{field}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("where", ["ndif", "dry run"])
def test_fine_tuning_says_it_is_local_only(where, remote_model, dry_model):
    from workbench.errors import UnsupportedModelError

    finetune = _engine("workbench.lnfree.finetune", "finetune")
    model = remote_model if where == "ndif" else dry_model
    with pytest.raises(UnsupportedModelError, match="local model only"):
        finetune(model, DOCS, "smoke", progress=False)


# -- results that must not be lost, and what a rerun resends ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResidResult(Result):
    """A result (so the cache writes it to disk) holding `resid`'s tensor."""

    value: torch.Tensor


def resid_result(model, tokens, layer: int):
    return ResidResult(resid(model, tokens, layer))


def test_an_unwritable_cache_folder_keeps_the_completed_result(ndif, remote_model, tokens, tmp_path):
    (tmp_path / "file").write_text("")
    runner = RemoteRunner(cache=ResultCache(directory=tmp_path / "file" / "cache"))
    before = ndif.stats()["requests"]
    with pytest.warns(CacheWriteWarning, match="kept in memory"):
        first = runner.run(resid_result, remote_model, tokens, 1)
    again = runner.run(resid_result, remote_model, tokens, 1)
    assert torch.equal(first.value, again.value) and ndif.stats()["requests"] == before + 1


def test_a_half_written_cache_file_is_sent_again_and_replaced(ndif, remote_model, tokens, tmp_path):
    RemoteRunner(cache=ResultCache(directory=tmp_path)).run(resid_result, remote_model, tokens, 1)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    before = ndif.stats()["requests"]
    fresh = RemoteRunner(cache=ResultCache(directory=tmp_path))  # a new kernel
    result = fresh.run(resid_result, remote_model, tokens, 1)
    assert ndif.stats()["requests"] == before + 1 and result.value.shape[1] == tokens.shape[1]
    RemoteRunner(cache=ResultCache(directory=tmp_path)).run(resid_result, remote_model, tokens, 1)
    assert ndif.stats()["requests"] == before + 1  # the replaced file is read back


def test_after_a_dropped_connection_the_rerun_sends_every_job_as_the_message_says(ndif, remote_model, tokens):
    ndif.scenario(disconnect_after="RUNNING")
    runner = RemoteRunner()
    with pytest.raises(RemoteError, match="sends all of its jobs again"):
        runner.run(ablate_and_compare, remote_model, tokens, 0)
    ndif.scenario()
    before = ndif.stats()["requests"]
    runner.run(ablate_and_compare, remote_model, tokens, 0)
    assert ndif.stats()["requests"] == before + 2  # nothing of the failed call was kept


def test_jobs_have_a_default_timeout():
    assert DEFAULT_TIMEOUT == 1800 and RemoteRunner().timeout == DEFAULT_TIMEOUT
    assert inspect.signature(remote.submit).parameters["timeout"].default == DEFAULT_TIMEOUT


def test_a_plain_http_host_is_refused_unless_the_user_opts_in(ndif, remote_model, tokens, monkeypatch):
    from nnsight import CONFIG

    assert ndif.url.startswith("http://127.0.0.1")  # loopback: allowed (this mock)
    for ok in ("https://api.ndif.us", "http://localhost:5001", "http://[::1]:80"):
        assert check_host(ok) == ok
    monkeypatch.setattr(CONFIG.API, "HOST", "http://ndif.example.com")
    with pytest.raises(RemoteError, match="WORKBENCH_ALLOW_INSECURE_NDIF=1"):
        resid(remote_model, tokens, 0)
    monkeypatch.setenv("WORKBENCH_ALLOW_INSECURE_NDIF", "1")
    assert check_host("http://ndif.example.com") == "http://ndif.example.com"
