"""PatchingExplorer in real JupyterLab: after every control change (site, Run, metric, pair, clicks, normalisation,
typed prompts) the page shows exactly the figures the kernel holds (traces, layout, axis ranges), and no text of
the previous view survives into the next. A screenshot of the panel is saved after each change."""

from __future__ import annotations

import re

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
    plot_texts,
    rendered,
    screenshot,
    select_containing,
    stale_texts,
    write_notebook,
)
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

NEW_CLEAN = "When Anna and Paul went to the park, Paul gave a book to"
NEW_CORRUPT = "When Anna and Paul went to the park, Anna gave a book to"


@pytest.fixture(scope="module")
def figures_file(test_notebooks):
    return test_notebooks / "patching-figures.json"


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks, figures_file):
    """The notebook opened in Lab and run; yields (page, console)."""
    cells = [
        LOAD_DEMO,
        "from workbench.tasks import ioi_pairs\n"
        "from workbench.widgets.patching import PatchingExplorer\n\n"
        "pairs = ioi_pairs(2, templates=0)\n"
        "explorer = PatchingExplorer(model, list(pairs.clean), list(pairs.corrupt), answers=list(pairs.answers))\n"
        "explorer.run()\n"
        "explorer",
        DUMP_CELL,
        f"dump_figures({str(figures_file)!r}, explorer, figure=explorer.figure, heads=explorer.heads_figure)",
    ]
    path = write_notebook(test_notebooks / "patching.ipynb", cells, "PatchingExplorer")
    with notebook_page(
        chromium, lab, path, lambda page: page.locator(".wb-patching-figure .xtick"), "patching-0"
    ) as opened:
        yield opened


def heatmap(page):
    return page.locator(".js-plotly-plot.wb-patching-figure")


def drill(page):
    return page.locator(".js-plotly-plot.wb-patching-heads")


def tick_labels(page, axis: str = "x") -> list[str]:
    return plot_texts(heatmap(page), f".{axis}tick text")


class Views:
    """Checks each view against the kernel and against the view before it."""

    def __init__(self):
        self.before: dict[str, list[str]] = {}
        self.step = 0

    def check(self, page, figures_file, name: str, drill_shown: bool = False) -> dict:
        self.step += 1
        label = f"patching-{self.step}-{name}"
        kernel = kernel_figures(page, figures_file, label)
        shown = {"figure": expect_page_shows(page, heatmap(page), kernel["figure"], label)}
        if drill_shown:
            shown["heads"] = expect_page_shows(page, drill(page), kernel["heads"], label + "-drill")
        for key, view in shown.items():
            stale = stale_texts(self.before.get(key, []), view["texts"], kernel[key])
            assert not stale, f"{label}: texts of the previous view are still shown: {stale}"
            self.before[key] = view["texts"]
        screenshot(output_of(page, ".wb-patching-figure"), label)
        return kernel


@pytest.fixture(scope="module")
def views():
    return Views()


def wait_done(page) -> None:
    expect(page.locator(".wb-patching-run")).to_be_enabled(timeout=SLOW_MS)


def test_first_run_shows_the_kernels_heatmap_with_the_prompt_tokens(panel, views, figures_file):
    page, console = panel
    kernel = views.check(page, figures_file, "first-run")
    labels = tick_labels(page)
    assert any("/" in label for label in labels), f"the differing token is unmarked: {labels}"
    assert set(labels) <= set(kernel["figure"]["data"][0]["x"]), labels
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    console.check()


def test_block_view_and_back_leaves_no_subplot_titles(panel, views, figures_file):
    page, console = panel
    select_containing(page.locator(".wb-patching-site select"), "block:")
    page.locator(".wb-patching-run").click()
    expect(heatmap(page).locator(".annotation-text")).to_have_count(3, timeout=SLOW_MS)
    wait_done(page)
    kernel = views.check(page, figures_file, "block")
    titles = heatmap(page).locator(".annotation-text").all_text_contents()
    assert titles == [a["text"] for a in kernel["figure"]["layout"]["annotations"]]
    # every subplot title is shown whole, none over the main title
    boxes = (
        heatmap(page)
        .locator(".annotation-text")
        .evaluate_all(
            "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top]; })"
        )
    )
    width = heatmap(page).evaluate("gd => gd.getBoundingClientRect()")
    assert all(width["left"] <= left and right <= width["right"] for left, right, _ in boxes), boxes
    for (_, right, _), (left, _, _) in zip(boxes, boxes[1:]):
        assert right <= left, f"subplot titles overlap: {boxes}"
    title_bottom = heatmap(page).locator(".gtitle").evaluate("e => e.getBoundingClientRect().bottom")
    assert all(top >= title_bottom for _, _, top in boxes), "a subplot title runs into the main title"
    select_containing(page.locator(".wb-patching-site select"), "resid_pre:")
    page.locator(".wb-patching-run").click()
    expect(heatmap(page).locator(".annotation-text")).to_have_count(0, timeout=SLOW_MS)
    wait_done(page)
    views.check(page, figures_file, "back-to-resid-pre")
    console.check()


