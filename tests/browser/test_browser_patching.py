"""PatchingExplorer in real JupyterLab: run, type new prompts, pick a site, Run, switch the metric, click a cell."""

from __future__ import annotations

import re

import pytest
from lab_driver import (
    LOAD_DEMO,
    SLOW_MS,
    click_plot_point,
    notebook_page,
    output_of,
    plot_texts,
    screenshot,
    select_containing,
    write_notebook,
)
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
NEW_CLEAN = "When Anna and Paul went to the park, Paul gave a book to"
NEW_CORRUPT = "When Anna and Paul went to the park, Anna gave a book to"

CELLS = [
    LOAD_DEMO,
    "from workbench.widgets.patching import PatchingExplorer\n\n"
    f"explorer = PatchingExplorer(model, {CLEAN!r}, {CORRUPT!r}, answers=(' Mary', ' John'))\n"
    "explorer.run()\n"
    "explorer",
]


@pytest.fixture(scope="module")
def panel(chromium, lab, test_notebooks):
    """The notebook opened in Lab and run; yields (page, console)."""
    path = write_notebook(test_notebooks / "patching.ipynb", CELLS, "PatchingExplorer")
    with notebook_page(
        chromium, lab, path, lambda page: page.locator(".wb-patching-figure .xtick"), "patching-0"
    ) as opened:
        yield opened


def heatmap(page):
    return page.locator(".js-plotly-plot.wb-patching-figure")


def tick_labels(page, axis: str = "x") -> list[str]:
    return plot_texts(heatmap(page), f".{axis}tick text")


def words(prompt: str) -> list[str]:
    return re.findall(r"\w+", prompt)


def differs(label: str, clean: str, corrupt: str) -> bool:
    """The position label marks a token that differs between the prompts ("i: clean/corrupt")."""
    return re.search(rf"{clean}\s*/\s*{corrupt}", label) is not None


def assert_ticks_show(labels: list[str], prompt: str) -> None:
    """Every word of the prompt appears, in order, among the position labels (one label per token)."""
    text = " ".join(labels)
    at = 0
    for word in words(prompt):
        found = text.find(word, at)
        assert found >= 0, f"{word!r} of {prompt!r} is missing from the position labels {labels}"
        at = found + len(word)


def test_first_run_draws_layer_by_position_heatmap_with_the_prompt_tokens(panel):
    page, console = panel
    assert_ticks_show(tick_labels(page), CLEAN)
    assert any(differs(label, "John", "Mary") for label in tick_labels(page)), (
        "the differing token is unmarked"
    )
    layers = tick_labels(page, "y")
    assert sorted(layers) == [f"L{i}" for i in range(len(layers))] and len(layers) >= 2, layers
    expect(heatmap(page).locator(".gtitle")).to_contain_text("Activation patching")
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    screenshot(output_of(page, ".wb-patching-figure"), "patching-1-first-run")
    console.check()


def test_typed_prompts_and_site_rerun_redraws(panel):
    page, console = panel
    page.locator(".wb-patching-clean textarea").fill(NEW_CLEAN)
    page.locator(".wb-patching-corrupt textarea").fill(NEW_CORRUPT)
    page.locator(".wb-patching-answers textarea").fill("' Anna', ' Paul'")
    select_containing(page.locator(".wb-patching-site select"), "attn_out")
    page.locator(".wb-patching-run").click()
    expect(heatmap(page).locator(".gtitle")).to_contain_text("attention", timeout=SLOW_MS)
    expect(page.locator(".wb-status.wb-ok")).to_contain_text("Done")
    assert_ticks_show(tick_labels(page), NEW_CLEAN)
    assert any(differs(label, "Paul", "Anna") for label in tick_labels(page)), tick_labels(page)
    screenshot(output_of(page, ".wb-patching-figure"), "patching-2-new-prompt-attn-out")
    console.check()


def test_metric_dropdown_redraws_the_colour_bar(panel):
    page, console = panel
    select = page.locator(".wb-patching-metric select")
    first, second = select.locator("option").all_text_contents()[:2]
    expect(heatmap(page).locator(".cbtitle")).to_contain_text(first)
    select.select_option(label=second)
    expect(heatmap(page).locator(".cbtitle")).to_contain_text(second, timeout=SLOW_MS)
    select.select_option(label=first)
    expect(heatmap(page).locator(".cbtitle")).to_contain_text(first, timeout=SLOW_MS)
    console.check()


def test_clicking_a_cell_drills_into_its_heads(panel):
    page, console = panel
    labels = tick_labels(page)
    target = next(label for label in labels if "/" in label)  # the position where the prompts differ
    layer = max(tick_labels(page, "y"))  # the last layer
    click_plot_point(page, heatmap(page), target, layer)
    drill = page.locator(".js-plotly-plot.wb-patching-heads")
    expect(drill.locator(".gtitle")).to_contain_text(
        f"Drill-down: layer {layer[1:]}, {target}", timeout=SLOW_MS
    )
    heads = plot_texts(drill, ".xtick text") + plot_texts(drill, ".ytick text")
    assert any(h.startswith("H") for h in heads), f"no head labels on the drill-down axes: {heads}"
    screenshot(output_of(page, ".wb-patching-figure"), "patching-3-drill-down")
    console.check()
