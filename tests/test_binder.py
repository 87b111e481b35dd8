"""The Binder set-up in binder/, checked without Docker.

repo2docker builds the image in this order: `pip install -r binder/requirements.txt` (the repository is not in
the image yet), copy the repository, run `binder/postBuild`, then start every session through `binder/start`.
These tests check each piece against the environment the test suite runs in:

- constraints.txt (what scripts/setup_env.sh installs) pins every dependency at the version installed here;
- requirements.txt pins every runtime dependency of pyproject.toml (and Voila) at exactly the version installed
  here, with torch as PyTorch's CPU build from its CPU wheel index;
- runtime.txt asks for this interpreter's Python;
- postBuild and start parse (`bash -n`), are executable, stop on errors; postBuild runs here (with `pip`
  replaced by a recorder) and leaves the server configuration where Jupyter reads it; start hands over to the
  server command with one torch thread;
- the server configuration names options that exist;
- the notebooks the Binder links open (the quickstart, the Voila dashboard), run as Binder runs them (full
  parameters), peak well under Binder's 2 GB.

What no test here can do: build the image (no Docker, and Docker Hub is unreachable from CI) or download
PyTorch's CPU wheel index (unreachable from CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import nbformat
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as _norm
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BINDER_MEMORY_LIMIT = 2 * 1024**3  # mybinder.org restarts the kernel above 2 GB
# JupyterLab's server and a browser-side margin share the 2 GB with the kernel; measured ~150 MB for the server
KERNEL_BUDGET = 1.5 * 1024**3
# the notebooks the Binder links open (README): the quickstart in JupyterLab and the Voila app
BINDER_ENTRY_POINTS = ["00_quickstart.ipynb", "dashboard.ipynb"]


def _requirements() -> tuple[list[str], dict[str, Requirement]]:
    """(pip options, {normalised name: requirement}) of binder/requirements.txt."""
    options, reqs = [], {}
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        req = Requirement(line)
        reqs[_norm(req.name)] = req
    return options, reqs


def _pinned(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"binder/requirements.txt: pin {req} with =="
    return specs[0].version


def test_requirements_pin_every_runtime_dependency_at_the_tested_version():
    _, reqs = _requirements()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_norm(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    needed["voila"] = Requirement("voila")  # the dashboard app
    missing = sorted(set(needed) - set(reqs))
    assert not missing, (
        f"binder/requirements.txt lacks {missing} (postBuild installs the project with --no-deps)"
    )
    for name, req in reqs.items():
        pin = _pinned(req)
        installed = version(req.name)
        if name == "torch":  # the local part (+cpu, +cu128) names the build; the release must match
            assert Version(pin).public == Version(installed).public, (
                f"torch: binder {pin}, tested {installed}"
            )
        else:
            assert pin == installed, (
                f"{req.name}: binder/requirements.txt pins {pin}, the tests run {installed}"
            )
        if name in needed:
            assert needed[name].specifier.contains(pin, prereleases=True), (
                f"{req.name}=={pin} does not satisfy pyproject.toml's {needed[name]}"
            )


def _lock() -> dict[str, str]:
    """{normalised name: version} of constraints.txt, the versions scripts/setup_env.sh installs on this Python."""
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[_norm(req.name)] = _pinned(req)
    return pins


def test_constraints_lock_every_dependency_at_the_tested_version():
    """A fresh `bash scripts/test.sh` installs exactly what these tests run on, whatever PyPI released since."""
    lock = _lock()
    if not lock:
        pytest.skip(f"constraints.txt pins versions for another Python than {sys.version.split()[0]}")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    unpinned = sorted({_norm(Requirement(d).name) for d in wanted} - set(lock) - {"torch"})
    assert not unpinned, f"constraints.txt lacks {unpinned}: run .venv/bin/python scripts/lock.py"
    assert "torch" not in lock, (
        "scripts/setup_env.sh chooses torch's build (CPU or CUDA); keep it out of the lock"
    )
    stale = {name: (pin, version(name)) for name, pin in lock.items() if version(name) != pin}
    assert not stale, f"constraints.txt vs installed {stale}: run .venv/bin/python scripts/lock.py"
    _, reqs = _requirements()
    differ = {n: (_pinned(r), lock[n]) for n, r in reqs.items() if n != "torch" and _pinned(r) != lock.get(n)}
    assert not differ, f"binder/requirements.txt vs constraints.txt: {differ}"


def test_torch_is_the_cpu_build_from_the_cpu_index():
    options, reqs = _requirements()
    assert Version(_pinned(reqs["torch"])).local == "cpu", "pin torch==X.Y.Z+cpu: PyPI's build pulls CUDA"
    indexes = [
        o.split(None, 1)[1].strip() for o in options if o.split()[0] in ("--extra-index-url", "--index-url")
    ]
    assert TORCH_CPU_INDEX in [i.rstrip("/") for i in indexes], (
        f"binder/requirements.txt needs {TORCH_CPU_INDEX}"
    )
    editable = [o for o in options if o.split()[0] in ("-e", "--editable")]
    assert not editable, f"{editable}: the repository is not in the image when requirements.txt is installed"


def test_runtime_is_the_tested_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime == f"python-{sys.version_info.major}.{sys.version_info.minor}", runtime
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(runtime.removeprefix("python-"))


@pytest.mark.parametrize("script", ["postBuild", "start"])
def test_scripts_parse_and_are_executable(script):
    path = BINDER / script
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n"), f"{script}: start with #!/bin/bash"
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert path.stat().st_mode & stat.S_IXUSR, f"chmod +x binder/{script}"
    tracked = subprocess.run(
        ["git", "ls-files", "-s", f"binder/{script}"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    if tracked:  # git keeps the executable bit that Binder's checkout needs
        assert tracked.startswith("100755"), f"git update-index --chmod=+x binder/{script}"
    if script == "postBuild":
        assert re.search(r"^set -e", text, re.M), (
            "postBuild must stop on errors (Binder ignores them otherwise)"
        )
    else:
        assert text.rstrip().endswith('exec "$@"'), 'start must end with exec "$@"'


def test_server_config_names_real_options():
    from voila.configuration import VoilaConfiguration

    config = json.loads((BINDER / "jupyter_server_config.json").read_text())
    known = {"VoilaConfiguration": VoilaConfiguration}
    for section, values in config.items():
        assert section in known, f"unexpected section {section}"
        traits = known[section].class_traits(config=True)
        for key in values:
            assert key in traits, f"{section}.{key} is not an option of Voila"


def test_post_build_runs_and_configures_the_server(tmp_path):
    """postBuild end to end on a copy of the repository, with `pip` replaced by a recorder (installing is
    checked by the pins above; the real install needs the network)."""
    repo = tmp_path / "repo"
    shutil.copytree(BINDER, repo / "binder")
    shim = tmp_path / "bin"
    shim.mkdir()
    log = tmp_path / "pip.log"
    (shim / "pip").write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    (shim / "pip").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{shim}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),  # the project that `pip install -e .` would have installed
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(repo / "binder" / "postBuild")], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert log.read_text().split() == ["install", "--no-deps", "--no-cache-dir", "-e", "."]
    assert "demo model:" in done.stdout  # the bundled model loads offline
    server = home / ".jupyter" / "jupyter_server_config.json"
    assert json.loads(server.read_text()) == json.loads((BINDER / "jupyter_server_config.json").read_text())
    settings = (
        home / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    )
    assert json.loads(settings.read_text()) == {"fetchNews": "false"}


def test_start_limits_threads_and_execs_the_server_command():
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(BINDER / "start"), "bash", "-c", 'echo "threads=$OMP_NUM_THREADS"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "threads=1\n", done.stdout


WAIT_FOR_PANELS = """
import gc
import time

