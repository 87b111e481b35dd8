"""One check for the panels' browser tests: after a change on the page, every visible figure of the panel equals
the kernel's, hidden figures stay hidden, and no text of the previous view survives; a screenshot per step."""

from __future__ import annotations

from pathlib import Path

from lab_driver import (
    SLOW_MS,
    expect_page_shows,
    kernel_figures,
    output_of,
    screenshot,
    stale_texts,
)


def type_in_readout(slider, text: str) -> None:
    """Set an ipywidgets slider (`slider` locates the widget) by typing into its readout and pressing Enter, as a
    user does for a value the arrow keys reach only in many steps."""
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(text)
    readout.press("Enter")


class Views:
    """Checks each view of one panel against the kernel and against the view before it.

    `figures` maps the names `dump_figures` writes to CSS selectors of the plotly figures on the page (a
    `.js-plotly-plot` with the panel's class); `idle` locates the button that is enabled again once a run
    ended; `output` is a selector inside the panel's output area (for its screenshot)."""

    def __init__(self, prefix: str, figures_file: Path, figures: dict[str, str], idle: str, output: str):
        self.prefix, self.figures_file = prefix, figures_file
        self.figures, self.idle, self.output = figures, idle, output
        self.before: dict[str, list[str]] = {}
        self.step = 0

    def plot(self, page, name: str):
        return page.locator(self.figures[name])

    def check(self, page, name: str, shown=None) -> tuple[dict, dict]:
        """Compare the figures named in `shown` (default: all) with the kernel's; every other one must be
        hidden. Returns (kernel figures, what the page shows)."""
        from playwright.sync_api import expect

        self.step += 1
        label = f"{self.prefix}-{self.step}-{name}"
        shown = list(self.figures) if shown is None else list(shown)
        expect(page.locator(self.idle)).to_be_enabled(timeout=SLOW_MS)
        kernel = kernel_figures(page, self.figures_file, label)
        views = {}
        for key in self.figures:
            if key in shown:
                views[key] = expect_page_shows(page, self.plot(page, key), kernel[key], f"{label}-{key}")
            else:
                expect(self.plot(page, key)).to_be_hidden()
                self.before.pop(key, None)  # shown again later, it is compared with nothing older
        for key, view in views.items():
            stale = stale_texts(self.before.get(key, []), view["texts"], kernel[key])
            assert not stale, f"{label}: texts of the previous {key} view are still shown: {stale}"
            self.before[key] = view["texts"]
        screenshot(output_of(page, self.output), label)
        return kernel, views
