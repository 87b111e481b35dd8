"""PlateauProbe in real JupyterLab: run, switch views (Curves, Plateau lengths, Interpolation before and after its
run), click a curve for its tokens, rerun at another layer. After each change the page shows exactly the kernel's
figures and no text of the previous view survives; a view without a result says that Run computes it."""

from __future__ import annotations

import pytest
from lab_driver import (
    DUMP_CELL,
    LOAD_DEMO,
    SLOW_MS,
    click_plot_point,
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

PROMPT = "When Mary and John went to the store, John gave a drink to"
PROMPT_B = "The capital of France is"


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "plateau-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        LOAD_DEMO,
        "from workbench.widgets.plateau import PlateauProbe\n\n"
        f"probe = PlateauProbe(model, {PROMPT!r}, layer=1)\n"
        "probe.run()\n"
        "probe",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, probe, figure=probe.figure, tokens=probe.token_figure)",
    ]
    path = write_notebook(test_notebooks / "plateau.ipynb", cells, "PlateauProbe")
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


def tokens(page):
    return page.locator(".js-plotly-plot.wb-plateau-tokens")


def title(page):
    return figure(page).locator(".gtitle")


class Views:
    def __init__(self):
        self.before: dict[str, list[str]] = {}
        self.step = 0

    def check(self, page, figures_file, name: str, tokens_shown: bool = False) -> dict:
        self.step += 1
        label = f"plateau-{self.step}-{name}"
        expect(page.locator(".wb-plateau-run")).to_be_enabled(timeout=SLOW_MS)
        kernel = kernel_figures(page, figures_file, label)
        shown = {"figure": expect_page_shows(page, figure(page), kernel["figure"], label)}
        if tokens_shown:
            shown["tokens"] = expect_page_shows(page, tokens(page), kernel["tokens"], label + "-tokens")
        else:
            expect(tokens(page)).to_be_hidden()
        for key, view in shown.items():
            stale = stale_texts(self.before.get(key, []), view["texts"], kernel[key])
            assert not stale, f"{label}: texts of the previous view are still shown: {stale}"
            self.before[key] = view["texts"]
        screenshot(output_of(page, ".wb-plateau-figure"), label)
        return shown


@pytest.fixture(scope="module")
def views():
    return Views()


def view_button(page, name: str):
    return page.locator(".wb-plateau-view button", has_text=name)


def test_first_run_draws_response_curves_per_family(panel, views, figures_file):
    page, console = panel
    views.check(page, figures_file, "curves")
    expect(title(page)).to_contain_text("resid_pre 1")
    legend = figure(page).locator(".legendtext").all_text_contents()
    chosen = page.locator(".wb-plateau-families option:checked").all_text_contents()
    assert chosen and all(any(f in entry for entry in legend) for f in chosen), (chosen, legend)
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output")
    console.check()


def test_views_switch_without_a_run_and_say_when_run_is_needed(panel, views, figures_file):
    page, console = panel
    view_button(page, "Plateau lengths").click()
    expect(title(page)).to_contain_text("Plateau length", timeout=SLOW_MS)
    shown = views.check(page, figures_file, "lengths")
    # the legend and the "never crossed" label do not overlap
    legend = figure(page).locator(".legend").evaluate("e => e.getBoundingClientRect()")
    label = (
        figure(page)
        .locator(".annotation-text", has_text="never crossed")
        .evaluate("e => e.getBoundingClientRect()")
    )
    assert label["right"] <= legend["left"] or label["bottom"] <= legend["top"], (label, legend)
    assert shown["figure"]["texts"]
    view_button(page, "Interpolation").click()
    expect(figure(page).locator(".annotation-text")).to_contain_text("press Run", timeout=SLOW_MS)
    expect(page.locator(".wb-status")).to_contain_text("press Run")
    views.check(page, figures_file, "interpolation-before-run")
    page.locator(".wb-plateau-prompt-b input").fill(PROMPT_B)
    page.locator(".wb-plateau-run").click()
    expect(title(page)).to_contain_text("Interpolation", timeout=SLOW_MS)
    views.check(page, figures_file, "interpolation")
    view_button(page, "Curves").click()
    expect(title(page)).to_contain_text("Response to perturbations", timeout=SLOW_MS)
    views.check(page, figures_file, "curves-again")
    console.check()


def test_clicking_a_curve_shows_its_tokens(panel, views, figures_file):
    page, console = panel
    # the highest point of any single curve: nothing is drawn above it, so the click lands on that curve
    x, y = figure(page).evaluate(
        """gd => {
            let best = null;
            for (const t of gd.data) {
                if (!t.meta || t.meta.role !== 'curves') continue;
                Array.from(t.y).forEach((v, i) => {
                    if (v !== null && !Number.isNaN(v) && (best === null || v > best[1])) best = [t.x[i], v];
                });
            }
            return best;
        }"""
    )
    click_plot_point(page, figure(page), x, y)
    expect(tokens(page).locator(".gtitle")).to_contain_text("Predictions along", timeout=SLOW_MS)
    expect(tokens(page).locator(".gtitle")).to_contain_text(" of 16")
    expect(page.locator(".wb-status")).to_contain_text("Tokens along")
    shown = views.check(page, figures_file, "tokens", tokens_shown=True)
    # the ribbon's cell labels do not run into each other
    boxes = (
        tokens(page)
        .locator(".heatmaplayer text")
        .evaluate_all(
            "els => els.filter(e => e.textContent.trim()).map(e => { const r = e.getBoundingClientRect(); "
            "return [r.left, r.right, r.top]; })"
        )
    )
    rows = {}
    for left, right, top in boxes:
        rows.setdefault(round(top), []).append((left, right))
    for cells in rows.values():
        cells.sort()
        assert all(a[1] <= b[0] + 1 for a, b in zip(cells, cells[1:])), f"token labels overlap: {cells}"
    assert len(shown["tokens"]["axes"]["xaxis"]["ticks"]) <= 14
    # the tokens belong to the probe: the interpolation view hides them, and shows them again on return
    view_button(page, "Interpolation").click()
    expect(title(page)).to_contain_text("Interpolation", timeout=SLOW_MS)
    views.check(page, figures_file, "interpolation-no-tokens")
    view_button(page, "Curves").click()
    expect(title(page)).to_contain_text("Response to perturbations", timeout=SLOW_MS)
    views.check(page, figures_file, "curves-with-tokens", tokens_shown=True)
    console.check()


def test_typed_setting_and_layer_slider_rerun(panel, views, figures_file):
    page, console = panel
    page.locator(".wb-plateau-directions input").fill("6")
    page.locator(".wb-plateau-directions input").press("Enter")
    slide(page, page.locator(".wb-plateau-layer"), 2)
    expect(page.locator(".wb-status")).to_contain_text("Press Run")
    page.locator(".wb-plateau-run").click()
    expect(title(page)).to_contain_text("resid_pre 2", timeout=SLOW_MS)
    views.check(page, figures_file, "layer-2")  # the tokens of the old curve are gone
    legend = " ".join(figure(page).locator(".legendtext").all_text_contents())
    assert "median of 6" in legend, legend
    console.check()
