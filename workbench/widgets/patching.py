"""`PatchingExplorer`: type a clean and a corrupt prompt, run a patching sweep, click a cell to see its heads.

    from workbench.widgets.patching import PatchingExplorer
    PatchingExplorer(model, "When Mary and John went to the store, John gave a drink to",
                     "When Mary and John went to the store, Mary gave a drink to", answers=(" Mary", " John"))

The panel holds no science: its controls become a `workbench.patching.sweep` call (see `.code()`, which prints
the call of the last successful run), and its figures come from `workbench.viz.patching`. Switching the metric,
the normalisation or the pair redraws from the stored result without running the model again; prompts, answers,
site and direction take effect on Run.
"""

from __future__ import annotations

import html
import time

import ipywidgets as widgets

from workbench.codegen import Expr, Name, Script, literal
from workbench.core.run import Run
from workbench.errors import Cancelled, InputError, SiteError, WorkbenchError
from workbench.patching import METRICS, Metric, sweep
from workbench.patching.inputs import resolve_direction, resolve_sites
from workbench.patching.spec import PatchSpec
from workbench.patching.sweep import remote_jobs
from workbench.viz.patching import effect_reach, heatmap
from workbench.widgets.base import (
    Panel,
    PanelFigure,
    add_classes,
    check_choice,
    engine_call,
    format_answers,
    lines,
    parse_answers,
    replace_figure,
    text_area,
)
from workbench.widgets.circuits import HeadViews
from workbench.widgets.remote import RemoteStatus, tracked

HEAD_VIEWS = ("z", "pattern")
# the site name first, so that a narrow dropdown still shows which site it is
SITE_OPTIONS = [
    ("resid_pre: entering the block", "resid_pre"),
    ("resid_mid: between attention and MLP", "resid_mid"),
    ("resid_post: leaving the block", "resid_post"),
    ("attn_out: attention output", "attn_out"),
    ("mlp_out: MLP output", "mlp_out"),
    ("block: attn_out + mlp_out + resid_pre", "block"),
    ("z: each head's output, all positions", "z"),
    ("pattern: each head's attention pattern", "pattern"),
]
BLOCK_VIEW = ["resid_pre", "attn_out", "mlp_out"]
_DIRECTION_HELP = {
    "denoising": "Denoising: clean activations go into the corrupt run. 1 = the patch alone restores the clean "
    "answer (sufficient).",
    "noising": "Noising: corrupt activations go into the clean run. Cells that fall towards 0 are necessary "
    "for the clean answer.",
}


