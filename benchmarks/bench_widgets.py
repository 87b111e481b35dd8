"""Widget interaction latency: redrawing a panel from its stored result, and rerunning it on the demo model.

The panels are driven in Python as a notebook user's clicks would drive them (``background = False``, so each
action returns when it is done): no browser, so the time is the kernel's side of an interaction (engine, figure,
serialising the figure widget's state), not the browser's rendering.

Cases:
- redraw from a stored result, per panel (target < 50 ms):
  PatchingExplorer (switch the metric; the grid and a head drill-down are shown), PlateauProbe (change the
  threshold; the default 16 directions x 32 sizes x 3 families), LNRemovalPreview (redraw the preview figure).
  Lower bound: building the same figure with the `workbench.viz` function alone (no widget). Peer: a fresh build,
  the same figures in new figure widgets (what a panel would pay to replace its widgets instead of updating them
  in place). `agrees`: after the timed redraws the panel's figures equal freshly built ones.
- rerun on the demo model: PatchingExplorer's Run button (an IOI sweep over every layer and position) and a
  click on a heatmap cell (every head's output and pattern at that cell). Lower bound: the same engine call and
  figure without the panel, so the ratio is the panel's own overhead. The issue sets no time target for reruns.

Run: ``python -m benchmarks.bench_widgets [cpu|gpu|smoke]`` (gpu runs the same as cpu: panels draw on the CPU).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
import warnings

import torch

from benchmarks.common import interleaved_medians, peak_memory_mb, row


def _fresh_build(figures) -> None:
    """The figures in new figure widgets: the alternative to updating a panel's widgets in place."""
    from workbench.widgets.figure import PanelFigure

    for fig in figures:
        PanelFigure(fig)


def _same(widget, fig) -> bool:
    import json

    def spec(f):
        out = json.loads(f.to_json())
        for trace in out["data"]:
            trace.pop("uid", None)
        return out

    return spec(widget) == spec(fig)


os.environ.setdefault("HF_HUB_OFFLINE", "1")

REDRAW_TARGET_S = 0.050
SIZES = {  # redraws timed per panel, reruns timed, plateau probe size
    "smoke": dict(redraws=3, reruns=1, n_directions=3, n_sizes=6, n_pairs=2),
    "cpu": dict(redraws=20, reruns=3, n_directions=16, n_sizes=32, n_pairs=4),
    "gpu": dict(redraws=20, reruns=3, n_directions=16, n_sizes=32, n_pairs=4),
}
TOY_PAIRS = (  # for the random model of the smoke size
    [
        "When Mary and John went to the store , John gave a drink to",
        "When Tom and Anna went to the park , Anna gave a book to",
    ],
    [
        "When Mary and John went to the store , Mary gave a drink to",
        "When Tom and Anna went to the park , Tom gave a book to",
    ],
    [(" Mary", " John"), (" Tom", " Anna")],
)


def load(size: str):
    """(model, clean, corrupt, answers, texts for the LN preview, label): the demo model and IOI pairs, or a
    random toy model at the smoke size."""
    if size == "smoke":
        from workbench.models.toy import random_model

        model = random_model("gpt2", "tiny", seed=1)
        clean, corrupt, answers = TOY_PAIRS
        g = torch.Generator().manual_seed(0)
        texts = torch.randint(2, model.cfg.d_vocab, (2, 12), generator=g)
        return model, clean, corrupt, answers, texts, "random tiny model"
    from workbench.models import load_model
    from workbench.tasks import demo_corpus, ioi_pairs

    model = load_model("demo")
    pairs = ioi_pairs(SIZES[size]["n_pairs"], templates=0, name_pairs="heldout")
    texts = demo_corpus("validation", n_docs=200)
    return model, list(pairs.clean), list(pairs.corrupt), list(pairs.answers), texts, "demo model"


def redraw_medians(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU times (seconds) of each function, measured round-robin after one warm-up call.

    A redraw is single-threaded Python, so its CPU time is what it would take on an idle machine; on a loaded
    one (other processes taking the cores) wall time is longer and noisier."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return (
        {k: statistics.median(v) for k, v in wall.items()},
        {k: statistics.median(v) for k, v in cpu.items()},
    )


def _cpu_note(wall: dict, cpu: dict) -> str:
    return f"CPU time {cpu['panel'] * 1000:.1f} ms (viz alone {cpu['viz'] * 1000:.1f} ms) for {wall['panel'] * 1000:.1f} ms wall"


def _check(panel) -> None:
    if not panel.status_text.startswith("Done"):
        raise RuntimeError(f"{type(panel).__name__} did not finish: {panel.status_text}")


