"""Latent x position sweeps: ablate, steer or patch one SAE latent at one position at a time, and measure a metric.

With the activation at the SAE's site written as x = sum_i f_i d_i + b_dec + error (d_i the decoder rows), each
patched run changes x at one position p by c d_i for one latent i, and keeps everything else:

- "ablate": c = -f_i(x), latent i switched off there (a latent that does not fire there changes nothing, and is
  not run);
- "steer": c = `scale`, the decoder direction added;
- "patch": c = f_i(x_source) - f_i(x), latent i takes the value it has in the `source` prompt (same token length).

The result is the change of the metric at the last position against the unedited run, [prompt, latent, pos]:
exact interventions, the check on `latent_attribution`'s first-order screen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError, UnsupportedModelError
from workbench.results import Provenance, Result
from workbench.sae import activations as acts
from workbench.sae.attribution import METRICS, _answers, last_metric
from workbench.sae.model import SAE

MODES = ("ablate", "steer", "patch")


@dataclasses.dataclass(frozen=True)
class LatentSweep(Result):
    """Change of a metric when one latent is edited at one position (module docstring).

    Attributes:
        values: [prompt, latent, pos] metric(edited) - metric(unedited); 0 where the edit is zero (e.g. an inactive
            latent ablated), NaN at positions the sweep skipped (before `sae.cfg.skip_positions`).
        coefficient: [prompt, latent, pos] the c of each edit (x += c d_i).
        base_value: [prompt] the metric on the unedited run.
        latents: [latent] the latent ids; tokens: [prompt, pos]; token_strings: {id: string}.
        mode, metric, scale: what was done; site, layer, sae: where and with what.
    """

    values: torch.Tensor
    coefficient: torch.Tensor
    base_value: torch.Tensor
    latents: torch.Tensor
    tokens: torch.Tensor
    token_strings: dict[int, str]
    mode: str
    metric: str
    scale: float
    site: str
    layer: int | None
    sae: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "values": "tokens latents pos",
        "coefficient": "tokens latents pos",
        "base_value": "tokens",
        "latents": "latents",
        "tokens": "tokens pos",
    }

    def grid(self, prompt: int | None = None) -> torch.Tensor:
        """[latent, pos]: the mean over prompts (NaN-aware), or one prompt's row."""
        return self.values[prompt] if prompt is not None else self.values.nanmean(0)

    def to_frame(self):
        import pandas as pd

        p, i, q = torch.meshgrid(*(torch.arange(s) for s in self.values.shape), indexing="ij")
        return pd.DataFrame(
            {
                "prompt": p.flatten().numpy(),
                "latent": self.latents[i.flatten()].numpy(),
                "position": q.flatten().numpy(),
                "token": [
                    self.token_strings.get(int(t), str(int(t))) for t in self.tokens[p, q].flatten().tolist()
                ],
                "coefficient": self.coefficient.flatten().numpy(),
                "change": self.values.flatten().numpy(),
            }
        )

    def __repr__(self) -> str:
        n, k, pos = self.values.shape
        return f"LatentSweep({self.mode}, {self.metric}, {n} prompts x {k} latents x {pos} positions, {self.sae})"


