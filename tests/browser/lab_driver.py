"""Driving JupyterLab and Voila pages in headless Chromium: the server handle, console-error collection,
notebook generation, "Run All", and plotly clicks at a data point's screen position."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
# Debian's chromium (scripts/test.sh installs it); $CHROMIUM names another Chromium build
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",  # runs as root in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 2000}  # tall, so a whole panel fits in one screenshot
# The machine is shared and has 2 cores: a notebook's first run imports torch and loads the model in a new kernel.
SLOW_MS = 240_000
STEP_MS = 120_000

# Console messages that are not failures of ours; each entry says why it is harmless.
BENIGN_CONSOLE: list[re.Pattern] = []

# The code a test notebook starts with: the bundled demo model, as the tutorials use it.
LOAD_DEMO = "from workbench.models import load_model\n\nmodel = load_model('demo')"


# -- servers ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not come up in {timeout:.0f} s; see {log}")


def serve(command: list[str], env: dict, log: Path, ready_url: str):
    """Start a server process (output to `log`) and wait until `ready_url` answers; yields the process."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(ready_url, proc, log, timeout=300)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def bare_env(home: Path) -> dict:
    """The environment `scripts/lab.sh` leaves (its .venv first on PATH), with no user configuration."""
    for d in ("config", "runtime", "settings", "workspaces"):
        (home / d).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@dataclass
class LabServer:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def link(self, path: str) -> str:
        """`path` below the server root (the repository) -> URL with the token."""
        sep = "&" if "?" in path else "?"
        return f"{self.url}/{path}{sep}token={self.token}"

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the server process (MB, VmHWM from /proc): its share of Binder's 2 GB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


@dataclass
class Console:
    """Errors a page logged: console.error messages and uncaught exceptions (minus `BENIGN_CONSOLE`)."""

    messages: list[str] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", lambda m: m.type == "error" and self._add(f"console.error: {m.text}"))
        page.on("pageerror", lambda e: self._add(f"page error: {e}"))
        page.on("requestfailed", lambda r: self._add(f"request failed: {r.url} ({r.failure})"))

    def _add(self, text: str) -> None:
        if not any(p.search(text) for p in BENIGN_CONSOLE):
            self.messages.append(text)

    def check(self) -> None:
        assert not self.messages, "the browser reported errors:\n" + "\n".join(self.messages)


# Voila's page template loads Font Awesome (icons) and MathJax 2 from public CDNs. The test machine has no
# internet, while Binder has: these requests are answered locally (an empty style sheet; a MathJax that typesets
# nothing), so the page loads without network errors; button icons are missing from the screenshots. Any other
# request that leaves the test server is an error.
FONT_AWESOME = re.compile(r"^https://cdn\.jsdelivr\.net/npm/@fortawesome/fontawesome-free@[^/]+/css/")
MATHJAX = re.compile(r"^https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/")
MATHJAX_STUB = """window.MathJax = {
  Hub: {config: {}, Config() {}, Configured() {}, Queue() {}, Register: {StartupHook() {}}},
  Ajax: {}, InputJax: {TeX: {resetEquationNumbers() {}}}
};"""


def new_page(browser, console: Console):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(STEP_MS)
    console.attach(page)

    def outside(route):
        url = route.request.url
        if FONT_AWESOME.match(url):
            route.fulfill(status=200, body="", content_type="text/css")
        elif MATHJAX.match(url):
            route.fulfill(status=200, body=MATHJAX_STUB, content_type="text/javascript")
        else:
            console.messages.append(f"request outside the test server: {url}")
            route.abort()

    page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), outside)
    return page


