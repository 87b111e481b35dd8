"""`SyntheticActivationProbe`: Giglemiani et al.'s two tests and Janiak et al.'s stable regions in one panel.

    from workbench.widgets.sae import SyntheticActivationProbe
    SyntheticActivationProbe.demo()                                  # demo model, demo SAE, demo prompts
    SyntheticActivationProbe(model, sae, prompts, reference=ref)     # your own

Tab "Synthetic activations": choose the test (1: blow-up toward a target, relative steps; 2: plateau toward a
random target, absolute steps), the families, the synthetic recipes' knobs, steps, step size and threshold (shown
in L2 units and as a fraction of the typical distance between two prompts). Run draws example curves with each
curve's marker, or the statistic's histogram / CDF with a table of means and KS statistics, or the dataset view.
Click a curve to see the sample's latents beside its twin's. Tab "Stable regions": interpolation between prompt
pairs for the trained model and a re-initialised copy, with the sharpness per model. The panel holds no science:
its controls become `synthetic_activation_test` / `stable_regions` calls, which "Show code" prints.
"""

from __future__ import annotations

import html
import warnings

import ipywidgets as widgets
import torch

from workbench.codegen import Expr, Name, Script, call, literal
from workbench.errors import InputError, WorkbenchError
from workbench.models import load_model
from workbench.plateau import RefStats
from workbench.sae.demo import demo_prompts, demo_reference, load_demo_sae
from workbench.sae.stable import reinitialised, stable_regions
from workbench.sae.synthetic import DEFAULT_FAMILIES, DEFAULT_THRESHOLD, FAMILIES, synthetic_activation_test
from workbench.viz import sae as viz
from workbench.widgets.base import Panel, PanelFigure, replace_figure, source_of

VIEWS = ("Curves", "Histogram", "CDF", "Dataset")


