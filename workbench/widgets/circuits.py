"""Circuit panels: `CircuitExplorer` (the edge graph with a threshold slider, the faithfulness curve, click an edge
for its exact value) and `HeadViews` (one head's attention pattern, its direct logit attribution, and path patching
from it to the logits and to later heads' queries, keys and values), which `PatchingExplorer` embeds.

    from workbench.widgets.circuits import CircuitExplorer, HeadViews
    CircuitExplorer(model, pairs)                      # pairs: a PromptPairs, or clean/corrupt/answers
    HeadViews(model, pairs).show_head(0, 3)

The panels hold no science: controls become calls of `workbench.circuits` (see `.code()`), figures come from
`workbench.viz.circuits`. Moving the slider redraws from the stored scores without running the model.
"""

from __future__ import annotations

import html
import math

import ipywidgets as widgets

from workbench.circuits import (
    Graph,
    attention_patterns,
    direct_logit_attribution,
    edge_attribution,
    faithfulness,
    path_patch,
)
from workbench.codegen import Name, Script, call
from workbench.errors import InputError, WorkbenchError
from workbench.viz import circuits as viz
from workbench.widgets.base import (
    Panel,
    add_classes,
    check_choice,
    engine_call,
    format_answers,
    lines,
    parse_answers,
    replace_figure,
    text_area,
)
from workbench.widgets.remote import RemoteStatus, tracked

_METHODS = [
    ("EAP (one backward pass)", "eap"),
    ("EAP-IG (integrated gradients)", "eap-ig"),
    ("exact (every edge)", "exact"),
]


def _unpack(clean, corrupt, answers):
    """Prompts and answers as lists of strings, from a PromptPairs or from the three arguments."""
    if hasattr(clean, "clean") and hasattr(clean, "corrupt") and hasattr(clean, "answers"):
        return list(clean.clean), list(clean.corrupt), [tuple(a) for a in clean.answers]
    as_list = [clean] if isinstance(clean, str) else list(clean or [])
    corrupt_list = [corrupt] if isinstance(corrupt, str) else list(corrupt or [])
    answers = list(answers or [])
    if len(answers) == 2 and all(isinstance(a, str) for a in answers):
        answers = [tuple(answers)]
    return as_list, corrupt_list, [tuple(a) for a in answers]


def _script(model_name: str) -> Script:
    """A script that starts by loading the model (what every panel's code begins with)."""
    script = Script()
    script.add(call("workbench.models", "load_model", [model_name]), assign="model")
    return script


class _Prompts:
    """Clean / corrupt / answers text boxes shared by the circuit panels."""

    def _build_prompts(self, clean, corrupt, answers) -> None:
        clean, corrupt, answers = _unpack(clean, corrupt, answers)
        self.clean_box = text_area("\n".join(clean), "Clean", "one prompt per line", 2)
        self.corrupt_box = text_area(
            "\n".join(corrupt), "Corrupt", "same number of tokens as the clean prompt", 2
        )
        self.answers_box = text_area(
            format_answers(answers), "Answers", "' Mary', ' John'   (correct, incorrect)"
        )

    def _prompt_kwargs(self) -> dict:
        clean, corrupt = lines(self.clean_box.value), lines(self.corrupt_box.value)
        if not clean:
            raise InputError("Type a clean prompt (one per line for several pairs).")
        answers = parse_answers(self.answers_box.value)
        return {"clean": clean, "corrupt": corrupt, "answers": answers[0] if len(answers) == 1 else answers}


