"""ToyModelExplorer in real JupyterLab (a small compressed-computation task): train, switch the mechanism views,
click a feature's curve, add a baseline and click a curve of the L/p-vs-p plot, run the σ sweep and click a
point, transplant, show the code. After each change the page shows exactly the kernel's four figures, and no
text of the previous view survives."""

from __future__ import annotations

import re

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
from panel_views import Views

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

FIGURES = {
    "training": ".js-plotly-plot.wb-toy-training-figure",
    "p": ".js-plotly-plot.wb-toy-p-figure",
    "sigma": ".js-plotly-plot.wb-toy-sigma-figure",
    "mechanism": ".js-plotly-plot.wb-toy-mechanism-figure",
}


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "toymodels-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        "from workbench.toymodels import ToyConfig\n"
        "from workbench.widgets import ToyModelExplorer\n\n"
        "config = ToyConfig(n_features=20, d_mlp=10, p=0.05, mixing='symmetric', sigma=0.05, steps=150)\n"
        "explorer = ToyModelExplorer(config, eval_points=4, n_samples=4000, n_workers=1, sweep_sigmas=(0.0, 0.05))\n"
        "explorer.train()\n"
        "explorer",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, explorer, training=explorer.figure, p=explorer.p_figure, "
        "sigma=explorer.sigma_figure, mechanism=explorer.mech_figure)",
    ]
    path = write_notebook(test_notebooks / "toymodels.ipynb", cells, "ToyModelExplorer")
    with notebook_page(
        chromium, lab, path, lambda page: title(page, "p").filter(has_text="loss per feature"), "toymodels-0"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
def views(figures_file):
    return Views("toymodels", figures_file, FIGURES, ".wb-toy-train", ".wb-toy-p-figure")


def plot(page, name: str):
    return page.locator(FIGURES[name])


def title(page, name: str):
    return plot(page, name).locator(".gtitle")


def highest(page, name: str, role: str) -> list:
    """[x, y, meta] of the highest point of any trace with meta.role `role`: nothing is drawn above it, so a
    click there lands on that trace."""
    return plot(page, name).evaluate(
        """(gd, role) => {
            let best = null;
            for (const t of gd.data) {
                if (!t.meta || t.meta.role !== role) continue;
                Array.from(t.y).forEach((v, i) => {
                    if (v !== null && !Number.isNaN(v) && (best === null || v > best[1])) best = [t.x[i], v, t.meta];
                });
            }
            return best;
        }""",
        role,
    )


def test_training_draws_every_figure(panel, views):
    page, console = panel
    kernel, _ = views.check(page, "trained")
    expect(title(page, "mechanism")).to_contain_text("sym σ=0.05 p=0.05")
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    assert kernel["sigma"]["data"] == []  # no sweep yet: an empty figure, nothing stale
    for name in FIGURES:  # each figure whole in its box: none cut off on the right
        drawn, room = plot(page, name).evaluate(
            "gd => [gd._fullLayout.width, gd.parentElement.getBoundingClientRect().width]"
        )
        assert drawn <= room + 1, f"the {name} figure is {drawn} px wide in a box of {room} px"
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    console.check()


def test_mechanism_views_and_a_feature_click(panel, views):
    page, console = panel
    for view, shows in (
        ("spectrum (singular vectors)", "singular value of I + M"),
        ("W_in W_out vs M", "against M, entry by entry"),
        ("projections", "neurons load on the top"),
        ("feature curves", "each feature's response"),
    ):
        page.locator(".wb-toy-mechanism-view button", has_text=view).click()
        expect(plot(page, "mechanism")).to_contain_text(shows, timeout=SLOW_MS)
        views.check(page, view.split(" ")[0].lower().replace("_", "-"))
    x, y, meta = highest(page, "mechanism", "feature")
    click_plot_point(page, plot(page, "mechanism"), x, y)
    expect(page.locator(".wb-status")).to_contain_text(
        f"Feature {meta['feature']} highlighted", timeout=SLOW_MS
    )
    views.check(page, "feature-highlighted")
    console.check()


def test_baseline_and_a_click_on_its_curve(panel, views):
    page, console = panel
    page.locator(".wb-toy-baseline select").select_option(label="naive + best offset")
    page.locator(".wb-toy-add-baseline").click()
    expect(plot(page, "p").locator(".legendtext", has_text="offset")).to_have_count(1, timeout=SLOW_MS)
    views.check(page, "baseline")
    x, y, meta = highest(page, "p", "curve")
    label = plot(page, "p").evaluate(
        "(gd, m) => gd.data.find(t => t.meta && t.meta.model === m).name", meta["model"]
    )
    click_plot_point(page, plot(page, "p"), x, y)
    expect(page.locator(".wb-status")).to_contain_text(f"Mechanism views: {label}", timeout=SLOW_MS)
    views.check(page, "clicked-curve")
    console.check()


def test_sigma_sweep_click_and_transplant(panel, views):
    page, console = panel
    page.locator(".wb-toy-sweep-kinds select").select_option(["symmetric"])
    page.locator(".wb-toy-sweep").click()
    expect(title(page, "sigma")).to_contain_text("against the mixing scale σ", timeout=SLOW_MS)
    views.check(page, "sweep")
    click_plot_point(page, plot(page, "sigma"), *sweep_point(page, 1))
    expect(page.locator(".wb-status")).to_contain_text("σ=0.05", timeout=SLOW_MS)
    expect(title(page, "mechanism")).to_contain_text("σ=0.05", timeout=SLOW_MS)
    kernel, _ = views.check(page, "sweep-point")
    assert any((t.get("meta") or {}).get("role") == "selected" for t in kernel["sigma"]["data"])
    page.locator(".wb-toy-transplant").click()
    expect(title(page, "training")).to_contain_text("transplant", timeout=SLOW_MS)
    views.check(page, "transplant")
    run_bar = page.locator(".widget-hbox").filter(has=page.locator(".wb-toy-train"))
    run_bar.locator("button", has_text="Show code").click()
    code = page.locator(".wb-code").first
    expect(code).to_contain_text("transplant(model, steps=150")
    expect(code).to_contain_text("tr.plot()")
    assert re.search(r"sigma=0\.05", code.text_content()), code.text_content()
    screenshot(output_of(page, ".wb-toy-p-figure"), "toymodels-code")
    console.check()


def sweep_point(page, i: int) -> list:
    """[σ, L/p] of point `i` of the symmetric sweep's line, as the page holds it."""
    return plot(page, "sigma").evaluate(
        "(gd, i) => { const t = gd.data.find(t => t.meta && t.meta.role === 'sweep'); return [t.x[i], t.y[i]]; }",
        i,
    )
