"""Per-token norm scales on a text set, and the frozen scale each norm site gets (calibration).

`norm_statistics` runs the model once over a text set and records, for every norm module, the scale it divides
each token by (``sqrt(var + eps)`` for LayerNorm, ``sqrt(mean(x^2) + eps)`` for RMSNorm), plus the per-token
loss. `NormStatistics.frozen_scales` turns those into one frozen scale per site without running the model again:

- ``method="mean"``: the mean per-token scale (the paper's sigma_avg, eq. 2);
- ``method="median"``: the median, robust to the position-0 outlier;
- ``method="ema"``: a moving average over batches in order, ``s = m * s + (1 - m) * batch_mean``, as the
  paper's code keeps while a norm is still real (momentum 0.9, one update per micro-batch);
- ``exclude_first`` / ``exclude_eot``: leave position 0 and end-of-text tokens out of the average (the
  auxiliary loss's target excludes both; the paper's code averages over all tokens).
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.lnfree.data import eot_id, eot_mask, text_tokens
from workbench.lnfree.freezing import frozen_forward, norm_infos
from workbench.lnfree.sites import norm_module, norm_modules, paper_order, site_label, split_site
from workbench.models.prefix import bytes_per_row
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

METHODS = ("mean", "median", "ema")


def rows_per_chunk(model, seq_len: int, run: Run, *, cache_blocks: bool = False) -> int:
    """How many rows of `seq_len` tokens one trace should take (a run's batch size wins): logits at every
    position dominate; with `cache_blocks`, every block's output is kept too."""
    extra = 4 * model.cfg.n_layers * model.cfg.d_model * seq_len if cache_blocks else 0
    return run.rows_per_chunk(bytes_per_row(model, seq_len, logit_pos=seq_len, extra=extra), model, 64)


@dataclasses.dataclass(frozen=True)
class FrozenScales(Result):
    """One frozen scale per norm site.

    Attributes:
        sites: site names in the paper's order ("mlp.0", ..., "qk.0", ..., "v.0", ..., "final").
        values: [site] frozen scales (the divisor that replaces each token's own scale).
        method, exclude_first, exclude_eot, momentum: how they were estimated.
    """

    model: str
    sites: list[str]
    values: torch.Tensor
    method: str
    exclude_first: bool
    exclude_eot: bool
    momentum: float | None
    provenance: Provenance

    def __getitem__(self, site: str) -> float:
        try:
            return float(self.values[self.sites.index(site)])
        except ValueError:
            raise InputError(f"No frozen scale for site {site!r}; sites: {', '.join(self.sites)}") from None

    def as_dict(self, sites: list[str] | None = None) -> dict[str, float]:
        """{site: scale} for `sites` (default all)."""
        return {s: self[s] for s in (self.sites if sites is None else sites)}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "site": self.sites,
                "label": [site_label(s) for s in self.sites],
                "kind": [split_site(s)[0] for s in self.sites],
                "layer": [split_site(s)[1] for s in self.sites],
                "module": [norm_module(s) for s in self.sites],
                "frozen_scale": self.values.tolist(),
            }
        )


