"""`train_sae`: train a sparse autoencoder on one site of any workbench model, from activations streamed in chunks.

Recipe (Bricken et al. 2023, "Towards Monosemanticity", and SAELens' defaults where they differ):

- Activations at positions >= `skip_positions` (BOS excluded by default: its residual is an outlier) are collected
  a few token rows per trace into a shuffled buffer of `buffer_tokens` vectors, refilled as training consumes it;
  the rows are reshuffled every pass over the data. Collection and training run through one `Run` (progress,
  cancel): ``run.map`` over chunks of rows, ``run.steps`` over training steps.
- Inputs are scaled by one constant so that their mean squared norm is d_in (the L1 coefficient then means the
  same at any site); the constant is folded into the weights at the end, so the saved SAE reads raw activations.
- ReLU SAEs minimise ``|x - x_hat|^2 + l1 * sum|f|`` (the L1 coefficient ramps up over the first `l1_warmup` of
  the steps); TopK and BatchTopK SAEs (`TRAINABLE`) minimise the reconstruction error alone. Decoder rows are kept at unit norm: the gradient's
  component along each row is removed before the step and the rows are renormalised after it (so the L1 term
  cannot be cheated by shrinking codes and growing rows).
- Dead latents are resampled (Bricken et al.): every `resample_every` steps, until `resample_until` of training,
  latents that did not fire in the window get a decoder row pointing at an input the SAE reconstructs badly
  (drawn with probability proportional to its squared error), an encoder column along it at a fifth of the mean
  live encoder norm, a zero bias, and fresh Adam moments. One mechanism for both architectures; no auxiliary loss.
- Adam, learning rate decayed linearly to zero over the last `lr_decay` of the steps. Everything is seeded:
  the same data, settings and thread count give the same weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.errors import InputError
from workbench.sae import activations as acts
from workbench.sae.model import SAE, SAEConfig

TRAINABLE = ("relu", "topk", "batchtopk")
"""relu: ReLU + L1; topk: the k largest pre-activations of every input; batchtopk (Bussmann et al. 2024): the
k x batch largest of the whole batch, so inputs get more or fewer latents as they need, and at inference a
threshold (a running mean of the smallest kept activation) in their place: saved as a JumpReLU SAE with one
threshold for every latent."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Settings of `train_sae` (see the module docstring). ``d_sae`` None means ``expansion * d_in``."""

    architecture: str = "relu"
    d_sae: int | None = None
    expansion: int = 8
    k: int | None = None
    l1_coefficient: float = 1.0
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    l1_warmup: float = 0.05
    lr_decay: float = 0.2
    buffer_tokens: int = 2**19
    rows_per_chunk: int = 64
    resample_every: int = 500
    resample_until: float = 0.7
    skip_positions: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.architecture not in TRAINABLE:
            raise InputError(f"train_sae trains {', '.join(TRAINABLE)} SAEs, got {self.architecture!r}.")
        if self.architecture in ("topk", "batchtopk") and not (isinstance(self.k, int) and self.k >= 1):
            raise InputError(f"A {self.architecture} SAE needs k, a positive whole number of active latents.")
        for name in ("steps", "batch_size", "buffer_tokens", "rows_per_chunk", "resample_every", "expansion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive whole number, got {value!r}.")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae < 1):
            raise InputError(f"d_sae must be a positive whole number, got {self.d_sae!r}.")
        if not (self.lr > 0 and self.l1_coefficient >= 0):
            raise InputError("lr must be positive and l1_coefficient >= 0.")
        if self.buffer_tokens < self.batch_size:
            raise InputError("buffer_tokens must be at least batch_size.")
        if not (0 <= self.l1_warmup <= 1 and 0 <= self.lr_decay <= 1 and 0 <= self.resample_until <= 1):
            raise InputError("l1_warmup, lr_decay and resample_until are fractions of the steps, in [0, 1].")


