"""CircuitExplorer in real JupyterLab: run, move the threshold, click an edge for its exact value, rerun with
another method and direction, show the code. After each change the page shows exactly the kernel's edge graph
and faithfulness curve, and no text of the previous view survives."""

from __future__ import annotations

import re

import pytest
from lab_driver import (
    DUMP_CELL,
    LOAD_DEMO,
    SLOW_MS,
    click_plot_point,
    no_horizontal_scroll,
    notebook_page,
    output_of,
    screenshot,
    select_containing,
    write_notebook,
)
from panel_views import Views, type_in_readout

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
GRAPH = ".js-plotly-plot.wb-circuits-graph"
CURVE = ".js-plotly-plot.wb-circuits-curve"


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "circuits-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        LOAD_DEMO,
        "from workbench.widgets.circuits import CircuitExplorer\n\n"
        f"explorer = CircuitExplorer(model, [{CLEAN!r}], [{CORRUPT!r}], [(' Mary', ' John')])\n"
        "explorer.run()\n"
        "explorer",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, explorer, graph=explorer.graph_figure, "
        "curve=explorer.curve_figure)",
    ]
    path = write_notebook(test_notebooks / "circuits.ipynb", cells, "CircuitExplorer")
    with notebook_page(
        chromium, lab, path, lambda page: title(page).filter(has_text="edge scores"), "circuits-0"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
def views(figures_file):
    return Views(
        "circuits", figures_file, {"graph": GRAPH, "curve": CURVE}, ".wb-circuits-run", ".wb-circuits-graph"
    )


def title(page):
    return page.locator(GRAPH).locator(".gtitle")


def test_first_run_draws_the_kernels_graph_and_curve(panel, views):
    page, console = panel
    kernel, _ = views.check(page, "eap-noising")
    expect(title(page)).to_contain_text("EAP edge scores (noising)")
    expect(page.locator(".wb-circuits-summary")).to_contain_text("edges scored by EAP (noising)")
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    # the slider reads the threshold the title names
    readout = float(page.locator(".wb-circuits-threshold .widget-readout").text_content())
    named = float(re.search(r">= ([\d.e+-]+) of", kernel["graph"]["layout"]["title"]["text"]).group(1))
    assert abs(readout - named) <= 0.01 * named, (readout, named)
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    console.check()


def test_threshold_redraws_without_a_run(panel, views):
    page, console = panel
    before = len(edge_points(page))
    type_in_readout(page.locator(".wb-circuits-threshold"), "0.3")
    expect(title(page)).to_contain_text(">= 0.3 of", timeout=SLOW_MS)
    views.check(page, "threshold-0.3")
    assert 0 < len(edge_points(page)) <= before
    console.check()


def edge_points(page) -> list[list]:
    """[x, y, receiver, sender] of each midpoint marker of the "edges" trace the page shows."""
    return page.locator(GRAPH).evaluate(
        """gd => {
            const t = gd.data.find(t => t.name === 'edges');
            return t ? Array.from(t.x).map((x, i) => [x, t.y[i], ...Array.from(t.customdata[i])]) : [];
        }"""
    )


def test_clicking_an_edge_patches_it_exactly(panel, views):
    page, console = panel
    x, y, _, _ = edge_points(page)[0]
    click_plot_point(page, page.locator(GRAPH), x, y)
    edge = page.locator(".wb-circuits-edge")
    expect(edge).to_contain_text("exact patching", timeout=SLOW_MS)
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    kernel, _ = views.check(page, "edge")
    sender, receiver = edge.locator("b").text_content().split(" -> ")
    graph_text = " ".join(str(t.get("text", "")) for t in kernel["graph"]["data"])
    assert sender in graph_text and receiver in graph_text, (sender, receiver)
    console.check()


def test_method_and_direction_rerun_and_the_code_follows(panel, views):
    page, console = panel
    select_containing(page.locator(".wb-circuits-method select"), "EAP-IG")
    page.locator(".wb-circuits-steps input").fill("3")
    page.locator(".wb-circuits-steps input").press("Enter")
    page.locator(".wb-circuits-direction button", has_text="denoising").click()
    page.locator(".wb-circuits-run").click()
    expect(title(page)).to_contain_text("EAP-IG, 3 steps edge scores (denoising)", timeout=SLOW_MS)
    views.check(page, "eap-ig-denoising")
    expect(page.locator(".wb-circuits-summary")).to_contain_text("EAP-IG (denoising)")
    expect(page.locator(".wb-circuits-edge")).to_have_text("")  # the clicked edge belonged to the last run
    run_bar = page.locator(".widget-hbox").filter(has=page.locator(".wb-circuits-run"))
    run_bar.locator("button", has_text="Show code").click()
    code = page.locator(".wb-code").first
    expect(code).to_contain_text("method='eap-ig'")
    expect(code).to_contain_text("direction='denoising'")
    expect(code).to_contain_text("steps=3")
    assert "path_patch(" not in code.text_content()
    readout = float(page.locator(".wb-circuits-threshold .widget-readout").text_content())
    printed = float(re.search(r"scores\.plot\(threshold=([\d.e+-]+)\)", code.text_content()).group(1))
    assert abs(readout - printed) <= 0.01 * printed, (readout, printed)
    screenshot(output_of(page, ".wb-circuits-graph"), "circuits-code")
    console.check()
