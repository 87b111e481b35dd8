"""notebooks/dashboard.ipynb as a Voila app, as the README starts it (`voila notebooks/dashboard.ipynb`, Voila's
default settings: the page connects after every cell ran) and as a Binder link opens it (/voila/render/ on the
JupyterLab server, progressive rendering). In both: the three panels appear in their tabs, each draws its first
picture, and later changes redraw (a slider, two clicks on heatmap cells, a view button); the page has no
horizontal scrollbar. Screenshots of each tab are saved."""

from __future__ import annotations

import pytest
from lab_driver import (
    ROOT,
    SLOW_MS,
    Console,
    click_plot_point,
    new_page,
    no_horizontal_scroll,
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


@pytest.fixture(scope="module", params=["readme", "binder"])
def app(request, chromium):
    """The dashboard page; yields (page, console, name)."""
    name = request.param
    console = Console()
    page = new_page(chromium, console)
    if name == "readme":
        page.goto(request.getfixturevalue("voila_app"), timeout=SLOW_MS)
    else:
        lab = request.getfixturevalue("lab")
        page.goto(lab.link(f"voila/render/{DASHBOARD.relative_to(ROOT).as_posix()}"), timeout=SLOW_MS)
    wait_visible(page, drawn(page, TABS[0]), f"voila-{name}-0")
    yield page, console, name
    page.close()
    if name == "binder":
        shutdown_kernels(request.getfixturevalue("lab"))


def drawn(page, tab: str):
    """The tab's figure title, once it shows a result (an empty figure has axes but no title)."""
    selector, words = FIGURES[tab]
    return page.locator(f".wb-dashboard .js-plotly-plot{selector} .gtitle").filter(has_text=words)


def show_tab(page, title: str) -> None:
    page.locator(".wb-dashboard .lm-TabBar-tab", has_text=title).click()


def test_header_and_three_tabs(app):
    page, console, name = app
    expect(page.locator("h1").first).to_contain_text("dashboard")
    labels = page.locator(".wb-dashboard .lm-TabBar-tabLabel").all_text_contents()
    assert labels == TABS
    # every label is shown whole (the tab bar cuts long titles)
    assert page.locator(".wb-dashboard .lm-TabBar-tabLabel").evaluate_all(
        "els => els.every(e => e.scrollWidth <= e.clientWidth)"
    ), labels
    assert not page.locator(".jp-OutputArea-output pre").filter(has_text="Traceback").count()
    assert page.evaluate("document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth"), (
        "the page scrolls sideways"
    )
    screenshot(page, f"voila-{name}-1-patching-tab")
    console.check()


def test_every_panel_draws_its_first_picture(app):
    page, console, name = app
    for tab in TABS[1:]:
        show_tab(page, tab)
        wait_visible(page, drawn(page, tab), f"voila-{name}-{tab}")
    expect(page.locator(".wb-dashboard .wb-status.wb-ok")).to_have_count(3, timeout=SLOW_MS)
    assert not page.locator(".wb-dashboard .wb-status.wb-error").count()
    screenshot(page, f"voila-{name}-3-plateau-tab")
    show_tab(page, TABS[1])
    screenshot(page, f"voila-{name}-2-lnfree-tab")
    assert not no_horizontal_scroll(page, ".wb-dashboard .lm-TabPanel-stackedPanel, .wb-dashboard")
    console.check()


def test_slider_redraws_the_layernorm_preview(app):
    page, console, name = app
    show_tab(page, TABS[1])
    slide(page, page.locator(".wb-lnfree-preset"), 2)
    expect(drawn(page, TABS[1])).to_contain_text("2 norms frozen together", timeout=SLOW_MS)
    console.check()


def test_clicking_patching_cells_redraws_the_drill_down(app):
    page, console, name = app
    show_tab(page, TABS[0])
    heatmap = page.locator(".js-plotly-plot.wb-patching-figure")
    labels = plot_texts(heatmap, ".xtick text")
    target = next(label for label in labels if "/" in label)
    layers = sorted(plot_texts(heatmap, ".ytick text"))
    drill = page.locator(".js-plotly-plot.wb-patching-heads")
    click_plot_point(page, heatmap, target, layers[-1])
    expect(drill.locator(".gtitle")).to_contain_text(f"layer {layers[-1][1:]}, {target}", timeout=SLOW_MS)
    # a second figure update after the first: every figure of the page keeps receiving them
    click_plot_point(page, heatmap, labels[-1], layers[0])
    expect(drill.locator(".gtitle")).to_contain_text(f"layer {layers[0][1:]}, {labels[-1]}", timeout=SLOW_MS)
    screenshot(page, f"voila-{name}-4-drill-down")
    console.check()


def test_plateau_view_button_redraws(app):
    page, console, name = app
    show_tab(page, TABS[2])
    page.locator(".wb-plateau-view button", has_text="Plateau lengths").click()
    expect(page.locator(".wb-plateau-figure .gtitle")).to_contain_text("Plateau length", timeout=SLOW_MS)
    screenshot(page, f"voila-{name}-5-plateau-lengths")
    console.check()
