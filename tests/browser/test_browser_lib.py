"""InteractionGraph in real JupyterLab (the LIB authors' mod-add checkpoint, ../shared/data/lib): run, click a node
for its profile and the dot on an edge for its scatter, move the weight and nodes sliders, show the constant node
and the communities, switch the basis to PCA, show the code. After each change the page shows exactly the
kernel's graph and profile, and no text of the previous view survives."""

from __future__ import annotations

import pytest
from lab_driver import (
    DUMP_CELL,
    SLOW_MS,
    click_plot_point,
    no_horizontal_scroll,
    notebook_page,
    output_of,
    screenshot,
    write_notebook,
)
from panel_views import Views, type_in_readout

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

GRAPH = ".js-plotly-plot.wb-lib-figure"
PROFILE = ".js-plotly-plot.wb-lib-profile"


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "lib-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file, lib_dir):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        "from workbench.lib import load_modadd, modadd_data\n"
        "from workbench.widgets import InteractionGraph\n\n"
        f"model = load_modadd(0, data_dir={str(lib_dir)!r})\n"
        "graph = InteractionGraph(model, modadd_data('train').subset(200), profile_data=modadd_data('all'))\n"
        "graph.run()\n"
        "graph",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, graph, graph=graph.figure, profile=graph.profile_figure)",
    ]
    path = write_notebook(test_notebooks / "lib.ipynb", cells, "InteractionGraph")
    with notebook_page(
        chromium, lab, path, lambda page: title(page).filter(has_text="interaction graph"), "lib-0"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
def views(figures_file):
    return Views("lib", figures_file, {"graph": GRAPH, "profile": PROFILE}, ".wb-lib-run", ".wb-lib-figure")


def title(page):
    return page.locator(GRAPH).locator(".gtitle")


def points(page, kind: str) -> list[list]:
    """[x, y, *customdata] of every point of the page's graph whose customdata starts with `kind`."""
    return page.locator(GRAPH).evaluate(
        """(gd, kind) => gd.data.flatMap(t => !t.customdata ? [] : Array.from(t.customdata).flatMap(
            (c, i) => c[0] === kind ? [[t.x[i], t.y[i], ...Array.from(c).slice(1)]] : []))""",
        kind,
    )


def test_first_run_draws_the_kernels_graph(panel, views):
    page, console = panel
    views.check(page, "lib")
    expect(title(page)).to_contain_text("LIB interaction graph: edges holding 90%")
    expect(page.locator(PROFILE)).to_contain_text("Click a node")
    expect(page.locator(".wb-lib-counts")).to_contain_text("Edges holding 90.0%")
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    console.check()


def test_clicking_a_node_then_an_edge_shows_their_profiles(panel, views):
    page, console = panel
    x, y, _, _ = next(p for p in points(page, "node") if p[2] == 1 and p[3] == 2)
    click_plot_point(page, page.locator(GRAPH), x, y)
    expect(page.locator(PROFILE).locator(".annotation-text").first).to_contain_text(
        "[2] over (x, y)", timeout=SLOW_MS
    )
    kernel, _ = views.check(page, "node")
    assert kernel["graph"]["layout"]["title"]["text"] == title(page).text_content()
    # an edge whose dot no node covers
    taken = [(round(p[0], 6), round(p[1], 6)) for p in points(page, "edge") + points(page, "node")]
    x, y, section, out_node, in_node = next(
        p for p in points(page, "edge") if taken.count((round(p[0], 6), round(p[1], 6))) == 1
    )
    click_plot_point(page, page.locator(GRAPH), x, y)
    expect(page.locator(PROFILE).locator(".annotation-text").first).to_contain_text(
        f"[{out_node}] against ", timeout=SLOW_MS
    )
    expect(page.locator(PROFILE).locator(".annotation-text").first).to_contain_text(f"[{in_node}]")
    views.check(page, "edge")
    console.check()


def test_view_controls_redraw_the_stored_graph(panel, views):
    page, console = panel
    type_in_readout(page.locator(".wb-lib-threshold"), "0.6")
    expect(title(page)).to_contain_text("edges holding 60%", timeout=SLOW_MS)
    expect(page.locator(".wb-lib-counts")).to_contain_text("Edges holding 60.0%")
    views.check(page, "weight-60")
    type_in_readout(page.locator(".wb-lib-nodes"), "5")
    expect(page.locator(".wb-lib-nodes .widget-readout")).to_have_text("5")
    views.check(page, "nodes-5")
    assert max(p[3] for p in points(page, "node")) <= 5
    page.locator(".wb-lib-const input").check()
    expect(page.locator(".wb-lib-const input")).to_be_checked()
    views.check(page, "constant-node")
    assert any(p[3] == 0 for p in points(page, "node"))  # the constant direction is node 0
    page.locator(".wb-lib-clusters input").check()
    views.check(page, "communities")
    console.check()


def test_basis_toggle_builds_pca_and_the_code_follows(panel, views):
    page, console = panel
    page.locator(".wb-lib-basis button", has_text="PCA").click()
    expect(title(page)).to_contain_text("PCA interaction graph", timeout=SLOW_MS)
    expect(page.locator(PROFILE)).to_contain_text("Click a node", timeout=SLOW_MS)
    views.check(page, "pca")
    headers = page.locator(".wb-lib-counts th").all_text_contents()
    assert "LIB" in headers and "PCA" in headers, headers
    run_bar = page.locator(".widget-hbox").filter(has=page.locator(".wb-lib-run"))
    run_bar.locator("button", has_text="Show code").click()
    code = page.locator(".wb-code").first
    expect(code).to_contain_text("basis='pca'")
    expect(code).to_contain_text("communities(graph")
    expect(code).to_contain_text("show_const=True")
    assert "feature_activations(" not in code.text_content()  # the clicked node belonged to the LIB graph
    screenshot(output_of(page, ".wb-lib-figure"), "lib-code")
    console.check()
