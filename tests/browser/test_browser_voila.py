"""notebooks/dashboard.ipynb as a Voila app, at the URL a Binder link opens (/voila/render/...): the three panels
appear in their tabs and each draws its first picture; moving a slider and clicking a heatmap cell redraw."""

from __future__ import annotations

import pytest
from lab_driver import (
    ROOT,
    SLOW_MS,
    Console,
    click_plot_point,
    new_page,
    plot_texts,
    screenshot,
    shutdown_kernels,
    slide,
    wait_visible,
)

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

DASHBOARD = ROOT / "notebooks" / "dashboard.ipynb"
TABS = ["Activation patching", "LayerNorm preview", "Activation plateaus"]
# each panel's figure and the words its title starts with once a result is drawn
FIGURES = {
    TABS[0]: (".wb-patching-figure", "Activation patching"),
    TABS[1]: (".wb-lnfree-figure", "zero-shot LayerNorm removal preview"),
    TABS[2]: (".wb-plateau-figure", "Response to perturbations"),
}


@pytest.fixture(scope="module")
def app(chromium, lab):
    """The dashboard rendered by Voila; yields (page, console)."""
    console = Console()
    page = new_page(chromium, console)
    page.goto(lab.link(f"voila/render/{DASHBOARD.relative_to(ROOT).as_posix()}"))
    wait_visible(page, drawn(page, TABS[0]), "voila-0")
    yield page, console
    page.close()
    shutdown_kernels(lab)


def drawn(page, tab: str):
    """The tab's figure title, once it shows a result (an empty figure has axes but no title)."""
    selector, words = FIGURES[tab]
    return page.locator(f".wb-dashboard .js-plotly-plot{selector} .gtitle").filter(has_text=words)


def show_tab(page, title: str) -> None:
    page.locator(".wb-dashboard .lm-TabBar-tab", has_text=title).click()


def test_header_and_three_tabs(app):
    page, console = app
    expect(page.locator("h1").first).to_contain_text("dashboard")
    labels = page.locator(".wb-dashboard .lm-TabBar-tabLabel").all_text_contents()
    assert labels == TABS
    # every label is shown whole (the tab bar cuts long titles)
    assert page.locator(".wb-dashboard .lm-TabBar-tabLabel").evaluate_all(
        "els => els.every(e => e.scrollWidth <= e.clientWidth)"
    ), labels
    assert not page.locator(".jp-OutputArea-output pre").filter(has_text="Traceback").count()
    screenshot(page, "voila-1-patching-tab")
    console.check()


def test_every_panel_draws_its_first_picture(app):
    page, console = app
    for tab in TABS[1:]:
        show_tab(page, tab)
        wait_visible(page, drawn(page, tab), f"voila-{tab}")
    expect(page.locator(".wb-dashboard .wb-status.wb-ok")).to_have_count(3, timeout=SLOW_MS)
    assert not page.locator(".wb-dashboard .wb-status.wb-error").count()
    screenshot(page, "voila-3-plateau-tab")
    show_tab(page, TABS[1])
    screenshot(page, "voila-2-lnfree-tab")
    console.check()


def test_slider_redraws_the_layernorm_preview(app):
    page, console = app
    show_tab(page, TABS[1])
    slide(page, page.locator(".wb-lnfree-preset"), 2)
    expect(drawn(page, TABS[1])).to_contain_text("2 norms frozen together", timeout=SLOW_MS)
    console.check()


def test_clicking_a_patching_cell_draws_the_drill_down(app):
    page, console = app
    show_tab(page, TABS[0])
    heatmap = page.locator(".js-plotly-plot.wb-patching-figure")
    target = next(label for label in plot_texts(heatmap, ".xtick text") if "/" in label)
    layer = max(plot_texts(heatmap, ".ytick text"))
    click_plot_point(page, heatmap, target, layer)
    drill = page.locator(".js-plotly-plot.wb-patching-heads")
    expect(drill.locator(".gtitle")).to_contain_text(f"layer {layer[1:]}, {target}", timeout=SLOW_MS)
    screenshot(page, "voila-4-drill-down")
    console.check()
