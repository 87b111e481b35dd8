"""Results of the circuit engines: frozen dataclasses with named axes, baselines, provenance, tables and figures.

Values are stored raw (metric values of patched runs, or estimated changes) per prompt pair; normalised views
are computed on demand as (M - M_corrupt) / (M_clean - M_corrupt): 0 = the corrupt run's level, 1 = the clean
run's, in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from workbench.core.measures import pearson, spearman
from workbench.errors import InputError
from workbench.patching.result import Baselines
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engines do not need it.


@dataclasses.dataclass(frozen=True)
class PathPatchingResult(Baselines, Result):
    """Path patching over sender groups x receiver groups.

    `raw` [metric, pair, sender, receiver]: the metric of the base run with the senders' source values patched
    along their direct edges into the receivers (NaN where a receiver does not read the sender: it comes first).
    `base` [metric, pair] is the unpatched run (corrupt when denoising, clean when noising). `positions` are the
    positions patched (None: all). `noop` [metric, pair]: the clean run with every requested edge patched from
    the clean run itself (it must equal `clean`; see `warnings`).
    """

    direction: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    positions: tuple[int, ...] | None
    metrics: tuple[str, ...]
    metric_labels: tuple[str, ...]
    metric: str
    raw: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    noop: torch.Tensor
    clean_tokens: tuple[tuple[str, ...], ...]
    corrupt_tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    shapes: ClassVar[dict[str, str]] = {
        "raw": "metrics pair senders receivers",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
        "noop": "metrics pair",
    }

    def values(
        self, metric: str | None = None, normalize: bool = True, per_pair: bool = False
    ) -> torch.Tensor:
        """[sender, receiver] (or [pair, sender, receiver]); normalised: 0 = corrupt level, 1 = clean level."""
        raw = self.raw[self.metric_index(metric)]
        values = raw if per_pair else raw.nanmean(0) if raw.isnan().any() else raw.mean(0)
        return self._normalise(values, metric, per_pair) if normalize else values

    def effect(self, metric: str | None = None, normalize: bool = True) -> torch.Tensor:
        """[sender, receiver] change from the unpatched run (towards clean is positive when denoising)."""
        return self.values(metric, normalize) - self.base_level(metric, normalize)

    def top(self, k: int = 10, metric: str | None = None, normalize: bool = True):
        """The k (sender, receiver) cells that move the metric most, by absolute change."""
        import pandas as pd

        change = self.effect(metric, normalize)
        flat = torch.nan_to_num(change.abs(), nan=-1.0).flatten()
        rows = []
        for i in flat.argsort(descending=True)[:k].tolist():
            s, r = divmod(i, len(self.receivers))
            if flat[i] < 0:
                break
            rows.append(
                {
                    "sender": self.senders[s],
                    "receiver": self.receivers[r],
                    "value": float(self.values(metric, normalize)[s, r]),
                    "change": float(change[s, r]),
                }
            )
        return pd.DataFrame(rows)

    def to_frame(self, per_pair: bool = False):
        """One row per (sender, receiver) cell (and pair), one column per metric, raw and normalised."""
        import pandas as pd

        pairs = range(self.n_pairs) if per_pair else [None]
        cols: dict[str, list] = {"direction": [], "sender": [], "receiver": []}
        if per_pair:
            cols["pair"] = []
        for p in pairs:
            for s in self.senders:
                for r in self.receivers:
                    cols["direction"].append(self.direction)
                    cols["sender"].append(s)
                    cols["receiver"].append(r)
                    if per_pair:
                        cols["pair"].append(p)
        cols.update(self._metric_columns(per_pair))
        return pd.DataFrame(cols)

    def __repr__(self) -> str:
        return (
            f"PathPatchingResult({self.direction}, {len(self.senders)} senders x {len(self.receivers)} receivers, "
            f"{self.n_pairs} pairs, metric={self.metric!r})"
        )


@dataclasses.dataclass(frozen=True)
class EdgeScores(Baselines, Result):
    """A score for every edge of the component graph: the (estimated or exact) change of the metric when that
    edge alone is patched, per prompt pair.

    `scores` [pair, receiver, sender] in metric units (0 where no edge exists: see `adjacency` [receiver, sender]).
    method: "eap" (gradient at the base run), "eap-ig" (gradients averaged over `steps` points between the base
    and the source run's embeddings) or "exact" (every edge patched on its own). `clean_ids`, `corrupt_ids`
    [pair, pos] and `answer_ids` [pair, 2] let `faithfulness` rerun the prompts.
    """

    method: str
    steps: int
    direction: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    adjacency: torch.Tensor
    scores: torch.Tensor
    positions: tuple[int, ...] | None
    metrics: tuple[str, ...]
    metric: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    answer_ids: torch.Tensor
    clean_tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    shapes: ClassVar[dict[str, str]] = {
        "adjacency": "receivers senders",
        "scores": "pair receivers senders",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
        "clean_ids": "pair pos",
        "corrupt_ids": "pair pos",
        "answer_ids": "pair 2",
    }

    @property
    def n_edges(self) -> int:
        return int(self.adjacency.sum())

    def values(self, normalize: bool = False, per_pair: bool = False) -> torch.Tensor:
        """[receiver, sender] mean change over pairs (or [pair, receiver, sender]); normalised by the mean
        clean - corrupt gap of the primary metric (so patching the whole model moves it by about -1 or +1)."""
        values = self.scores if per_pair else self.scores.mean(0)
        if not normalize:
            return values
        _, gap = self.gap(self.metric, per_pair)
        return values / (gap.view(-1, 1, 1) if per_pair else gap)

    def edge_list(self, normalize: bool = False) -> list[tuple[int, int, float]]:
        """Every edge as (receiver index, sender index, score), strongest |score| first."""
        values = self.values(normalize)
        idx = self.adjacency.nonzero()
        scores = values[idx[:, 0], idx[:, 1]]
        order = scores.abs().argsort(descending=True)
        return [(int(idx[i, 0]), int(idx[i, 1]), float(scores[i])) for i in order.tolist()]

    def circuit(self, k: int) -> list[tuple[str, str]]:
        """The k edges with the largest |score|, as (sender, receiver) labels."""
        return [(self.senders[s], self.receivers[r]) for r, s, _ in self.edge_list()[: max(0, int(k))]]

    def top(self, k: int = 10, normalize: bool = False):
        import pandas as pd

        rows = [
            {"sender": self.senders[s], "receiver": self.receivers[r], "score": v}
            for r, s, v in self.edge_list(normalize)[:k]
        ]
        return pd.DataFrame(rows)

    def to_frame(self, normalize: bool = False):
        """One row per edge: sender, receiver, score (mean over pairs), its rank by |score|."""
        import pandas as pd

        rows = [
            {"sender": self.senders[s], "receiver": self.receivers[r], "score": v, "rank": i + 1}
            for i, (r, s, v) in enumerate(self.edge_list(normalize))
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        steps = f", {self.steps} steps" if self.method == "eap-ig" else ""
        return (
            f"EdgeScores({self.method}{steps}, {self.direction}, {self.n_edges} edges, {self.n_pairs} pairs, "
            f"metric={self.metric!r})"
        )


@dataclasses.dataclass(frozen=True)
class Faithfulness(Baselines, Result):
    """How much of the behaviour the top-k edges of a scoring carry, measured by exact edge patching.

    `ks` [k]: circuit sizes; `circuit` [metric, pair, k]: the clean run with every edge *outside* the top k
    patched from the corrupt run (the circuit's edges keep their clean values); normalised, 1 = the clean run,
    0 = the corrupt run. `verified_*` [edge]: the strongest edges by score, each patched alone in the scoring's
    direction: its estimate and the exact change (both mean over pairs, metric units).
    """

    method: str
    direction: str
    ks: torch.Tensor
    n_edges: int
    circuit_values: torch.Tensor
    metrics: tuple[str, ...]
    metric: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    verified_senders: tuple[str, ...]
    verified_receivers: tuple[str, ...]
    verified_estimate: torch.Tensor
    verified_exact: torch.Tensor
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    shapes: ClassVar[dict[str, str]] = {
        "ks": "k",
        "circuit_values": "metrics pair k",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
        "verified_estimate": "verified_senders",
        "verified_exact": "verified_senders",
    }

    def curve(self, metric: str | None = None, normalize: bool = True) -> torch.Tensor:
        """[k] the circuit's metric (mean over pairs), normalised (1 = clean, 0 = corrupt) by default."""
        values = self.circuit_values[self.metric_index(metric)].mean(0)
        return self._normalise(values, metric, False) if normalize else values

    def smallest(self, fraction: float = 0.8, metric: str | None = None) -> int | None:
        """The smallest k whose circuit recovers at least `fraction` of the clean - corrupt gap (None if none)."""
        curve = self.curve(metric)
        for k, v in zip(self.ks.tolist(), curve.tolist()):
            if v >= fraction:
                return int(k)
        return None

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"edges": self.ks.tolist(), "faithfulness": self.curve().tolist()})

    def verified_frame(self):
        """The verified edges: estimate, exact change, and the estimate's error."""
        import pandas as pd

        return pd.DataFrame(
            {
                "sender": list(self.verified_senders),
                "receiver": list(self.verified_receivers),
                "estimate": self.verified_estimate.tolist(),
                "exact": self.verified_exact.tolist(),
                "error": (self.verified_estimate - self.verified_exact).tolist(),
            }
        )

    def __repr__(self) -> str:
        k80 = self.smallest(0.8)
        return (
            f"Faithfulness({self.method}, {len(self.ks)} circuit sizes of {self.n_edges} edges; 80% of the gap "
            f"at {k80 if k80 is not None else 'no size tried'} edges; {len(self.verified_senders)} edges verified)"
        )


