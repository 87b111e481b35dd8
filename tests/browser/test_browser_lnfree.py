"""LNRemovalPreview in real JupyterLab: run, move the "paper order up to step" slider, press the kind buttons. After
each change the page shows exactly the kernel's figure; every category of the bar chart (the final norm
included) is inside the shown range; the log axis of the scale distributions reads as whole numbers."""

from __future__ import annotations

import re

import pytest
from lab_driver import (
    DUMP_CELL,
    LOAD_DEMO,
    SLOW_MS,
    expect_page_shows,
    kernel_figures,
    no_horizontal_scroll,
    notebook_page,
    output_of,
    screenshot,
    slide,
    stale_texts,
    write_notebook,
)

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "lnfree-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        LOAD_DEMO,
        "from workbench.tasks import demo_corpus\n"
        "from workbench.widgets.lnfree import LNRemovalPreview\n\n"
        "panel = LNRemovalPreview(model, demo_corpus('validation', 16), n_rows=8, run=True)\n"
        "panel",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, panel, figure=panel.figure)",
    ]
    path = write_notebook(test_notebooks / "lnfree.ipynb", cells, "LNRemovalPreview")
    with notebook_page(
        chromium,
        lab,
        path,
        lambda page: title(page).filter(has_text="zero-shot LayerNorm removal preview"),
        "lnfree-0",
    ) as opened:
        yield opened


def figure(page):
    return page.locator(".js-plotly-plot.wb-lnfree-figure")


def title(page):
    return figure(page).locator(".gtitle")


class Views:
    def __init__(self):
        self.before: list[str] = []
        self.step = 0

    def check(self, page, figures_file, name: str) -> dict:
        self.step += 1
        label = f"lnfree-{self.step}-{name}"
        expect(page.locator(".wb-lnfree-run")).to_be_enabled(timeout=SLOW_MS)
        kernel = kernel_figures(page, figures_file, label)["figure"]
        shown = expect_page_shows(page, figure(page), kernel, label)
        stale = stale_texts(self.before, shown["texts"], kernel)
        assert not stale, f"{label}: texts of the previous view are still shown: {stale}"
        self.before = shown["texts"]
        screenshot(output_of(page, ".wb-lnfree-figure"), label)
        return shown


@pytest.fixture(scope="module")
def views():
    return Views()


def test_run_draws_the_four_preview_panels(panel, views, figures_file):
    page, console = panel
    shown = views.check(page, figures_file, "preview")
    subplot_titles = figure(page).locator(".annotation-text").all_text_contents()
    for expected in ("freezing one norm", "removal order (cumulative)", "per-token scale", "per-token error"):
        assert any(expected in t for t in subplot_titles), f"{expected!r} not among {subplot_titles}"
    assert not re.search(r"frozen", title(page).text_content())  # nothing chosen yet
    # the log axis of the scale distributions: every label a whole number (0.5, 1, 2), no bare "5, 2, 1"
    (ticks,) = [axis["ticks"] for axis in shown["axes"].values() if axis["type"] == "log"]
    assert ticks and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in ticks), ticks
    assert len(set(ticks)) == len(ticks), f"repeated log tick labels: {ticks}"
    assert "final" in shown["axes"]["xaxis"]["categories"]
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output")
    console.check()


def test_slider_freezes_a_prefix_of_the_paper_order(panel, views, figures_file):
    page, console = panel
    slide(page, page.locator(".wb-lnfree-preset"), 3)
    expect(page.locator(".wb-lnfree-sites option:checked")).to_have_text(["MLP 0", "MLP 1", "MLP 2"])
    expect(title(page)).to_contain_text("3 norms frozen together: loss", timeout=SLOW_MS)
    views.check(page, figures_file, "three-norms")
    # up to step 6 and back: the bar chart keeps every category in view, the final norm's bar included
    slide(page, page.locator(".wb-lnfree-preset"), 6)
    expect(title(page)).to_contain_text("6 norms frozen together: loss", timeout=SLOW_MS)
    shown = views.check(page, figures_file, "six-norms")
    assert "final" in shown["axes"]["xaxis"]["categories"]
    console.check()


def test_kind_buttons_and_clear(panel, views, figures_file):
    page, console = panel
    page.locator(".wb-lnfree-clear").click()
    expect(title(page)).not_to_contain_text("frozen", timeout=SLOW_MS)
    expect(page.locator(".wb-lnfree-preset .widget-readout")).to_have_text("0")
    views.check(page, figures_file, "cleared")
    page.locator(".wb-lnfree-kind-final").click()
    expect(title(page)).to_contain_text("1 norm frozen: loss", timeout=SLOW_MS)
    views.check(page, figures_file, "final-only")
    n_layers = (page.locator(".wb-lnfree-sites option").count() - 1) // 3
    page.locator(".wb-lnfree-kind-mlp").click()
    expect(title(page)).to_contain_text(f"{n_layers + 1} norms frozen together", timeout=SLOW_MS)
    views.check(page, figures_file, "mlp-and-final")
    console.check()