class CircuitExplorer(_Prompts, Panel):
    """Edge attribution over the component graph, drawn as layers of nodes, with the faithfulness curve beside it.

    Attributes:
        scores: the last `EdgeScores`; curve: its `Faithfulness`; edge: the last clicked edge's `PathPatchingResult`
            (exact patching of that edge alone), or None.
        graph_figure / curve_figure: the two figure widgets.
    """

    def __init__(
        self,
        model,
        clean=(),
        corrupt=(),
        answers=(),
        *,
        method: str = "eap",
        steps: int = 5,
        direction: str = "noising",
        threshold: float = 0.05,
    ):
        self.model = model
        self.scores = None
        self.curve = None
        self.edge = None
        self._edge_label = None
        self._last = None  # the engine arguments of the last successful run
        self._quiet = False  # set while the panel moves its own slider, so that it redraws once
        # the engine's choices, checked before they reach the controls (whose own error is a long TraitError)
        check_choice("method", method, [m for _, m in _METHODS])
        check_choice("direction", direction, ["noising", "denoising"])
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 200:
            raise InputError(f"steps={steps!r}: give a whole number of integration steps from 1 to 200.")
        if not (isinstance(threshold, (int, float)) and 1e-4 <= threshold <= 10):
            raise InputError(f"threshold={threshold!r}: give the smallest |score| shown, from 1e-4 to 10.")
        self._build_prompts(clean, corrupt, answers)
        self.method_box = widgets.Dropdown(options=_METHODS, value=method, description="Method")
        self.steps_box = widgets.BoundedIntText(
            value=steps, min=1, max=200, description="IG steps", layout=widgets.Layout(width="180px")
        )
        self.direction_box = widgets.ToggleButtons(
            options=["noising", "denoising"],
            value=direction,
            description="Direction",
            tooltips=[
                "Corrupt one edge in the clean run (gradients at the clean run): which edges are necessary?",
                "Restore one clean edge in the corrupt run: which edges are sufficient?",
            ],
        )
        self.threshold = widgets.FloatLogSlider(
            value=threshold,
            base=10,
            min=-4,
            max=1,
            step=0.05,
            description="|score| >=",
            readout_format=".3g",
            continuous_update=False,
            layout=widgets.Layout(width="420px"),
        )
        self.edge_line = widgets.HTML()
        self.summary = widgets.HTML()
        self.warning_line = widgets.HTML()
        add_classes(
            "wb-circuits",
            clean=self.clean_box,
            corrupt=self.corrupt_box,
            answers=self.answers_box,
            method=self.method_box,
            steps=self.steps_box,
            threshold=self.threshold,
            direction=self.direction_box,
            edge=self.edge_line,
            summary=self.summary,
        )
        super().__init__()
        self.graph_figure = self.figure
        self.curve_figure = type(self.figure)()
        add_classes("wb-circuits", graph=self.graph_figure, curve=self.curve_figure, run=self.run_button)
        self.run_button.on_click(lambda _: self.run())
        self.threshold.observe(lambda _: None if self._quiet else self.redraw(), "value")
        self.remote_status = None
        if getattr(model, "remote", False) is True:
            self.remote_status = RemoteStatus()
        self.children = [
            self.clean_box,
            self.corrupt_box,
            self.answers_box,
            widgets.HBox([self.method_box, self.steps_box]),
            self.direction_box,
            self.run_bar,
            *([self.remote_status] if self.remote_status is not None else []),
            self.status,
            self.summary,
            self.warning_line,
            self.threshold,
            self.graph_figure,
            self.edge_line,
            self.curve_figure,
            self.code_view,
        ]
        self.set_status(
            "Press Run to score every edge; then move the slider, and click an edge for its exact value."
        )

    # -- state -> API calls ------------------------------------------------------------------------------
    def _kwargs(self) -> dict:
        kwargs = self._prompt_kwargs()
        kwargs.update(method=self.method_box.value, direction=self.direction_box.value)
        if self.method_box.value == "eap-ig":
            kwargs["steps"] = int(self.steps_box.value)
        return kwargs

    def code(self) -> str:
        """The calls that reproduce the last successful run and the view."""
        if self._last is None:
            raise InputError("Nothing has run yet: press Run first.")
        script = _script(self.model.name)
        script.call("scores", "workbench.circuits", "edge_attribution", [Name("model")], self._last)
        script.call("curve", "workbench.circuits", "faithfulness", [Name("model"), Name("scores")])
        script.call(None, "", "scores.plot", [], {"threshold": self.threshold.value})
        script.add("curve.plot()")
        if self._edge_label is not None:
            sender, receiver = self._edge_label
            edge_kwargs = {k: self._last[k] for k in ("clean", "corrupt", "answers", "direction")}
            edge_kwargs.update(senders=sender, receivers=receiver)
            script.add("# the clicked edge, patched exactly")
            script.call("edge", "workbench.circuits", "path_patch", [Name("model")], edge_kwargs)
        return script.render()

    # -- running ------------------------------------------------------------------------------------------
    def _tracked(self, compute):
        if self.remote_status is None:
            return compute
        return tracked(compute, lambda token: self.remote_status.runner(token))

    def run(self) -> None:
        """Score every edge and measure the faithfulness curve (in the background in a notebook)."""
        try:
            kwargs = self._kwargs()
        except WorkbenchError as err:
            self.show_error(err)
            return

        def compute(progress, cancel):
            scores = engine_call(edge_attribution, self.model, **kwargs, warn=False)(progress, cancel)
            curve = engine_call(faithfulness, self.model, scores)(progress, cancel)
            return kwargs, scores, curve

        self.start(self._tracked(compute), self._show, label="Scoring edges")

    def _show(self, out) -> None:
        kwargs, scores, curve = out
        self._last, self.scores, self.curve = kwargs, scores, curve
        self.edge, self._edge_label = None, None
        self.edge_line.value = ""
        self.warning_line.value = "".join(
            f'<div style="color:#8a6d00">&#9888; {html.escape(w)}</div>' for w in scores.warnings
        )
        top = scores.edge_list(normalize=True)
        if top:  # a threshold that shows the strongest ~20 edges to begin with
            self._quiet = True
            try:
                self.threshold.value = max(abs(top[min(19, len(top) - 1)][2]), 1e-4)
            finally:
                self._quiet = False
        self.redraw()
        k80 = curve.smallest(0.8)
        found = (
            f"the top {k80} recover 80% of the clean - corrupt gap"
            if k80 is not None
            else "no size tried recovers 80%"
        )
        self.summary.value = (
            f"{scores.n_edges} edges scored by {scores.method.upper()} ({scores.direction}); {found}."
        )

    def redraw(self) -> None:
        """Redraw both figures from the stored results (no model run)."""
        if self.scores is None:
            return
        try:
            graph = viz.edge_graph(self.scores, threshold=self.threshold.value, highlight=self._edge_label)
            curve = viz.faithfulness_curve(self.curve)
        except WorkbenchError as err:  # the view says why, not "Done" over the previous picture
            self.draw_failed(self.graph_figure, err)
            return
        replace_figure(self.graph_figure, graph)
        for trace in self.graph_figure.data:
            if trace.name == "edges":
                trace.on_click(self._on_click)
        replace_figure(self.curve_figure, curve)
        self.refresh_code()  # (the code plots with the slider's threshold)

    def _on_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        r, s = (int(v) for v in trace.customdata[points.point_inds[0]])
        self.patch_edge(self.scores.senders[s], self.scores.receivers[r])

    def patch_edge(self, sender: str, receiver: str) -> None:
        """Patch one edge exactly, in the scores' direction, and show its value beside its score."""
        if self.scores is None:
            self.set_status("Run first, then click an edge.", "info")
            return
        kwargs = {k: self._last[k] for k in ("clean", "corrupt", "answers", "direction")}

        compute = engine_call(
            path_patch, self.model, **kwargs, senders=sender, receivers=receiver, warn=False
        )

        def show(result):
            self.edge, self._edge_label = result, (sender, receiver)
            r, s = self.scores.receivers.index(receiver), self.scores.senders.index(sender)
            score = float(self.scores.values(normalize=True)[r, s])
            exact = float(result.effect()[0, 0])
            self.edge_line.value = (
                f"<b>{html.escape(sender)} -&gt; {html.escape(receiver)}</b>: exact patching {exact:+.4f}, "
                f"{self.scores.method.upper()} score {score:+.4f} (both normalised by the clean - corrupt gap)"
            )
            self.redraw()

        self.start(self._tracked(compute), show, label=f"Patching {sender} -> {receiver}")


