"""Fourier labels of mod-add directions: which terms of (x, y) a basis direction is made of.

Each direction is evaluated on all 113 x 113 inputs (summed over the three positions at the embedding, the last
position elsewhere, as the authors do) and Fourier transformed over (x, y). Its variance splits into families:
the constant, terms in x only ("cos(kx)") or y only ("cos(ky)"; reported together as "cos(kx) + cos(ky)" when their
shares differ by less than 0.01), and two-dimensional terms, reported per direction in whichever convention is more
concentrated: "cos(ix + jy)" / "cos(ix - jy)" (phase-free: the squared magnitude of the coefficient at (i, j) or
(i, -j), both signs) or "cos(ix) cos(jy)" / "sin(ix) sin(jy)" (from the sum and difference of those magnitudes).
Shares are of the direction's total squared Fourier magnitude, the constant term included.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from workbench.core import Run
from workbench.errors import InputError
from workbench.lib.build import LibGraph, collect_acts, float64_twin
from workbench.lib.data import MODULUS, modadd_data
from workbench.lib.models import LibModel
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

TOP_TERMS = 7
"""At most this many terms are kept per direction (the authors' label length)."""


def term_shares(act: torch.Tensor) -> dict[str, float]:
    """Shares of every Fourier term of one direction's activation [113, 113] (indexed [x, y])."""
    p = act.shape[0]
    if act.shape != (p, p) or p % 2 == 0:
        raise InputError(f"Fourier labels need a square grid of odd size, got {tuple(act.shape)}")
    a = torch.fft.fft2(act.to(torch.float64))
    power = a.abs() ** 2
    total = float(power.sum())
    if total == 0:
        return {"const": 0.0}
    h = p // 2
    shares = {"const": float(power[0, 0]) / total}
    for k in range(1, h + 1):
        cx = float(power[k, 0] + power[p - k, 0]) / total
        cy = float(power[0, k] + power[0, p - k]) / total
        if abs(cx - cy) < 0.01:
            shares[f"cos({k}x) + cos({k}y)"] = cx + cy
        else:
            shares[f"cos({k}x)"] = cx
            shares[f"cos({k}y)"] = cy
    pos = torch.arange(1, h + 1)
    A_pp = a[pos][:, pos].abs()  # coefficient at (+i, +j); (-i, -j) is its conjugate
    A_pm = a[pos][:, p - pos].abs()  # at (+i, -j)
    plus, minus = 2 * A_pp**2 / total, 2 * A_pm**2 / total
    coscos, sinsin = (A_pp + A_pm) ** 2 / total, (A_pp - A_pm) ** 2 / total
    concentrated_pm = float(plus.sum()) / max(float(minus.sum()), 1e-300)
    concentrated_cs = float(coscos.sum()) / max(float(sinsin.sum()), 1e-300)
    for i in range(h):
        for j in range(h):
            if concentrated_pm > concentrated_cs:
                shares[_two_d(i + 1, j + 1, "+")] = float(plus[i, j])
                shares[_two_d(i + 1, j + 1, "-")] = float(minus[i, j])
            else:
                shares[f"cos({i + 1}x) cos({j + 1}y)"] = float(coscos[i, j])
                shares[f"sin({i + 1}x) sin({j + 1}y)"] = float(sinsin[i, j])
    return shares


def _two_d(i: int, j: int, sign: str) -> str:
    return f"cos({i}(x {sign} y))" if i == j else f"cos({i}x {sign} {j}y)"


def top_terms(
    shares: dict[str, float], cover: float = 0.995, min_share: float = 0.005
) -> list[tuple[str, float]]:
    """The largest terms until they cover `cover` of the total or fall below `min_share` (at most `TOP_TERMS`)."""
    out, cum = [], 0.0
    for name, value in sorted(shares.items(), key=lambda kv: -kv[1]):
        out.append((name, value))
        cum += value
        if cum > cover or value < min_share:
            break
    return out[:TOP_TERMS]


def term_frequency(name: str) -> int | None:
    """The frequency of a single-frequency term ("cos(15x) + cos(15y)", "cos(8(x + y))", ...), else None."""
    if name == "const":
        return 0
    nums = {int(n) for n in re.findall(r"(\d+)[xy(]", name)}
    return nums.pop() if len(nums) == 1 else None


@dataclasses.dataclass(frozen=True)
class FourierLabels(Result):
    """The Fourier terms of the first directions of each node layer of a mod-add graph.

    Axes: node layer (`layers`), direction (0 = the constant one when centred), term (top terms, largest first).

    Attributes:
        layers: the node layers labelled.
        basis: the graph's basis.
        terms: per layer, per direction, the names of its top terms.
        shares: per layer, per direction, their shares of the direction's variance.
        top_share: per layer [direction] the share of the top term.
        frequency: per layer [direction] the top term's frequency (0 for the constant, -1 for a two-frequency term).
    """

    layers: tuple[str, ...]
    basis: str
    terms: tuple[tuple[tuple[str, ...], ...], ...]
    shares: tuple[tuple[tuple[float, ...], ...], ...]
    top_share: tuple[torch.Tensor, ...]
    frequency: tuple[torch.Tensor, ...]
    provenance: Provenance

    def label(self, layer: str, direction: int) -> str:
        """ "51% cos(15x) + cos(15y) | 30% ..." for one direction."""
        i = self.layers.index(layer)
        return " | ".join(f"{s:.0%} {t}" for t, s in zip(self.terms[i][direction], self.shares[i][direction]))

    def frequencies(self, layer: str, n: int | None = None, min_share: float = 0.5) -> list[int]:
        """Distinct single frequencies (> 0) of the first `n` directions whose top term holds at least `min_share`."""
        i = self.layers.index(layer)
        n = len(self.frequency[i]) if n is None else n
        freqs = [
            int(f) for f, s in zip(self.frequency[i][:n], self.top_share[i][:n]) if f > 0 and s >= min_share
        ]
        return sorted(set(freqs))

    def to_frame(self):
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for d, (terms, shares) in enumerate(zip(self.terms[i], self.shares[i])):
                rows.append(
                    {
                        "layer": layer,
                        "direction": d,
                        "top_term": terms[0],
                        "top_share": shares[0],
                        "frequency": int(self.frequency[i][d]),
                        "label": self.label(layer, d),
                    }
                )
        return pd.DataFrame(rows)


def grid_activations(model: LibModel, graph: LibGraph, layer: str, run: Run | None = None) -> torch.Tensor:
    """A mod-add layer's basis directions on all pairs: [113 (x), 113 (y), k] (embedding: summed over positions)."""
    if model.kind != "modadd":
        raise InputError("Fourier labels are for the mod-add model (its inputs are a 113 x 113 grid)")
    gi = graph.layer_index(layer)
    m = float64_twin(model)
    run = run or Run(progress=False)
    (f,) = collect_acts(m, modadd_data("all").x, [m.index(layer)], run)
    fh = f @ graph.C[gi] if graph.C[gi] is not None else f
    fh = fh.sum(1) if fh.shape[1] > 1 else fh[:, -1]
    return fh.reshape(MODULUS, MODULUS, -1)


def fourier_labels(
    model: LibModel,
    graph: LibGraph,
    *,
    layers=None,
    n_directions: int = 16,
    progress=True,
    cancel=None,
    run: Run | None = None,
) -> FourierLabels:
    """Fourier labels of the first `n_directions` directions of each node layer (the logits excluded) of a mod-add
    graph. Progress and cancel per layer."""
    run = Run.of(run, progress=progress, cancel=cancel)
    if not isinstance(graph, LibGraph):
        raise InputError(f"graph must be a LibGraph, got {type(graph).__name__}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise InputError(f"n_directions must be a positive int, got {n_directions!r}")
    layers = [n for n in graph.node_layers if n != "output"] if layers is None else list(layers)
    for name in layers:
        graph.layer_index(name)

    def one(name):
        grid = grid_activations(model, graph, name, run)
        k = min(n_directions, grid.shape[-1])
        terms, shares, top, freq = [], [], [], []
        for d in range(k):
            best = top_terms(term_shares(grid[..., d]))
            terms.append(tuple(t for t, _ in best))
            shares.append(tuple(s for _, s in best))
            top.append(best[0][1])
            f = term_frequency(best[0][0])
            freq.append(-1 if f is None else f)
        return tuple(terms), tuple(shares), torch.tensor(top, dtype=torch.float64), torch.tensor(freq)

    out = run.map(layers, one, desc="Fourier labels")
    return FourierLabels(
        layers=tuple(layers),
        basis=graph.basis,
        terms=tuple(o[0] for o in out),
        shares=tuple(o[1] for o in out),
        top_share=tuple(o[2] for o in out),
        frequency=tuple(o[3] for o in out),
        provenance=Provenance.capture(
            model.code, basis=graph.basis, layers=layers, n_directions=n_directions
        ),
    )
