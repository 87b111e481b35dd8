"""`ToyModelExplorer`: train compressed-computation toy models, compare them with baselines, open their mechanism.

    from workbench.widgets import ToyModelExplorer
    ToyModelExplorer()                       # controls for the task; Train runs in the background

The panel holds no science: Train is `workbench.toymodels.train`, the σ sweep `sigma_sweep`, the transplant
`transplant`, baselines `naive_model` / `offset_model` / `snmf_model`, every L/p curve `evaluate`; figures come from
`workbench.viz.toymodels`. `.code()` prints those calls for the panel's last successful run. Clicking a curve of
the L/p-vs-p plot or a point of the L/p-vs-σ plot loads that model into the mechanism views (spectrum with
cosines, W_in W_out vs M scatter, per-feature curves); clicking a feature's curve highlights it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench.codegen import Expr, Name, Script, call, literal
from workbench.core import Run
from workbench.errors import InputError, WorkbenchError
from workbench.toymodels import (
    LossCurves,
    ToyConfig,
    ToyModel,
    TrainingProgress,
    best_offset,
    combine,
    default_ps,
    evaluate,
    finetune,
    mechanism,
    naive_model,
    offset_model,
    responses,
    sigma_sweep,
    snmf_model,
    train,
    transplant,
)
from workbench.viz import toymodels as viz
from workbench.widgets.base import Panel, add_classes, replace_figure

MIXING_OPTIONS = {
    "M = 0 (clean labels)": ("clean", "I-G"),
    "embedding-like, M = I − W_E W_Eᵀ (exact reduction)": ("embed", "I-G"),
    "embedding-like, M = W_E W_Eᵀ − I (critique's code)": ("embed", "G-I"),
    "symmetric Gaussian σ": ("symmetric", "I-G"),
    "asymmetric Gaussian σ": ("asymmetric", "I-G"),
    "low rank (symmetric, flat spectrum)": ("lowrank", "I-G"),
}
BASELINES = ("naive", "naive + best offset", "semi-NMF (exact, I + Mᵀ)", "semi-NMF (critique's code, I + M)")
MECH_VIEWS = (
    "spectrum (eigenvectors)",
    "spectrum (singular vectors)",
    "W_in W_out vs M",
    "feature curves",
    "projections",
)
REDRAW_EVERY = 0.3  # seconds between live loss-curve redraws
STYLE = {"description_width": "110px"}
API = "workbench.toymodels"


class ToyModelExplorer(Panel):
    """Compressed computation toy models in a panel.

    Args:
        config: the starting `ToyConfig` (default: the critique's simplified model, M = 0, p = 0.01, 10k steps).
        eval_points: densities of the L/p-vs-p plot (log-spaced 0.001..1).
        n_samples: evaluation samples per density (10^5: standard error ~1% of L/p).
        n_workers: training processes for the σ sweep (one thread each).
        sweep_sigmas: the σ values of the sweep button.

    Attributes:
        models: every model on the L/p-vs-p plot, in order; curves: their `LossCurves`.
        current: the model shown in the mechanism views. sweep: the last `SigmaSweep`; transplanted: the last
        `Transplant`. result: whatever the last run produced.
    """

    def __init__(
        self,
        config: ToyConfig | None = None,
        *,
        eval_points: int = 12,
        n_samples: int = 100_000,
        n_workers: int = 2,
        sweep_sigmas: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08),
    ):
        super().__init__()
        cfg = config or ToyConfig()
        self.eval_points, self.n_samples, self.n_workers = eval_points, n_samples, n_workers
        self.models: list[ToyModel] = []
        self.recipes: list[Expr] = []  # the public-API expression that recreates each model
        self.curves: LossCurves | None = None
        self.current: ToyModel | None = None
        self.current_recipe: Expr | None = None
        self.sweep = None
        self.transplanted = None
        self.highlight: int | None = None
        self._show_transplant = (
            False  # the training figure shows the last transplant (else the current model)
        )
        self._last_code: list[
            tuple[str | None, Expr | str]
        ] = []  # (assigned name, statement) of the last run
        self._live: dict[int, TrainingProgress] = {}
        self._last_draw = 0.0
        self._draw_lock = threading.Lock()
        self._build_controls(cfg, sweep_sigmas)
        self._build_buttons()
        self._build_figures()
        add_classes(
            "wb-toy",
            steps=self.steps_box,
            sweep_kinds=self.sweep_kinds,
            baseline=self.baseline_box,
            add_baseline=self.baseline_button,
            sweep=self.sweep_button,
            transplant=self.transplant_button,
            mechanism_view=self.mech_box,
        )
        self.children = self._layout()
        self._sync_controls()
        self.set_status("Set the task and press Train (10k steps take about 15 s of one core).")

    def _build_controls(self, cfg: ToyConfig, sweep_sigmas: tuple[float, ...]) -> None:
        wide = widgets.Layout(width="470px")
        self.mixing_box = widgets.Dropdown(
            options=list(MIXING_OPTIONS),
            value=_mixing_label(cfg),
            description="mixing M",
            style=STYLE,
            layout=wide,
        )
        self.model_box = widgets.Dropdown(
            options=[
                ("simplified MLP n → d → n", "mlp"),
                ("residual CC model (frozen W_E, W_U = W_Eᵀ)", "residual"),
            ],
            value=cfg.model,
            description="model",
            style=STYLE,
            layout=wide,
        )
        self.sigma_box = widgets.FloatSlider(
            value=cfg.sigma or 0.03,
            min=0,
            max=0.1,
            step=0.001,
            readout_format=".3f",
            description="σ",
            style=STYLE,
            continuous_update=False,
        )
        self.learn_box = widgets.Checkbox(
            value=cfg.learn_sigma, description="learn σ (starts at σ)", indent=False
        )
        self.p_box = widgets.FloatLogSlider(
            value=cfg.p,
            base=10,
            min=-3,
            max=0,
            step=0.05,
            readout_format=".3g",
            description="training p",
            style=STYLE,
            continuous_update=False,
        )
        self.rank_box = _int_box(cfg.rank or 10, "rank", 1, 10_000)
        self.n_box = _int_box(cfg.n_features, "features n", 2, 2000)
        self.d_box = _int_box(cfg.d_mlp, "neurons d", 1, 2000)
        self.steps_box = _int_box(cfg.steps, "steps", 1, 10_000_000)
        self.seed_box = widgets.IntText(
            value=cfg.seed, description="seed", style=STYLE, layout=widgets.Layout(width="200px")
        )
        self.sweep_box = widgets.Text(
            value=", ".join(f"{s:g}" for s in sweep_sigmas), description="sweep σ", style=STYLE, layout=wide
        )
        self.sweep_kinds = widgets.SelectMultiple(
            options=["symmetric", "asymmetric"],
            value=("symmetric", "asymmetric"),
            rows=2,
            description="sweep kinds",
            style=STYLE,
        )
        self.baseline_box = widgets.Dropdown(
            options=BASELINES,
            value="naive",
            description="baseline",
            style=STYLE,
            layout=widgets.Layout(width="400px"),
        )
        self.mech_box = widgets.ToggleButtons(options=MECH_VIEWS, value=MECH_VIEWS[0])
        self.mech_box.style.button_width = "175px"
        self.mixing_box.observe(lambda _c: self._sync_controls(), names="value")
        self.model_box.observe(lambda _c: self._sync_controls(), names="value")
        self.mech_box.observe(lambda _c: self.redraw_mechanism(), names="value")

    def _build_buttons(self) -> None:
        self.run_button.description = "Train"
        self.run_button.add_class("wb-toy-train")
        self.sweep_button = widgets.Button(
            description="σ sweep", icon="line-chart", layout=widgets.Layout(width="110px")
        )
        self.transplant_button = widgets.Button(
            description="Transplant to M = 0", layout=widgets.Layout(width="170px")
        )
        self.baseline_button = widgets.Button(
            description="Add baseline", icon="plus", layout=widgets.Layout(width="130px")
        )
        self.run_bar.children = (
            self.run_button,
            self.sweep_button,
            self.transplant_button,
            self.stop_button,
            self.progress,
            self.code_button,
        )
        self.run_button.on_click(lambda _b: self.train())
        self.sweep_button.on_click(lambda _b: self.run_sweep())
        self.transplant_button.on_click(lambda _b: self.run_transplant())
        self.baseline_button.on_click(lambda _b: self.add_baseline())

    def _build_figures(self) -> None:
        self.p_figure = go.FigureWidget()
        self.sigma_figure = go.FigureWidget()
        self.mech_figure = go.FigureWidget()
        for fig, cls in (
            (self.figure, "training"),
            (self.p_figure, "p"),
            (self.sigma_figure, "sigma"),
            (self.mech_figure, "mechanism"),
        ):
            fig.add_class(f"wb-toy-{cls}-figure")

    def _layout(self) -> list[widgets.Widget]:
        wrap = widgets.Layout(flex_flow="row wrap")
        sizes = widgets.VBox(
            [
                widgets.HBox([self.n_box, self.d_box]),
                widgets.HBox([self.steps_box, self.seed_box]),
                widgets.HBox([self.learn_box, self.rank_box]),
            ]
        )
        task = widgets.VBox([self.model_box, self.mixing_box, self.sigma_box, self.p_box])
        controls = widgets.VBox(
            [
                widgets.HBox([task, sizes], layout=wrap),
                widgets.HBox([self.sweep_box, self.sweep_kinds], layout=wrap),
                widgets.HBox([self.baseline_box, self.baseline_button]),
            ]
        )
        return [
            controls,
            self.run_bar,
            self.status,
            self.code_view,
            # two figures a row where they fit, else one: a figure is drawn 700 px wide, and a half-width box
            # cut off its right part (the legend, and the densities and inputs up to 1)
            widgets.HBox([widgets.Box([self.figure]), widgets.Box([self.p_figure])], layout=wrap),
            widgets.HBox(
                [widgets.Box([self.sigma_figure]), widgets.VBox([self.mech_box, self.mech_figure])],
                layout=wrap,
            ),
        ]

    # -- controls ------------------------------------------------------------------------------------------
    def _sync_controls(self) -> None:
        residual = self.model_box.value == "residual"
        if residual:
            self.mixing_box.value = "embedding-like, M = I − W_E W_Eᵀ (exact reduction)"
        self.mixing_box.disabled = residual
        kind = MIXING_OPTIONS[self.mixing_box.value][0]
        gaussian = kind in ("symmetric", "asymmetric", "lowrank")
        self.sigma_box.disabled = not gaussian
        self.learn_box.disabled = not gaussian
        self.rank_box.layout.display = "" if kind == "lowrank" else "none"

    def config(self) -> ToyConfig:
        """The `ToyConfig` the controls describe (raises `InputError` with a sentence when they are invalid)."""
        kind, sign = MIXING_OPTIONS[self.mixing_box.value]
        gaussian = kind in ("symmetric", "asymmetric", "lowrank")
        return ToyConfig(
            n_features=int(self.n_box.value),
            d_mlp=int(self.d_box.value),
            p=float(f"{self.p_box.value:.4g}"),
            mixing=kind,
            sigma=float(self.sigma_box.value) if gaussian else 0.0,
            learn_sigma=bool(self.learn_box.value) and gaussian,
            embed_sign=sign,
            rank=int(self.rank_box.value) if kind == "lowrank" else None,
            model=self.model_box.value,
            steps=int(self.steps_box.value),
            seed=int(self.seed_box.value),
        )

    def set_config(self, cfg: ToyConfig) -> None:
        """Set the controls from a config."""
        self.model_box.value = cfg.model
        self.mixing_box.value = _mixing_label(cfg)
        if cfg.has_sigma:
            self.sigma_box.value = cfg.sigma
        self.learn_box.value = cfg.learn_sigma
        if cfg.rank:
            self.rank_box.value = cfg.rank
        self.p_box.value, self.n_box.value, self.d_box.value = cfg.p, cfg.n_features, cfg.d_mlp
        self.steps_box.value, self.seed_box.value = cfg.steps, cfg.seed

    def sweep_sigmas(self) -> list[float]:
        try:
            values = [float(s) for s in self.sweep_box.value.replace(";", ",").split(",") if s.strip()]
        except ValueError:
            raise InputError("Sweep σ: give numbers separated by commas, e.g. 0, 0.01, 0.02, 0.03.") from None
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise InputError("Sweep σ: give at least one number >= 0.")
        return values

    @property
    def eval_ps(self):
        return default_ps(self.eval_points)

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self, progress, cancel) -> Run:
        return Run(progress=progress, cancel=cancel, on_partial=self._on_partial)

    def _evaluate(self, models: list[ToyModel], run: Run) -> LossCurves:
        return evaluate(models, self.eval_ps, n_samples=self.n_samples, own_p=True, run=run)

    def _add(self, models: list[ToyModel], recipes: list[str], curves: LossCurves) -> None:
        """Put models (and their evaluated curves) on the L/p-vs-p plot, replacing same-key entries."""
        keep = [i for i, m in enumerate(self.models) if m.key not in {n.key for n in models}]
        old = None
        if self.curves is not None and keep:
            old = _select(self.curves, keep)
        self.models = [self.models[i] for i in keep] + list(models)
        self.recipes = [self.recipes[i] for i in keep] + list(recipes)
        self.curves = curves if old is None else combine([old, curves])

    def train(self) -> None:
        """Train (or fetch from the cache) the model the controls describe, then evaluate it over p."""
        try:
            cfg = self.config()
        except WorkbenchError as err:
            self.show_error(err)
            return
        self._live = {}

        def compute(progress, cancel):
            run = self._run(progress, cancel)
            model = train(cfg, run=run)
            return model, self._evaluate([model], Run(progress=progress, cancel=cancel))

        def on_result(out):
            model, curves = out
            recipe = _train_expr(cfg)
            self._add([model], [recipe], curves)
            self._last_code = [("model", recipe)]
            self._show_transplant = False
            self.load(model, recipe)
            self.redraw()

        self.start(compute, on_result, label=f"Training {cfg.describe()} ({cfg.steps:,} steps)")

    def run_sweep(self) -> None:
        """Train one model per (kind, σ) of the sweep settings (σ fixed), with the other controls as the base."""
        try:
            base = self.config().replace(learn_sigma=False)
            sigmas = self.sweep_sigmas()
            kinds = tuple(self.sweep_kinds.value)
            if not kinds:
                raise InputError("Choose at least one sweep kind (symmetric, asymmetric).")
            if base.model != "mlp":
                raise InputError("The σ sweep uses the simplified MLP; switch the model to it.")
        except WorkbenchError as err:
            self.show_error(err)
            return
        base = base.replace(mixing="symmetric", sigma=0.0)
        self._live = {}

        def compute(progress, cancel):
            return sigma_sweep(
                sigmas,
                kinds,
                base=base,
                n_samples=self.n_samples,
                n_workers=self.n_workers,
                run=self._run(progress, cancel),
            )

        def on_result(sweep):
            self.sweep = sweep
            kwargs = {"base": _config_expr(base), "n_samples": self.n_samples, "n_workers": self.n_workers}
            self._last_code = [
                ("sweep", call(API, "sigma_sweep", [sigmas, kinds], kwargs)),
                (None, "sweep.plot()"),
            ]
            self.redraw()

        self.start(compute, on_result, label=f"σ sweep: {len(sigmas) * len(kinds)} models")

    def run_transplant(self) -> None:
        """Fine-tune the current (trained, noisy) model on M = 0 and show both phases."""
        model, recipe = self.current, self.current_recipe
        if (
            model is None
            or model.kind != "trained"
            or model.cfg.mixing == "clean"
            or model.cfg.model != "mlp"
        ):
            self.show_error(
                InputError(
                    "Load a simplified model trained with mixing (M != 0) first: train one, or "
                    "click a curve or a σ-sweep point."
                )
            )
            return
        steps = int(self.steps_box.value)
        self._live = {}

        def compute(progress, cancel):
            run = self._run(progress, cancel)
            tr = transplant(model, steps=steps, n_samples=self.n_samples, run=run)
            after = finetune(model, steps=steps, run=run)  # cached by transplant: no second training
            return tr, after, self._evaluate([after], Run(progress=progress, cancel=cancel))

        def on_result(out):
            tr, after, curves = out
            self.transplanted = tr
            self._show_transplant = True
            self._add([after], [call(API, "finetune", [recipe], {"steps": steps})], curves)
            self._last_code = [
                ("model", recipe),
                (
                    "tr",
                    call(API, "transplant", [Name("model")], {"steps": steps, "n_samples": self.n_samples}),
                ),
                (None, "tr.plot()"),
            ]
            self.redraw()

        self.start(compute, on_result, label=f"Transplanting {model.label} to M = 0 ({steps:,} steps)")

    def add_baseline(self) -> None:
        """Add the chosen baseline, built for the task the controls describe, to the L/p-vs-p plot."""
        try:
            cfg = self.config()
            if cfg.model != "mlp":
                cfg = cfg.replace(
                    model="mlp", mixing="embed", embed_sign="I-G"
                )  # the residual model's reduced task
        except WorkbenchError as err:
            self.show_error(err)
            return
        choice = self.baseline_box.value

        def compute(progress, cancel):
            if choice == "naive":
                model, recipe = naive_model(cfg), call(API, "naive_model", [_config_expr(cfg)])
            elif choice == "naive + best offset":
                b = round(best_offset(cfg.p, cfg.n_features, cfg.d_mlp)[0], 5)
                model, recipe = offset_model(b, cfg), call(API, "offset_model", [b, _config_expr(cfg)])
            else:
                orientation = "exact" if "exact" in choice else "code"
                model = snmf_model(cfg, orientation=orientation)
                recipe = call(API, "snmf_model", [_config_expr(cfg)], {"orientation": orientation})
            return model, recipe, self._evaluate([model], Run(progress=progress, cancel=cancel))

        def on_result(out):
            model, recipe, curves = out
            self._add([model], [recipe], curves)
            self._last_code = [("baseline", recipe)]
            self.redraw()

        self.start(compute, on_result, label=f"Adding the {choice} baseline")

    # -- live progress ------------------------------------------------------------------------------------------
    def _on_partial(self, part) -> None:
        if not isinstance(part, TrainingProgress):
            return
        self._live[part.index] = part
        now = time.perf_counter()
        if now - self._last_draw < REDRAW_EVERY and part.step < part.steps:
            return
        self._last_draw = now
        with self._draw_lock:
            fig = go.Figure()
            for i, live in sorted(self._live.items()):
                one = viz.live_curve(live.label, live.curve, live.steps)
                trace = one.data[0]
                trace.line.color = viz.PALETTE[i % len(viz.PALETTE)]
                fig.add_trace(trace)
            steps = max(live.steps for live in self._live.values())
            done = sum(live.step for live in self._live.values())
            fig.update_layout(
                title=f"training ({done:,} steps done)",
                xaxis=dict(title="step", range=[0, steps]),
                yaxis=dict(title="L / p (running mean)", type="log"),
                height=380,
            )
            replace_figure(self.figure, fig)

    # -- loading and drawing ------------------------------------------------------------------------------------
    def load(self, model: ToyModel, recipe: Expr | None = None) -> None:
        """Show `model` in the mechanism views (what a click on its curve or sweep point does); `recipe` is the
        code that makes it (default: training its config)."""
        self.current, self.current_recipe = model, recipe or _train_expr(model.cfg)
        self.highlight = None
        self.redraw_mechanism()
        self.set_status(f"Mechanism views: {model.label}.", "info")

    def redraw(self) -> None:
        """Redraw every figure from stored results (no training)."""
        if self.transplanted is not None and self._show_transplant:
            replace_figure(self.figure, viz.transplant(self.transplanted))
        elif self.current is not None and len(self.current.curve):
            replace_figure(self.figure, viz.training_curve(self.current))
        if self.curves is not None:
            idx = next((i for i, m in enumerate(self.models) if m is self.current), None)
            replace_figure(self.p_figure, viz.loss_vs_p(self.curves, highlight=idx))
            for trace in self.p_figure.data:
                if isinstance(trace.meta, dict) and trace.meta.get("role") in ("curve", "own"):
                    trace.on_click(self._on_p_click)
        if self.sweep is not None:
            selected = None
            if (
                self.current is not None
                and self.current.cfg.mixing in self.sweep.kinds
                and self._in_sweep(self.current)
            ):
                selected = (self.current.cfg.mixing, self.current.cfg.sigma)
            replace_figure(self.sigma_figure, viz.sigma_sweep(self.sweep, selected=selected))
            for trace in self.sigma_figure.data:
                if isinstance(trace.meta, dict) and trace.meta.get("role") == "sweep":
                    trace.on_click(self._on_sigma_click)
        self.redraw_mechanism()

    def _in_sweep(self, model: ToyModel) -> bool:
        return any(model.cfg.key == ToyConfig.from_dict(c).key for c in self.sweep.configs)

    def redraw_mechanism(self) -> None:
        model = self.current
        if model is None:
            return
        view = self.mech_box.value
        try:
            if view.startswith("spectrum"):
                fig = viz.spectrum(mechanism(model), basis="sv" if "singular" in view else "eig")
            elif view == "W_in W_out vs M":
                fig = viz.scatter(mechanism(model), paper=False)
            elif view == "projections":
                fig = viz.projections(mechanism(model))
            else:
                fig = viz.responses(responses(model), highlight=self.highlight)
        except WorkbenchError as err:
            self.show_error(err)
            return
        replace_figure(self.mech_figure, fig)
        for trace in self.mech_figure.data:
            if isinstance(trace.meta, dict) and trace.meta.get("role") == "feature":
                trace.on_click(self._on_feature_click)

    def _on_p_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        m = int(trace.customdata[points.point_inds[0]])
        self.load(self.models[m], self.recipes[m])
        self.redraw()

    def _on_sigma_click(self, trace, points, selector=None) -> None:
        if not points.point_inds or self.sweep is None:
            return
        k, j = (int(v) for v in trace.customdata[points.point_inds[0]])
        kind, sigma = self.sweep.kinds[k], float(self.sweep.sigma[j])
        self.load(self.sweep.model(kind, sigma))
        self.redraw()

    def _on_feature_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        self.highlight = int(trace.customdata[points.point_inds[0]])
        self.redraw_mechanism()
        self.set_status(f"Feature {self.highlight} highlighted.", "info")

    # -- show code ----------------------------------------------------------------------------------------------
    def code(self) -> str:
        """The public-API calls that reproduce the panel's last successful run and its L/p-vs-p plot (they train
        again where the cache of a fresh kernel is empty)."""
        if not self._last_code:
            raise InputError("Nothing has run yet: press Train first.")
        script = Script()
        for name, statement in self._last_code:
            script.add(statement, assign=name) if isinstance(statement, Expr) else script.add(statement)
        if self.curves is not None and self._last_code[-1][1] != "sweep.plot()":
            script.add("")
            script.add(literal(list(self.recipes)), assign="models")
            ps = call(API, "default_ps", [self.eval_points])
            kwargs = {"n_samples": self.n_samples, "own_p": True}
            script.call("curves", API, "evaluate", [Name("models"), ps], kwargs)
            script.add("curves.plot()")
            shown = next((i for i, m in enumerate(self.models) if m is self.current), None)
            if shown is not None:
                script.add(Expr(f"mechanism(models[{shown}]).plot()", ((API, "mechanism"),)))
            elif self.current_recipe is not None:
                recipe = self.current_recipe
                script.add(Expr(f"mechanism({recipe.text}).plot()", (*recipe.imports, (API, "mechanism"))))
        return script.render()


def _int_box(value: int, description: str, low: int, high: int) -> widgets.BoundedIntText:
    return widgets.BoundedIntText(
        value=value,
        min=low,
        max=high,
        description=description,
        style=STYLE,
        layout=widgets.Layout(width="200px"),
    )


def _mixing_label(cfg: ToyConfig) -> str:
    """The mixing dropdown's entry for a config."""
    want = (cfg.mixing, cfg.embed_sign if cfg.mixing == "embed" else "I-G")
    return next(label for label, value in MIXING_OPTIONS.items() if value == want)


def _config_expr(cfg: ToyConfig) -> Expr:
    """``ToyConfig(...)`` with the fields that differ from the defaults."""
    return call(API, "ToyConfig", (), cfg.changes())


def _train_expr(cfg: ToyConfig) -> Expr:
    return call(API, "train", [_config_expr(cfg)])


def _select(curves: LossCurves, keep: list[int]) -> LossCurves:
    """The curves of the models at indices `keep`."""
    return dataclasses.replace(
        curves,
        loss=curves.loss[keep],
        stderr=curves.stderr[keep],
        per_feature=curves.per_feature[keep],
        labels=tuple(curves.labels[i] for i in keep),
        kinds=tuple(curves.kinds[i] for i in keep),
        train_p=curves.train_p[keep],
        own_loss=curves.own_loss[keep],
        own_stderr=curves.own_stderr[keep],
        naive=curves.naive[keep],
    )