class PatchingExplorer(Panel):
    """Activation patching in a panel: prompts, answers, site, direction and metric; a layer x position heatmap
    (or layer x head for per-head sites) with the prompt's tokens; click a cell to patch each head there.

    Attributes:
        grid: the main sweep's `PatchingResult` (kept when a later run fails).
        heads: the drill-down `PatchingResult` for the clicked cell, or None.
        figure / heads_figure: the two figure widgets.
        remote_status: for NDIF models, the job status line (job id, state, Cancel); else None.

    Raises `SiteError` / `InputError` (with the sites, directions or metrics there are) for a `site`,
    `direction` or `metric` the panel cannot offer.
    """

    def __init__(
        self,
        model,
        clean: str | list[str] = "",
        corrupt: str | list[str] = "",
        answers=(),
        *,
        site: str = "resid_pre",
        direction: str = "denoising",
        metric: str | Metric = "logit_diff",
        normalize: bool = True,
        extra_metrics: list[Metric] | None = None,
    ):
        self.model = model
        self.grid = None
        self.heads = None
        self._grid_kwargs: dict | None = None  # the sweep of the last successful run (what .code() prints)
        self._heads_kwargs: dict | None = None
        self._drill_cell = None
        self._user_metrics = {
            m.name: m for m in ([metric] if isinstance(metric, Metric) else []) + list(extra_metrics or [])
        }
        direction = self._check(model, site, direction, metric)
        self._build_controls(clean, corrupt, answers, site, direction, metric, normalize)
        self.heads_figure = PanelFigure()
        self.heads_figure.add_class("wb-patching-heads")
        self._quiet = False  # set while the panel itself changes controls, so observers do not redraw
        super().__init__()
        self.figure.add_class("wb-patching-figure")
        self.run_button.add_class("wb-patching-run")
        self.warning_line = widgets.HTML()
        self.warning_line.add_class("wb-patching-warnings")
        # click a head in the drill-down: its pattern, DLA and paths (workbench.widgets.circuits)
        self.head_views = HeadViews(model, show_prompts=False)
        self.heads_box = widgets.VBox(
            [self.heads_figure, self.head_views], layout=widgets.Layout(display="none")
        )
        self.remote_status = None
        if getattr(model, "remote", False) is True:  # NDIF: show each job's id and state, with Cancel
            self.remote_status = RemoteStatus()
        self._wire()
        self.children = [
            self.clean_box,
            self.corrupt_box,
            self.answers_box,
            widgets.HBox(
                [self.site_box, self.metric_box, self.pair_box], layout=widgets.Layout(flex_flow="row wrap")
            ),
            widgets.HBox(
                [self.direction_box, self.normalize_box], layout=widgets.Layout(flex_flow="row wrap")
            ),
            self.direction_help,
            self.run_bar,
            *([self.remote_status] if self.remote_status is not None else []),
            self.status,
            self.warning_line,
            self.figure,
            self.heads_box,
            self.code_view,
        ]
        self.set_status(
            "Edit the prompts and press Run. Click a cell of the heatmap to patch each head there."
        )

    def _check(self, model, site: str, direction: str, metric) -> str:
        """The engine's checks and sentences, before the values reach the controls (whose own error is a long
        TraitError); returns the direction's canonical name."""
        sites = [v for _, v in SITE_OPTIONS]
        if site not in sites:
            resolve_sites(model, site)  # the engine's sentence for a site it does not know
            check_choice("site", site, sites, SiteError, "A panel shows one site, or 'block' for three.")
        resolve_sites(model, BLOCK_VIEW if site == "block" else site)  # ... or that the model lacks
        check_choice(
            "metric",
            metric.name if isinstance(metric, Metric) else metric,
            list(METRICS) + list(self._user_metrics),
            hint="Give your own as Metric(name, fn).",
        )
        return resolve_direction(direction)

    def _build_controls(self, clean, corrupt, answers, site, direction, metric, normalize) -> None:
        self.clean_box = text_area(
            "\n".join([clean] if isinstance(clean, str) else clean), "Clean", "one prompt per line", 2
        )
        self.corrupt_box = text_area(
            "\n".join([corrupt] if isinstance(corrupt, str) else corrupt),
            "Corrupt",
            "same number of tokens as the clean prompt",
            2,
        )
        self.answers_box = text_area(
            format_answers(answers), "Answers", "' Mary', ' John'   (correct, incorrect)"
        )
        self.site_box = widgets.Dropdown(
            options=SITE_OPTIONS, value=site, description="Site", layout=widgets.Layout(width="360px")
        )
        self.direction_box = widgets.ToggleButtons(
            options=[("denoising", "denoising"), ("noising", "noising")],
            value=direction,
            description="Direction",
            tooltips=[_DIRECTION_HELP["denoising"], _DIRECTION_HELP["noising"]],
        )
        metric_names = list(METRICS) + list(self._user_metrics)
        self.metric_box = widgets.Dropdown(
            options=[(METRICS[m].title if m in METRICS else m, m) for m in metric_names],
            value=metric.name if isinstance(metric, Metric) else metric,
            description="Metric",
            layout=widgets.Layout(width="300px"),
        )
        self.normalize_box = widgets.Checkbox(
            value=normalize,
            description="normalise (0 = corrupt, 1 = clean)",
            indent=False,
            layout=widgets.Layout(width="auto"),  # the default width cuts the label
        )
        self.pair_box = widgets.Dropdown(
            options=[("mean", -1)], value=-1, description="Pair", layout=widgets.Layout(width="160px")
        )
        self.direction_help = widgets.HTML(self._help_text())
        add_classes(
            "wb-patching",
            clean=self.clean_box,
            corrupt=self.corrupt_box,
            answers=self.answers_box,
            site=self.site_box,
            direction=self.direction_box,
            metric=self.metric_box,
            normalize=self.normalize_box,
            pair=self.pair_box,
        )

    def _wire(self) -> None:
        """The metric, normalisation and pair redraw; prompts, site and direction wait for Run."""
        self.run_button.on_click(lambda _: self.run())
        self.direction_box.observe(
            lambda _: setattr(self.direction_help, "value", self._help_text()), "value"
        )
        for box in (self.metric_box, self.normalize_box, self.pair_box):
            box.observe(lambda _: self.redraw(), "value")
        for box in (self.clean_box, self.corrupt_box, self.answers_box, self.site_box, self.direction_box):
            box.observe(lambda _: self._note_pending(), "value")

    # -- state -> API call ---------------------------------------------------------------------------
    def _help_text(self) -> str:
        return f'<span class="wb-patching-help" style="color:#555">{_DIRECTION_HELP[self.direction_box.value]}</span>'

    def _metric_arg(self):
        name = self.metric_box.value
        return self._user_metrics.get(name, name)

    def _sweep_kwargs(self) -> dict:
        clean, corrupt = lines(self.clean_box.value), lines(self.corrupt_box.value)
        if not clean:
            raise InputError("Type a clean prompt (one per line for several pairs).")
        answers = parse_answers(self.answers_box.value)
        site = self.site_box.value
        kwargs = {
            "clean": clean,
            "corrupt": corrupt,
            "answers": answers[0] if len(answers) == 1 else answers,
            "site": list(BLOCK_VIEW) if site == "block" else site,
            "direction": self.direction_box.value,
            "metric": self._metric_arg(),
        }
        if site in HEAD_VIEWS:
            kwargs["positions"] = "together"
        return kwargs

    def _drill_kwargs(self, layer: int, position: int, head: int | None) -> dict:
        kwargs = dict(self._grid_kwargs)
        grid = self.grid
        if head is None:
            # a layer x position cell: every head's output and pattern at that layer and position
            kwargs.update(site=["z", "pattern"], layers=[layer], positions=[list(grid.positions[position])])
        else:  # a layer x head cell: that head at each position
            kwargs.update(layers=[layer], heads=[head], positions="each")
        return kwargs

    def _note_pending(self) -> None:
        """A control that takes effect on Run changed: say so (the picture still shows the last run)."""
        if self.grid is None or self.busy:
            return

        def run_inputs(kwargs):  # (the metric is also a view: switching it redraws)
            return {k: v for k, v in kwargs.items() if k != "metric"}

        try:
            pending = run_inputs(self._sweep_kwargs()) != run_inputs(self._grid_kwargs)
        except WorkbenchError:
            pending = True
        if pending:
            self.set_status("Press Run to patch with the new prompts, site or direction.", "info")

    def code(self) -> str:
        """The public-API calls that reproduce what the panel shows: the last successful sweep (and drill-down),
        drawn with the current metric, normalisation and pair."""
        script = Script()
        kwargs = self._grid_kwargs
        if kwargs is None:
            kwargs = self._sweep_kwargs()
            script.header.append("not run yet: the sweep Run will make")
        script.add(Expr(f"model = load_model({self.model.name!r})", (("workbench.models", "load_model"),)))
        kwargs = self._code_kwargs(kwargs, script)
        # the prompts and answers once, as variables: the drill-down's call uses them too
        for name in ("clean", "corrupt", "answers"):
            script.add(literal(kwargs[name]), assign=name)
        inputs = {name: Name(name) for name in ("clean", "corrupt", "answers")}
        script.call("result", "workbench.patching", "sweep", [Name("model")], {**kwargs, **inputs})
        script.add(f"result.plot({_plot_args(self)})")
        if self.heads is not None and self._heads_kwargs is not None:
            heads = {**self._code_kwargs(self._heads_kwargs, None), **inputs}
            script.call("heads", "workbench.patching", "sweep", [Name("model")], heads)
            script.add(f"heads.plot({_plot_args(self)})")
        return script.render()

    def _code_kwargs(self, kwargs: dict, script: Script | None) -> dict:
        metric = kwargs.get("metric")
        if isinstance(metric, Metric):
            name = metric.name if metric.name.isidentifier() else "metric"
            if script is not None:
                script.add(f"# {name}: the Metric({metric.name!r}, fn) you gave the explorer")
            kwargs = {**kwargs, "metric": Name(name)}
        return kwargs

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the sweep for the current controls (in the background in a notebook)."""
        try:
            kwargs = self._sweep_kwargs()
        except WorkbenchError as err:
            self.show_error(err)
            return

        def show(result):
            self._grid_kwargs = kwargs
            self._show_grid(result)
            if _is_partial(result):
                self.done_note = f"Stopped: {result.warnings[0]}"

        self.start(self._compute(kwargs, fill=True), show, label=f"Patching {self._cost(kwargs)}")

    def drill(self, layer: int, position: int, head: int | None = None) -> None:
        """Patch each head at (layer, position index) of the main grid, or (for per-head views) the head `head`
        of `layer` at each position; draws the result below the heatmap."""
        if self.grid is None:
            self.set_status("Run a sweep first, then click a cell.", "info")
            return
        kwargs = self._drill_kwargs(layer, position, head)

        def show(result):
            self._drill_cell, self._heads_kwargs = (layer, position, head), kwargs
            self._show_heads(result)

        self.start(self._compute(kwargs), show, label=f"Patching heads of layer {layer}")

    def _cost(self, kwargs: dict) -> str:
        """What a sweep of `kwargs` patches, said before it runs: pairs x positions x layers (x heads) x sites."""
        sites = kwargs["site"] if isinstance(kwargs["site"], list) else [kwargs["site"]]
        n_pairs, n_layers = len(kwargs["clean"]), self.model.cfg.n_layers
        try:
            n_pos = (
                1
                if kwargs.get("positions") == "together"
                else self.model.to_tokens(kwargs["clean"][0]).shape[-1]
            )
        except WorkbenchError:  # the sweep itself says what is wrong with the prompt
            return ""
        heads = self.model.cfg.n_heads if kwargs["site"] in HEAD_VIEWS else 1
        runs = n_pairs * n_pos * n_layers * heads * len(sites)
        parts = [f"{n_pairs} pair(s)", f"{n_pos} position(s)", f"{n_layers} layers"]
        parts += [f"{heads} heads"] if heads > 1 else []
        parts += [f"{len(sites)} sites"] if len(sites) > 1 else []
        return f"({' x '.join(parts)} = {runs:,} patched runs{self._jobs(kwargs)})"

    def _jobs(self, kwargs: dict) -> str:
        """ "; N NDIF jobs" for a remote model ("" for a local one, or inputs the sweep will refuse)."""
        if not self.model.remote:
            return ""
        options = {k: kwargs.get(k) for k in ("layers", "heads")}
        options.update(positions=kwargs.get("positions", "each"), metric=kwargs.get("metric", "logit_diff"))
        try:
            spec = PatchSpec.resolve(
                self.model, kwargs["clean"], kwargs["corrupt"], kwargs["answers"],
                site=kwargs["site"], direction=kwargs["direction"], **options,
            )  # fmt: skip
        except WorkbenchError:
            return ""
        n = remote_jobs(self.model, spec)
        return f"; {n} NDIF job{'s' if n != 1 else ''}"

    def _compute(self, kwargs: dict, fill: bool = False):
        """The panel's compute function for `sweep(**kwargs)`. With `fill` (a local model's main sweep), the heatmap
        fills in layer by layer, the status line estimates the time left, and Stop keeps the finished layers."""

        def compute(progress, cancel):
            # remote models: a repeated sweep or drill-down is served from the result cache, not resubmitted
            # (warn=False: the panel shows the baseline warnings itself)
            if not fill or self.model.remote:
                return engine_call(sweep, self.model, **kwargs, warn=False)(progress, cancel)
            previous, partial, started, drawn = self.grid, [None], time.perf_counter(), [0.0]

            def counted(done, total):
                progress(done, total)
                if 0 < done < total:
                    left = (time.perf_counter() - started) / done * (total - done)
                    self.set_status(
                        f"Patching: {done} of {total} heatmap rows done, about {left:.0f} s left.", "busy"
                    )

            def draw(result):
                partial[0] = result
                # a picture per layer, but not faster than the page draws
                if time.perf_counter() - drawn[0] > 0.3:
                    drawn[0] = time.perf_counter()
                    self._show_grid(result)

            run = Run(progress=counted, cancel=cancel, on_partial=draw)
            try:
                return sweep(self.model, **kwargs, run=run, warn=False)
            except Cancelled:
                if partial[0] is None:
                    raise
                return partial[0]  # what finished, marked partial by its first warning
            except BaseException:
                if partial[0] is not None and previous is not None:
                    self._show_grid(previous)  # the failed run's rows go: the last good result stays
                raise

        if self.remote_status is None:
            return compute
        return tracked(compute, lambda token: self.remote_status.runner(token))

    # -- drawing -------------------------------------------------------------------------------------
    def _view(self) -> dict:
        pair = self.pair_box.value
        return {
            "metric": self.metric_box.value,
            "normalize": self.normalize_box.value,
            "pair": None if pair < 0 else pair,
        }

    def _show_grid(self, result) -> None:
        self.grid = result
        self.warning_line.value = "".join(
            f'<div style="color:#8a6d00">&#9888; {html.escape(w)}</div>' for w in result.warnings
        )
        self.heads, self._heads_kwargs, self._drill_cell = None, None, None
        self.heads_box.layout.display = "none"
        options = [("mean", -1)] + [(f"pair {i}", i) for i in range(result.n_pairs)]
        if list(self.pair_box.options) != options:
            self._quiet = True
            try:
                self.pair_box.options, self.pair_box.value = options, -1
            finally:
                self._quiet = False
        self.redraw()

    def _show_heads(self, result) -> None:
        self.heads = result
        self.heads_box.layout.display = ""
        self.redraw()

    def build_figures(self) -> tuple:
        """(main figure, drill-down figure or None) for the stored results and the current view; raises the
        workbench's error when the view cannot be drawn."""
        view = self._view()
        main = heatmap(self.grid, **view)
        drill = None
        if self.heads is not None:
            layer, position, head = self._drill_cell
            where = self.grid.position_labels[position] if head is None else f"head {head}"
            if head is None and view["pair"]:
                where = main.data[0].x[position]  # the chosen pair's token at that position
            reach = effect_reach(self.grid, **view)  # the main map's colour scale: comparable colours
            drill = heatmap(self.heads, **view, reach=reach, title=f"Drill-down: layer {layer}, {where}")
        return main, drill

    def redraw(self) -> None:
        """Redraw both figures from the stored results (no model run). A view that cannot be drawn says why in
        the figure and the status line."""
        if self._quiet or self.grid is None:
            return
        try:
            main, drill = self.build_figures()
        except WorkbenchError as err:
            self.draw_failed(self.figure, err)
            self.heads_box.layout.display = "none"
            self.refresh_code()
            return
        if self.draw_error is not None:
            self.draw_error = None
            self.set_status("Showing the stored result (no model run).", "ok")
        replace_figure(self.figure, main)
        for trace in self.figure.data:
            trace.on_click(self._on_click)
        if drill is not None:
            replace_figure(self.heads_figure, drill)
            for trace in self.heads_figure.data:
                trace.on_click(self._on_head_click)
            self.heads_box.layout.display = ""
        self.refresh_code()

    def _on_head_click(self, trace, points, selector=None) -> None:
        """A head of the drill-down: show its views for the prompts of the last run."""
        if not points.point_inds or self._grid_kwargs is None:
            return
        row, col = points.point_inds[0]
        layer, _, head = (int(v) for v in trace.customdata[row][col][:3])
        if head >= 0:
            kw = self._grid_kwargs
            self.head_views.use(kw["clean"], kw["corrupt"], kw["answers"], direction=kw["direction"])
            self.head_views.show_head(layer, head)

    def _on_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        row, col = points.point_inds[0]
        layer, position, head = (int(v) for v in trace.customdata[row][col][:3])
        self.drill(layer, position, None if head < 0 else head)


def _plot_args(panel: PatchingExplorer) -> str:
    view = panel._view()
    args = [f"metric={view['metric']!r}", f"normalize={view['normalize']!r}"]
    if view["pair"] is not None:
        args.append(f"pair={view['pair']}")
    return ", ".join(args)


def _is_partial(result) -> bool:
    return bool(result.warnings) and result.warnings[0].startswith("Partial:")