def latent_sweep(
    model,
    sae: SAE,
    prompts,
    latents: Sequence[int],
    answers=None,
    *,
    mode: str = "ablate",
    source=None,
    scale: float = 1.0,
    metric: str = "logit_diff",
    batch_size: int | None = None,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> LatentSweep:
    """Edit each of `latents` at each position of `prompts`, one (latent, position) per run; see the module.

    Args:
        prompts: texts of one token length, or a [batch, pos] token tensor.
        latents: latent ids of `sae`.
        answers: (correct, incorrect) strings for all prompts, or one pair per prompt ("logprob": the correct one).
        mode: "ablate", "steer" (add `scale` times the decoder row) or "patch" (the latent's value in `source`).
        source: for "patch", prompts of the same token length, one per prompt.
        metric: "logit_diff" or "logprob" at the last position.
    Returns:
        `LatentSweep` with values [prompt, latent, pos].
    """
    if model.remote is True:
        raise UnsupportedModelError(
            "Latent sweeps encode activations on this machine: run them on a local model."
        )
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    layer = acts.check_site(model, sae.cfg.site, sae.cfg.layer)
    if sae.cfg.site == "z":
        raise InputError("Latent sweeps support SAEs on residual-width sites, not z.")
    ids = _latent_ids(latents, sae.cfg.d_sae)
    tokens = model.to_tokens(prompts)
    n, n_pos = tokens.shape
    if (mode == "patch") != (source is not None):
        raise InputError(
            'Give source= prompts with mode="patch" (and only then): the latent values to patch in.'
        )
    ans = _answers(model, answers, n, metric)
    run = Run.of(run, progress=progress, cancel=cancel, batch_size=batch_size)

    x, base_value = _read(model, sae, layer, tokens, ans, metric)
    sae_cpu = sae.to("cpu")
    with torch.no_grad():
        f = sae_cpu.encode(x)[..., ids]  # [prompt, pos, latent]
        if mode == "ablate":
            coef = -f
        elif mode == "steer":
            if not torch.isfinite(torch.tensor(float(scale))):
                raise InputError(f"scale must be a finite number, got {scale}.")
            coef = torch.full_like(f, float(scale))
        else:
            src = model.to_tokens(source)
            if src.shape != tokens.shape:
                raise InputError(
                    f"source has shape {tuple(src.shape)}; it needs one prompt per prompt, of the same token length "
                    f"{tuple(tokens.shape)}."
                )
            coef = sae_cpu.encode(_read(model, sae, layer, src, ans, metric)[0])[..., ids] - f
    coef = coef.permute(0, 2, 1).contiguous()  # [prompt, latent, pos]
    skip = sae.cfg.skip_positions
    coef[:, :, :skip] = 0
    values = torch.zeros(n, len(ids), n_pos)
    values[:, :, :skip] = float("nan")
    rows = coef.nonzero().tolist()  # (prompt, latent index, pos) with an edit to run
    directions = sae_cpu.W_dec.detach().float()[ids]  # [latent, d_model]

    def one(chunk: list[list[int]]) -> None:
        p, i, q = (torch.tensor(c) for c in zip(*chunk))
        delta = torch.zeros(len(chunk), n_pos, directions.shape[1])
        delta[torch.arange(len(chunk)), q] = coef[p, i, q, None] * directions[i]
        edited = _edited_metric(model, sae, layer, tokens[p], delta, ans[p], metric)
        values[p, i, q] = edited - base_value[p]

    size = run.rows_per_chunk(4 * n_pos * model.cfg.d_model * 8, model.device, 64)
    run.map([rows[a : a + size] for a in range(0, len(rows), size)], one, desc=f"latent sweep ({mode})")
    strings = (
        {t: model.tokenizer.decode([t]) for t in torch.unique(tokens).tolist()} if model.tokenizer else {}
    )
    return LatentSweep(
        values=values,
        coefficient=coef,
        base_value=base_value,
        latents=torch.tensor(ids),
        tokens=tokens,
        token_strings=strings,
        mode=mode,
        metric=metric,
        scale=float(scale),
        **acts.result_fields(
            model,
            sae,
            layer,
            latents=ids,
            mode=mode,
            scale=float(scale),
            metric=metric,
            answers=ans.tolist(),
            patched_runs=len(rows),
        ),  # fmt: skip
    )


def _latent_ids(latents, d_sae: int) -> list[int]:
    ids = [int(i) for i in latents] if not isinstance(latents, (int, bool)) else None
    if not ids or any(isinstance(i, bool) for i in latents):
        raise InputError(f"latents must be a non-empty list of latent ids (0..{d_sae - 1}), got {latents!r}.")
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise InputError(f"Latent ids {bad} are out of range: this SAE has latents 0..{d_sae - 1}.")
    return ids


def _read(model, sae: SAE, layer, tokens, ans, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [prompt, pos, d_model] at the SAE's site, the metric [prompt]) of an unedited run, on the CPU."""
    with torch.no_grad(), model.trace(tokens.to(model.device)):
        x = model.site(sae.cfg.site, layer).value.save()
        value = last_metric(model.site("logits").value[:, -1], ans.to(model.device), metric).save()
    return x.detach().float().cpu(), value.detach().cpu()


def _edited_metric(model, sae: SAE, layer, tokens, delta, ans, metric) -> torch.Tensor:
    """[row] the metric with `delta` [row, pos, d_model] added at the SAE's site."""
    with torch.no_grad(), model.trace(tokens.to(model.device)):
        handle = model.site(sae.cfg.site, layer)
        old = handle.value
        handle.value = old + delta.to(device=old.device, dtype=old.dtype)
        value = last_metric(model.site("logits").value[:, -1], ans.to(model.device), metric).save()
    return value.detach().cpu()
