"""SyntheticActivationProbe in real JupyterLab (demo model, demo SAE): run test 1, click a curve for the sample's
latents, switch views and metric, rerun as test 2 and type a threshold, then the stable-regions tab. After each
change the page shows exactly the kernel's figures, the hidden ones stay hidden, and no text of the previous view
survives."""

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

from workbench.sae.synthetic import FAMILIES

expect = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed").expect
pytestmark = pytest.mark.browser

FIGURE = ".js-plotly-plot.wb-sae-figure"
SAMPLE = ".js-plotly-plot.wb-sae-sample"
STABLE = ".js-plotly-plot.wb-sae-stable"


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "sae-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        "from workbench.widgets.sae import SyntheticActivationProbe\n\n"
        "probe = SyntheticActivationProbe.demo(n_prompts=8, reference_rows=200, n_steps=8)\n"
        "probe.run()\n"
        "probe",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, probe, figure=probe.figure, sample=probe.sample_figure, "
        "stable=probe.stable_figure)",
    ]
    path = write_notebook(test_notebooks / "sae.ipynb", cells, "SyntheticActivationProbe")
    with notebook_page(
        chromium, lab, path, lambda page: title(page).filter(has_text="Test 1"), "sae-0"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
def views(figures_file):
    figures = {"figure": FIGURE, "sample": SAMPLE, "stable": STABLE}
    return Views("sae", figures_file, figures, ".wb-sae-run", ".wb-sae-tabs")


def title(page):
    return page.locator(FIGURE).locator(".gtitle")


def button(page, group: str, text: str):
    return page.locator(f".wb-sae-{group} button", has_text=text)


def test_first_run_draws_test_1_curves(panel, views):
    page, console = panel
    kernel, _ = views.check(page, "test-1-curves", shown=["figure"])
    expect(title(page)).to_contain_text("Test 1 (blow-up toward a target)")
    legend = page.locator(FIGURE).locator(".legendtext").all_text_contents()
    assert len(legend) == 4, legend  # one entry per family
    expect(page.locator(".wb-sae-threshold-note")).to_contain_text("test 2 only")
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    console.check()


def test_clicking_a_curve_shows_the_samples_latents(panel, views):
    page, console = panel
    # the highest point of any single curve: nothing is drawn above it, so the click lands on that curve
    x, y, family, sample = page.locator(FIGURE).evaluate(
        """gd => {
            let best = null;
            for (const t of gd.data) {
                if (!t.meta || t.meta.role !== 'curve') continue;
                Array.from(t.y).forEach((v, i) => {
                    if (v !== null && !Number.isNaN(v) && (best === null || v > best[1]))
                        best = [t.x[i], v, t.meta.family, t.meta.sample];
                });
            }
            return best;
        }"""
    )
    click_plot_point(page, page.locator(FIGURE), x, y)
    sample_title = page.locator(SAMPLE).locator(".gtitle")
    expect(sample_title).to_contain_text(f"Sample {sample}:", timeout=SLOW_MS)
    expect(page.locator(".wb-status")).to_contain_text(f"{FAMILIES[family]}, sample {sample}: max-slope step")
    expect(sample_title).to_contain_text(FAMILIES[family])
    views.check(page, "sample", shown=["figure", "sample"])
    console.check()


def test_views_and_metric_redraw_from_the_stored_result(panel, views):
    page, console = panel
    for view, word, kind in (("Histogram", "histogram", "histogram"), ("CDF", "CDF", "scatter")):
        button(page, "view", view).click()
        expect(title(page)).to_contain_text(f"max-slope step per family ({word}, l2)", timeout=SLOW_MS)
        kernel, _ = views.check(page, view.lower(), shown=["figure", "sample"])
        assert kernel["figure"]["data"][0]["type"] == kind
        assert kernel["figure"]["data"][-1]["type"] == "table"
    button(page, "metric", "KL").click()
    expect(title(page)).to_contain_text("(CDF, kl)", timeout=SLOW_MS)
    views.check(page, "cdf-kl", shown=["figure", "sample"])
    button(page, "view", "Curves").click()
    expect(title(page)).to_contain_text("Test 1", timeout=SLOW_MS)
    expect(page.locator(FIGURE).locator(".ytitle")).to_contain_text("KL")
    views.check(page, "curves-kl", shown=["figure", "sample"])
    console.check()


def test_test_2_rerun_and_typed_threshold(panel, views):
    page, console = panel
    button(page, "metric", "L2").click()
    button(page, "test", "Test 2").click()
    page.locator(".wb-sae-run").click()
    expect(title(page)).to_contain_text("Test 2 (plateau toward a random target)", timeout=SLOW_MS)
    kernel, _ = views.check(page, "test-2", shown=["figure"])  # the clicked sample was test 1's
    note = page.locator(".wb-sae-threshold-note")
    before = note.text_content()
    typical = float(re.search(r"typical distance ([\d.e+-]+)", before).group(1))
    threshold = page.locator(".wb-sae-threshold input")
    threshold.fill("0.05")
    threshold.press("Enter")
    expect(note).not_to_have_text(before, timeout=SLOW_MS)
    kernel, _ = views.check(page, "test-2-threshold", shown=["figure"])
    shown = re.search(r"= ([\d.e+-]+) L2 units", note.text_content()).group(1)
    assert abs(float(shown) - 0.05 * typical) <= 0.01 * float(shown), (shown, typical)
    # the dashed line the page draws is at the threshold the note names
    line = next(t for t in kernel["figure"]["data"] if (t.get("meta") or {}).get("role") == "threshold")
    assert line["name"].startswith(f"threshold {shown} = 0.05 × typical distance"), (line["name"], shown)
    button(page, "view", "Dataset").click()
    expect(title(page)).to_contain_text("Real codes of 8 samples", timeout=SLOW_MS)
    views.check(page, "dataset", shown=["figure"])
    console.check()


def test_stable_regions_tab_runs_and_the_code_follows(panel, views):
    page, console = panel
    page.locator(".wb-sae-tabs .lm-TabBar-tab", has_text="Stable regions").click()
    expect(page.locator(FIGURE)).to_be_hidden(timeout=SLOW_MS)
    page.locator(".wb-sae-pairs input").fill("3")
    page.locator(".wb-sae-pairs input").press("Enter")
    page.locator(".wb-sae-run").click()
    expect(page.locator(STABLE).locator(".gtitle")).to_contain_text("3 pairs", timeout=SLOW_MS)
    views.check(page, "stable", shown=["stable"])
    run_bar = page.locator(".widget-hbox").filter(has=page.locator(".wb-sae-run"))
    run_bar.locator("button", has_text="Show code").click()
    code = page.locator(".wb-code").first
    expect(code).to_contain_text("stable_regions(")
    expect(code).to_contain_text("prompts[:6]")
    assert "synthetic_activation_test(" not in code.text_content()
    screenshot(output_of(page, ".wb-sae-tabs"), "sae-code")
    # back to the first tab: its last view, untouched by the other tab's run
    page.locator(".wb-sae-tabs .lm-TabBar-tab", has_text="Synthetic activations").click()
    expect(title(page)).to_contain_text("Real codes of 8 samples", timeout=SLOW_MS)
    views.check(page, "back-to-synthetic", shown=["figure"])
    console.check()
