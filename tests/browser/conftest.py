"""Fixtures for the browser tests: one JupyterLab server per session (it also serves Voila at /voila/render/,
as Binder does), one headless Chromium, and helpers that open a notebook, run it, drive widgets and collect
console errors.

Needs Debian's chromium at /usr/bin/chromium (`bash scripts/test.sh` installs it when missing) and Python
playwright; without them every test here is skipped with the reason. `playwright install` is never needed.
Screenshots go to test-artifacts/browser/ (gitignored), with the server's log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab_driver import ARTIFACTS, CHROME_ARGS, CHROMIUM, ROOT, LabServer, bare_env, free_port, serve, wait_for


def _write_settings(settings: Path) -> None:
    """Lab user settings for a quiet, deterministic UI."""
    files = {
        # without this a news toast covers part of every screenshot (--LabApp.news_url=None is not enough)
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
        # never write outputs back into the notebooks being tested; start the notebook's kernel without asking
        # (Lab asks which kernel to use when its kernel list loads late, as on a busy machine). Lab ignores a
        # whole settings file when one key is unknown, so each key goes to the plugin whose schema has it.
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        # every cell in the page at once (the default adds cells as they scroll into view)
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
            "autoStartDefaultKernel": True,
            "windowingMode": "none",
        },
    }
    for name, value in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> LabServer:
    """JupyterLab on 127.0.0.1 with a random token, rooted at the repository (Voila included)."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `bash scripts/test.sh` installs Debian's chromium (as root or with sudo); "
            "CHROMIUM=/path/to/chromium names another build"
        )
    pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("lab")
    _write_settings(home / "settings")
    # the server configuration Binder uses (binder/postBuild installs the same file); no other user config
    (home / "config").mkdir()
    shutil.copy(
        ROOT / "binder" / "jupyter_server_config.json", home / "config" / "jupyter_server_config.json"
    )
    token, port = secrets.token_hex(16), free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # a shared 2-core machine
    }
    log = ARTIFACTS / "lab-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={ROOT}",
                "--ServerApp.allow_root=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],  # fmt: skip
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LabServer(f"http://127.0.0.1:{port}", token, proc, log)
    try:
        wait_for(f"{server.url}/api/status?token={token}", proc, log)
        yield server
        if proc.poll() is None and Path("/proc").is_dir():
            (ARTIFACTS / "lab-server-peak-rss.txt").write_text(f"{server.peak_rss_mb():.0f} MB\n")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def chromium(lab):
    """Headless Debian chromium driven by playwright (started after the server, skipped with it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def test_notebooks() -> Path:
    """Where the browser tests write their generated notebooks (inside the Lab root, gitignored)."""
    path = ARTIFACTS / "notebooks"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="session")
def voila_app(tmp_path_factory) -> str:
    """The dashboard served by the command the README prints, `voila notebooks/dashboard.ipynb`, with Voila's
    default settings (no progressive rendering), from the environment `scripts/lab.sh` makes."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    voila = ROOT / ".venv" / "bin" / "voila"
    assert voila.exists(), "scripts/lab.sh's environment has no voila command"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = bare_env(tmp_path_factory.mktemp("voila"))
    command = ["voila", "notebooks/dashboard.ipynb", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    for _ in serve(command, env, ARTIFACTS / "voila-server.log", url + "/voila/static/voila.js"):
        yield url
