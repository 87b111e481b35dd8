"""Evaluation of LN-free (and ordinary) models: cross-entropy on a text set, and whether direct logit
attribution is exact.

`evaluate_loss` gives the mean next-token cross-entropy with its median and upper percentiles: the paper's GPT-2
XL LN-free model has a mean of 130 nats on The Pile because of three sequences with tokens it never saw, so a mean
alone can mislead. Sites can be frozen zero-shot for the evaluation (``freeze=...``).

`dla_exactness` is the paper's check (section 5.1, appendix G). For each attention head and MLP (a *component*
``c`` of the final residual stream ``r``) and the correct next token ``t``:

- direct logit attribution: ``DLA_c = norm_lin(c) . u_t``, the component pushed through the final norm with the
  scale of the full residual (``norm_lin(c) = centre(c) / sigma(r) * w``), as interpretability work does;
- direct effect: ``DE_c = norm(r) . u_t - norm(r - c) . u_t``, what removing the component actually changes;
- NMAE_c = mean |DLA_c - DE_c| / mean |DE_c| over tokens; the paper averages it over heads: 49% for GPT-2
  Small with LayerNorm, 0.00% LN-free. Without a per-token scale the final norm is linear and DLA = DE.
"""

from __future__ import annotations

import dataclasses
import math

import nnsight
import torch

from workbench.core import CancelToken, Run, selectors
from workbench.errors import InputError
from workbench.lnfree.calibration import FrozenScales, rows_per_chunk
from workbench.lnfree.data import text_tokens
from workbench.lnfree.freezing import frozen_forward, norm_infos
from workbench.lnfree.norms import FrozenNorm, norm_info
from workbench.lnfree.sites import parse_sites
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

EXTREME_LOSS = 30.0
"""Per-token losses above this many nats are counted as extreme (a uniform guess over 50k tokens is 10.8)."""


@dataclasses.dataclass(frozen=True)
class LossStats(Result):
    """Next-token cross-entropy on a text set (nats).

    Attributes:
        token_loss: [row, pos - 1] per-token loss.
        frozen: the sites frozen zero-shot for this evaluation (empty for the model as it is).
    """

    model: str
    token_loss: torch.Tensor
    frozen: list[str]
    provenance: Provenance

    @property
    def finite(self) -> torch.Tensor:
        flat = self.token_loss.flatten().double()
        return flat[torch.isfinite(flat)]

    @property
    def mean(self) -> float:
        return float(self.token_loss.double().mean())

    @property
    def median(self) -> float:
        return float(self.finite.median())

    def quantile(self, q: float) -> float:
        return float(torch.quantile(self.finite.float(), q))

    @property
    def n_tokens(self) -> int:
        return self.token_loss.numel()

    @property
    def n_nonfinite(self) -> int:
        return int((~torch.isfinite(self.token_loss)).sum())

    @property
    def n_extreme(self) -> int:
        return int((self.token_loss > EXTREME_LOSS).sum())

    def summary(self) -> dict[str, float]:
        return {
            "mean": self.mean,
            "median": self.median,
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
            "p999": self.quantile(0.999),
            "max": float(self.finite.max()),
            "n_tokens": self.n_tokens,
            "n_extreme": self.n_extreme,
            "n_nonfinite": self.n_nonfinite,
        }

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"model": self.model, "frozen": len(self.frozen), **self.summary()}])


def evaluate_loss(
    model,
    data,
    *,
    freeze=None,
    scales: FrozenScales | None = None,
    seq_len: int | None = None,
    n_rows: int | None = None,
    batch_size: int | None = None,
    memory_budget=None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> LossStats:
    """Per-token next-token cross-entropy of `model` on a text set, optionally with norm sites frozen.

    Args:
        data: token ids [row, pos] or a list of documents.
        freeze: sites to freeze zero-shot ("mlp", "qk.3", ...; see `parse_sites`); None freezes nothing.
        scales: the frozen scales (required with `freeze`: calibrate them with `calibrate` or take
            `RemovalPreview.scales`).
    """
    infos = norm_infos(model)
    tokens = text_tokens(model, data, seq_len=seq_len, n_rows=n_rows)
    sites = parse_sites(freeze, model.cfg.n_layers) if freeze not in (None, [], ()) else []
    if sites and scales is None:
        raise InputError("Freezing sites needs their frozen scales: pass scales=calibrate(model, data).")
    frozen = {s: scales[s] for s in sites}
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)

    def one(start: int, stop: int) -> torch.Tensor:
        return (
            frozen_forward(model, tokens[start:stop], infos=infos, freeze=frozen, run=run)["loss"]
            .float()
            .cpu()
        )

    parts = run.chunked(len(tokens), rows_per_chunk(model, tokens.shape[1], run), one, desc="loss")
    return LossStats(
        model=model.name,
        token_loss=torch.cat(parts),
        frozen=sites,
        provenance=Provenance.capture(model.name, frozen=sites, n_rows=len(tokens), seq_len=tokens.shape[1]),
    )