ATP_KINDS = ("q", "k", "v", "mlp")
ATP_METHODS = ("atp", "atp+qk", "atp*", "exact")


@dataclasses.dataclass(frozen=True)
class AtPResult(Baselines, Result):
    """Attribution patching of every node (query, key, value per head and position; MLP output per position).

    Grids [pair, kind, layer, pos, head] with kinds ("q", "k", "v", "mlp"); keys and values use the first
    `n_kv_heads` heads, MLPs head 0, the rest is NaN. `atp`: the linear estimate of the metric's change when the
    node alone is patched; `atp_qk`: the same with the QK fix (queries and keys; equal to `atp` elsewhere);
    `graddrop`: the AtP* score (1 / (L - 1)) sum_l |estimate with layer l's gradient dropped|, a magnitude, or None;
    `exact`: the measured change (NaN where not measured: see `verify`). Baselines `clean`, `corrupt`
    [metric, pair]; token ids for rerunning.
    """

    direction: str
    qk_fix: bool
    n_kv_heads: int
    position_labels: tuple[str, ...]
    atp: torch.Tensor
    atp_qk: torch.Tensor
    graddrop: torch.Tensor | None
    exact: torch.Tensor
    metrics: tuple[str, ...]
    metric: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    answer_ids: torch.Tensor
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    shapes: ClassVar[dict[str, str]] = {
        "atp": "pair 4 layer position_labels head",
        "atp_qk": "pair 4 layer position_labels head",
        "graddrop": "pair 4 layer position_labels head",
        "exact": "pair 4 layer position_labels head",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
        "clean_ids": "pair position_labels",
        "corrupt_ids": "pair position_labels",
        "answer_ids": "pair 2",
    }

    def grid(self, method: str = "atp*", normalize: bool = False) -> torch.Tensor:
        """[kind, layer, pos, head] mean over pairs: "atp", "atp+qk" and "exact" are signed changes of the metric;
        "atp*" is the GradDrop magnitude (|atp+qk| when GradDrop was off). normalize divides by the mean
        clean - corrupt gap."""
        if method not in ATP_METHODS:
            raise InputError(f"method={method!r}: use one of {', '.join(ATP_METHODS)}.")
        if method == "atp*":
            values = self.graddrop if self.graddrop is not None else self.atp_qk.abs()
        else:
            values = {"atp": self.atp, "atp+qk": self.atp_qk, "exact": self.exact}[method]
        mean = values.mean(0)
        if normalize:
            mean = mean / self.gap()[1]
        return mean

    def nodes(self) -> list[tuple[int, int, int, int]]:
        """Every node that exists, as (kind index, layer, pos, head)."""
        return [tuple(i) for i in (~self.atp[0].isnan()).nonzero().tolist()]

    def node_label(self, node) -> str:
        ki, layer, pos, head = node
        kind = ATP_KINDS[ki]
        where = (
            f"MLP{layer}"
            if kind == "mlp"
            else f"L{layer}{'H' if kind == 'q' or self.n_kv_heads == self.atp.shape[-1] else 'KV'}{head}.{kind}"
        )
        return f"{where} @ {self.position_labels[pos]}"

    def ranking(self, method: str = "atp*") -> list[tuple[int, int, int, int]]:
        """Nodes by |score| of `method`, strongest first (unmeasured exact nodes last)."""
        values = self.grid(method).abs().nan_to_num(-1.0)
        nodes = self.nodes()
        scores = torch.tensor([float(values[n]) for n in nodes])
        return [nodes[i] for i in scores.argsort(descending=True).tolist()]

    def compare(self, k: int = 20):
        """Each method against the exact grid where it was measured: Pearson (signed methods), Spearman of
        |score|, and recall of the exact top k by |change| within the method's top k (pandas DataFrame)."""
        import pandas as pd

        exact = self.grid("exact")
        nodes = [n for n in self.nodes() if not exact[n].isnan()]
        if len(nodes) < 3:
            raise InputError(
                "Too few nodes were measured exactly; run atp_star(..., exact=True) or verify()."
            )
        e = torch.tensor([float(exact[n]) for n in nodes], dtype=torch.float64)
        k = max(1, min(int(k), len(nodes)))
        top_e = set(e.abs().argsort(descending=True)[:k].tolist())
        rows = []
        for method in ("atp", "atp+qk", "atp*"):
            g = self.grid(method)
            a = torch.tensor([float(g[n]) for n in nodes], dtype=torch.float64)
            top_a = set(a.abs().argsort(descending=True)[:k].tolist())
            rows.append(
                {
                    "method": method,
                    "pearson": pearson(a, e) if method != "atp*" else float("nan"),
                    "spearman_abs": spearman(a.abs(), e.abs()),
                    f"top{k}_recall": len(top_a & top_e) / k,
                    "worst_exact_rank_missed": _worst_missed(a, e, k),
                }
            )
        return pd.DataFrame(rows)

    def to_frame(self):
        import pandas as pd

        rows = []
        grids = {m: self.grid(m) for m in ATP_METHODS}
        for node in self.nodes():
            ki, layer, pos, head = node
            rows.append(
                {
                    "kind": ATP_KINDS[ki],
                    "layer": layer,
                    "position": self.position_labels[pos],
                    "head": head if ATP_KINDS[ki] != "mlp" else None,
                    "node": self.node_label(node),
                    **{m: float(grids[m][node]) for m in ATP_METHODS},
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        measured = int((~self.exact[0].isnan()).sum())
        return (
            f"AtPResult({self.direction}, {len(self.nodes())} nodes, {self.n_pairs} pairs, qk_fix={self.qk_fix}, "
            f"graddrop={self.graddrop is not None}, {measured} measured exactly)"
        )


def _worst_missed(a: torch.Tensor, e: torch.Tensor, k: int) -> int | None:
    """The best exact rank (1 = strongest) among the exact top k that the method leaves out of its top k."""
    top_a = set(a.abs().argsort(descending=True)[:k].tolist())
    for rank, i in enumerate(e.abs().argsort(descending=True)[:k].tolist(), 1):
        if i not in top_a:
            return rank
    return None


@dataclasses.dataclass(frozen=True)
class LogitLensResult(Result):
    """The logit lens: every layer's residual stream through the final norm and the unembedding.

    Axes [prompt, layer, pos(, k)]; `layers` names the rows ("embeddings", "after L0", ...; the last row is the
    model's output). `top_ids` / `top_probs` / `top_tokens`: the k most likely next tokens; with answers,
    `logit_diff` (correct - incorrect), `correct_rank` (0 = top) and `correct_logprob`, else None.
    """

    layers: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: tuple
    logit_diff: torch.Tensor | None
    correct_rank: torch.Tensor | None
    correct_logprob: torch.Tensor | None
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "top_ids": "tokens layers pos k",
        "top_probs": "tokens layers pos k",
        "logit_diff": "tokens layers pos",
        "correct_rank": "tokens layers pos",
        "correct_logprob": "tokens layers pos",
    }

    @property
    def n_prompts(self) -> int:
        return self.top_ids.shape[0]

    def values(self, what: str = "logit_diff", prompt: int | None = None) -> torch.Tensor:
        """[layer, pos]: "logit_diff", "rank", "logprob" (need answers) or "top_prob"; mean over prompts unless
        `prompt` is given (ranks: the median)."""
        table = {
            "logit_diff": self.logit_diff,
            "rank": self.correct_rank,
            "logprob": self.correct_logprob,
            "top_prob": self.top_probs[..., 0],
        }
        if what not in table:
            raise InputError(f"what={what!r}: use one of {', '.join(table)}.")
        values = table[what]
        if values is None:
            raise InputError(
                f"{what} needs answers: run logit_lens(model, prompts, answers=(correct, incorrect))."
            )
        if prompt is not None:
            return values[prompt].float()
        return values.float().median(0).values if what == "rank" else values.float().mean(0)

    def to_frame(self, prompt: int = 0):
        import pandas as pd

        rows = []
        for li, layer in enumerate(self.layers):
            for pos, tok in enumerate(self.tokens[prompt]):
                row = {
                    "layer": layer,
                    "position": pos,
                    "token": tok,
                    "top_token": self.top_tokens[prompt][li][pos][0],
                    "top_prob": float(self.top_probs[prompt, li, pos, 0]),
                }
                if self.logit_diff is not None:
                    row["logit_diff"] = float(self.logit_diff[prompt, li, pos])
                    row["correct_rank"] = int(self.correct_rank[prompt, li, pos])
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"LogitLensResult({self.n_prompts} prompts, {len(self.layers)} rows x {self.top_ids.shape[2]} positions)"


@dataclasses.dataclass(frozen=True)
class DLAResult(Result):
    """Direct logit attribution at one position: each part's share of logit(correct) - logit(incorrect).

    `contributions` [prompt, part] (parts: "embed", "pos_embed", "L3H1", "L3 attn bias", "MLP3", ...),
    `constant` [prompt] the final norm's and the unembedding's biases, `total` [prompt] the model's logit
    difference: contributions.sum(-1) + constant == total (the norm's scale is frozen at this run's value:
    `note` says what that means).
    """

    parts: tuple[str, ...]
    contributions: torch.Tensor
    constant: torch.Tensor
    total: torch.Tensor
    position: int
    final_norm: str
    per_head: bool
    note: str
    tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "contributions": "tokens parts",
        "constant": "tokens",
        "total": "tokens",
    }

    def values(self, prompt: int | None = None) -> torch.Tensor:
        """[part] for one prompt, or the mean over prompts."""
        return self.contributions[prompt] if prompt is not None else self.contributions.mean(0)

    def heads(self) -> torch.Tensor:
        """[layer, head] mean contributions of the heads (per-head models only)."""
        if not self.per_head:
            raise InputError(
                "This model's attention output is normalised before the residual add: no per-head DLA."
            )
        labels = [p for p in self.parts if p.startswith("L") and "H" in p and " " not in p]
        layers = 1 + max(int(p[1 : p.index("H")]) for p in labels)
        heads = 1 + max(int(p[p.index("H") + 1 :]) for p in labels)
        grid = torch.zeros(layers, heads)
        mean = self.values()
        for p in labels:
            grid[int(p[1 : p.index("H")]), int(p[p.index("H") + 1 :])] = mean[self.parts.index(p)]
        return grid

    def residual_error(self) -> float:
        """max |sum of parts + constant - total| over prompts (float rounding only)."""
        return float(
            (self.contributions.double().sum(-1) + self.constant.double() - self.total.double()).abs().max()
        )

    def to_frame(self):
        import pandas as pd

        mean = self.values()
        return pd.DataFrame(
            {
                "part": list(self.parts),
                "dla": mean.tolist(),
                "std": self.contributions.std(0).nan_to_num(0).tolist(),
            }
        ).sort_values("dla", key=lambda s: -s.abs())

    def __repr__(self) -> str:
        return (
            f"DLAResult({len(self.parts)} parts, {len(self.tokens)} prompts, position {self.position}, mean logit "
            f"difference {float(self.total.mean()):.3f}, final norm {self.final_norm})"
        )


@dataclasses.dataclass(frozen=True)
class AttentionPatterns(Result):
    """Attention patterns [head, query, key] of one prompt; `tokens` label both axes."""

    heads: tuple[str, ...]
    tokens: tuple[str, ...]
    pattern: torch.Tensor
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {"pattern": "heads tokens tokens"}

    def of(self, head: str) -> torch.Tensor:
        if head not in self.heads:
            raise InputError(f"{head!r} is not among these heads: {', '.join(self.heads)}.")
        return self.pattern[self.heads.index(head)]

    def to_frame(self):
        import pandas as pd

        rows = []
        for hi, head in enumerate(self.heads):
            for q, qt in enumerate(self.tokens):
                for k, kt in enumerate(self.tokens[: q + 1]):
                    rows.append(
                        {
                            "head": head,
                            "query": q,
                            "query_token": qt,
                            "key": k,
                            "key_token": kt,
                            "weight": float(self.pattern[hi, q, k]),
                        }
                    )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"AttentionPatterns({len(self.heads)} heads, {len(self.tokens)} tokens)"
