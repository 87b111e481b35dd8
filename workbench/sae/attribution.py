"""Latent attribution: how much each active latent at each position contributes to a metric, to first order.

With the activation at the SAE's site written as x = sum_i f_i d_i + b_dec + error (d_i the unit decoder rows),
the metric M changes by about -f_i (d_i . dM/dx) when latent i is switched off. The attribution of latent i at a
position is therefore f_i (d_i . dM/dx), from one forward and one backward pass per batch of prompts; the
error's share is error . dM/dx (Marks et al. 2024, "Sparse Feature Circuits"). It is exact for a metric linear
in the activation and a screen otherwise: confirm the strongest latents by ablating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import nnsight
import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError, UnsupportedModelError
from workbench.results import Provenance, Result
from workbench.sae import activations as acts
from workbench.sae.model import SAE

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

METRICS = ("logit_diff", "logprob")


@dataclasses.dataclass(frozen=True)
class LatentAttribution(Result):
    """First-order contributions of active latents to a metric (module docstring), stored sparsely.

    Attributes:
        prompt, position, latent: [entry] where each active latent is.
        activation: [entry] its activation f_i; attribution: [entry] f_i (d_i . dM/dx).
        error_attribution: [prompt, pos] error . dM/dx of the SAE's reconstruction error.
        metric_value: [prompt] the metric on the clean run.
        metric: its name; answers: [prompt, 2] token ids (correct, incorrect; -1 when unused).
        tokens: [prompt, pos] the prompts' tokens; token_strings: {id: string}.
        prompts: texts; site, layer, sae: where and what.
    """

    prompt: torch.Tensor
    position: torch.Tensor
    latent: torch.Tensor
    activation: torch.Tensor
    attribution: torch.Tensor
    error_attribution: torch.Tensor
    metric_value: torch.Tensor
    metric: str
    answers: torch.Tensor
    tokens: torch.Tensor
    token_strings: dict[int, str]
    prompts: tuple[str, ...]
    site: str
    layer: int | None
    sae: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "prompt": "entry",
        "position": "entry",
        "latent": "entry",
        "activation": "entry",
        "attribution": "entry",
        "error_attribution": "tokens pos",
        "metric_value": "tokens",
        "answers": "tokens 2",
        "tokens": "tokens pos",
    }

    def by_latent(self):
        """Total attribution per latent over prompts and positions, largest magnitude first (a DataFrame)."""
        import pandas as pd

        frame = self.to_frame()
        if frame.empty:
            return pd.DataFrame(columns=["latent", "attribution", "abs_attribution", "entries"])
        out = frame.groupby("latent").agg(attribution=("attribution", "sum"), entries=("attribution", "size"))
        out["abs_attribution"] = out["attribution"].abs()
        return out.sort_values("abs_attribution", ascending=False).reset_index()

    def grid(self, latents: Sequence[int], prompt: int | None = None) -> torch.Tensor:
        """[latent, pos] attribution of `latents` at each position, summed over prompts (or of one prompt)."""
        out = torch.zeros(len(latents), self.tokens.shape[1])
        for row, latent in enumerate(latents):
            sel = self.latent == latent
            if prompt is not None:
                sel &= self.prompt == prompt
            out[row].index_add_(0, self.position[sel], self.attribution[sel])
        return out

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "prompt": self.prompt.numpy(),
                "position": self.position.numpy(),
                "token": [
                    self.token_strings.get(int(self.tokens[p, q]), str(int(self.tokens[p, q])))
                    for p, q in zip(self.prompt.tolist(), self.position.tolist())
                ],
                "latent": self.latent.numpy(),
                "activation": self.activation.numpy(),
                "attribution": self.attribution.numpy(),
            }
        )

    def __repr__(self) -> str:
        return (
            f"LatentAttribution({self.metric}, {self.tokens.shape[0]} prompts x {self.tokens.shape[1]} positions, "
            f"{len(self.latent)} active latent entries, {self.sae})"
        )


def last_metric(last: torch.Tensor, answers: torch.Tensor, metric: str) -> torch.Tensor:
    """[batch] a built-in metric (`METRICS`) from the last position's logits [batch, vocab] and answer ids
    [batch, 2] (correct, incorrect)."""
    last = last.float()
    if metric == "logit_diff":
        return last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:2])[:, 0]
    return torch.log_softmax(last, -1).gather(-1, answers[:, :1])[:, 0]


def _answers(model, answers, n: int, metric: str) -> torch.Tensor:
    if answers is None:
        raise InputError(f"metric {metric!r} needs answers, e.g. answers=(' Mary', ' John').")
    if (
        isinstance(answers, (tuple, list))
        and len(answers) in (1, 2)
        and all(isinstance(a, str) for a in answers)
    ):
        answers = [tuple(answers)] * n
    pairs = list(answers)
    if len(pairs) != n:
        raise InputError(f"Give one answer pair per prompt ({n}), or one pair for all.")
    out = torch.full((n, 2), -1, dtype=torch.long)
    for i, pair in enumerate(pairs):
        pair = (pair,) if isinstance(pair, str) else tuple(pair)
        if metric == "logit_diff" and len(pair) != 2:
            raise InputError("logit_diff needs (correct, incorrect) answers.")
        for j, a in enumerate(pair[:2]):
            out[i, j] = model.to_single_token(a)
    return out


def latent_attribution(
    model,
    sae: SAE,
    prompts,
    answers=None,
    *,
    metric: str | Callable[[torch.Tensor], torch.Tensor] = "logit_diff",
    batch_size: int = 16,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> LatentAttribution:
    """Attribute `metric` at the last position to the SAE's active latents at every position of `prompts`.

    Args:
        prompts: texts of one token length, or a [batch, pos] token tensor.
        answers: (correct, incorrect) strings for all prompts, or one pair per prompt.
        metric: "logit_diff" (logit(correct) - logit(incorrect)), "logprob" (log P(correct)), or a function
            fn(logits [batch, d_vocab] at the last position) -> [batch].
    """
    if model.remote is True:
        raise UnsupportedModelError("Latent attribution reads gradients: run it on a local model.")
    layer = acts.check_site(model, sae.cfg.site, sae.cfg.layer)
    if sae.cfg.site == "z":
        raise InputError("Latent attribution supports SAEs on residual-width sites, not z.")
    tokens = model.to_tokens(prompts)
    n = len(tokens)
    if callable(metric):
        name, fn, ans = getattr(metric, "__name__", "custom"), metric, torch.full((n, 2), -1)
    elif metric in METRICS:
        name, ans = metric, _answers(model, answers, n, metric)
        fn = None
    else:
        raise InputError(f"metric must be one of {', '.join(METRICS)} or a function of the last logits.")
    run = Run.of(run, progress=progress, cancel=cancel)
    sae_dev = sae.to(model.device)
    spans = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def one(span: list[int]):
        toks = tokens[span].to(model.device)
        a = ans[span].to(model.device)
        with torch.enable_grad(), model.trace(toks):
            embed = model.site("embed").value
            embed.requires_grad_(True)
            x = model.site(sae.cfg.site, layer).value
            last = model.site("logits").value[:, -1].float()
            value = fn(last) if fn is not None else last_metric(last, a, name)
            with value.sum().backward(inputs=[embed]):
                grad = x.grad.clone()
            nnsight.save(grad)
            xs = x.save()
            vs = value.save()
        return xs.detach().float(), grad.detach().float(), vs.detach().float()

    parts = run.map(spans, one, desc="latent attribution", weights=[len(s) for s in spans])
    x = torch.cat([p[0] for p in parts]).cpu()
    g = torch.cat([p[1] for p in parts]).cpu()
    values = torch.cat([p[2] for p in parts]).cpu()
    sae_cpu = sae_dev.to("cpu")
    with torch.no_grad():
        f = sae_cpu.encode(x)  # [prompt, pos, d_sae]
        per_latent = g @ sae_cpu.W_dec.detach().float().T  # d_i . dM/dx
        err = x - sae_cpu.reconstruct(x)
    skip = sae.cfg.skip_positions
    f[:, :skip] = 0
    on = torch.nonzero(f > 0)
    p, q, i = on[:, 0], on[:, 1], on[:, 2]
    err_attr = (err * g).sum(-1)
    err_attr[:, :skip] = 0
    ids = torch.unique(tokens).tolist()
    strings = {t: model.tokenizer.decode([t]) for t in ids} if model.tokenizer is not None else {}
    texts = tuple("".join(model.to_str_tokens(r)) for r in tokens) if model.tokenizer is not None else ()
    return LatentAttribution(
        prompt=p,
        position=q,
        latent=i,
        activation=f[p, q, i],
        attribution=f[p, q, i] * per_latent[p, q, i],
        error_attribution=err_attr,
        metric_value=values,
        metric=name,
        answers=ans,
        tokens=tokens,
        token_strings=strings,
        prompts=texts,
        **acts.result_fields(model, sae, layer, prompts=list(texts), metric=name, answers=ans.tolist()),
    )