# -- PatchingExplorer ----------------------------------------------------------------------------------------
def patching_cases(model, clean, corrupt, answers, label: str, opts: dict) -> list[dict]:
    from plotly.callbacks import Points

    from workbench.patching import METRICS, sweep
    from workbench.viz.patching import heatmap
    from workbench.widgets.patching import PatchingExplorer

    panel = PatchingExplorer(model, clean, corrupt, answers)
    panel.background = False
    kwargs = panel._sweep_kwargs()

    def click_cell(layer: int, position: int):
        trace = panel.figure.data[0]
        callback = trace._click_callbacks[-1]
        callback(
            trace, Points(point_inds=[[layer, position]], xs=[None], ys=[None], trace_name="", trace_index=0)
        )

    # rerun: the Run button vs the same sweep and figure without the panel
    def panel_run():
        panel.run_button.click()
        _check(panel)

    def api_run():
        result = sweep(model, **kwargs, progress=False)
        return heatmap(result, metric="logit_diff", normalize=True)

    peak = peak_memory_mb(panel_run)
    n_layers = model.cfg.n_layers
    cell = (n_layers - 1, len(panel.grid.positions) - 1)  # the last layer at the last position

    def panel_click():
        click_cell(*cell)
        _check(panel)

    def api_click():
        d = panel._drill_kwargs(cell[0], cell[1], None)
        result = sweep(model, **d, progress=False)
        return heatmap(result, metric="logit_diff", normalize=True)

    times = interleaved_medians(
        {"panel run": panel_run, "api run": api_run, "panel click": panel_click, "api click": api_click},
        repeats=opts["reruns"],
        warmup=1,
    )
    # redraw: switching the metric redraws the grid and the drill-down from the stored results (metrics whose
    # normalisation is undefined for these pairs only put a sentence in the status line: left out)
    from workbench.errors import WorkbenchError

    usable = []
    for m in METRICS:
        try:
            heatmap(panel.grid, metric=m, normalize=True)
            usable.append(m)
        except WorkbenchError:
            pass
    metrics = itertools.cycle([m for m in usable if m != panel.metric_box.value] + [panel.metric_box.value])
    view = itertools.cycle(usable)

    def panel_redraw():
        panel.metric_box.value = next(metrics)

    def viz_only():
        m = next(view)
        heatmap(panel.grid, metric=m, normalize=True)
        heatmap(panel.heads, metric=m, normalize=True)

    fresh_metrics = itertools.cycle(usable)

    def fresh():
        m = next(fresh_metrics)
        _fresh_build(
            [heatmap(panel.grid, metric=m, normalize=True), heatmap(panel.heads, metric=m, normalize=True)]
        )

    redraw, redraw_cpu = redraw_medians(
        {"panel": panel_redraw, "viz": viz_only, "fresh": fresh}, opts["redraws"]
    )
    main, drill = panel.build_figures()
    agrees = _same(panel.figure, main) and _same(panel.heads_figure, drill)
    g = panel.grid
    n_cells = len(g.layers) * len(g.positions)
    rows = [
        row(
            f"widgets/PatchingExplorer redraw from a stored result (metric switch, grid + head drill-down), {label}",
            median_s=redraw["panel"],
            lower_bound_s=redraw["viz"],
            peers={"fresh build": redraw["fresh"]},
            agrees=agrees,
            target=f"< {REDRAW_TARGET_S * 1000:.0f} ms",
            meets_target=redraw["panel"] < REDRAW_TARGET_S,
            notes=f"{n_cells}-cell grid and a {len(panel.heads.heads or ())}-head drill-down; lower bound: the two "
            f"heatmap figures built without the widget; fresh build: the same figures in new figure widgets; "
            f"median of {opts['redraws']}; " + _cpu_note(redraw, redraw_cpu),
        ),
        row(
            f"widgets/PatchingExplorer rerun (Run button), {label}, {len(clean)} IOI pairs",
            median_s=times["panel run"],
            lower_bound_s=times["api run"],
            peak_mem_mb=peak,
            target="no time target; the ratio is the panel's own overhead",
            notes=f"sweep of resid_pre over {len(g.layers)} layers x {len(g.positions)} positions; lower bound: "
            f"`sweep(...)` + `heatmap(...)` without the panel; median of {opts['reruns']}",
        ),
        row(
            f"widgets/PatchingExplorer click a cell (drill-down into every head's z and pattern), {label}",
            median_s=times["panel click"],
            lower_bound_s=times["api click"],
            target="no time target; the ratio is the panel's own overhead",
            notes=f"layer {cell[0]}, position {cell[1]}; lower bound: the same `sweep(...)` + `heatmap(...)`",
        ),
    ]
    return rows