@dataclasses.dataclass(frozen=True)
class NormStatistics(Result):
    """Per-token scales of every norm module on a text set, and the model's per-token loss there.

    Attributes:
        tokens: [row, pos] the text set.
        norms: norm modules in forward order ("ln1.0", "ln2.0", ..., "ln_final").
        scales: [norm, row, pos] the scale each norm divides each token by.
        eot: [row, pos] bool, end-of-text tokens (all False when the model has no tokenizer).
        loss: [row, pos - 1] next-token cross-entropy of the unmodified model (nats).
        kind: "layernorm" or "rmsnorm".
    """

    model: str
    tokens: torch.Tensor
    norms: list[str]
    scales: torch.Tensor
    eot: torch.Tensor
    loss: torch.Tensor
    kind: str
    n_layers: int
    provenance: Provenance

    @property
    def mean_loss(self) -> float:
        return float(self.loss.double().mean())

    def norm_scales(self, norm: str) -> torch.Tensor:
        """[row, pos] per-token scales of one norm module ("ln1.3", "ln2.0", "ln_final")."""
        if norm not in self.norms:
            raise InputError(f"Unknown norm module {norm!r}; modules: {', '.join(self.norms)}")
        return self.scales[self.norms.index(norm)]

    def include_mask(self, exclude_first: bool = False, exclude_eot: bool = False) -> torch.Tensor:
        """[row, pos] bool: the tokens an average over this text set uses."""
        mask = torch.ones_like(self.eot)
        if exclude_first:
            mask[:, 0] = False
        if exclude_eot:
            mask &= ~self.eot
        if not mask.any():
            raise InputError("Excluding position 0 and end-of-text tokens leaves no tokens to average.")
        return mask

    def frozen_scales(
        self,
        method: str = "mean",
        *,
        exclude_first: bool = False,
        exclude_eot: bool = False,
        momentum: float = 0.9,
        batch_size: int = 8,
    ) -> FrozenScales:
        """One frozen scale per site (see the module docstring for the options)."""
        if method not in METHODS:
            raise InputError(f"method={method!r}: choose one of {', '.join(METHODS)}.")
        if method == "ema" and not 0 <= momentum < 1:
            raise InputError(
                f"momentum={momentum}: a moving average needs 0 <= momentum < 1 (the paper uses 0.9)."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: give a positive number of rows per batch.")
        mask = self.include_mask(exclude_first, exclude_eot)
        per_norm = {}
        for i, norm in enumerate(self.norms):
            s = self.scales[i].double()
            if method == "mean":
                per_norm[norm] = float(s[mask].mean())
            elif method == "median":
                per_norm[norm] = float(s[mask].median())
            else:
                value = None
                for start in range(0, s.shape[0], batch_size):
                    m = mask[start : start + batch_size]
                    if not m.any():
                        continue
                    batch = float(s[start : start + batch_size][m].mean())
                    value = batch if value is None else momentum * value + (1 - momentum) * batch
                per_norm[norm] = value
        sites = paper_order(self.n_layers)
        values = torch.tensor([per_norm[norm_module(site)] for site in sites], dtype=torch.float64)
        return FrozenScales(
            model=self.model,
            sites=sites,
            values=values,
            method=method,
            exclude_first=exclude_first,
            exclude_eot=exclude_eot,
            momentum=momentum if method == "ema" else None,
            provenance=Provenance.capture(
                self.model,
                method=method,
                exclude_first=exclude_first,
                exclude_eot=exclude_eot,
                momentum=momentum,
                batch_size=batch_size,
                n_tokens=int(mask.sum()),
            ),
        )

    def to_frame(self):
        """One row per (norm, row, pos): scale, token, whether it is position 0 or end-of-text."""
        import pandas as pd

        n_norm, n_row, n_pos = self.scales.shape
        norm_idx, row_idx, pos_idx = torch.meshgrid(
            torch.arange(n_norm), torch.arange(n_row), torch.arange(n_pos), indexing="ij"
        )
        return pd.DataFrame(
            {
                "norm": [self.norms[i] for i in norm_idx.flatten().tolist()],
                "row": row_idx.flatten().numpy(),
                "pos": pos_idx.flatten().numpy(),
                "token": self.tokens.expand(n_norm, -1, -1).flatten().numpy(),
                "scale": self.scales.flatten().numpy(),
                "is_first": (pos_idx == 0).flatten().numpy(),
                "is_eot": self.eot.expand(n_norm, -1, -1).flatten().numpy(),
            }
        )


def _check_model(model) -> None:
    norm_infos(model)  # raises UnsupportedModelError for plain modules or unknown norms


def norm_statistics(
    model,
    data,
    *,
    seq_len: int | None = None,
    n_rows: int | None = None,
    batch_size: int | None = None,
    memory_budget=None,
    eot: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> NormStatistics:
    """Run `model` over a text set and record every norm's per-token scale and the per-token loss.

    Args:
        data: token ids [row, pos] or a list of documents (packed into rows of `seq_len` tokens, default 128).
        n_rows: use only the first `n_rows` rows.
        batch_size: rows per trace (default: from `memory_budget`).
        eot: the end-of-text token id (default: the tokenizer's EOS).
    """
    _check_model(model)
    tokens = text_tokens(model, data, seq_len=seq_len, n_rows=n_rows)
    infos = norm_infos(model)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    norms = norm_modules(model.cfg.n_layers)

    def one(start: int, stop: int):
        out = frozen_forward(model, tokens[start:stop], infos=infos, read_scales=True, run=run)
        return torch.stack([out[f"scale.{n}"].float().cpu() for n in norms]), out["loss"].float().cpu()

    parts = run.chunked(len(tokens), rows_per_chunk(model, tokens.shape[1], run), one, desc="norm scales")
    eot_token = eot_id(model, eot)
    return NormStatistics(
        model=model.name,
        tokens=tokens,
        norms=norms,
        scales=torch.cat([p[0] for p in parts], dim=1),
        eot=eot_mask(tokens, eot_token),
        loss=torch.cat([p[1] for p in parts]),
        kind=infos["ln_final"][0],
        n_layers=model.cfg.n_layers,
        provenance=Provenance.capture(model.name, n_rows=len(tokens), seq_len=tokens.shape[1], eot=eot_token),
    )


def calibrate(
    model,
    data,
    method: str = "mean",
    *,
    exclude_first: bool = False,
    exclude_eot: bool = False,
    momentum: float = 0.9,
    ema_batch_size: int = 8,
    **kwargs,
) -> FrozenScales:
    """Frozen scales for every norm site of `model`, estimated on a text set (see the module docstring).

    Other keyword arguments go to `norm_statistics` (seq_len, n_rows, batch_size, memory_budget, eot, progress,
    cancel).
    """
    stats = norm_statistics(model, data, **kwargs)
    return stats.frozen_scales(
        method,
        exclude_first=exclude_first,
        exclude_eot=exclude_eot,
        momentum=momentum,
        batch_size=ema_batch_size,
    )
