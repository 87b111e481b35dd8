"""`PlateauProbe`: push activations along families of directions and watch when the output starts to change.

    from workbench.widgets.plateau import PlateauProbe
    PlateauProbe(model, ["When Mary and John went to the store, John gave a drink to"], reference_data=corpus)

The panel holds no science: its controls become a `workbench.plateau.probe` (or `interpolate`) call, shown by
`.code()`, and its figures come from `workbench.viz.plateau`. Changing the metric, threshold or log scale
redraws from the stored result without running the model. Click a curve to see the tokens the model predicts
along it.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go
import torch

from workbench import remote
from workbench.errors import InputError, WorkbenchError
from workbench.plateau import (
    DEFAULT_FAMILIES,
    FAMILIES,
    WRITE_SITES,
    RefStats,
    interpolate,
    probe,
    reference_stats,
)
from workbench.plateau.probe import KL_THRESHOLD
from workbench.viz import plateau as viz
from workbench.widgets.base import Panel, replace_figure

VIEWS = ("Curves", "Plateau lengths", "Interpolation")


def _lines(text: str) -> list[str]:
    return [line for line in (t.rstrip("\r") for t in text.split("\n")) if line.strip()]


class PlateauProbe(Panel):
    """Activation plateaus in a panel.

    Pick prompts, the site and layer, a position, direction families and the size range; Run shows the median and
    spread of the response curves per family, a histogram of plateau lengths with tests against the
    `cov_mixture` baseline, or (Interpolation view) the walk from the first prompt's activation to prompt B's.
    Click a curve to see the top tokens along it.

    Args:
        model: a `WorkbenchModel`.
        prompts: the starting prompts (one per line in the panel).
        reference: `RefStats` for the starting site and layer (see `workbench.plateau.reference_stats`).
        reference_data: texts or tokens to compute reference statistics from whenever the site or layer changes.
            Without either, the probe uses the prompts' own activations (and says so: too few for a covariance).
        directions: your own directions {name: [k, d_model]} (e.g. SAE decoder rows), offered as families.
        prompt_b: the interpolation target.

    Attributes:
        plateau: the last `PlateauResult`; interpolation: the last `InterpolationResult` (`result` is whichever
            came last).
        figure / token_figure: the main figure and the tokens along the clicked curve.
    """

    def __init__(
        self,
        model,
        prompts: str | list[str] = "",
        *,
        reference: RefStats | None = None,
        reference_data=None,
        directions: dict[str, torch.Tensor] | None = None,
        prompt_b: str = "",
        layer: int = 1,
        site: str = "resid_pre",
    ):
        self.model = model
        self.plateau = None
        self.interpolation = None
        self._quiet = False  # set while the panel changes its own controls, so observers do not redraw
        self.user_directions = dict(directions or {})
        self.reference_data = reference_data
        self._references: dict[tuple[str, int], RefStats] = {}
        if reference is not None:
            self._references[(reference.site, reference.layer)] = reference
        self._given_reference = reference
        n_layers = model.cfg.n_layers
        wide = widgets.Layout(width="100%")
        self.prompts_box = widgets.Textarea(
            value="\n".join([prompts] if isinstance(prompts, str) else prompts),
            description="Prompts",
            placeholder="one prompt per line (lengths may differ)",
            rows=3,
            layout=wide,
        )
        self.site_box = widgets.Dropdown(options=list(WRITE_SITES), value=site, description="Site")
        self.layer_box = widgets.IntSlider(
            value=layer % n_layers, min=0, max=n_layers - 1, description="Layer", continuous_update=False
        )
        self.position_box = widgets.Dropdown(description="Position")
        family_options = list(FAMILIES) + list(self.user_directions)
        self.families_box = widgets.SelectMultiple(
            options=family_options,
            value=tuple(DEFAULT_FAMILIES) + tuple(self.user_directions),
            description="Families",
            rows=min(7, len(family_options)),
        )
        self.synthetic_box = widgets.Checkbox(
            value=False,
            description="also perturb random activations N(mean, cov) (plateau test)",
            indent=False,
            layout=widgets.Layout(width="auto"),  # the default width cuts the label
        )
        self.n_directions_box = widgets.BoundedIntText(value=16, min=1, max=512, description="Directions")
        self.max_size_box = widgets.FloatText(value=1.0, description="Max size")
        self.n_sizes_box = widgets.BoundedIntText(value=32, min=2, max=256, description="Sizes")
        self.metric_box = widgets.ToggleButtons(
            options=[("KL (nats)", "kl"), ("L2 at read site", "l2")], value="kl", description="Metric"
        )
        self.threshold_box = widgets.FloatText(value=KL_THRESHOLD, description="Threshold")
        self.log_box = widgets.Checkbox(value=False, description="log y", indent=False)
        self.view_box = widgets.ToggleButtons(options=list(VIEWS), value="Curves", description="View")
        self.prompt_b_box = widgets.Text(
            value=prompt_b, description="Prompt B", placeholder="interpolation target", layout=wide
        )
        self.notes = widgets.HTML()
        for w, cls in [
            (self.prompts_box, "wb-plateau-prompts"),
            (self.site_box, "wb-plateau-site"),
            (self.layer_box, "wb-plateau-layer"),
            (self.position_box, "wb-plateau-position"),
            (self.families_box, "wb-plateau-families"),
            (self.synthetic_box, "wb-plateau-synthetic"),
            (self.n_directions_box, "wb-plateau-directions"),
            (self.max_size_box, "wb-plateau-max-size"),
            (self.n_sizes_box, "wb-plateau-sizes"),
            (self.metric_box, "wb-plateau-metric"),
            (self.threshold_box, "wb-plateau-threshold"),
            (self.log_box, "wb-plateau-log"),
            (self.view_box, "wb-plateau-view"),
            (self.prompt_b_box, "wb-plateau-prompt-b"),
            (self.notes, "wb-plateau-notes"),
        ]:
            w.add_class(cls)
        self.token_figure = go.FigureWidget()
        self.token_figure.add_class("wb-plateau-tokens")
        super().__init__()
        self.figure.add_class("wb-plateau-figure")
        self.run_button.add_class("wb-plateau-run")
        self.run_button.on_click(lambda _: self.run())
        self.prompts_box.observe(lambda _: self._update_positions(), "value")
        self.metric_box.observe(lambda _: self._metric_changed(), "value")
        for box in (self.threshold_box, self.log_box, self.view_box):
            box.observe(lambda _: None if self._quiet else self.redraw(), "value")
        self.token_box = widgets.VBox([self.token_figure], layout=widgets.Layout(display="none"))
        self.children = [
            self.prompts_box,
            widgets.HBox([self.site_box, self.layer_box, self.position_box]),
            widgets.HBox(
                [
                    self.families_box,
                    widgets.VBox([self.n_directions_box, self.max_size_box, self.n_sizes_box]),
                ]
            ),
            self.synthetic_box,
            widgets.HBox([self.metric_box, self.threshold_box, self.log_box]),
            self.view_box,
            self.prompt_b_box,
            self.run_bar,
            self.status,
            self.notes,
            self.figure,
            self.token_box,
            self.code_view,
        ]
        self._update_positions()
        self.set_status(
            "Press Run. Sizes are in units of the median activation norm at the site. Click a curve."
        )

    # -- controls --------------------------------------------------------------------------------------------
    def _update_positions(self) -> None:
        options: list[tuple[str, int | str]] = [("last token", -1), ("every position but the first", "all")]
        prompts = _lines(self.prompts_box.value)
        if prompts and self.model.tokenizer is not None:
            try:
                tokens = self.model.to_str_tokens(prompts[0])
            except WorkbenchError:
                tokens = []
            options += [(f"{i}: {t!r}", i) for i, t in enumerate(tokens)]
        current = self.position_box.value
        self.position_box.options = options
        self.position_box.value = current if current in [v for _, v in options] else -1

    def _set_default_threshold(self) -> None:
        metric = self.metric_box.value
        self._quiet = True
        try:
            if self.plateau is not None:
                self.threshold_box.value = round(self.plateau.default_threshold(metric), 6)
            else:
                self.threshold_box.value = KL_THRESHOLD if metric == "kl" else 0.0
        finally:
            self._quiet = False

    def _metric_changed(self) -> None:
        self._set_default_threshold()
        self.redraw()

    def _sizes(self) -> torch.Tensor:
        smax = self.max_size_box.value
        if not smax > 0:
            raise InputError("Max size must be positive (it is in units of the median activation norm).")
        return torch.linspace(0, smax, self.n_sizes_box.value + 1)

    def _prompts(self) -> list[str]:
        prompts = _lines(self.prompts_box.value)
        if not prompts:
            raise InputError("Type at least one prompt (one per line).")
        return prompts

    def _probe_kwargs(self) -> dict:
        families = [f for f in self.families_box.value if f in FAMILIES]
        users = [f for f in self.families_box.value if f in self.user_directions]
        if not families and not users:
            raise InputError("Choose at least one direction family.")
        kwargs = {
            "prompts": self._prompts(),
            "layer": self.layer_box.value,
            "site": self.site_box.value,
            "positions": self.position_box.value,
            "families": tuple(families),
            "n_directions": self.n_directions_box.value,
            "sizes": self._sizes(),
            "bases": ("real", "cov_random") if self.synthetic_box.value else ("real",),
        }
        if users:
            kwargs["directions"] = {k: self.user_directions[k] for k in users}
        return kwargs

    def _interp_kwargs(self) -> dict:
        prompt_b = self.prompt_b_box.value.strip()
        if not prompt_b:
            raise InputError(
                "Type prompt B: the interpolation walks from the first prompt's activation to B's."
            )
        position = self.position_box.value
        if position == "all":
            raise InputError("Interpolation uses one position: choose the last token or a token.")
        return {
            "prompts_a": self._prompts()[0],
            "prompts_b": prompt_b,
            "layer": self.layer_box.value,
            "site": self.site_box.value,
            "position": position,
            "n_steps": self.n_sizes_box.value + 1,
        }

    def _reference(self, site: str, layer: int, progress, cancel) -> RefStats | None:
        key = (site, layer)
        if key not in self._references and self.reference_data is not None:
            self._references[key] = remote.call(
                reference_stats,
                self.model,
                self.reference_data,
                layer=layer,
                site=site,
                progress=progress,
                cancel=cancel,
            )
        return self._references.get(key)

    # -- show code ---------------------------------------------------------------------------------------
    def code(self) -> str:
        """The public-API calls that reproduce the current view."""
        lines = ["import torch", "", "from workbench.models import load_model"]
        if self.view_box.value == "Interpolation":
            kw = self._interp_kwargs()
            lines += [
                "from workbench.plateau import interpolate",
                "",
                f"model = load_model({self.model.name!r})",
                f"result = interpolate(model, {_args(kw)})",
                "result.plot()",
            ]
            return "\n".join(lines)
        kw = self._probe_kwargs()
        site, layer = kw["site"], kw["layer"]
        imports = ["probe"]
        setup = []
        if self.reference_data is not None or (site, layer) in self._references:
            if self.reference_data is not None:
                imports.append("reference_stats")
                setup.append(f"reference = reference_stats(model, corpus, layer={layer}, site={site!r})")
                setup.insert(0, "# corpus: the reference_data you gave the panel")
            else:
                setup.append("# reference: the RefStats you gave the panel")
            kw["reference"] = _Name("reference")
        if "directions" in kw:
            setup.append("# directions: the dict you gave the panel, " + ", ".join(kw["directions"]))
            kw["directions"] = _Name("directions")
        plot = f"metric={self.metric_box.value!r}, threshold={self.threshold_box.value!r}"
        lines += [
            f"from workbench.plateau import {', '.join(imports)}",
            "",
            f"model = load_model({self.model.name!r})",
            *setup,
            f"result = probe(model, {_args(kw)})",
        ]
        if self.view_box.value == "Plateau lengths":
            lines += [
                "from workbench.viz.plateau import plateau_lengths",
                "",
                f"plateau_lengths(result, {plot})",
                f"result.compare(baseline='cov_mixture', {plot})",
            ]
        else:
            lines.append(f"result.plot({plot}, log_y={self.log_box.value})")
        return "\n".join(lines)

    # -- running -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the probe (or the interpolation, in that view) for the current controls."""
        try:
            if self.view_box.value == "Interpolation":
                kwargs = self._interp_kwargs()

                def compute(progress, cancel):
                    return remote.call(interpolate, self.model, **kwargs, progress=progress, cancel=cancel)

                self.start(compute, self._show_interpolation, label="Interpolating")
                return
            kwargs = self._probe_kwargs()
        except WorkbenchError as err:
            self.show_error(err)
            return
        prompts = kwargs.pop("prompts")

        def compute(progress, cancel):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the result's warnings are shown in the notes line instead
                ref = self._reference(kwargs["site"], kwargs["layer"], False, cancel)
                # remote models: a repeated run is served from the result cache, not resubmitted
                return remote.call(
                    probe, self.model, prompts, **kwargs, reference=ref, progress=progress, cancel=cancel
                )

        self.start(compute, self._show_probe, label="Probing")

    def _show_probe(self, result) -> None:
        self.plateau = result
        self._set_default_threshold()
        self._show_notes(result.warnings)
        self.redraw()

    def _show_interpolation(self, result) -> None:
        self.interpolation = result
        self._show_notes(())
        self.redraw()

    def _show_notes(self, notes) -> None:
        self.notes.value = "".join(
            f'<div class="wb-plateau-note" style="color:#8a6d00">⚠ {html.escape(n)}</div>' for n in notes
        )

    # -- drawing -----------------------------------------------------------------------------------------
    def redraw(self) -> None:
        """Redraw the current view from stored results (no model runs)."""
        view = self.view_box.value
        try:
            if view == "Interpolation":
                if self.interpolation is None:
                    return
                fig = viz.interpolation(self.interpolation)
            else:
                if self.plateau is None:
                    return
                metric, threshold = self.metric_box.value, self.threshold_box.value
                if view == "Curves":
                    fig = viz.curves(self.plateau, metric, threshold, log_y=self.log_box.value)
                else:
                    fig = viz.plateau_lengths(self.plateau, metric, threshold)
        except WorkbenchError as err:
            self.show_error(err)
            return
        replace_figure(self.figure, fig)
        for trace in self.figure.data:
            role = (trace.meta or {}).get("role") if isinstance(trace.meta, dict) else None
            if role in ("curves", "pair"):
                trace.on_click(self._on_click)

    def _on_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        i = points.point_inds[0]
        role = trace.meta.get("role")
        if role == "pair":
            self.show_pair_tokens(int(trace.meta["pair"]))
            return
        base, direction = trace.customdata[i]
        self.show_tokens(int(base), int(direction))

    def show_tokens(self, base: int, direction: int) -> None:
        """Show the top tokens along one probe curve (what a click on it does)."""
        if self.plateau is None:
            return
        try:
            fig = viz.tokens_along(self.plateau, base, direction)
        except WorkbenchError as err:
            self.show_error(err)
            return
        replace_figure(self.token_figure, fig)
        self.token_box.layout.display = ""
        self.set_status(
            f"Tokens along {self.plateau.families[direction]} direction {direction}, "
            f"{self.plateau.base_label(base)}.",
            "info",
        )

    def show_pair_tokens(self, pair: int) -> None:
        """Show the top tokens along one interpolation path."""
        res = self.interpolation
        if res is None:
            return
        fig = viz.token_ribbon(
            res.alphas, res.top_ids[pair], res.top_probs[pair], res.token_strings, "α",
            f"Predictions along pair {pair}: {res.prompts_a[pair]!r} → {res.prompts_b[pair]!r}",
        )  # fmt: skip
        replace_figure(self.token_figure, fig)
        self.token_box.layout.display = ""


class _Name(str):
    """A variable name in generated code (printed without quotes)."""

    def __repr__(self) -> str:
        return str(self)


def _args(kwargs: dict) -> str:
    """Keyword arguments as call text; prompts first and positional."""
    positional, named = [], []
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            text = f"torch.linspace(0, {float(value[-1])!r}, {len(value)})"
        else:
            text = repr(value)
        if key in ("prompts", "prompts_a", "prompts_b"):
            positional.append(text)
        else:
            named.append(f"{key}={text}")
    return ", ".join(positional + named)
