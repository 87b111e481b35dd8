"""Driving JupyterLab and Voila pages in headless Chromium: the server handle, console-error collection,
notebook generation, "Run All", and plotly clicks at a data point's screen position."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
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
