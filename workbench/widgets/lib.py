"""`InteractionGraph`: build a LIB (or PCA, or neuron) interaction graph and explore it by clicking.

    from workbench.widgets import InteractionGraph
    InteractionGraph(setup="modadd-0")           # the authors' mod-add checkpoint; or "mnist", "demo-lm"
    InteractionGraph(model, data, profile_data=...)   # your own LibModel and LibData

Node layers are columns, each layer's nodes run top-down in basis order (the constant direction first, then by
Lambda or variance). The threshold slider shows, per section, the fewest edges that hold that share of its weight
and prints how many that is (for every basis built so far). Click a node for its profile (mod-add: its
activation over all 113 x 113 inputs and its Fourier terms; MNIST: its top images and input-space direction;
language models: its top tokens), click the dot on an edge for the scatter of its two features. The panel holds
no science: Run calls `workbench.lib.build_graph` (shown by "Show code"), figures come from `workbench.viz.lib`.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench.codegen import Expr, Name, Script, call
from workbench.errors import InputError, WorkbenchError
from workbench.lib import build as lib_build
from workbench.lib import communities, edge_attributions, feature_activations
from workbench.lib.build import LibGraph, build_graph
from workbench.lib.data import LibData
from workbench.lib.linalg import INTEGRATIONS
from workbench.lib.models import LibModel
from workbench.lib.setups import SETUPS, Setup, load_setup
from workbench.viz import lib as viz
from workbench.viz.common import message_figure
from workbench.widgets.base import Panel, PanelFigure, add_classes, replace_figure

BASIS_LABELS = {"lib": "LIB", "pca": "PCA", "neuron": "neurons"}
_LIB_NAMES = (
    "build_graph",
    "communities",
    "edge_attributions",
    "feature_activations",
    "lm_data",
    "lm_sections",
    "load_mnist_mlp",
    "load_modadd",
    "mnist_data",
    "modadd_data",
)


class InteractionGraph(Panel):
    """The interaction graph of a model, with node profiles and edge scatters.

    Args:
        model, data: a `LibModel` and the `LibData` its graph is built on; or leave them out and give `setup`.
        setup: one of `workbench.lib.setups.SETUPS` ("modadd-0".."modadd-4", "mnist", "demo-lm"); the default
            when no model is given is "modadd-0".
        profile_data: what node profiles and edge scatters are drawn from (mod-add: all pairs; default: `data`).
        basis: the basis built first ("lib", "pca", "neuron").
        threshold: the share of each section's edge weight shown.
        nodes_per_layer: nodes shown per layer (besides the constant one).
        data_dir / mnist_dir: where the checkpoints / MNIST are (else the environment variables or a download).
        graphs: graphs you built already with `build_graph` on this model and data: shown without rebuilding
            (the first one at once).

    Attributes:
        graph: the graph shown (a `LibGraph`); graphs: every graph built, by options.
        selection: ("node", layer, node), ("edge", section, out, in) or None.
        features: the `FeatureActivations` behind the node profile; attribution: the `EdgeAttributions` behind
            the edge scatter.
        profile_figure: the node profile or edge scatter.
    """

    def __init__(
        self,
        model: LibModel | None = None,
        data: LibData | None = None,
        *,
        setup: str | None = None,
        profile_data: LibData | None = None,
        basis: str = "lib",
        threshold: float = 0.9,
        nodes_per_layer: int = 30,
        data_dir=None,
        mnist_dir=None,
        prelude: tuple[str, ...] = (),
        graphs=(),
    ):
        if basis not in BASIS_LABELS:
            raise InputError(f"basis must be one of {list(BASIS_LABELS)}, got {basis!r}")
        self._dirs = {"data_dir": data_dir, "mnist_dir": mnist_dir}
        if model is None:
            self.experiment = load_setup(setup or "modadd-0", **self._dirs)
        else:
            if data is None:
                raise InputError(
                    "give the data the graph is built on with the model (InteractionGraph(model, data))"
                )
            self.experiment = Setup("custom", model, data, data, profile_data or data, tuple(prelude))
        self.graph: LibGraph | None = None
        self.graphs: dict[tuple, LibGraph] = {}
        self.features = None
        self.attribution = None
        self.selection: tuple | None = None
        self.clusters = None
        self._features: dict[int, object] = {}
        self._quiet = False
        options = list(SETUPS) if self.experiment.name != "custom" else ["custom"]
        self.setup_box = widgets.Dropdown(options=options, value=self.experiment.name, description="Model")
        self.setup_box.disabled = self.experiment.name == "custom"
        self.basis_box = widgets.ToggleButtons(
            options=[(v, k) for k, v in BASIS_LABELS.items()], value=basis, description="Basis"
        )
        self.integration_box = widgets.Dropdown(
            options=list(INTEGRATIONS), value="gradient", description="Integration"
        )
        self.intervals_box = widgets.BoundedIntText(value=0, min=0, max=100, description="Intervals")
        self.truncation_box = widgets.FloatText(value=lib_build.TRUNCATION, description="Truncation")
        self.threshold_box = widgets.FloatSlider(
            value=threshold,
            min=0.5,
            max=1.0,
            step=0.005,
            description="Weight shown",
            readout_format=".1%",
            continuous_update=False,
            style={"description_width": "initial"},
        )
        self.nodes_box = widgets.IntSlider(
            value=nodes_per_layer, min=3, max=120, description="Nodes/layer", continuous_update=False
        )
        self.const_box = widgets.Checkbox(value=False, description="constant node", indent=False)
        self.clusters_box = widgets.Checkbox(
            value=False, description="colour by Louvain community", indent=False
        )
        self.resolution_box = widgets.FloatText(value=0.5, description="Resolution")
        self.counts = widgets.HTML()
        self.profile_figure = PanelFigure()
        add_classes(
            "wb-lib",
            setup=self.setup_box,
            basis=self.basis_box,
            integration=self.integration_box,
            intervals=self.intervals_box,
            truncation=self.truncation_box,
            threshold=self.threshold_box,
            nodes=self.nodes_box,
            const=self.const_box,
            clusters=self.clusters_box,
            resolution=self.resolution_box,
            counts=self.counts,
            profile=self.profile_figure,
        )
        super().__init__()
        self.figure.add_class("wb-lib-figure")
        self.run_button.add_class("wb-lib-run")
        self.run_button.on_click(lambda _: self.run())
        self.setup_box.observe(lambda _: None if self._quiet else self._setup_changed(), "value")
        self.basis_box.observe(lambda _: None if self._quiet else self.run(), "value")
        for box in (self.threshold_box, self.const_box):
            box.observe(lambda _: None if self._quiet else self.redraw(), "value")
        # communities are found among the nodes shown: their number changes them
        for box in (self.clusters_box, self.resolution_box, self.nodes_box):
            box.observe(lambda _: None if self._quiet else self._clusters_changed(), "value")
        self.children = [
            widgets.HBox([self.setup_box, self.basis_box]),
            widgets.HBox([self.integration_box, self.intervals_box, self.truncation_box]),
            widgets.HBox([self.threshold_box, self.nodes_box, self.const_box]),
            widgets.HBox([self.clusters_box, self.resolution_box]),
            self.run_bar,
            self.status,
            self.counts,
            self.figure,
            self.profile_figure,
            self.code_view,
        ]
        self.set_status("Press Run to build the graph. Then click a node or the dot on an edge.")
        for graph in graphs:
            self.add_graph(graph)
        if graphs:
            self._quiet = True
            self.basis_box.value = graphs[0].basis
            self.integration_box.value = graphs[0].integration
            self.intervals_box.value = graphs[0].n_intervals
            self.truncation_box.value = graphs[0].truncation
            self._quiet = False
            self._show_graph(graphs[0])
            self.set_status("Click a node or the dot on an edge; toggle the basis to compare.", "ok")

    def add_graph(self, graph: LibGraph) -> None:
        """Keep a graph built elsewhere (on this panel's model and data) for the basis toggle and the counts."""
        if not isinstance(graph, LibGraph):
            raise InputError(f"graphs must be LibGraphs from build_graph, got {type(graph).__name__}")
        if graph.model_code != self.experiment.model.code or graph.data_code != self.experiment.train.code:
            raise InputError(
                f"this graph was built on {graph.model_code} with {graph.data_code}, not on the panel's "
                f"{self.experiment.model.code} with {self.experiment.train.code}"
            )
        kwargs = {"basis": graph.basis, "integration": graph.integration, "n_intervals": graph.n_intervals}
        self.graphs[self._key({**kwargs, "truncation": graph.truncation})] = graph

    # -- options -------------------------------------------------------------------------------------
    def _build_kwargs(self) -> dict:
        integration = self.integration_box.value
        n = int(self.intervals_box.value)
        if integration == "gradient" and n != 0:
            raise InputError("Gradient integration evaluates at alpha = 1 only: set Intervals to 0.")
        truncation = float(self.truncation_box.value)
        if not truncation >= 0:
            raise InputError("Truncation must be a number >= 0 (the authors use 1e-15).")
        return {
            "basis": self.basis_box.value,
            "integration": integration,
            "n_intervals": n,
            "truncation": truncation,
        }

    @staticmethod
    def _key(kwargs: dict) -> tuple:
        return tuple(sorted(kwargs.items()))

    def _setup_changed(self) -> None:
        try:
            self.experiment = load_setup(self.setup_box.value, **self._dirs)
        except WorkbenchError as err:
            self.show_error(err)
            return
        self.graphs.clear()
        self._features.clear()
        self.graph = self.features = self.attribution = self.selection = self.clusters = None
        self.counts.value = ""
        # the previous model's graph goes: nothing on the page belongs to another model
        replace_figure(self.figure, message_figure(f"{SETUPS[self.setup_box.value]}: press Run.", height=200))
        replace_figure(self.profile_figure, _empty("Click a node or the dot on an edge."))
        self.refresh_code()
        self.set_status(f"{SETUPS[self.setup_box.value]}: press Run.")

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Build the graph for the current options (shown at once when it was built before)."""
        try:
            kwargs = self._build_kwargs()
        except WorkbenchError as err:
            self.show_error(err)
            return
        key = self._key(kwargs)
        if key in self.graphs:
            self._show_graph(self.graphs[key])
            self.set_status(f"{BASIS_LABELS[kwargs['basis']]} graph (built before).", "ok")
            return
        exp = self.experiment

        def compute(progress, cancel):
            return build_graph(exp.model, exp.train, **kwargs, progress=progress, cancel=cancel)

        def done(graph):
            self.graphs[key] = graph
            self._show_graph(graph)

        self.start(compute, done, label=f"Building the {BASIS_LABELS[kwargs['basis']]} graph")

    def _show_graph(self, graph: LibGraph) -> None:
        self.graph = graph
        self.selection = None
        self.attribution = None
        self.features = self._features.get(id(graph))
        self.clusters = self._clusters(graph) if self.clusters_box.value else None
        self.redraw()
        replace_figure(self.profile_figure, _empty("Click a node or the dot on an edge."))

    def _clusters(self, graph: LibGraph):
        resolution = float(self.resolution_box.value)
        if not resolution > 0:
            raise InputError("Resolution must be positive (the authors use 0.5 and 1).")
        return communities(graph, resolution=resolution, nodes_per_layer=int(self.nodes_box.value))

    def _clusters_changed(self) -> None:
        if self.graph is None:
            return
        try:
            self.clusters = self._clusters(self.graph) if self.clusters_box.value else None
        except WorkbenchError as err:
            self.show_error(err)
            return
        self.redraw()

    # -- drawing -------------------------------------------------------------------------------------
    def _view(self) -> dict:
        return {
            "threshold": float(self.threshold_box.value),
            "nodes_per_layer": int(self.nodes_box.value),
            "show_const": bool(self.const_box.value),
        }

    def redraw(self) -> None:
        """Redraw the graph from the stored result (no model runs)."""
        if self.graph is None:
            return
        view = self._view()
        try:
            fig = viz.graph_figure(self.graph, **view, communities=self.clusters, selected=self.selection)
        except WorkbenchError as err:  # the view says why, not "Done" over the previous picture
            self.draw_failed(self.figure, err)
            return
        if self.draw_error is not None:
            self.draw_error = None
            self.set_status("Showing the stored graph (no model run).", "ok")
        replace_figure(self.figure, fig)
        for trace in self.figure.data:
            trace.on_click(self._clicked)
        self.counts.value = self._counts_html(view)
        self.refresh_code()  # (the code plots with the current view)

    def edge_counts(self) -> dict[str, dict[str, int]]:
        """{basis: {section: edges holding the slider's share of the weight}} for every basis built with the
        current integration options (all nodes, constant edges included, as the authors count)."""
        q = float(self.threshold_box.value)
        out: dict[str, dict[str, int]] = {}
        try:
            current = {k: v for k, v in self._build_kwargs().items() if k != "basis"}
        except WorkbenchError:
            return out
        for key, g in self.graphs.items():
            opts = dict(key)
            if {k: v for k, v in opts.items() if k != "basis"} != current or not g.has_edges:
                continue
            out[g.basis] = {f"{a} → {b}": g.edges_holding(s, q) for s, (a, b) in enumerate(g.sections)}
        return out

    def _counts_html(self, view: dict) -> str:
        counts = self.edge_counts()
        if not counts:
            return ""
        totals = {g.basis: [e.numel() for e in g.edges] for g in self.graphs.values() if g.basis in counts}
        head = "".join(f"<th style='padding:0 8px'>{html.escape(BASIS_LABELS[b])}</th>" for b in counts)
        rows = []
        for s, (a, b) in enumerate(self.graph.sections):
            sec = f"{a} → {b}"
            cells = "".join(
                f"<td style='text-align:right;padding:0 8px'>{counts[basis].get(sec, '')} of {totals[basis][s]}</td>"
                for basis in counts
            )
            rows.append(f"<tr><td>{html.escape(sec)}</td>{cells}</tr>")
        return (
            f"<div class='wb-lib-count-table' style='font-size:12px'><b>Edges holding {view['threshold']:.1%} of "
            f"each section's weight</b> (all nodes, constant edges included, as the authors count):<table><tr><th></th>{head}</tr>"
            f"{''.join(rows)}</table></div>"
        )

    # -- clicking ------------------------------------------------------------------------------------
    def _clicked(self, trace, points, _state) -> None:
        if not points.point_inds:
            return
        data = trace.customdata[points.point_inds[0]]
        if data[0] == "node":
            self.select_node(int(data[1]), int(data[2]))
        elif data[0] == "edge":
            self.select_edge(int(data[1]), int(data[2]), int(data[3]))

    def select_node(self, layer: int | str, node: int) -> None:
        """Show the profile of `node` at `layer` (computing the graph's feature activations once)."""
        if self.graph is None:
            self.set_status("Build a graph first (Run), then click a node.", "info")
            return
        try:
            li = self.graph.layer_index(layer)
            if not 0 <= node < self.graph.n_nodes(li):
                raise InputError(f"{self.graph.node_layers[li]} has nodes 0..{self.graph.n_nodes(li) - 1}")
        except WorkbenchError as err:
            self.show_error(err)
            return
        graph, exp = self.graph, self.experiment

        def show(features):
            self._features[id(graph)] = features
            self.features = features
            self.selection = ("node", li, node)  # (once shown: a failed click keeps the last selection)
            fig = viz.node_profile(features, graph.node_layers[li], node)
            replace_figure(self.profile_figure, fig)
            self.redraw()

        if id(graph) in self._features:
            show(self._features[id(graph)])
            return

        def compute(progress, cancel):
            return feature_activations(exp.model, graph, exp.profile, progress=progress, cancel=cancel)

        self.start(compute, show, label="Computing the feature activations")

    def select_edge(self, section: int, out_node: int, in_node: int) -> None:
        """Show the scatter of edge (out_node <- in_node) of `section` over the profile data."""
        if self.graph is None:
            self.set_status("Build a graph first (Run), then click an edge.", "info")
            return
        graph, exp = self.graph, self.experiment

        def compute(_progress, _cancel):
            return edge_attributions(exp.model, graph, exp.profile, section, out_node, in_node)

        def show(attr):
            self.attribution = attr
            self.selection = ("edge", section, out_node, in_node)
            replace_figure(self.profile_figure, viz.edge_scatter(attr))
            self.redraw()

        self.start(compute, show, label="Computing the edge's attributions")

    # -- show code -----------------------------------------------------------------------------------
    def code(self) -> str:
        """Calls that reproduce the graph shown, and the clicked node's or edge's figure, in a fresh kernel."""
        if self.graph is None:
            raise InputError("Nothing has been built yet: press Run first.")
        g, exp = self.graph, self.experiment
        script = Script()
        for line in exp.prelude or (['lm = load_model("demo")'] if "lm_sections(" in g.model_code else []):
            script.add(_expr(line))
        if g.model_code == "model":
            script.header.append("model: the LibModel you gave the panel")
        else:
            script.add(_expr(g.model_code), assign="model")
        script.add(_expr(g.data_code), assign="data")
        opts = {
            "basis": g.basis,
            "integration": g.integration,
            "n_intervals": g.n_intervals,
            "truncation": g.truncation,
        }
        defaults = {
            "basis": "lib",
            "integration": "gradient",
            "n_intervals": 0,
            "truncation": lib_build.TRUNCATION,
        }
        kwargs = {k: v for k, v in opts.items() if v != defaults[k]}
        script.call("graph", "workbench.lib", "build_graph", [Name("model"), Name("data")], kwargs)
        view = self._view()
        plot = {"threshold": view["threshold"], "nodes_per_layer": view["nodes_per_layer"]}
        if view["show_const"]:
            plot["show_const"] = True
        if self.clusters is not None:
            c = self.clusters
            script.call(
                "clusters",
                "workbench.lib",
                "communities",
                [Name("graph")],
                {"resolution": c.resolution, "nodes_per_layer": c.nodes_per_layer},
            )
            plot["communities"] = Name("clusters")
        script.call(None, "", "graph.plot", [], plot)
        profile = _expr(exp.profile.code)
        if self.selection is not None and self.selection[0] == "node" and self.features is not None:
            _, li, node = self.selection
            script.call(
                "features", "workbench.lib", "feature_activations", [Name("model"), Name("graph"), profile]
            )
            script.call(None, "", "features.plot", [], {"layer": g.node_layers[li], "node": node})
        elif self.selection is not None and self.selection[0] == "edge" and self.attribution is not None:
            _, s, o, n = self.selection
            edge = call(
                "workbench.lib", "edge_attributions", [Name("model"), Name("graph"), profile, s, o, n]
            )
            script.add(Expr(edge.text + ".plot()", edge.imports))
        return script.render()


def _expr(text: str) -> Expr:
    """Source text of a loader call, with the imports of the workbench names it uses."""
    imports = tuple(("workbench.lib", name) for name in _LIB_NAMES if f"{name}(" in text)
    if "load_model(" in text:
        imports += (("workbench.models", "load_model"),)
    return Expr(text, imports)


def _empty(text: str):
    fig = go.Figure()
    fig.add_annotation(
        text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"color": "#777"}
    )
    fig.update_layout(
        height=160, xaxis={"visible": False}, yaxis={"visible": False}, margin={"t": 10, "b": 10}
    )
    return fig
