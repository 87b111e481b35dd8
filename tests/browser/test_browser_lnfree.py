"""LNRemovalPreview in real JupyterLab: run, move the "paper order up to step" slider, press the kind buttons."""

from __future__ import annotations

import re

import pytest
from lab_driver import (
    LOAD_DEMO,
    SLOW_MS,
    notebook_page,
    output_of,
    screenshot,
    slide,
    write_notebook,
)

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

CELLS = [
    LOAD_DEMO,
    "from workbench.tasks import demo_corpus\n"
    "from workbench.widgets.lnfree import LNRemovalPreview\n\n"
    "panel = LNRemovalPreview(model, demo_corpus('validation', 16), n_rows=8, run=True)\n"
    "panel",
]


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks):
    """The notebook opened in Lab and run; yields (page, console)."""
    path = write_notebook(test_notebooks / "lnfree.ipynb", CELLS, "LNRemovalPreview")
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


def n_sites(page) -> int:
    return page.locator(".wb-lnfree-sites option").count()


def test_run_draws_the_four_preview_panels(panel):
    page, console = panel
    subplot_titles = figure(page).locator(".annotation-text").all_text_contents()
    for expected in ("freezing one norm", "removal order (cumulative)", "per-token scale", "per-token error"):
        assert any(expected in t for t in subplot_titles), f"{expected!r} not among {subplot_titles}"
    assert not re.search(r"frozen together", title(page).text_content())  # nothing chosen yet
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    screenshot(output_of(page, ".wb-lnfree-figure"), "lnfree-1-preview")
    console.check()


def test_slider_freezes_a_prefix_of_the_paper_order(panel):
    page, console = panel
    slide(page, page.locator(".wb-lnfree-preset"), 3)
    expect(page.locator(".wb-lnfree-preset .widget-readout")).to_have_text("3")
    # the kernel answers with the selection: the first three norms of the removal order
    expect(page.locator(".wb-lnfree-sites option:checked")).to_have_text(["MLP 0", "MLP 1", "MLP 2"])
    expect(title(page)).to_contain_text("3 norms frozen together: loss", timeout=SLOW_MS)
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    screenshot(output_of(page, ".wb-lnfree-figure"), "lnfree-2-three-norms-frozen")
    console.check()


def test_kind_buttons_and_clear(panel):
    page, console = panel
    page.locator(".wb-lnfree-clear").click()
    expect(title(page)).not_to_contain_text("frozen together", timeout=SLOW_MS)
    expect(page.locator(".wb-lnfree-preset .widget-readout")).to_have_text("0")
    page.locator(".wb-lnfree-kind-final").click()
    expect(title(page)).to_contain_text("1 norms frozen together", timeout=SLOW_MS)
    n_layers = (n_sites(page) - 1) // 3
    page.locator(".wb-lnfree-kind-mlp").click()
    expect(title(page)).to_contain_text(f"{n_layers + 1} norms frozen together", timeout=SLOW_MS)
    console.check()
