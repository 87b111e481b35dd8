"""`PlateauProbe`: push activations along families of directions and watch when the output starts to change.

    from workbench.widgets.plateau import PlateauProbe
    PlateauProbe(model, ["When Mary and John went to the store, John gave a drink to"], reference_data=corpus)

The panel holds no science: its controls become a `workbench.plateau.probe` (or `interpolate`) call, shown by
`.code()` for the last successful run, and its figures come from `workbench.viz.plateau`. Changing the view, the
metric, threshold or log scale redraws from the stored results without running the model; a view whose result
is not computed yet says so and waits for Run. Click a curve to see the tokens the model predicts along it.
"""

from __future__ import annotations

import html
import warnings

import ipywidgets as widgets
import torch

from workbench.codegen import Expr, Name, Script, call, literal
from workbench.errors import InputError, SiteError, WorkbenchError
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
from workbench.viz.common import message_figure
from workbench.widgets.base import (
    FULL_WIDTH,
    Panel,
    PanelFigure,
    add_classes,
    check_choice,
    engine_call,
    lines,
    replace_figure,
    source_of,
)

VIEWS = ("Curves", "Plateau lengths", "Interpolation")
LITERAL_LIMIT = 20_000  # numbers of a user direction tensor .code() writes out (a larger one is referred to)


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
        check_choice("site", site, WRITE_SITES, SiteError, "Plateau probes perturb one of these sites.")
        model.check_site(site, layer)
        directions = dict(directions or {})
        for name, d in directions.items():
            if not (isinstance(d, torch.Tensor) and d.dim() == 2 and d.shape[1] == model.cfg.d_model):
                shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                raise InputError(
                    f"directions[{name!r}] is {shape}: give a tensor [k, d_model] = [k, {model.cfg.d_model}]."
                )
            if name in FAMILIES:
                raise InputError(f"directions[{name!r}]: that name is a built-in family; choose another.")
        self.model = model
        self.plateau = None
        self.interpolation = None
        self._probe_run: dict | None = None  # the calls of the last successful runs (what .code() prints)
        self._interp_run: dict | None = None
        self._tokens_of: str | None = None  # which result the token figure shows: "probe" or "interpolation"
        self._quiet = False  # set while the panel changes its own controls, so observers do not redraw
        self.user_directions = directions
        self.reference_data = reference_data
        self._references: dict[tuple[str, int], RefStats] = {}
        if reference is not None:
            self._references[(reference.site, reference.layer)] = reference
        self._given_reference = reference
        self._build_controls(prompts, site, layer % model.cfg.n_layers, prompt_b)
        self.token_figure = PanelFigure()
        self.token_figure.add_class("wb-plateau-tokens")
        self.token_box = widgets.VBox([self.token_figure], layout=widgets.Layout(display="none"))
        super().__init__()
        self.figure.add_class("wb-plateau-figure")
        self.run_button.add_class("wb-plateau-run")
        self._wire()
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
        replace_figure(self.figure, message_figure("Press Run to probe.", height=200))

    def _build_controls(self, prompts, site: str, layer: int, prompt_b: str) -> None:
        wide = widgets.Layout(width=FULL_WIDTH)
        self.prompts_box = widgets.Textarea(
            value="\n".join([prompts] if isinstance(prompts, str) else prompts),
            description="Prompts",
            placeholder="one prompt per line (lengths may differ)",
            rows=3,
            layout=wide,
        )
        self.site_box = widgets.Dropdown(options=list(WRITE_SITES), value=site, description="Site")
        self.layer_box = widgets.IntSlider(
            value=layer,
            min=0,
            max=self.model.cfg.n_layers - 1,
            description="Layer",
            continuous_update=False,
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
        self.view_box = widgets.ToggleButtons(
            options=list(VIEWS),
            value="Curves",
            description="View",
            tooltips=[
                "median and spread of the response curves (after Run)",
                "where each curve first crosses the threshold (after Run)",
                "A's activation walked to prompt B's (Run computes it)",
            ],
        )
        self.prompt_b_box = widgets.Text(
            value=prompt_b, description="Prompt B", placeholder="interpolation target", layout=wide
        )
        self.notes = widgets.HTML()
        add_classes(
            "wb-plateau",
            prompts=self.prompts_box,
            site=self.site_box,
            layer=self.layer_box,
            position=self.position_box,
            families=self.families_box,
            synthetic=self.synthetic_box,
            directions=self.n_directions_box,
            max_size=self.max_size_box,
            sizes=self.n_sizes_box,
            metric=self.metric_box,
            threshold=self.threshold_box,
            log=self.log_box,
            view=self.view_box,
            prompt_b=self.prompt_b_box,
            notes=self.notes,
        )

    def _wire(self) -> None:
        """Views redraw from stored results; settings Run uses say that Run is needed."""
        self.run_button.on_click(lambda _: self.run())
        self.prompts_box.observe(lambda _: self._update_positions(), "value")
        self.metric_box.observe(lambda _: self._metric_changed(), "value")
        for box in (self.threshold_box, self.log_box, self.view_box):
            box.observe(lambda _: None if self._quiet else self.redraw(), "value")
        for box in (
            self.prompts_box,
            self.site_box,
            self.layer_box,
            self.position_box,
            self.families_box,
            self.synthetic_box,
            self.n_directions_box,
            self.max_size_box,
            self.n_sizes_box,
            self.prompt_b_box,
        ):
            box.observe(lambda _: self._note_pending(), "value")

    # -- controls --------------------------------------------------------------------------------------------
    def _update_positions(self) -> None:
        options: list[tuple[str, int | str]] = [
            ("last token", -1),
            ("every position but the first", "all-but-first"),
        ]
        prompts = lines(self.prompts_box.value)
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
        prompts = lines(self.prompts_box.value)
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
        if position == "all-but-first":
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
            compute = engine_call(reference_stats, self.model, self.reference_data, layer=layer, site=site)
            self._references[key] = compute(progress, cancel)
        return self._references.get(key)

    # -- show code ---------------------------------------------------------------------------------------
    def _view_kind(self) -> str:
        return "interpolation" if self.view_box.value == "Interpolation" else "probe"

    def code(self) -> str:
        """The public-API calls behind the current view: the last successful probe (or interpolation), drawn
        with the current metric, threshold and log scale."""
        script = Script()
        kind = self._view_kind()
        run = self._interp_run if kind == "interpolation" else self._probe_run
        if run is None:
            run = self._next_run(kind)
            script.header.append("not run yet: the call Run will make")
        script.add(Expr(f"model = load_model({self.model.name!r})", (("workbench.models", "load_model"),)))
        if kind == "interpolation":
            kw = dict(run)
            args = [kw.pop("prompts_a"), kw.pop("prompts_b")]
            script.call("result", "workbench.plateau", "interpolate", [Name("model"), *args], kw)
            script.add("result.plot()")
            return script.render()
        kw = dict(run)
        prompts = kw.pop("prompts")
        reference = kw.pop("_reference", None)
        if reference == "data":
            script.add(source_of(self.reference_data), assign="corpus")
            script.call(
                "reference",
                "workbench.plateau",
                "reference_stats",
                [Name("model"), Name("corpus")],
                {"layer": kw["layer"], "site": kw["site"]},
            )
            kw["reference"] = Name("reference")
        elif reference == "given":
            script.add("# reference: the RefStats you gave the panel")
            kw["reference"] = Name("reference")
        if "directions" in kw:
            given = kw["directions"]
            if sum(d.numel() for d in given.values()) <= LITERAL_LIMIT:
                script.add(literal(given), assign="directions")
            else:
                script.add("# directions: the dict you gave the panel, " + ", ".join(given))
            kw["directions"] = Name("directions")
        script.call("result", "workbench.plateau", "probe", [Name("model"), prompts], kw)
        plot = {"metric": self.metric_box.value, "threshold": self.threshold_box.value}
        if self.view_box.value == "Plateau lengths":
            groups = self.plateau.groups() if self.plateau is not None else list(run["families"])
            baseline = "cov_mixture" if "cov_mixture" in groups else groups[0]  # as the figure chooses
            script.add(call("workbench.viz.plateau", "plateau_lengths", [Name("result")], plot))
            script.add(call("", "result.compare", [], {"baseline": baseline, **plot}))
        else:
            script.add(call("", "result.plot", [], {**plot, "log_y": self.log_box.value}))
        return script.render()

    def _next_run(self, kind: str) -> dict:
        """The call Run would make now (for code before the first run)."""
        if kind == "interpolation":
            return self._interp_kwargs()
        kw = self._probe_kwargs()
        key = (kw["site"], kw["layer"])
        if self.reference_data is not None:
            kw["_reference"] = "data"
        elif key in self._references:
            kw["_reference"] = "given"
        return kw

    def _note_pending(self) -> None:
        """A control that takes effect on Run changed while a result is shown: say so."""
        if self.busy or (self.plateau is None and self.interpolation is None):
            return
        self.set_status(
            "Press Run to compute with the changed settings (the figure shows the last run).", "info"
        )

    # -- running -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the probe (or the interpolation, in that view) for the current controls."""
        try:
            if self.view_box.value == "Interpolation":
                kwargs = self._interp_kwargs()

                def show(result):
                    self._interp_run = kwargs
                    self._show_interpolation(result)

                self.start(engine_call(interpolate, self.model, **kwargs), show, label="Interpolating")
                return
            kwargs = self._probe_kwargs()
        except WorkbenchError as err:
            self.show_error(err)
            return
        call_kwargs = dict(kwargs)
        prompts = call_kwargs.pop("prompts")
        key = (kwargs["site"], kwargs["layer"])
        reference = (
            "data" if self.reference_data is not None else "given" if key in self._references else None
        )

        def compute(progress, cancel):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the result's warnings are shown in the notes line instead
                ref = self._reference(kwargs["site"], kwargs["layer"], False, cancel)
                # remote models: a repeated run is served from the result cache, not resubmitted
                return engine_call(probe, self.model, prompts, **call_kwargs, reference=ref)(progress, cancel)

        def show(result):
            self._probe_run = {**kwargs, **({"_reference": reference} if reference else {})}
            self._show_probe(result)

        self.start(compute, show, label="Probing")

    def _show_probe(self, result) -> None:
        self.plateau = result
        self._set_default_threshold()
        if self._tokens_of == "probe":  # the clicked curve belonged to the previous result
            self._hide_tokens()
        self.redraw()

    def _show_interpolation(self, result) -> None:
        self.interpolation = result
        if self._tokens_of == "interpolation":
            self._hide_tokens()
        self.redraw()

    def _show_notes(self, notes) -> None:
        self.notes.value = "".join(
            f'<div class="wb-plateau-note" style="color:#8a6d00">⚠ {html.escape(n)}</div>' for n in notes
        )

    # -- drawing -----------------------------------------------------------------------------------------
    def build_figure(self):
        """The figure of the current view from the stored results (a message when the view's result is not
        computed yet)."""
        view = self.view_box.value
        if view == "Interpolation":
            if self.interpolation is None:
                return message_figure(
                    "Interpolation: type prompt B and press Run to walk the first prompt's activation to B's.",
                    height=300,
                )
            return viz.interpolation(self.interpolation)
        if self.plateau is None:
            return message_figure(f"{view}: press Run to probe.", height=300)
        metric, threshold = self.metric_box.value, self.threshold_box.value
        if view == "Curves":
            return viz.curves(self.plateau, metric, threshold, log_y=self.log_box.value)
        return viz.plateau_lengths(self.plateau, metric, threshold)

    def redraw(self) -> None:
        """Redraw the current view from stored results (no model runs)."""
        try:
            fig = self.build_figure()
        except WorkbenchError as err:
            self.draw_failed(self.figure, err)
            self._hide_tokens()
            return
        if self.draw_error is not None:
            self.draw_error = None
            self.set_status("Showing the stored result (no model run).", "ok")
        replace_figure(self.figure, fig)
        for trace in self.figure.data:
            role = (trace.meta or {}).get("role") if isinstance(trace.meta, dict) else None
            if role in ("curves", "pair"):
                trace.on_click(self._on_click)
        kind = self._view_kind()
        shown = self.interpolation if kind == "interpolation" else self.plateau
        waiting = shown is None
        self._show_notes(getattr(shown, "warnings", ()))  # the notes of the result this view draws
        if waiting and not self.busy:
            hint = "type prompt B and " if kind == "interpolation" and not self.prompt_b_box.value else ""
            self.set_status(f"{self.view_box.value}: {hint}press Run to compute this view.", "info")
        # the token ribbon belongs to a curve of the result this view shows
        self.token_box.layout.display = "" if self._tokens_of == kind and not waiting else "none"
        self.refresh_code()

    def _hide_tokens(self) -> None:
        self._tokens_of = None
        self.token_box.layout.display = "none"

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
        self._tokens_of = "probe"
        self.token_box.layout.display = ""
        self.set_status(
            f"Tokens along {viz.direction_label(self.plateau, direction)}, {self.plateau.base_label(base)}.",
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
        self._tokens_of = "interpolation"
        self.token_box.layout.display = ""
