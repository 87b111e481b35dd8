"""PlateauProbe in real JupyterLab: run, type a setting, move the layer slider and rerun, click a curve to see
its tokens, switch the view."""

from __future__ import annotations

import pytest
from lab_driver import (
    LOAD_DEMO,
    SLOW_MS,
    click_plot_point,
    notebook_page,
    output_of,
    screenshot,
    slide,
    write_notebook,
)

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

PROMPT = "When Mary and John went to the store, John gave a drink to"
CELLS = [
    LOAD_DEMO,
    "from workbench.widgets.plateau import PlateauProbe\n\n"
    f"probe = PlateauProbe(model, {PROMPT!r}, layer=1)\n"
    "probe.run()\n"
    "probe",
]


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks):
    """The notebook opened in Lab and run; yields (page, console)."""
    path = write_notebook(test_notebooks / "plateau.ipynb", CELLS, "PlateauProbe")
    with notebook_page(
        chromium,
        lab,
        path,
        lambda page: title(page).filter(has_text="Response to perturbations"),
        "plateau-0",
    ) as opened:
        yield opened


def figure(page):
    return page.locator(".js-plotly-plot.wb-plateau-figure")


def title(page):
    return figure(page).locator(".gtitle")


def test_first_run_draws_response_curves_per_family(panel):
    page, console = panel
    expect(title(page)).to_contain_text("resid_pre 1")
    legend = figure(page).locator(".legendtext").all_text_contents()
    chosen = page.locator(".wb-plateau-families option:checked").all_text_contents()
    assert chosen and all(any(f in entry for entry in legend) for f in chosen), (chosen, legend)
    assert "perturbation size" in figure(page).locator(".g-xtitle").text_content()
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    screenshot(output_of(page, ".wb-plateau-figure"), "plateau-1-curves")
    console.check()


def test_typed_setting_and_layer_slider_rerun(panel):
    page, console = panel
    page.locator(".wb-plateau-directions input").fill("6")
    page.locator(".wb-plateau-directions input").press("Enter")
    slide(page, page.locator(".wb-plateau-layer"), 2)
    page.locator(".wb-plateau-run").click()
    expect(title(page)).to_contain_text("resid_pre 2", timeout=SLOW_MS)
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    # six directions per family: the legend says how many curves each median summarises
    legend = " ".join(figure(page).locator(".legendtext").all_text_contents())
    assert "median of 6" in legend, legend
    console.check()


def test_clicking_a_curve_shows_its_tokens(panel):
    page, console = panel
    # the highest point of any single curve: nothing is drawn above it, so the click lands on that curve
    x, y = figure(page).evaluate(
        """gd => {
            let best = null;
            for (const t of gd.data) {
                if (!t.meta || t.meta.role !== 'curves') continue;
                t.y.forEach((v, i) => { if (v !== null && (best === null || v > best[1])) best = [t.x[i], v]; });
            }
            return best;
        }"""
    )
    click_plot_point(page, figure(page), x, y)
    tokens = page.locator(".js-plotly-plot.wb-plateau-tokens")
    expect(tokens.locator(".gtitle")).to_contain_text("Predictions along", timeout=SLOW_MS)
    expect(page.locator(".wb-status")).to_contain_text("Tokens along")
    assert tokens.locator(".ytick text").count() > 0
    screenshot(output_of(page, ".wb-plateau-figure"), "plateau-2-tokens-along-a-curve")
    console.check()


def test_view_buttons_redraw_without_a_run(panel):
    page, console = panel
    page.locator(".wb-plateau-view button", has_text="Plateau lengths").click()
    expect(title(page)).to_contain_text("Plateau length", timeout=SLOW_MS)
    page.locator(".wb-plateau-view button", has_text="Curves").click()
    expect(title(page)).to_contain_text("Response to perturbations", timeout=SLOW_MS)
    console.check()