class HeadViews(_Prompts, Panel):
    """One head in three views: its attention pattern (tokens on both axes), its direct logit attribution among
    every head, and path patching from it to the logits and to every later head's q, k and v.

    Attributes:
        pattern, dla, paths: the last results (`AttentionPatterns`, `DLAResult`, `PathPatchingResult`).
    """

    def __init__(
        self,
        model,
        clean=(),
        corrupt=(),
        answers=(),
        *,
        direction: str = "denoising",
        metric="logit_diff",
        show_prompts: bool = True,
    ):
        self.model = model
        self.pattern = self.dla = self.paths = None
        self.head = None
        self._last = None
        self._build_prompts(clean, corrupt, answers)
        self.direction = direction
        self.metric = metric
        super().__init__()
        self.pattern_figure = self.figure
        self.dla_figure = type(self.figure)()
        self.paths_figure = type(self.figure)()
        add_classes("wb-headviews", pattern=self.pattern_figure, dla=self.dla_figure, paths=self.paths_figure)
        self.title = widgets.HTML()
        self.views = widgets.VBox(
            [self.title, widgets.HBox([self.pattern_figure, self.dla_figure]), self.paths_figure]
        )
        self.views.layout.display = "none"
        prompts = [self.clean_box, self.corrupt_box, self.answers_box] if show_prompts else []
        # Show code once there is a head to show code for
        self.code_bar = widgets.HBox([self.code_button], layout=widgets.Layout(display="none"))
        self.children = [*prompts, self.status, self.views, self.code_view, self.code_bar]
        self.set_status(
            "Call show_head(layer, head) to see a head."
            if show_prompts
            else "Click a head in the drill-down: its attention pattern, direct logit attribution and paths appear here."
        )

    def use(self, clean, corrupt, answers, *, direction: str | None = None, metric=None) -> None:
        """Set the prompts (and direction, metric) the views are computed for."""
        clean, corrupt, answers = _unpack(clean, corrupt, answers)
        self.clean_box.value, self.corrupt_box.value = "\n".join(clean), "\n".join(corrupt)
        self.answers_box.value = "\n".join(f"{a!r}, {b!r}" for a, b in answers)
        self.direction = direction or self.direction
        self.metric = metric if metric is not None else self.metric

    def _calls(self, layer: int, head: int) -> dict:
        prompts = self._prompt_kwargs()
        label = f"L{layer}H{head}"
        graph = Graph.of(self.model)
        later = [r.label for r in graph.receivers if r.kind in ("q", "k", "v") and r.layer > layer]
        metric = self.metric if isinstance(self.metric, str) else "logit_diff"
        return {
            "pattern": {"prompt": prompts["clean"][0], "heads": [label]},
            "dla": {"prompts": prompts["clean"], "answers": prompts["answers"]},
            "paths": {
                **prompts,
                "senders": label,
                "receivers": ["logits", *later],
                "direction": self.direction,
                "metric": metric,
            },
        }

    def code(self) -> str:
        if self._last is None:
            raise InputError("No head shown yet: call show_head(layer, head).")
        calls = self._last
        script = _script(self.model.name)
        script.call("pattern", "workbench.circuits", "attention_patterns", [Name("model")], calls["pattern"])
        script.call("dla", "workbench.circuits", "direct_logit_attribution", [Name("model")], calls["dla"])
        script.call("paths", "workbench.circuits", "path_patch", [Name("model")], calls["paths"])
        script.add("pattern.plot(); dla.plot(); paths.plot()")
        return script.render()

    def show_head(self, layer: int, head: int) -> None:
        """Compute and draw the three views of head `head` of `layer`."""
        c = self.model.cfg
        if not (
            isinstance(layer, int)
            and 0 <= layer < c.n_layers
            and isinstance(head, int)
            and 0 <= head < c.n_heads
        ):
            self.show_error(
                InputError(
                    f"Head L{layer}H{head} does not exist: layers 0..{c.n_layers - 1}, heads 0..{c.n_heads - 1}."
                )
            )
            return
        try:
            calls = self._calls(layer, head)
        except WorkbenchError as err:
            self.show_error(err)
            return

        def compute(progress, cancel):
            pattern = attention_patterns(self.model, **calls["pattern"])
            dla = engine_call(direct_logit_attribution, self.model, **calls["dla"])(False, cancel)
            paths = engine_call(path_patch, self.model, **calls["paths"], warn=False)(progress, cancel)
            return calls, (layer, head), pattern, dla, paths

        self.start(compute, self._show, label=f"Head L{layer}H{head}")

    def _show(self, out) -> None:
        calls, self.head, self.pattern, self.dla, self.paths = out
        self._last = calls
        layer, head = self.head
        label = f"L{layer}H{head}"
        replace_figure(self.pattern_figure, viz.attention_figure(self.pattern, height=420))
        dla_fig = viz.dla_figure(self.dla, height=420)
        share = float(self.dla.values()[self.dla.parts.index(label)]) if label in self.dla.parts else math.nan
        dla_fig.update_layout(
            title={
                "text": f"{label}: direct logit attribution {share:+.3f} (mean over prompts)<br>"
                "every head, the final norm's scale frozen at the run"
            }
        )
        replace_figure(self.dla_figure, dla_fig)
        paths = viz.path_heatmap(self.paths, height=260)
        paths.update_layout(
            title={
                "text": f"Path patching from {label} ({self.paths.direction})<br>"
                "into the logits and every later head's q, k, v"
            }
        )
        replace_figure(self.paths_figure, paths)
        notes = "".join(
            f'<div style="color:#8a6d00">&#9888; {html.escape(w)}</div>' for w in self.paths.warnings
        )
        self.title.value = f"<b>Head {label}</b>{notes}"
        self.views.layout.display = self.code_bar.layout.display = ""
