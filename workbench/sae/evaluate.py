"""`evaluate_sae`: how well an SAE reconstructs its site, how sparse it is, and what splicing it in costs.

On held-out token rows (positions >= the SAE's `skip_positions`; the skipped leading positions are left alone):

- L0: active latents per token (mean, per position, and every token's count);
- explained variance: 1 - sum |x - x_hat|^2 / sum |x - mean x|^2 over all tokens, in the model's own space;
- loss: next-token cross-entropy (nats per predicted token, all positions of every row) of the clean model, with
  the site replaced by the SAE's reconstruction ("spliced"), by zeros and by the mean activation;
- fraction of loss recovered: (L_zero - L_spliced) / (L_zero - L_clean) (SAELens' definition; 1 = as good as
  the model, 0 = as bad as zero-ablating the site), and the same against mean ablation;
- KL(clean || spliced) of the next-token distribution per token, nats;
- firing frequency of every latent; dead latents (never fired) and dense ones (fire on more than
  `dense_threshold` of tokens).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError, UnsupportedModelError
from workbench.results import Provenance, Result
from workbench.sae import activations as acts
from workbench.sae.model import SAE

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


@dataclasses.dataclass(frozen=True)
class SAEEvaluation(Result):
    """Measured quality of an SAE on held-out data (module docstring for the definitions).

    Attributes:
        l0: mean active latents per token.
        l0_by_position: [pos] mean L0 at each position over the rows that reach it (NaN at skipped positions).
        l0_per_token: [token] active latents of every evaluated token (chunk by chunk, rows shortest first).
        explained_variance, mse: over all evaluated tokens (mse: mean of |x - x_hat|^2 per token).
        loss_clean, loss_spliced, loss_zero, loss_mean: nats per predicted token.
        frac_recovered, frac_recovered_mean: fraction of loss recovered against zero / mean ablation.
        kl_spliced: mean KL(clean || spliced) per predicted token, nats.
        firing_frequency: [latent] fraction of evaluated tokens on which each latent fires.
        dead, dense: counts of latents that never fired / fired on more than `dense_threshold` of tokens.
        n_rows, seq_len, n_tokens: the evaluation data (rows, the longest row, tokens the SAE encoded).
        site, layer, sae: where the SAE reads and what it is.
    """

    l0: float
    l0_by_position: torch.Tensor
    l0_per_token: torch.Tensor
    explained_variance: float
    mse: float
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    loss_mean: float
    frac_recovered: float
    frac_recovered_mean: float
    kl_spliced: float
    firing_frequency: torch.Tensor
    dead: int
    dense: int
    dense_threshold: float
    n_rows: int
    seq_len: int
    n_tokens: int
    site: str
    layer: int | None
    sae: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "l0_by_position": "seq_len",
        "l0_per_token": "n_tokens",
        "firing_frequency": "latent",
    }

    def summary(self) -> dict[str, float]:
        """The headline numbers as a dict."""
        return {
            "L0": self.l0,
            "explained variance": self.explained_variance,
            "loss clean": self.loss_clean,
            "loss spliced": self.loss_spliced,
            "loss zero-ablated": self.loss_zero,
            "loss mean-ablated": self.loss_mean,
            "fraction of loss recovered": self.frac_recovered,
            "fraction recovered (vs mean ablation)": self.frac_recovered_mean,
            "KL(clean || spliced)": self.kl_spliced,
            "dead latents": self.dead,
            "dense latents": self.dense,
        }

    def to_frame(self):
        """One row per latent: its firing frequency and whether it is dead or dense."""
        import pandas as pd

        f = self.firing_frequency
        return pd.DataFrame(
            {
                "latent": torch.arange(len(f)).numpy(),
                "firing_frequency": f.numpy(),
                "dead": (f == 0).numpy(),
                "dense": (f > self.dense_threshold).numpy(),
            }
        )

    def __repr__(self) -> str:
        return (
            f"SAEEvaluation({self.sae}: L0 {self.l0:.1f}, explained variance {self.explained_variance:.3f}, "
            f"loss {self.loss_clean:.3f} -> {self.loss_spliced:.3f} spliced (zero-ablated {self.loss_zero:.3f}; "
            f"{100 * self.frac_recovered:.1f}% recovered), {self.dead} dead, {self.dense} dense, "
            f"{self.n_tokens} tokens)"
        )


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[row, pos - 1] cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]


def spliced_logits(
    model, sae: SAE, tokens: torch.Tensor, mode: str = "sae", fill: torch.Tensor | None = None
):
    """[row, pos, d_vocab] logits with the SAE's site replaced at positions >= skip: by the reconstruction
    (mode "sae"), zeros ("zero"), or `fill` [d_in] ("fill"). Mode "clean" leaves it alone."""
    skip = sae.cfg.skip_positions
    site, layer = sae.cfg.site, sae.cfg.layer
    with torch.no_grad(), model.trace(tokens.to(model.device)):
        if mode != "clean":
            x = acts.read(model, site, layer)
            new = x.clone()
            if mode == "sae":
                new[:, skip:] = sae.reconstruct(x[:, skip:].float()).to(new.dtype)
            elif mode == "zero":
                new[:, skip:] = 0
            else:
                new[:, skip:] = fill.to(device=new.device, dtype=new.dtype)
            acts.write(model, site, layer, new)
        logits = model.site("logits").value.save()
    return logits.detach()


def evaluate_sae(
    model,
    sae: SAE,
    data,
    *,
    seq_len: int | None = None,
    rows_per_chunk: int = 64,
    dense_threshold: float = DENSE_THRESHOLD,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SAEEvaluation:
    """Evaluate `sae` on `model` with held-out `data`: token rows (a [row, pos] tensor or 1-D tensors) or texts,
    one row per text (BOS first, cut at `seq_len`); `rows_per_chunk` rows per trace, right-padded (exact for
    causal models; padded positions are left out of every number).

    Four traces per chunk of rows: clean, spliced, zero-ablated, mean-ablated (the mean over all evaluated
    tokens, so mean ablation runs in a second pass). Splicing runs the SAE inside the trace: local models only.
    """
    sae, layer = _check_sae(model, sae)
    run = Run.of(run, progress=progress, cancel=cancel)
    rows = acts.token_rows(model, data, seq_len)
    skip = sae.cfg.skip_positions
    rows = [r for r in rows if len(r) > max(skip, 1)]
    if not rows:
        raise InputError(f"No row is longer than the {max(skip, 1)} positions an evaluation needs.")
    sae = sae.to(model.device)
    spans = acts.batches(rows, rows_per_chunk=rows_per_chunk)
    tally = _Tally(model, sae, layer, rows)
    run.map(spans, tally.add, desc="evaluating SAE", weights=[len(s) for s in spans])
    mean = (tally.sum / tally.n_tokens).float()
    run.map(
        spans,
        lambda span: tally.add_mean_ablation(span, mean),
        desc="mean ablation",
        weights=[len(s) for s in spans],
    )
    return tally.result(model, layer, dense_threshold)


def _check_sae(model, sae: SAE) -> tuple[SAE, int | None]:
    """`sae` with its layer resolved, and that layer; errors for SAEs this model cannot splice in."""
    if not isinstance(sae, SAE):
        raise InputError(f"evaluate_sae takes a workbench SAE, got {type(sae).__name__}.")
    if model.remote is True:
        raise UnsupportedModelError(
            "Splicing an SAE into a model on NDIF would send its weights with every job; evaluate it on a local "
            "copy of the model."
        )
    layer = acts.check_site(model, sae.cfg.site, sae.cfg.layer)
    if acts.site_width(model, sae.cfg.site) != sae.d_in:
        raise InputError(
            f"The SAE reads vectors of width {sae.d_in}, but {sae.cfg.site} of {model.name} has width "
            f"{acts.site_width(model, sae.cfg.site)}: it belongs to another model."
        )
    return (sae if layer == sae.cfg.layer else _at_layer(sae, layer)), layer


class _Tally:
    """Sums over the evaluated tokens, chunk of rows by chunk (`add`, then `add_mean_ablation`), and the
    `SAEEvaluation` they give (`result`)."""

    def __init__(self, model, sae: SAE, layer: int | None, rows: list[torch.Tensor]):
        self.model, self.sae, self.layer, self.rows = model, sae, layer, rows
        self.skip = sae.cfg.skip_positions
        self.n_pos = max(len(r) for r in rows)
        self.l0_sum = torch.zeros(self.n_pos, dtype=torch.float64)
        self.l0_count = torch.zeros(self.n_pos, dtype=torch.float64)
        self.err = 0.0
        self.sq = torch.zeros(sae.d_in, dtype=torch.float64)
        self.sum = torch.zeros(sae.d_in, dtype=torch.float64)
        self.fires = torch.zeros(sae.d_sae, dtype=torch.float64)
        self.l0_tokens: list[torch.Tensor] = []
        self.losses: dict[str, list[torch.Tensor]] = {
            "clean": [],
            "sae": [],
            "zero": [],
            "kl": [],
            "mean": [],
        }

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.l0_tokens))

    def add(self, span: list[int]) -> None:
        """Reconstruction, sparsity and the clean, spliced and zero-ablated losses of the rows `span`."""
        model, sae, skip = self.model, self.sae, self.skip
        toks, mask = acts.padded(self.rows, span)
        on = mask[:, skip:]  # [row, pos - skip] real positions the SAE encodes
        x = acts.site_activations(model, toks, sae.cfg.site, self.layer)[:, skip:][on].to(
            model.device
        )  # [n, d]
        f = sae.encode(x)
        x_hat = sae.reconstruct(x)
        active = f > 0
        per = torch.zeros(on.shape, dtype=torch.long)
        per[on] = active.sum(-1).cpu()
        self.l0_tokens.append(per[on])
        self.l0_sum[skip : skip + per.shape[1]] += per.sum(0).double()
        self.l0_count[skip : skip + per.shape[1]] += on.sum(0).double()
        self.fires.add_(active.sum(0).double().cpu())
        flat = x.double().cpu()
        self.err += float((x_hat - x).pow(2).sum().double())
        self.sq += flat.pow(2).sum(0)
        self.sum += flat.sum(0)
        predicted = mask[:, 1:]  # next-token losses where the next token is real
        clean = spliced_logits(model, sae, toks, "clean")
        spliced = spliced_logits(model, sae, toks, "sae")
        zero = spliced_logits(model, sae, toks, "zero")
        self.losses["clean"].append(_next_token_loss(clean, toks).cpu()[predicted])
        self.losses["sae"].append(_next_token_loss(spliced, toks).cpu()[predicted])
        self.losses["zero"].append(_next_token_loss(zero, toks).cpu()[predicted])
        lp, lq = torch.log_softmax(clean.float(), -1), torch.log_softmax(spliced.float(), -1)
        self.losses["kl"].append((lp.exp() * (lp - lq)).sum(-1)[:, :-1].cpu()[predicted])

    def add_mean_ablation(self, span: list[int], mean: torch.Tensor) -> None:
        """The loss of the rows `span` with the site replaced by `mean` [d_in]."""
        toks, mask = acts.padded(self.rows, span)
        loss = _next_token_loss(spliced_logits(self.model, self.sae, toks, "fill", mean), toks).cpu()
        self.losses["mean"].append(loss[mask[:, 1:]])

    def result(self, model, layer: int | None, dense_threshold: float) -> SAEEvaluation:
        sae, n_tok = self.sae, self.n_tokens
        variance = float((self.sq - self.sum**2 / n_tok).sum())
        loss = {k: float(torch.cat(v).double().mean()) for k, v in self.losses.items()}
        l0_all = torch.cat(self.l0_tokens)
        nan = torch.full_like(self.l0_sum, float("nan"))
        by_pos = torch.where(self.l0_count > 0, self.l0_sum / self.l0_count.clamp(min=1), nan).float()
        freq = (self.fires / n_tok).float()

        def recovered(baseline: float) -> float:
            gap = baseline - loss["clean"]
            return float("nan") if gap == 0 else (baseline - loss["sae"]) / gap

        return SAEEvaluation(
            l0=float(l0_all.float().mean()),
            l0_by_position=by_pos,
            l0_per_token=l0_all.to(torch.int32),
            explained_variance=1 - self.err / variance,
            mse=self.err / n_tok,
            loss_clean=loss["clean"],
            loss_spliced=loss["sae"],
            loss_zero=loss["zero"],
            loss_mean=loss["mean"],
            frac_recovered=recovered(loss["zero"]),
            frac_recovered_mean=recovered(loss["mean"]),
            kl_spliced=loss["kl"],
            firing_frequency=freq,
            dead=int((freq == 0).sum()),
            dense=int((freq > dense_threshold).sum()),
            dense_threshold=float(dense_threshold),
            n_rows=len(self.rows),
            seq_len=int(self.n_pos),
            n_tokens=n_tok,
            **acts.result_fields(
                model,
                sae,
                layer,
                n_rows=len(self.rows),
                seq_len=int(self.n_pos),
                skip_positions=self.skip,
                dense_threshold=float(dense_threshold),
            ),
        )


def _at_layer(sae: SAE, layer: int) -> SAE:
    """The same SAE with a negative layer index resolved."""
    cfg = dataclasses.replace(sae.cfg, layer=layer)
    return SAE(cfg, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, sae.firing_frequency)