from workbench.widgets.base import Panel


def _panels():
    return [o for o in gc.get_objects() if isinstance(o, Panel)]


def _started():
    # a panel that waits for a click (the head views inside the patching explorer) has never started a run
    return [p for p in _panels() if p._thread is not None or p.result is not None]


def _settled(p):
    return not p.busy and (p.result is not None or "wb-error" in p.status.value)


deadline = time.monotonic() + 600
while not (len(_started()) >= 3 and all(_settled(p) for p in _started())) and time.monotonic() < deadline:
    time.sleep(0.5)
missing = [f"{type(p).__name__}: {p.status_text}" for p in _started() if p.result is None]
assert len(_started()) >= 3 and not missing, f"panels without a picture: {missing}"
"""


def _peak_rss(pid: int) -> int:
    """Peak resident memory (bytes) of a live process: VmHWM, the kernel's own high-water mark."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc (Linux)")
@pytest.mark.parametrize("name", BINDER_ENTRY_POINTS)
def test_binder_notebook_fits_binder_memory(name):
    """A notebook a Binder link opens, run as Binder runs it (full parameters): the kernel's peak memory stays
    well under 2 GB."""
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    # the panels compute in background threads: a last cell waits until every panel has drawn its picture
    nb.cells.append(nbformat.v4.new_code_cell(WAIT_FOR_PANELS))
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with client.setup_kernel(env=env):
        pid = client.km.provisioner.pid
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        peak = _peak_rss(pid)
    report = {"peak_rss_mb": round(peak / 2**20), "seconds": round(time.perf_counter() - started, 1)}
    out = ROOT / "test-artifacts" / f"memory-{path.stem}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report))
    print(f"{name} kernel: {report}")
    assert peak < KERNEL_BUDGET, f"{name}: the kernel peaked at {peak / 2**20:.0f} MB (Binder's limit: 2 GB)"