def test_metric_and_pair_redraw_what_the_kernel_draws(panel, views, figures_file):
    page, console = panel
    select = page.locator(".wb-patching-metric select")
    second = select.locator("option").all_text_contents()[1]
    select.select_option(label=second)
    expect(heatmap(page).locator(".cbtitle")).to_contain_text(second, timeout=SLOW_MS)
    views.check(page, figures_file, "metric")
    page.locator(".wb-patching-pair select").select_option(label="pair 1")
    expect(heatmap(page).locator(".gtitle")).to_contain_text("pair 1", timeout=SLOW_MS)
    kernel = views.check(page, figures_file, "pair-1")
    # the position axis names pair 1's tokens
    assert kernel["figure"]["data"][0]["x"] != [] and all(
        label in kernel["figure"]["data"][0]["x"] for label in tick_labels(page)
    )
    page.locator(".wb-patching-pair select").select_option(label="mean")
    views.check(page, figures_file, "pair-mean")
    console.check()


def test_clicks_drill_down_and_redraw_the_drill_down(panel, views, figures_file):
    page, console = panel
    labels = tick_labels(page)
    target = next(label for label in labels if "/" in label)
    layers = sorted(tick_labels(page, "y"))
    click_plot_point(page, heatmap(page), target, layers[-1])
    expect(drill(page).locator(".gtitle")).to_contain_text(
        f"Drill-down: layer {layers[-1][1:]}, {target}", timeout=SLOW_MS
    )
    wait_done(page)
    kernel = views.check(page, figures_file, "drill-last-layer", drill_shown=True)
    heads = plot_texts(drill(page), ".xtick text") + plot_texts(drill(page), ".ytick text")
    assert any(h.startswith("H") for h in heads), f"no head labels on the drill-down axes: {heads}"
    # the drill-down's colours use the main map's scale
    main, sub = kernel["figure"]["data"][0], kernel["heads"]["data"][0]
    assert abs((sub["zmax"] - sub["zmid"]) - (main["zmax"] - main["zmid"])) < 1e-9
    click_plot_point(page, heatmap(page), labels[-1], layers[0])
    expect(drill(page).locator(".gtitle")).to_contain_text(
        f"layer {layers[0][1:]}, {labels[-1]}", timeout=SLOW_MS
    )
    wait_done(page)
    views.check(page, figures_file, "drill-first-layer", drill_shown=True)
    page.locator(".wb-patching-normalize input").click()
    expect(heatmap(page).locator(".cbtitle")).not_to_contain_text("normalised", timeout=SLOW_MS)
    views.check(page, figures_file, "not-normalised", drill_shown=True)
    screenshot(
        page.locator(".jp-OutputArea-output").filter(has=page.locator(".wb-patching-heads")),
        "patching-drill-panel",
    )
    console.check()


def test_typed_prompts_and_site_rerun(panel, views, figures_file):
    page, console = panel
    page.locator(".wb-patching-clean textarea").fill(NEW_CLEAN)
    page.locator(".wb-patching-corrupt textarea").fill(NEW_CORRUPT)
    page.locator(".wb-patching-answers textarea").fill("' Anna', ' Paul'")
    select_containing(page.locator(".wb-patching-site select"), "attn_out:")
    page.locator(".wb-patching-run").click()
    expect(heatmap(page).locator(".gtitle")).to_contain_text("attention", timeout=SLOW_MS)
    wait_done(page)
    views.check(page, figures_file, "typed-prompts")
    text = " ".join(tick_labels(page))
    for word in re.findall(r"\w+", NEW_CLEAN):
        assert word in text, f"{word!r} is missing from the position labels"
    expect(drill(page)).to_be_hidden()
    assert not no_horizontal_scroll(page, ".jp-OutputArea-output"), "the panel is wider than the output area"
    # Show code prints this run (not the previous one)
    run_bar = page.locator(".widget-hbox").filter(has=page.locator(".wb-patching-run"))
    run_bar.locator("button", has_text="Show code").click()
    code = page.locator(".wb-code").first
    expect(code).to_contain_text("Paul gave a book to")
    expect(code).to_contain_text("site='attn_out'")
    assert "heads = sweep(" not in code.text_content()
    screenshot(output_of(page, ".wb-patching-figure"), "patching-code")
    assert rendered(heatmap(page))["width"] > 300
    console.check()