def write_notebook(path: Path, cells: list[str], title: str) -> Path:
    """A small notebook of code cells (after a markdown title) for the browser to run."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}")] + [nbformat.v4.new_code_cell(c) for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def wait_visible(page, locator, name: str, timeout: float = SLOW_MS) -> None:
    """Wait for `locator`; on a timeout save a screenshot `<name>-timeout.png` of the whole page first."""
    try:
        locator.first.wait_for(state="visible", timeout=timeout)
    except Exception:
        screenshot(page, f"{name}-timeout")
        raise


def open_and_run(page, lab: LabServer, path: Path) -> None:
    """Open a notebook (a path inside the repository) in Lab, and run its code cells one by one as a user does
    (select, Ctrl+Enter), each to completion. A cell that raises fails the test with its traceback.

    Lab starts the notebook's kernel itself (the settings in conftest.py skip its kernel dialog). A kernel
    started beforehand through the REST API is not used: Lab may replace it with a new one after connecting,
    which loses requests sent in between."""
    rel = path.resolve().relative_to(ROOT).as_posix()
    page.goto(lab.link(f"lab/tree/{rel}") + "&reset")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=SLOW_MS)
    import nbformat

    n_code = sum(c.cell_type == "code" for c in nbformat.read(path, as_version=4).cells)
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    for i in range(n_code):
        cells.nth(i).wait_for(state="visible")  # Lab may still be adding cells to the page
        run_cell(page, cells.nth(i), name=f"{path.stem}-cell{i}")


@contextlib.contextmanager
def notebook_page(browser, lab: LabServer, path: Path, ready, name: str):
    """A page with the notebook at `path` opened in Lab and run, once `ready(page)` (a locator) is visible;
    yields (page, console) and closes the page and the kernels afterwards."""
    console = Console()
    page = new_page(browser, console)
    try:
        open_and_run(page, lab, path)
        wait_visible(page, ready(page), name)
        yield page, console
    finally:
        page.close()
        shutdown_kernels(lab)


def run_cell(page, cell, name: str) -> None:
    """Select `cell`, press Ctrl+Enter (run in place) and wait until its prompt shows an execution count; fail with the
    traceback if the cell raised.

    A prompt still blank ("[ ]", not "[*]") 30 s after Ctrl+Enter means the request never reached the kernel
    (Lab drops it when the kernel connection is still settling, which a busy machine makes likely): it is sent
    once more.
    """
    prompt = cell.locator(".jp-InputArea-prompt")
    for blank_limit in (30, None):
        prompt.click()
        page.keyboard.press("Control+Enter")
        state = _wait_for_count(page, prompt, blank_limit)
        if state != "blank":
            break
    if state != "done":
        screenshot(page, f"{name}-{state}")
        raise AssertionError(f"{name}: the cell did not finish ({state}, prompt {prompt.text_content()!r})")
    traceback = cell.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
    if traceback.count():
        screenshot(page, f"{name}-error")
        raise AssertionError(f"{name} raised:\n{traceback.first.inner_text()}")


def _wait_for_count(page, prompt, blank_limit: float | None) -> str:
    """Poll a cell prompt: "done" once it shows "[n]", "blank" if it stayed empty for `blank_limit` s,
    "timeout" after SLOW_MS."""
    start = time.monotonic()
    while True:
        text = prompt.text_content() or ""
        if re.search(r"\[\d+\]", text):
            return "done"
        elapsed = time.monotonic() - start
        if blank_limit is not None and "*" not in text and elapsed > blank_limit:
            return "blank"
        if elapsed > SLOW_MS / 1000:
            return "timeout"
        page.wait_for_timeout(250)


def shutdown_kernels(lab: LabServer) -> None:
    """Free the memory of every kernel the server runs (tests open one notebook each)."""
    req = urllib.request.Request(f"{lab.url}/api/kernels?token={lab.token}")
    for kernel in json.loads(urllib.request.urlopen(req, timeout=10).read()):
        urllib.request.urlopen(
            urllib.request.Request(
                f"{lab.url}/api/kernels/{kernel['id']}?token={lab.token}", method="DELETE"
            ),
            timeout=30,
        )


def click_plot_point(page, plot, x, y, axis: str = "") -> None:
    """Click the data point (x, y) of a plotly figure, as a user's mouse does.

    `plot` is a locator of the `.js-plotly-plot` element; `axis` selects the subplot ("" for xaxis/yaxis, "2" for
    xaxis2/yaxis2). Category axes take the category label. The position comes from plotly's own axis mapping,
    and the click is dispatched at that screen point, over the drag layer that receives real clicks.
    """
    box = plot.evaluate(
        """(gd, [x, y, axis]) => {
            const xa = gd._fullLayout['xaxis' + axis], ya = gd._fullLayout['yaxis' + axis];
            const r = gd.getBoundingClientRect();
            return {x: r.left + xa._offset + xa.d2p(x), y: r.top + ya._offset + ya.d2p(y)};
        }""",
        [x, y, axis],
    )
    page.mouse.move(box["x"], box["y"])
    page.mouse.click(box["x"], box["y"])


def select_containing(select, text: str) -> str:
    """Pick the option of an ipywidgets Dropdown (`select` locates its <select>) whose label contains `text`."""
    labels = select.locator("option").all_text_contents()
    label = next((o for o in labels if text in o), None)
    assert label is not None, f"no option containing {text!r} among {labels}"
    select.select_option(label=label)
    return label


def slide(page, slider, value: int) -> None:
    """Move an ipywidgets IntSlider (`slider` locates the widget) to `value` with the keyboard, one step per key
    press, as a user does; each press is confirmed by the readout before the next."""
    handle, readout = slider.locator(".noUi-handle"), slider.locator(".widget-readout")
    current = int(readout.text_content())
    key = "ArrowRight" if value > current else "ArrowLeft"
    handle.focus()
    while current != value:
        handle.press(key)
        current += 1 if value > current else -1
        expect_text(readout, str(current))


def expect_text(locator, text: str, timeout: float = STEP_MS) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_text(text, timeout=timeout)


def output_of(page, selector: str):
    """The output area that holds the element `selector` (for element screenshots)."""
    return page.locator(".jp-OutputArea-output").filter(has=page.locator(selector))


def plot_texts(plot, selector: str) -> list[str]:
    """Texts of SVG elements in a plotly figure (e.g. ".xtick text", ".gtitle")."""
    return plot.locator(selector).all_text_contents()


def screenshot(target, name: str) -> Path:
    """Save a PNG of a page or element under test-artifacts/browser/."""
    path = ARTIFACTS / f"{name}.png"
    page = getattr(target, "page", target)
    page.mouse.move(0, 0)  # no hover label over the picture
    target.screenshot(path=str(path))
    return path


# -- what plotly rendered, against what the kernel built ------------------------------------------------------------
sys.path.insert(0, str(ROOT / "tests"))
from frontend_mirror import plain  # noqa: E402  (the same reading of plotly's array encodings)

DUMP_CELL = '''import json as _json
import plotly.io as _pio


def dump_figures(path, panel, **figures):
    """Write the kernel's figures (after the panel's run finished) for the browser test to compare."""
    panel.wait(600)
    with open(path, "w") as out:
        _json.dump({name: _json.loads(_pio.to_json(fig, validate=False)) for name, fig in figures.items()}, out)
'''

RENDERED_JS = """gd => {
    const plainify = v => {
        if (ArrayBuffer.isView(v)) return Array.from(v);
        if (Array.isArray(v)) return v.map(plainify);
        if (v && typeof v === 'object') {
            const out = {};
            for (const [k, x] of Object.entries(v)) if (!k.startsWith('_')) out[k] = plainify(x);
            return out;
        }
        return v;
    };
    const full = gd._fullLayout;
    const axes = {};
    for (const [k, ax] of Object.entries(full)) {
        if (!/^[xy]axis\\d*$/.test(k) || !ax || !ax._id) continue;
        if (!(full._subplots.xaxis.includes(ax._id) || full._subplots.yaxis.includes(ax._id))) continue;
        axes[k] = {range: ax.range.slice(), type: ax.type, categories: (ax._categories || []).slice(),
                   visible: ax.visible, ticks: (ax._vals || []).map(v => v.text)};
    }
    const texts = Array.from(gd.querySelectorAll('svg text')).map(t => t.textContent).filter(t => t.trim());
    return {data: plainify(gd.data).map(t => { delete t.uid; return t; }), layout: plainify(gd.layout),
            axes, texts, width: gd.getBoundingClientRect().width};
}"""


def rendered(plot) -> dict:
    """What plotly.js holds and drew for a figure: its data and layout, each shown axis (range, type,
    categories) and every text of the SVG (titles, annotations, ticks, legend). NaN reads as None, as in the
    kernel's JSON."""
    view = plot.evaluate(RENDERED_JS)
    return {**view, "data": plain(view["data"]), "layout": plain(view["layout"])}


