"""`LNRemovalPreview`: choose norms to freeze and see what it costs, zero-shot.

Run computes the preview (`workbench.lnfree.preview`): the loss change of freezing each norm alone, the
cumulative curve in the paper's removal order, and the per-token scale distributions. Choosing norms (per layer
and kind, or the preset "paper order up to step k") highlights them and measures the loss with exactly those
norms frozen together (`workbench.lnfree.evaluate_loss`). `.code()` prints the calls of the last successful run
and measurement, with the data written out (or the `demo_corpus` call that makes it).
"""

from __future__ import annotations

import threading

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench.codegen import Expr, Name, Script, call
from workbench.errors import InputError
from workbench.lnfree.evaluation import evaluate_loss
from workbench.lnfree.preview import preview
from workbench.lnfree.sites import KIND_LABELS, paper_order, parse_sites, site_label, split_site
from workbench.viz.common import message_figure
from workbench.viz.lnfree import preview_figure
from workbench.widgets.base import Panel, engine_call, replace_figure, source_of

ESTIMATORS = {
    "mean over tokens (paper)": ("mean", False, False),
    "mean, without position 0 / end-of-text": ("mean", True, True),
    "median over tokens": ("median", False, False),
    "moving average (paper's code)": ("ema", False, False),
}


class LNRemovalPreview(Panel):
    """Zero-shot LayerNorm-removal preview for `model` on a text set `data` (token ids or documents).

    Args:
        model: a `WorkbenchModel` (local, or remote: the preview runs inside nnsight traces).
        data: token ids [row, pos] or a list of documents.
        n_rows, seq_len: how much of `data` to use (rows of `seq_len` tokens when packing documents).
        model_var, data_var: the variable names `.code()` uses.
        run: compute the preview immediately.

    Attributes:
        preview: the last `RemovalPreview`; selection_loss: the measured loss with `frozen` (the sites of the
            last measurement) frozen together, or None.
    """

    def __init__(
        self,
        model,
        data,
        *,
        n_rows: int | None = 32,
        seq_len: int | None = None,
        batch_size: int | None = None,
        model_var: str = "model",
        data_var: str = "tokens",
        run: bool = False,
    ):
        super().__init__()
        self.model, self.data = model, data
        self.n_rows, self.seq_len, self.batch_size = n_rows, seq_len, batch_size
        self.model_var, self.data_var = model_var, data_var
        for name, value in (("n_rows", n_rows), ("seq_len", seq_len), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name}={value!r}: give a positive whole number (or None for the default).")
        for name, value in (("model_var", model_var), ("data_var", data_var)):
            if not value.isidentifier():
                raise InputError(f"{name}={value!r}: give a Python variable name for the printed code.")
        self.preview = None
        self.selection_loss = None
        self.frozen: list[str] = []  # the sites `selection_loss` was measured with
        self._preview_options: dict | None = None  # the options of the last successful preview
        self._pending = False
        self._syncing = False
        n_layers = model.cfg.n_layers
        self.order = paper_order(n_layers)

        self.estimator = widgets.Dropdown(
            options=list(ESTIMATORS),
            value=list(ESTIMATORS)[0],
            description="frozen scale",
            style={"description_width": "90px"},
            layout=widgets.Layout(width="380px"),
        )
        self.preset = widgets.IntSlider(
            value=0,
            min=0,
            max=len(self.order),
            description="paper order up to step",
            style={"description_width": "150px"},
            layout=widgets.Layout(width="460px"),
            continuous_update=False,
        )
        self.sites = widgets.SelectMultiple(
            options=[(site_label(s), s) for s in self.order],
            value=(),
            rows=10,
            description="norms to freeze",
            style={"description_width": "110px"},
            layout=widgets.Layout(width="300px"),
        )
        self.kind_buttons = {
            kind: widgets.Button(
                description=f"all {KIND_LABELS[kind]}" if kind != "final" else "final",
                layout=widgets.Layout(width="120px"),
            )
            for kind in ("mlp", "qk", "v", "final")
        }
        self.clear_button = widgets.Button(description="clear", layout=widgets.Layout(width="120px"))
        for kind, button in self.kind_buttons.items():
            button.on_click(lambda _b, kind=kind: self.toggle_kind(kind))
            button.add_class(f"wb-lnfree-kind-{kind}")
        self.clear_button.on_click(lambda _b: self.select([]))
        self.clear_button.add_class("wb-lnfree-clear")

        self.estimator.add_class("wb-lnfree-estimator")
        self.preset.add_class("wb-lnfree-preset")
        self.sites.add_class("wb-lnfree-sites")
        self.figure.add_class("wb-lnfree-figure")
        self.run_button.add_class("wb-lnfree-run")
        replace_figure(self.figure, message_figure("Press Run to compute the zero-shot preview.", height=200))

        self.estimator.observe(self._on_estimator, names="value")
        self.preset.observe(self._on_preset, names="value")
        self.sites.observe(self._on_sites, names="value")
        self.run_button.on_click(lambda _b: self.run())

        buttons = widgets.VBox([*self.kind_buttons.values(), self.clear_button])
        controls = widgets.HBox(
            [widgets.VBox([self.estimator, self.preset]), self.sites, buttons],
            layout=widgets.Layout(align_items="flex-start", flex_flow="row wrap"),
        )
        self.children = [controls, self.run_bar, self.status, self.code_view, self.figure]
        self.set_status(
            f"{model.name}: press Run to compute the zero-shot preview ({len(self.order)} norm sites)."
        )
        if run:
            self.run()

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        """The chosen sites, in the paper's order."""
        chosen = set(self.sites.value)
        return [s for s in self.order if s in chosen]

    def _estimator_options(self) -> dict:
        method, excl_first, excl_eot = ESTIMATORS[self.estimator.value]
        return {"method": method, "exclude_first": excl_first, "exclude_eot": excl_eot}

    def _data_options(self) -> dict:
        out = {}
        if self.n_rows is not None:
            out["n_rows"] = self.n_rows
        if self.seq_len is not None:
            out["seq_len"] = self.seq_len
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return out

    def select(self, sites) -> None:
        """Choose the norms to freeze (site names, see `workbench.lnfree.sites.parse_sites`)."""
        try:
            chosen = parse_sites(list(sites), self.model.cfg.n_layers) if sites else []
        except InputError as err:
            self.show_error(err)
            return
        self.sites.value = tuple(chosen)

    def toggle_kind(self, kind: str) -> None:
        """Add every site of `kind` to the selection, or remove them if all are selected."""
        kind_sites = [s for s in self.order if split_site(s)[0] == kind]
        current = set(self.sites.value)
        if set(kind_sites) <= current:
            current -= set(kind_sites)
        else:
            current |= set(kind_sites)
        self.select(sorted(current, key=self.order.index))

    # -- events --------------------------------------------------------------------------------------------
    def _on_estimator(self, _change) -> None:
        if self.preview is not None:
            self.set_status("The frozen-scale estimator changed: press Run to recompute the preview.", "info")

    def _on_preset(self, change) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self.sites.value = tuple(self.order[: change["new"]])
        finally:
            self._syncing = False
        self._selection_changed()

    def _on_sites(self, _change) -> None:
        if not self._syncing:
            k = len(self.selected)
            self._syncing = True
            try:  # the preset slider follows when the choice is a prefix of the paper's order
                self.preset.value = k if self.selected == self.order[:k] else 0
            finally:
                self._syncing = False
        if not self._syncing:
            self._selection_changed()

    def _selection_changed(self) -> None:
        if self.preview is None:
            self.set_status("Press Run first: the preview calibrates the frozen scales.", "info")
            return
        self.selection_loss = None
        self._redraw()
        self.evaluate_selection()

    # -- computing -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Compute the preview (one forward pass per site and per cumulative step)."""
        options = {**self._estimator_options(), **self._data_options()}

        def on_result(result):
            self.preview, self._preview_options = result, options
            self.selection_loss, self.frozen = None, []
            self._redraw()
            if self.selected:
                self._pending = True
                self._after_run()

        # remote models: a repeated preview is served from the result cache, not resubmitted
        compute = engine_call(preview, self.model, self.data, **options)
        self.start(compute, on_result, label="Computing the preview")

    def evaluate_selection(self) -> None:
        """Measure the loss with the selected sites frozen together (one forward pass per batch)."""
        if self.preview is None:
            self.set_status("Press Run first: the preview calibrates the frozen scales.", "info")
            return
        if self.busy:
            self._pending = True
            return
        selected = self.selected
        if not selected:
            self.selection_loss, self.frozen = None, []
            self._redraw()
            self.set_status("Nothing frozen: the loss is the model's own.", "info")
            return
        scales = self.preview.scales

        compute = engine_call(
            evaluate_loss, self.model, self.data, freeze=selected, scales=scales, **self._data_options()
        )

        def on_result(result):
            if selected == self.selected:
                self.selection_loss, self.frozen = result.mean, selected
                self._redraw()
            else:
                self._pending = True
            self._after_run()

        self.start(compute, on_result, label=f"Measuring the loss with {len(selected)} norms frozen")

    def _after_run(self) -> None:
        """Re-measure once the current run has finished if the selection changed meanwhile."""
        if not self._pending:
            return
        self._pending = False
        if not self.background:
            return self.evaluate_selection()
        thread = self._thread

        def wait_then_run():
            if thread is not None:
                thread.join()
            self.evaluate_selection()

        threading.Thread(target=wait_then_run, daemon=True).start()

    # -- drawing -------------------------------------------------------------------------------------------
    def build_figure(self) -> go.Figure:
        k = self.preset.value or None
        loss = self.selection_loss if self.frozen == self.selected else None
        return preview_figure(self.preview, selected=self.selected, k=k, frozen_loss=loss)

    def _redraw(self) -> None:
        if self.preview is not None:
            replace_figure(self.figure, self.build_figure())
            self.refresh_code()

    def code(self) -> str:
        """The calls behind the figure: the last successful preview, and the loss measured with the chosen norms
        frozen together (when it was measured), then the plot of the current selection."""
        script = Script()
        options = self._preview_options
        if options is None:
            options = {**self._estimator_options(), **self._data_options()}
            script.header.append("not run yet: the preview Run will compute")
        model, data = Name(self.model_var), Name(self.data_var)
        script.add(
            Expr(f"{self.model_var} = load_model({self.model.name!r})", (("workbench.models", "load_model"),))
        )
        script.add(source_of(self.data), assign=self.data_var)
        method = {"method": options["method"]}
        if options["exclude_first"] or options["exclude_eot"]:
            method.update(exclude_first=options["exclude_first"], exclude_eot=options["exclude_eot"])
        data_opts = {k: options[k] for k in ("n_rows", "seq_len", "batch_size") if k in options}
        script.call("result", "workbench.lnfree", "preview", [model, data], {**data_opts, **method})
        selected, k = self.selected, self.preset.value or None
        plot = {"selected": selected, "k": k} if selected else {}
        if selected and self.frozen == selected and self.selection_loss is not None:
            script.call(
                "frozen",
                "workbench.lnfree",
                "evaluate_loss",
                [model, data],
                {"freeze": selected, "scales": Expr("result.scales"), **data_opts},
            )
            plot["frozen_loss"] = Expr("frozen.mean")
        script.add(call("", "result.plot", [], plot))
        return script.render()