# -- PlateauProbe --------------------------------------------------------------------------------------------
def plateau_case(model, clean, label: str, opts: dict) -> dict:
    from workbench.viz import plateau as viz
    from workbench.widgets.plateau import PlateauProbe

    panel = PlateauProbe(model, clean[:2])
    panel.background = False
    panel.n_directions_box.value = opts["n_directions"]
    panel.n_sizes_box.value = opts["n_sizes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        panel.run_button.click()
    _check(panel)
    base = panel.threshold_box.value or 1e-3
    thresholds = itertools.cycle([base * f for f in (0.5, 2.0, 1.0)])
    shown = itertools.cycle([base * f for f in (0.5, 2.0, 1.0)])

    def panel_redraw():
        panel.threshold_box.value = next(thresholds)

    def viz_only():
        viz.curves(panel.plateau, panel.metric_box.value, next(shown), log_y=False)

    fresh_thresholds = itertools.cycle([base * f for f in (0.5, 2.0, 1.0)])

    def fresh():
        _fresh_build([viz.curves(panel.plateau, panel.metric_box.value, next(fresh_thresholds), log_y=False)])

    t, t_cpu = redraw_medians({"panel": panel_redraw, "viz": viz_only, "fresh": fresh}, opts["redraws"])
    agrees = _same(panel.figure, panel.build_figure())
    n_curves = sum(1 for tr in panel.figure.data if (tr.meta or {}).get("role") == "curves")
    return row(
        f"widgets/PlateauProbe redraw from a stored result (threshold change), {label}",
        median_s=t["panel"],
        lower_bound_s=t["viz"],
        peers={"fresh build": t["fresh"]},
        agrees=agrees,
        target=f"< {REDRAW_TARGET_S * 1000:.0f} ms",
        meets_target=t["panel"] < REDRAW_TARGET_S,
        notes=f"{len(panel.figure.data)} traces ({n_curves} curve traces), {opts['n_directions']} directions x "
        f"{opts['n_sizes']} sizes per family; lower bound: `viz.curves(...)` alone; median of {opts['redraws']}; "
        + _cpu_note(t, t_cpu),
    )


# -- LNRemovalPreview ----------------------------------------------------------------------------------------
def lnfree_case(model, texts, label: str, opts: dict) -> dict:
    from workbench.viz.lnfree import preview_figure
    from workbench.widgets.lnfree import LNRemovalPreview

    panel = LNRemovalPreview(model, texts, n_rows=len(texts) if isinstance(texts, torch.Tensor) else 16)
    panel.background = False
    panel.run_button.click()
    _check(panel)

    def viz_only():
        preview_figure(panel.preview, selected=panel.selected, k=panel.preset.value or None, frozen_loss=None)

    def fresh():
        _fresh_build([panel.build_figure()])

    t, t_cpu = redraw_medians({"panel": panel._redraw, "viz": viz_only, "fresh": fresh}, opts["redraws"])
    agrees = _same(panel.figure, panel.build_figure())
    return row(
        f"widgets/LNRemovalPreview redraw from a stored result, {label}",
        median_s=t["panel"],
        lower_bound_s=t["viz"],
        peers={"fresh build": t["fresh"]},
        agrees=agrees,
        target=f"< {REDRAW_TARGET_S * 1000:.0f} ms",
        meets_target=t["panel"] < REDRAW_TARGET_S,
        notes=f"{len(panel.figure.data)} traces in {len(panel.preview.sites)}-site preview figure; lower bound: "
        f"`preview_figure(...)` alone; median of {opts['redraws']}; " + _cpu_note(t, t_cpu),
    )


def run(size: str = "cpu", repeats: int | None = None) -> list[dict]:
    """`repeats` overrides how many reruns are timed (redraws are always timed `SIZES[size]['redraws']` times)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}")
    opts = dict(SIZES[size])
    if repeats is not None:
        opts["reruns"] = repeats
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, clean, corrupt, answers, texts, label = load(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a random model's baselines draw warnings
        rows = patching_cases(model, clean, corrupt, answers, label, opts)
    rows.append(plateau_case(model, clean, label, opts))
    rows.append(lnfree_case(model, texts, label, opts))
    return rows


if __name__ == "__main__":
    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        ratio = r["ratio_to_lower_bound"]
        fresh = r["peers_s"].get("fresh build")
        print(
            f"{r['case']}\n  {r['median_s'] * 1000:.1f} ms"
            + (f" ({ratio:.2f}x lower bound)" if ratio else "")
            + (f"; a fresh build takes {fresh * 1000:.1f} ms ({fresh / r['median_s']:.2f}x)" if fresh else "")
            + (f"; agrees with a fresh build: {r['agrees']}" if r["agrees"] is not None else "")
        )
        print(f"  target {r['target']}: {r['meets_target']}; {r['notes']}")