def rerun_cell(page, cell, name: str) -> None:
    """Run a cell that already ran, and wait for its new execution count."""
    prompt = cell.locator(".jp-InputArea-prompt")
    before = prompt.text_content()
    prompt.click()
    page.keyboard.press("Control+Enter")
    start = time.monotonic()
    while True:
        text = prompt.text_content() or ""
        if re.search(r"\[\d+\]", text) and text != before:
            break
        if time.monotonic() - start > SLOW_MS / 1000:
            screenshot(page, f"{name}-timeout")
            raise AssertionError(f"{name}: the cell did not run again ({text!r})")
        page.wait_for_timeout(200)
    traceback = cell.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
    if traceback.count():
        raise AssertionError(f"{name} raised:\n{traceback.first.inner_text()}")


def kernel_figures(page, path: Path, name: str) -> dict:
    """Rerun the notebook's last cell (a `dump_figures` call) and read the figures the kernel holds."""
    if path.exists():
        path.unlink()
    rerun_cell(page, page.locator(".jp-Notebook .jp-CodeCell").last, name)
    return {k: plain(v) for k, v in json.loads(path.read_text()).items()}


def _same(a, b, path="") -> list[str]:
    """Differences between a kernel value `a` and what plotly.js holds `b` (numbers to 1e-9 relative)."""
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return [f"{path}: {b!r} is not a dict"]
        return [d for k, v in a.items() for d in _same(v, b.get(k), f"{path}.{k}")]
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [f"{path}: {str(b)[:80]} (page) != {str(a)[:80]} (kernel)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if abs(a - b) <= 1e-9 * max(1.0, abs(a)) else [f"{path}: {b} (page) != {a} (kernel)"]
    return [] if a == b else [f"{path}: {str(b)[:80]!r} (page) != {str(a)[:80]!r} (kernel)"]


# top-level layout keys plotly.js writes into a figure's layout by itself (a FigureWidget's view sets its size)
PLOTLY_JS_LAYOUT = {"autosize", "width", "height", "xaxis", "yaxis"}


def figure_differences(page_view: dict, kernel: dict) -> list[str]:
    """How the page's figure differs from the kernel's: every trace and layout property the kernel set must be
    in the page with the same value; the page may hold no other layout part (a subplot, annotation, title or
    range of an earlier view); every shown axis must show all of its categories, and its set range if any."""
    diffs = []
    data, layout = kernel["data"], kernel.get("layout", {})
    page_layout = page_view["layout"]
    for name, axis in page_view["axes"].items():  # plotly.js turns autorange "reversed" into a falling range
        page_axis = page_layout.get(name, {})
        if layout.get(name, {}).get("autorange") == "reversed" and page_axis.get("autorange") is True:
            if axis["range"][0] > axis["range"][1]:
                page_axis["autorange"] = "reversed"
    if len(page_view["data"]) != len(data):
        diffs.append(f"{len(page_view['data'])} traces in the page, {len(data)} in the kernel")
    for i, (mine, theirs) in enumerate(zip(data, page_view["data"])):
        mine = {k: v for k, v in mine.items() if k != "uid"}
        diffs += _same(mine, theirs, f"data[{i}]")
    for key, value in layout.items():
        if key != "template":
            diffs += _same(value, page_view["layout"].get(key), f"layout.{key}")
    extra = set(page_view["layout"]) - set(layout) - PLOTLY_JS_LAYOUT
    diffs += [f"layout.{k} is in the page only: {str(page_view['layout'][k])[:80]}" for k in sorted(extra)]
    for name, axis in page_view["axes"].items():
        given = layout.get(name, {}).get("range")
        if given is not None:
            diffs += _same(given, axis["range"], f"{name}.range")
        elif axis["type"] == "category" and axis["categories"]:
            low, high = sorted(axis["range"])
            if low > -0.5 + 1e-6 or high < len(axis["categories"]) - 0.5 - 1e-6:
                diffs.append(f"{name} shows {axis['range']} of categories {axis['categories']}")
    return diffs


def kernel_strings(kernel: dict) -> str:
    """Every string of a kernel figure, joined (the texts a rendered view may show)."""
    out = []

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk({k: v for k, v in kernel.get("layout", {}).items() if k != "template"})
    walk(kernel["data"])
    return "\n".join(out).replace("<br>", "\n")


def stale_texts(before: list[str], after: list[str], kernel_after: dict) -> list[str]:
    """Texts of the new view that were in the old view and that the new view's figure does not contain: a
    title, label or annotation of the old view surviving the change (tick numbers excepted)."""

    def squeeze(text: str) -> str:
        # an SVG text joins the lines of a "<br>" title without a separator (or with a zero-width space), and
        # shows "<sub>", "<b>", ... as styles, not as text
        return re.sub(r"\s+|\u200b|</?(br|sub|sup|b|i|em|span)\b[^>]*>", "", text)

    strings = squeeze(kernel_strings(kernel_after))
    numeric = re.compile(r"^[−\-+]?[\d.,]+(e[−\-+]?\d+)?[kMGµmn%]?$")
    return [t for t in after if t in before and not numeric.match(t.strip()) and squeeze(t) not in strings]


def expect_page_shows(page, plot, kernel: dict, name: str, timeout: float = STEP_MS) -> dict:
    """Wait until the page's figure equals the kernel's (`figure_differences` empty); returns what it shows."""
    start = time.monotonic()
    while True:
        view = rendered(plot)
        diffs = figure_differences(view, kernel)
        if not diffs:
            return view
        if time.monotonic() - start > timeout / 1000:
            screenshot(page, f"{name}-differs")
            raise AssertionError(
                f"{name}: the page shows another figure than the kernel's:\n" + "\n".join(diffs[:20])
            )
        page.wait_for_timeout(300)


def no_horizontal_scroll(page, selector: str) -> list[str]:
    """Elements matching `selector` whose content is wider than they are (a horizontal scrollbar, or cut
    content)."""
    return page.locator(selector).evaluate_all(
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className + ' ' + e.scrollWidth + '>' + e.clientWidth)"
    )