class SyntheticActivationProbe(Panel):
    """Synthetic activations composed of SAE latents, probed like real ones (module docstring).

    Args:
        model: a `WorkbenchModel`.
        sae: an `SAE` at a residual site of `model` (activations are written where it reads).
        prompts: texts or a [n, pos] token tensor; one sample per prompt.
        reference: `RefStats` at the SAE's site (the random family and test 2's targets), or texts / tokens to
            compute them from. None uses the prompts' own activations (with a warning).
        models: {label: model} for the stable-regions tab (default: the model and a re-initialised copy, made on
            first use).
        sources: code for "model", "sae", "prompts", "reference" in "Show code" (`workbench.codegen.Expr` or
            text; default: derived: `load_model(name)`, how the SAE was loaded, `demo_prompts` / `demo_reference`
            when the data are those, else literals).

    Attributes:
        synthetic: the last `SyntheticTestResult`; stable: the last `StableRegionsResult`.
        figure / sample_figure / stable_figure: the curves or histograms, the clicked sample's latents, the
            stable-regions picture.
    """

    def __init__(
        self,
        model,
        sae,
        prompts,
        *,
        reference=None,
        models: dict | None = None,
        sources: dict[str, str] | None = None,
        test: str = "blowup",
        families=DEFAULT_FAMILIES,
        n_samples: int | None = None,
        n_steps: int = 100,
    ):
        self.model, self.sae, self.reference = model, sae, reference
        self.prompts = prompts
        n_prompts = len(prompts) if not isinstance(prompts, str) else 1
        self._models = models
        self.sources = dict(sources or {})
        self.synthetic = None
        self.stable = None
        self._sample: tuple[str, int] | None = None  # the clicked (family, sample)
        self._last: tuple[str, dict] | None = None
        self._quiet = False

        self.tabs = widgets.Tab()
        self.test_box = widgets.ToggleButtons(
            options=[
                ("Test 1: blow-up toward a target", "blowup"),
                ("Test 2: plateau toward random", "plateau"),
            ],
            value=test,
            description="Test",
            style={"button_width": "230px"},
        )
        self.family_boxes = {
            f: widgets.Checkbox(value=f in families, description=label, indent=False,
                                layout=widgets.Layout(width="190px"))
            for f, label in FAMILIES.items()
        }  # fmt: skip
        self.n_samples_box = widgets.BoundedIntText(
            value=min(n_samples or n_prompts, n_prompts), min=2, max=max(2, n_prompts), description="Samples"
        )
        self.n_steps_box = widgets.BoundedIntText(value=n_steps, min=3, max=400, description="Steps")
        self.step_size_box = widgets.FloatText(value=0.0, description="Step h", tooltip="0: automatic")
        self.threshold_box = widgets.FloatText(value=DEFAULT_THRESHOLD, description="Threshold")
        self.threshold_note = widgets.HTML("× typical distance")
        self.neighbours_box = widgets.BoundedIntText(value=10, min=1, max=10_000, description="k nearest")
        self.anchors_box = widgets.BoundedIntText(value=100, min=1, max=100_000, description="Anchors")
        self.anchor_auto = widgets.Checkbox(value=True, description="auto anchor cosine", indent=False)
        self.anchor_box = widgets.FloatText(value=0.42, description="Anchor cos", disabled=True)
        self.seed_box = widgets.IntText(value=0, description="Seed")
        self.metric_box = widgets.ToggleButtons(options=[("L2 at read site", "l2"), ("KL (nats)", "kl")], value="l2",
                                                description="Metric")  # fmt: skip
        self.view_box = widgets.ToggleButtons(options=list(VIEWS), value="Curves", description="View")
        self.notes = widgets.HTML()
        self.sample_figure = PanelFigure()
        self.sample_box = widgets.VBox([self.sample_figure], layout=widgets.Layout(display="none"))
        self.pairs_box = widgets.BoundedIntText(value=min(32, max(1, n_prompts // 2)), min=1, max=max(1, n_prompts // 2),
                                                description="Pairs")  # fmt: skip
        self.stable_steps_box = widgets.IntSlider(
            value=11, min=3, max=61, description="α steps", continuous_update=False
        )
        self.model_boxes = {
            "trained": widgets.Checkbox(value=True, description="trained", indent=False),
            "re-initialised": widgets.Checkbox(value=True, description="re-initialised copy", indent=False),
        }
        self.stable_figure = PanelFigure()
        for w, cls in [
            (self.test_box, "wb-sae-test"),
            (self.n_samples_box, "wb-sae-samples"),
            (self.n_steps_box, "wb-sae-steps"),
            (self.threshold_box, "wb-sae-threshold"),
            (self.view_box, "wb-sae-view"),
            (self.metric_box, "wb-sae-metric"),
            (self.notes, "wb-sae-notes"),
            (self.sample_figure, "wb-sae-sample"),
            (self.stable_figure, "wb-sae-stable"),
            (self.tabs, "wb-sae-tabs"),
            (self.threshold_note, "wb-sae-threshold-note"),
            (self.pairs_box, "wb-sae-pairs"),
            (self.stable_steps_box, "wb-sae-alpha-steps"),
        ]:
            w.add_class(cls)
        super().__init__()
        self.figure.add_class("wb-sae-figure")
        self.run_button.add_class("wb-sae-run")
        self.run_button.on_click(lambda _: self.run())
        self.anchor_auto.observe(lambda c: setattr(self.anchor_box, "disabled", c["new"]), "value")
        for box in (self.view_box, self.metric_box, self.threshold_box):
            box.observe(lambda _: None if self._quiet else self.redraw(), "value")

        synthetic_tab = widgets.VBox(
            [
                self.test_box,
                widgets.HBox(list(self.family_boxes.values()), layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.n_samples_box, self.n_steps_box, self.seed_box]),
                widgets.HBox([self.step_size_box, self.threshold_box, self.threshold_note]),
                widgets.HBox([self.neighbours_box, self.anchors_box, self.anchor_auto, self.anchor_box]),
                widgets.HBox([self.metric_box]),
                self.view_box,
            ]
        )
        stable_tab = widgets.VBox(
            [
                widgets.HBox([self.pairs_box, self.stable_steps_box]),
                widgets.HBox(list(self.model_boxes.values())),
            ]
        )
        self.tabs.children = [synthetic_tab, stable_tab]
        self.tabs.set_title(0, "Synthetic activations")
        self.tabs.set_title(1, "Stable regions")
        self.figure_box = widgets.VBox([self.figure, self.sample_box])
        self.stable_box = widgets.VBox([self.stable_figure], layout=widgets.Layout(display="none"))
        self.tabs.observe(lambda _: self._tab_changed(), "selected_index")
        self.children = [self.tabs, self.run_bar, self.status, self.notes, self.figure_box, self.stable_box,
                         self.code_view]  # fmt: skip
        self.set_status("Press Run. Click a curve to compare a sample's latents with its synthetic twin's.")

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def demo(cls, n_prompts: int = 64, reference_rows: int = 2_000, **kwargs) -> SyntheticActivationProbe:
        """The panel on the demo model with the demo SAE, `n_prompts` demo prompts and demo reference stats."""
        model = load_model("demo")
        return cls(model, load_demo_sae(), demo_prompts(model, n_prompts),
                   reference=demo_reference(model, reference_rows), **kwargs)  # fmt: skip

    def _models_for_stable(self) -> dict:
        if self._models is None:
            self._models = {"trained": self.model, "re-initialised": reinitialised(self.model, seed=0)}
        chosen = {
            k: v for k, v in self._models.items() if k not in self.model_boxes or self.model_boxes[k].value
        }
        if not chosen:
            raise InputError("Choose at least one model.")
        return chosen

    # -- controls -> calls ------------------------------------------------------------------------------------
    def _prompts(self, n: int):
        p = self.prompts
        return p[:n] if not isinstance(p, str) else [p]

    def _synthetic_kwargs(self) -> dict:
        families = tuple(f for f, box in self.family_boxes.items() if box.value)
        if not families:
            raise InputError("Choose at least one family.")
        kw = {
            "test": self.test_box.value,
            "families": families,
            "n_steps": self.n_steps_box.value,
            "threshold": self.threshold_box.value,
            "n_neighbours": self.neighbours_box.value,
            "n_anchor_candidates": self.anchors_box.value,
            "anchor_cosine": "auto" if self.anchor_auto.value else self.anchor_box.value,
            "seed": self.seed_box.value,
        }
        if self.test_box.value == "plateau" and self.step_size_box.value > 0:
            kw["step_size"] = self.step_size_box.value
        if not self.threshold_box.value > 0:
            raise InputError(
                "The threshold is a positive fraction of the typical distance between two prompts."
            )
        return kw

    def _stable_kwargs(self) -> dict:
        n = 2 * self.pairs_box.value
        if n > len(self._prompts(10**9)):
            raise InputError("Not enough prompts for that many pairs.")
        return {"n_pairs": self.pairs_box.value, "n_steps": self.stable_steps_box.value,
                "models": [k for k, b in self.model_boxes.items() if b.value]}  # fmt: skip

    # -- running ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the current tab's computation in the background."""
        try:
            if self.tabs.selected_index == 1:
                kw = self._stable_kwargs()
                models = self._models_for_stable()
                prompts = self._prompts(2 * kw["n_pairs"])

                def compute(progress, cancel):
                    return stable_regions(models, prompts, n_steps=kw["n_steps"], layer=self.sae.cfg.layer,
                                          site=self.sae.cfg.site, progress=progress, cancel=cancel)  # fmt: skip

                self.start(compute, lambda r: self._show_stable(r, kw), label="Interpolating")
                return
            kw = self._synthetic_kwargs()
            n = self.n_samples_box.value
        except WorkbenchError as err:
            self.show_error(err)
            return
        prompts = self._prompts(n)

        def compute(progress, cancel):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = synthetic_activation_test(self.model, self.sae, prompts, reference=self.reference,
                                                   progress=progress, cancel=cancel, **kw)  # fmt: skip
            del caught  # the result carries its warnings; the notes line shows them
            return result

        self.start(
            compute, lambda r: self._show_synthetic(r, {**kw, "n_samples": n}), label="Running the test"
        )

    def _show_synthetic(self, result, kw: dict) -> None:
        self.synthetic = result
        self._last = ("synthetic", kw)
        self._sample = None  # the clicked sample belonged to the previous result
        self.sample_box.layout.display = "none"
        self._quiet = True
        try:
            self.threshold_box.value = round(result.threshold_fraction, 6)
        finally:
            self._quiet = False
        self._show_notes(result.warnings)
        self.redraw()

    def _show_stable(self, result, kw: dict) -> None:
        self.stable = result
        self._last = ("stable", kw)
        replace_figure(self.stable_figure, viz.stable_regions(result))
        self.stable_box.layout.display = ""
        self._show_notes(())

    def _show_notes(self, notes) -> None:
        self.notes.value = "".join(
            f'<div class="wb-sae-note" style="color:#8a6d00">⚠ {html.escape(n)}</div>' for n in notes
        )

    def _tab_changed(self) -> None:
        stable = self.tabs.selected_index == 1
        self.figure_box.layout.display = "none" if stable else ""
        self.stable_box.layout.display = "" if stable and self.stable is not None else "none"

    # -- drawing ----------------------------------------------------------------------------------------------
    def _threshold_abs(self) -> float | None:
        res = self.synthetic
        if res is None or res.test != "plateau" or self.metric_box.value != "l2":
            return None
        return self.threshold_box.value * res.typical_distance

    def redraw(self) -> None:
        """Redraw the synthetic-activation view from the stored result (no model runs)."""
        res = self.synthetic
        if res is None:
            return
        metric, view = self.metric_box.value, self.view_box.value
        tau = self._threshold_abs()
        if res.test == "plateau":
            self.threshold_note.value = (
                f"× typical distance {res.typical_distance:.3g} = <b>{self.threshold_box.value * res.typical_distance:.3g}</b>"
                f" L2 units; step h = {res.step_size:.3g}"
            )
        else:
            self.threshold_note.value = "× typical distance (test 2 only)"
        try:
            if view == "Curves":
                fig = viz.curves(res, metric, threshold=tau)
            elif view in ("Histogram", "CDF"):
                fig = viz.histograms(res, metric, cdf=view == "CDF", threshold=tau)
            else:
                fig = viz.dataset(res)
        except WorkbenchError as err:  # the view says why, not "Done" over the previous picture
            self.draw_failed(self.figure, err)
            self.sample_box.layout.display = "none"
            return
        if self.draw_error is not None:
            self.draw_error = None
            self.set_status("Showing the stored result (no model run).", "ok")
        replace_figure(self.figure, fig)
        for trace in self.figure.data:
            meta = trace.meta if isinstance(trace.meta, dict) else {}
            if meta.get("role") in ("curve", "marker"):
                trace.on_click(self._on_click)
        if self._sample is not None:  # the clicked sample's statistic, in this metric and threshold
            self._sample_status()
        self.refresh_code()

    def _on_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        self.show_sample(trace.meta["family"], int(trace.meta["sample"]))

    def show_sample(self, family: str, sample: int) -> None:
        """Show a sample's real latents beside its twin's (what clicking a curve does)."""
        if self.synthetic is None:
            return
        try:
            fig = viz.sample_latents(self.synthetic, family, sample)
        except WorkbenchError as err:
            self.show_error(err)
            return
        replace_figure(self.sample_figure, fig)
        self.sample_box.layout.display = ""
        self._sample = (family, sample)
        self._sample_status()
        self.refresh_code()

    def _sample_status(self) -> None:
        family, sample = self._sample
        stat = int(self.synthetic.statistic(self.metric_box.value, self._threshold_abs())[
            self.synthetic.families.index(family), sample])  # fmt: skip
        self.set_status(
            f"{FAMILIES[family]}, sample {sample}: {self.synthetic.statistic_name} {stat}.", "info"
        )

    # -- show code --------------------------------------------------------------------------------------------
    def _source(self, key: str) -> Expr:
        """Code for the panel's model, SAE, prompts or reference (`sources` first, then derived)."""
        given = self.sources.get(key)
        if given is not None:
            return given if isinstance(given, Expr) else Expr(str(given))
        if key == "model":
            return call("workbench.models", "load_model", [self.model.name])
        if key == "sae":
            src = getattr(self.sae, "source", None) or {}
            if src.get("demo"):
                return call("workbench.sae", "load_demo_sae")
            if "path" in src:
                kw = {} if src.get("centre_input") is None else {"centre_input": src["centre_input"]}
                return call("workbench.sae", "load_sae", [src["path"]], kw)
            if "hub" in src:
                return call(
                    "workbench.sae", "load_sae", [src["hub"], src["sae_id"]], {"revision": src["revision"]}
                )
            raise InputError(
                "The panel's SAE was not loaded from files, so code cannot load it in a fresh kernel: save it with "
                "save_sae(sae, path) and load it with load_sae(path), or give sources={'sae': '...'}."
            )
        if key == "prompts":
            demo = self._demo_prompts_call()
            return demo if demo is not None else literal(self.prompts)
        if key == "reference":
            ref = self.reference
            if isinstance(ref, RefStats):
                options = ref.provenance.options
                if options.get("made_by") == "workbench.sae.demo_reference":
                    kw = {k: options[k] for k in ("seq_len", "layer", "site") if k in options}
                    return call("workbench.sae", "demo_reference", [Name("model"), options["rows"]], kw)
                raise InputError(
                    "The panel's reference statistics are a RefStats object: give sources={'reference': '...'} "
                    "with the call that made them, or pass reference=texts."
                )
            if ref is None:
                return literal(None)
            return call("workbench.plateau", "reference_stats", [Name("model"), source_of(ref)],
                        {"layer": self.sae.cfg.layer, "site": self.sae.cfg.site})  # fmt: skip
        raise KeyError(key)  # pragma: no cover

    def _demo_prompts_call(self) -> Expr | None:
        """`demo_prompts(model, n)` when the prompts are exactly that, else None."""
        p = self.prompts
        if self.model.name != "demo" or not isinstance(p, torch.Tensor) or p.dim() != 2:
            return None
        try:
            same = torch.equal(demo_prompts(self.model, len(p), p.shape[1] - 1), p)
        except WorkbenchError:
            return None
        if not same:
            return None
        kw = {} if p.shape[1] == 11 else {"n_tokens": p.shape[1] - 1}
        return call("workbench.sae", "demo_prompts", [Name("model"), len(p)], kw)

    def code(self) -> str:
        """The calls that reproduce the last successful run in a fresh kernel."""
        if self._last is None:
            raise InputError("Nothing has run yet: press Run first.")
        kind, kw = self._last
        script = Script()
        script.add(self._source("model"), assign="model")
        script.add(self._source("prompts"), assign="prompts")
        if kind == "stable":
            n = 2 * kw["n_pairs"]
            models = {}
            for label in kw["models"]:
                models[label] = (
                    Name("model")
                    if label == "trained"
                    else call("workbench.sae", "reinitialised", [Name("model")], {"seed": 0})
                )
            script.call("result", "workbench.sae", "stable_regions", [models, Expr(f"prompts[:{n}]")],
                        {"n_steps": kw["n_steps"], "layer": self.sae.cfg.layer, "site": self.sae.cfg.site})  # fmt: skip
            script.add("result.summary()")
            script.add("result.plot()")
            return script.render()
        script.add(self._source("sae"), assign="sae")
        script.add(self._source("reference"), assign="reference")
        call_kw = {k: v for k, v in kw.items() if k != "n_samples"}
        args = [Name("model"), Name("sae"), Expr(f"prompts[:{kw['n_samples']}]")]
        script.call("result", "workbench.sae", "synthetic_activation_test", args,
                    {"reference": Name("reference"), **call_kw})  # fmt: skip
        script.add("result.summary()")
        self._plot_code(script)
        return script.render()

    def _plot_code(self, script: Script) -> None:
        """The figure calls of the current view (and of the clicked sample) for the synthetic test."""
        metric, view, tau = self.metric_box.value, self.view_box.value, self._threshold_abs()
        shown = {"metric": metric} if metric != "l2" else {}
        if tau is not None:
            shown["threshold"] = tau
        if view == "Curves":
            script.call(None, "", "result.plot", [], shown)
        elif view in ("Histogram", "CDF"):
            cdf = {"cdf": True} if view == "CDF" else {}
            script.call(None, "workbench.viz.sae", "histograms", [Name("result")], {**shown, **cdf})
        else:
            script.call(None, "workbench.viz.sae", "dataset", [Name("result")])
        if self._sample is not None:
            script.call(None, "workbench.viz.sae", "sample_latents", [Name("result"), *self._sample])