# ---------------------------------------------------------------------------------------------------------------
# DLA exactness


@dataclasses.dataclass(frozen=True)
class DLAExactness(Result):
    """How far direct logit attribution is from the true direct effect, per component.

    Attributes:
        nmae_heads: [layer, head] mean |DLA - DE| / mean |DE| per attention head.
        nmae_mlps: [layer] the same per MLP.
        mean_abs_de_heads: [layer, head] mean |DE| (to see which heads matter).
        max_abs_error: the largest |DLA - DE| over all components and tokens (logits).
        final_norm: "frozen" (LN-free: a fixed scale), or "layernorm" / "rmsnorm" (a per-token scale).
        n_tokens: how many (sequence, position) pairs were averaged.
    """

    model: str
    nmae_heads: torch.Tensor
    nmae_mlps: torch.Tensor
    mean_abs_de_heads: torch.Tensor
    max_abs_error: float
    final_norm: str
    n_tokens: int
    provenance: Provenance

    @property
    def mean_nmae(self) -> float:
        """NMAE averaged over heads (the paper's number: 49.07% for GPT-2 Small, 0.00% LN-free)."""
        return float(self.nmae_heads.double().mean())

    def to_frame(self):
        import pandas as pd

        n_layers, n_heads = self.nmae_heads.shape
        rows = [
            {
                "component": f"L{layer}H{head}",
                "layer": layer,
                "head": head,
                "nmae": float(self.nmae_heads[layer, head]),
                "mean_abs_de": float(self.mean_abs_de_heads[layer, head]),
            }
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
        rows += [
            {"component": f"MLP{layer}", "layer": layer, "head": None, "nmae": float(self.nmae_mlps[layer])}
            for layer in range(n_layers)
        ]
        return pd.DataFrame(rows)


def _final_norm(model):
    """(kind, eps, weight offset, frozen scale or None) of the final norm."""
    module = model.torch_submodule("ln_final")
    info = norm_info(module)
    frozen = None
    if isinstance(module, FrozenNorm):
        frozen = module.frozen_scale()
    return info, frozen


def _positions(positions, n_pos: int) -> list[int]:
    """Prediction positions of rows of `n_pos` tokens: position p predicts token p + 1, so only 0..n_pos-2 have a
    target, and the words of `workbench.core.selectors` apply to those ("last" is n_pos - 2)."""
    groups = selectors.resolve_positions(positions, n_pos - 1, legacy_all="each")
    return sorted({p for g in groups for p in g})


def dla_exactness(
    model,
    data,
    *,
    positions="last",
    seq_len: int | None = None,
    n_rows: int | None = None,
    batch_size: int | None = None,
    memory_budget=None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> DLAExactness:
    """DLA against the true direct effect for every head and MLP (see the module docstring).

    Args:
        data: token ids [row, pos] or a list of documents.
        positions: prediction positions (each predicts the next token): "last" (the default, as the paper:
            position -2 predicting the row's last token), "each", or a list.
    """
    norm_infos(model)
    cfg = model.cfg
    tokens = text_tokens(model, data, seq_len=seq_len, n_rows=n_rows)
    pos = _positions(positions, tokens.shape[1])
    info, frozen_scale = _final_norm(model)
    if frozen_scale is None and info.eps >= 1e6:
        frozen_scale = math.sqrt(
            info.eps
        )  # the released LN-free convention: a huge eps makes the norm linear
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    # per-component outputs are kept for every row: half the rows of a plain forward pass
    chunk = run.batch_size or max(1, rows_per_chunk(model, tokens.shape[1], run) // 2)
    L, H = cfg.n_layers, cfg.n_heads
    sums = {"err_h": torch.zeros(L, H, dtype=torch.float64), "de_h": torch.zeros(L, H, dtype=torch.float64)}
    sums |= {"err_m": torch.zeros(L, dtype=torch.float64), "de_m": torch.zeros(L, dtype=torch.float64)}
    state = {"max": 0.0, "n": 0}
    idx = torch.tensor(pos)

    def one(start: int, stop: int):
        batch = tokens[start:stop]
        targets = batch[:, idx + 1]
        saved = _dla_trace(model, batch, idx, targets, run)
        r = saved["resid"].double().flatten(0, 1)  # [N, d_model]
        u = saved["u"].double().flatten(0, 1)  # [N, d_model]
        w = saved["w"].double() + info.weight_offset
        norm = _normaliser(info, r, frozen_scale)
        full = (norm(r) * w * u).sum(-1)  # [N]
        for layer in range(L):
            heads = saved[f"heads.{layer}"].double().flatten(0, 1)  # [N, H, d_model]
            mlp = saved[f"mlp.{layer}"].double().flatten(0, 1).unsqueeze(1)  # [N, 1, d_model]
            for comp, err_key, de_key, target in (
                (heads, "err_h", "de_h", (layer, slice(None))),
                (mlp, "err_m", "de_m", (layer,)),
            ):
                de = full.unsqueeze(1) - (norm(r.unsqueeze(1) - comp) * w * u.unsqueeze(1)).sum(-1)
                dla = (norm.linear(comp) * w * u.unsqueeze(1)).sum(-1)
                err = (dla - de).abs()
                shape = sums[err_key][target].shape
                sums[err_key][target] += err.sum(0).reshape(shape)
                sums[de_key][target] += de.abs().sum(0).reshape(shape)
                state["max"] = max(state["max"], float(err.max()))
        state["n"] += r.shape[0]

    run.chunked(len(tokens), chunk, one, desc="DLA vs direct effect")
    n = max(state["n"], 1)
    return DLAExactness(
        model=model.name,
        nmae_heads=(sums["err_h"] / sums["de_h"].clamp_min(1e-30)).float(),
        nmae_mlps=(sums["err_m"] / sums["de_m"].clamp_min(1e-30)).float(),
        mean_abs_de_heads=(sums["de_h"] / n).float(),
        max_abs_error=state["max"],
        final_norm="frozen" if frozen_scale is not None else info.kind,
        n_tokens=state["n"],
        provenance=Provenance.capture(
            model.name, positions=positions, n_rows=len(tokens), seq_len=tokens.shape[1]
        ),
    )


class _normaliser:
    """``norm(x)`` without weight and bias, and its linearisation at the full residual ``r`` (same scale)."""

    def __init__(self, info, r: torch.Tensor, frozen_scale: float | None):
        self.kind, self.eps, self.frozen = info.kind, info.eps, frozen_scale
        self.r_scale = self._scale(r).unsqueeze(-1).unsqueeze(-1)  # [N, 1, 1]

    def _centre(self, x):
        return x - x.mean(-1, keepdim=True) if self.kind == "layernorm" else x

    def _scale(self, x):
        if self.frozen is not None:
            return torch.full(x.shape[:-1], self.frozen, dtype=x.dtype)
        var = x.var(-1, unbiased=False) if self.kind == "layernorm" else x.pow(2).mean(-1)
        return (var + self.eps).sqrt()

    def __call__(self, x):
        return self._centre(x) / self._scale(x).unsqueeze(-1)

    def linear(self, c):
        """[N, k, d] components through the norm with the full residual's scale (the cached scale)."""
        return self._centre(c) / self.r_scale


def _dla_trace(model, tokens: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, run=None) -> dict:
    """Saved per-head outputs, MLP outputs, final residual and target unembeddings at positions `idx`."""
    cfg, a = model.cfg, model.adapter
    with torch.no_grad(), model.trace(tokens, run=run):
        out = {}
        for layer in range(cfg.n_layers):
            z = model.site("z", layer).value[:, idx]  # [B, P, H, d_head]
            w_o = model.submodule("out_proj", layer).weight
            w_o = w_o if a.weights_transposed else w_o.T  # [H * d_head, d_model]
            w_o = w_o.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)
            out[f"heads.{layer}"] = torch.einsum("bphd,hdm->bphm", z.to(w_o.dtype), w_o)
            out[f"mlp.{layer}"] = model.site("mlp_out", layer).value[:, idx]
        lnf = model.submodule("ln_final")
        out["resid"] = lnf.input[:, idx]
        out["w"] = lnf.weight
        out["u"] = model.submodule("unembed").weight[targets.to(lnf.weight.device)]
        out = nnsight.save(out)
    return {k: v.detach().float().cpu() for k, v in out.items()}
