"""JupyterLab as `scripts/lab.sh` starts it for a new user (no user settings): the quickstart opens, and no
"official Jupyter news" question covers it. Runs only where the environment is current (lab.sh would install
otherwise, and tests never install)."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from lab_driver import ARTIFACTS, ROOT, SLOW_MS, Console, bare_env, free_port, new_page, screenshot, serve

pytestmark = pytest.mark.browser


def _environment_is_current() -> bool:
    """scripts/setup_env.sh's own check: the stamp of the last install matches the files it installs from."""
    files = ["pyproject.toml", "constraints.txt", "scripts/setup_env.sh"]
    fingerprint = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()[:16]
    stamps = [ROOT / ".venv" / ".installed", ROOT / ".venv" / ".installed-test"]  # (the test set-up suffices)
    return any(s.exists() and s.read_text().strip() == fingerprint for s in stamps)


@pytest.fixture(scope="module")
def lab_sh(chromium, tmp_path_factory):
    if not _environment_is_current():
        pytest.skip(
            "the environment is not current: run `bash scripts/setup_env.sh` (this test does not install)"
        )
    token, port = secrets.token_hex(16), free_port()
    env = bare_env(tmp_path_factory.mktemp("lab-sh"))
    command = [
        "bash", "scripts/lab.sh", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in serve(command, env, ARTIFACTS / "lab-sh-server.log", f"{url}/api/status?token={token}"):
        yield url, token


def test_lab_opens_the_quickstart_without_the_news_question(lab_sh, chromium):
    url, token = lab_sh
    console = Console()
    page = new_page(chromium, console)
    try:
        page.goto(f"{url}/lab/tree/notebooks/00_quickstart.ipynb?token={token}", timeout=SLOW_MS)
        notebook = page.locator(".jp-Notebook").first
        notebook.wait_for(state="visible", timeout=SLOW_MS)
        # the rendered heading (the hidden tab title and the cell's hidden source also say "Quickstart")
        heading = notebook.locator(".jp-RenderedMarkdown h1", has_text="Quickstart: the workbench")
        heading.first.wait_for(state="visible", timeout=SLOW_MS)
        page.wait_for_timeout(15_000)  # the question appears a few seconds after start
        assert not page.get_by_text("official Jupyter news").count(), "JupyterLab asks about its news"
        screenshot(page, "lab-sh-quickstart")
    finally:
        page.close()