class _Buffer:
    """A shuffled buffer of activations, refilled from the token rows in a seeded order (pass after pass)."""

    def __init__(self, model, tokens, site, layer, s: TrainSettings, run: Run, gen: torch.Generator):
        self.model, self.tokens, self.site, self.layer, self.s, self.gen = model, tokens, site, layer, s, gen
        self.inner = Run(progress=False, cancel=run.cancel)
        self.order: list[int] = []
        self.data = torch.empty(0, acts.site_width(model, site))
        self.pos = 0
        self.passes = 0
        self.tokens_seen = 0
        self.total = acts.n_tokens(tokens, s.skip_positions)
        self.per_row = max(1, self.total // len(tokens))
        # when every activation fits in the buffer, collect them once and reshuffle for each pass
        self.fits = self.total <= s.buffer_tokens
        self.all: torch.Tensor | None = None

    def _next_rows(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.tokens), generator=self.gen).tolist()
                self.passes += 1
            take = min(n - len(out), len(self.order))
            out += self.order[:take]
            self.order = self.order[take:]
        return out

    def refill(self) -> None:
        if self.fits:
            if self.all is None:
                self.all = acts.stream(
                    self.model, self.tokens, self.site, self.layer, rows_per_chunk=self.s.rows_per_chunk,
                    skip_positions=self.s.skip_positions, run=self.inner,
                )  # fmt: skip
            self.passes += 1
            self.tokens_seen += len(self.all)
            self.data = torch.cat(
                [self.data[self.pos :], self.all[torch.randperm(len(self.all), generator=self.gen)]]
            )
            self.pos = 0
            return
        rows = self._next_rows(max(1, -(-self.s.buffer_tokens // self.per_row)))
        new = acts.stream(
            self.model, self.tokens, self.site, self.layer, rows=rows, rows_per_chunk=self.s.rows_per_chunk,
            skip_positions=self.s.skip_positions, run=self.inner,
        )  # fmt: skip
        data = torch.cat([self.data[self.pos :], new])
        self.data = data[torch.randperm(len(data), generator=self.gen)]
        self.pos = 0
        self.tokens_seen += len(new)

    def batch(self, n: int) -> torch.Tensor:
        if len(self.data) - self.pos < n:
            self.refill()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


class _Training:
    """The parameters, optimiser and running statistics of one training run (module docstring for the recipe).

    Parameters live in the scaled input space (inputs times `scale`); `sae()` folds the scale back in.
    """

    def __init__(self, s: TrainSettings, init: SAE, first: torch.Tensor, scale: float, gen: torch.Generator):
        d_sae = init.d_sae
        self.s, self.scale, self.gen = s, scale, gen
        self.W_dec = init.W_dec.detach().clone().requires_grad_(True)
        self.W_enc = init.W_enc.detach().clone().requires_grad_(True)
        self.b_enc = torch.zeros(d_sae, requires_grad=True)
        self.b_dec = (first.mean(0) * scale).requires_grad_(True)
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=s.lr)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.history: dict[str, list[float]] = {
            "step": [],
            "mse": [],
            "fvu": [],
            "l0": [],
            "l1": [],
            "dead": [],
        }
        self.resampled = 0
        self.theta: float | None = None  # batchtopk's inference threshold (running mean of the smallest kept)
        self.warm = max(1, int(s.l1_warmup * s.steps))
        self.decay_from = int((1 - s.lr_decay) * s.steps)
        self.stop_resampling = int(s.resample_until * s.steps)
        self.log_every = max(1, s.steps // 100)

    def codes(self, pre: torch.Tensor) -> torch.Tensor:
        """[batch, d_sae] codes of pre-activations `pre` (batchtopk also updates its threshold)."""
        s = self.s
        if s.architecture == "relu":
            return torch.relu(pre)
        if s.architecture == "topk":
            top = pre.topk(s.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        flat = torch.relu(pre).flatten()
        top = flat.topk(min(s.k * len(pre), flat.numel()))
        f = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        kept = top.values[top.values > 0]
        if len(kept):
            smallest = float(kept.min().detach())
            self.theta = smallest if self.theta is None else 0.99 * self.theta + 0.01 * smallest
        return f

    def step(self, step: int, x: torch.Tensor) -> None:
        """One optimiser step on the scaled batch x [batch, d_in], then logging and resampling."""
        s, W_dec = self.s, self.W_dec
        f = self.codes((x - self.b_dec) @ self.W_enc + self.b_enc)
        x_hat = f @ W_dec + self.b_dec
        err = (x_hat - x).pow(2).sum(-1)
        mse = err.mean()
        l1 = f.sum(-1).mean()  # f >= 0
        loss = mse
        if s.architecture == "relu":
            loss = loss + s.l1_coefficient * min(1.0, (step + 1) / self.warm) * l1
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # keep decoder rows on the unit sphere: drop the gradient along each row, renormalise after the step
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
            lr = (
                s.lr
                if step < self.decay_from
                else s.lr * (s.steps - step) / max(1, s.steps - self.decay_from)
            )
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            active = f > 0
            self.fired |= active.any(0)
            if step % self.log_every == 0 or step == s.steps - 1:
                self._log(step, x, mse, l1, active)
            if (step + 1) % s.resample_every == 0:
                dead = torch.nonzero(~self.fired).flatten()
                if len(dead) and step < self.stop_resampling:
                    _resample(dead, x, err, self.W_enc, self.b_enc, W_dec, self.b_dec, self.opt, self.gen)
                    self.resampled += len(dead)
                self.fired.zero_()

    def _log(self, step: int, x, mse, l1, active) -> None:
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        history = self.history
        history["step"].append(step)
        history["mse"].append(float(mse))
        history["fvu"].append(float(mse / var))
        history["l0"].append(float(active.sum(-1).float().mean()))
        history["l1"].append(float(l1))
        history["dead"].append(int((~self.fired).sum()) if (step + 1) % self.s.resample_every == 0 else -1)

    def sae(self, cfg: SAEConfig) -> SAE:
        """The trained SAE reading raw activations: f_raw = f / scale, decoder rows stay unit."""
        with torch.no_grad():
            b_dec_raw = self.b_dec.detach() / self.scale
            b_enc_raw = self.b_enc.detach() / self.scale
        threshold = None
        if self.s.architecture == "batchtopk":
            threshold = torch.full((len(b_enc_raw),), (self.theta or 0.0) / self.scale)
        return SAE(cfg, self.W_enc.detach(), b_enc_raw, self.W_dec.detach(), b_dec_raw, threshold)


def train_sae(
    model,
    data,
    *,
    site: str = "resid_pre",
    layer: int | None = 1,
    settings: TrainSettings | None = None,
    seq_len: int | None = None,
    dataset: str = "",
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **overrides: Any,
) -> SAE:
    """Train an SAE on `site` of `layer` of `model` (see the module docstring for the recipe).

    Args:
        model: a `WorkbenchModel` (local).
        data: token rows (a [row, pos] tensor or a list of 1-D tensors, BOS first) or texts, one row each (BOS
            first, cut at `seq_len` tokens; rows of one length run together).
        site, layer: where the SAE reads (any of `workbench.sae.activations.SAE_SITES`).
        settings: `TrainSettings`; keyword `overrides` replace single fields (``steps=500, l1_coefficient=2``).
        dataset: a note of where `data` came from, kept in the SAE's metadata.
        run / progress / cancel: the shared `Run` (progress bar or callback, Stop).

    Returns the trained `SAE` (``cfg.metadata["training"]`` holds the settings, the measured loss history and the
    input scale). Its firing frequencies are not set: measure them on held-out data with `evaluate_sae` and
    attach them with ``sae.with_frequency(evaluation.firing_frequency)``.
    """
    s = dataclasses.replace(settings or TrainSettings(), **overrides)
    s.check()
    if model.remote is True:
        raise InputError("Train SAEs on a local model (load it without remote=True).")
    layer = acts.check_site(model, site, layer)
    run = Run.of(run, progress=progress, cancel=cancel)
    tokens = acts.token_rows(model, data, seq_len)
    if acts.n_tokens(tokens, s.skip_positions) == 0:
        raise InputError(f"The token rows leave nothing after skipping {s.skip_positions} positions.")
    d_in = acts.site_width(model, site)
    d_sae = s.d_sae or s.expansion * d_in
    if s.architecture in ("topk", "batchtopk") and s.k > d_sae:
        raise InputError(f"k={s.k} is more than the {d_sae} latents.")
    gen = torch.Generator().manual_seed(s.seed)
    started = time.perf_counter()
    buffer = _Buffer(model, tokens, site, layer, s, run, gen)
    buffer.refill()
    first = buffer.data
    scale = float((first.pow(2).sum(-1).mean() / d_in).rsqrt())  # mean squared norm -> d_in

    training = _Training(s, SAE.init(d_in, d_sae, site=site, layer=layer, seed=s.seed), first, scale, gen)
    for step in run.steps(s.steps, desc=f"training SAE ({site} {layer})"):
        training.step(step, buffer.batch(s.batch_size) * scale)

    architecture = "jumprelu" if s.architecture == "batchtopk" else s.architecture  # inference by threshold
    cfg = SAEConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        site=site,
        layer=layer,
        k=s.k if s.architecture == "topk" else None,
        model_name=model.name,
        skip_positions=s.skip_positions,
        metadata={
            "context_size": max(len(t) for t in tokens),
            "prepend_bos": bool(model.default_prepend_bos),
            "dataset_path": dataset or None,
            "training": {
                "settings": dataclasses.asdict(s),
                "input_scale": scale,
                "batchtopk_threshold": None if training.theta is None else training.theta / scale,
                "tokens_seen": int(buffer.tokens_seen),
                "training_tokens_available": int(buffer.total),
                "passes_over_data": buffer.passes,
                "resampled_latents": training.resampled,
                "wall_time_s": round(time.perf_counter() - started, 1),
                "threads": torch.get_num_threads(),
                "history": training.history,
            },
        },
    )
    return training.sae(cfg)


def _resample(dead, x, err, W_enc, b_enc, W_dec, b_dec, opt, gen) -> None:
    """Point dead latents at badly reconstructed inputs (module docstring)."""
    n = len(dead)
    weights = err.detach().clamp(min=0) + 1e-12
    picks = torch.multinomial(weights, n, replacement=n > len(weights), generator=gen)
    direction = x[picks] - b_dec.detach()
    direction /= direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    live = torch.ones(W_enc.shape[1], dtype=torch.bool)
    live[dead] = False
    enc_norm = W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
    W_dec[dead] = direction
    W_enc[:, dead] = direction.T * 0.2 * enc_norm
    b_enc[dead] = 0.0
    for param, index in ((W_dec, (dead,)), (W_enc, (slice(None), dead)), (b_enc, (dead,))):
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
