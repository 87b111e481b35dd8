"""Removal fine-tuning: freeze norm scales one site at a time while training, as in the paper (local only).

`finetune(model, train, "demo")` copies the model, replaces every norm by a `FrozenNorm` (the pre-attention
norm split into its q/k and v paths), and trains all weights with AdamW on next-token cross-entropy plus the
auxiliary loss on the final norm's input:

    L = CE + aux_weight * mean_tokens (sigma_token - sigma_target)^2,

where ``sigma_target`` is the mean scale of tokens that are neither position 0 nor end-of-text (no gradient). At
the steps of the `RemovalSchedule` each site is frozen at the moving average of its batch-mean scale (momentum
0.9 by default, updated on every micro-batch while the norm is real). When every site is frozen the model is
consolidated into the family's standard layout with `FrozenNorm` modules (see `norms.consolidate`) and returned
as a new `WorkbenchModel`; it exports to the released checkpoints' convention with `export_lnfree`.

``finetune(..., remove=False)`` is the paper's control: the same data order, steps and learning-rate schedule,
with LayerNorm kept and no auxiliary loss.

One decision differs from the paper's code, where the q/k and v paths of a block share one scale buffer (so the
q/k scale keeps following the moving average until the v path is removed): here each path is frozen at its own
removal step, as the paper's text describes; consolidation folds the difference into the value projection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.core import CancelToken, Run
from workbench.errors import InputError, UnsupportedModelError
from workbench.lnfree.calibration import calibrate
from workbench.lnfree.data import eot_id, text_tokens
from workbench.lnfree.norms import (
    FrozenNorm,
    check_surgery,
    consolidate,
    get_module,
    install_frozen_norms,
    plain_copy,
    site_path,
    token_scale,
)
from workbench.lnfree.schedule import FinetuneConfig, preset, removal_events
from workbench.lnfree.sites import paper_order
from workbench.models import load_model
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

_HISTORY_FIELDS = ("step", "loss", "aux_loss", "lr", "grad_norm", "n_frozen")


@dataclasses.dataclass(frozen=True)
class TrainingHistory(Result):
    """What happened during a fine-tuning run, step by step.

    Attributes:
        step, loss, aux_loss, lr, grad_norm, n_frozen: [step] per optimizer step (loss: cross-entropy averaged
            over the step's micro-batches; aux_loss: the weighted auxiliary loss; n_frozen: sites frozen).
        events: [(step, site)] removals, in order.
        frozen_scales: {site: scale} each site was frozen at.
        val_step, val_loss: [eval] validation cross-entropy after `val_step` optimizer steps (0 = before).
        removed: True for a removal run, False for the control.
        lnfree: whether every norm ended frozen (the returned model has no per-token scale left).
    """

    model: str
    removed: bool
    lnfree: bool
    step: torch.Tensor
    loss: torch.Tensor
    aux_loss: torch.Tensor
    lr: torch.Tensor
    grad_norm: torch.Tensor
    n_frozen: torch.Tensor
    events: list[tuple[int, str]]
    frozen_scales: dict[str, float]
    val_step: torch.Tensor
    val_loss: torch.Tensor
    config: dict
    wall_time_s: float
    provenance: Provenance

    @property
    def final_val_loss(self) -> float | None:
        return float(self.val_loss[-1]) if len(self.val_loss) else None

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame({name: getattr(self, name).numpy() for name in _HISTORY_FIELDS})
        val = dict(zip(self.val_step.tolist(), self.val_loss.tolist()))
        frame["val_loss"] = [val.get(int(s) + 1) for s in frame["step"]]
        frame["removed_sites"] = [
            ", ".join(site for step, site in self.events if step == int(s)) for s in frame["step"]
        ]
        return frame


@dataclasses.dataclass
class RemovalRun:
    """The outcome of `finetune`: the fine-tuned model and its history."""

    model: object  # WorkbenchModel
    history: TrainingHistory
    checkpoint_dir: Path | None = None

    @property
    def lnfree(self) -> bool:
        return self.history.lnfree


# ---------------------------------------------------------------------------------------------------------------


def _check(model) -> None:
    if model.remote is not False:
        raise UnsupportedModelError(
            "Removal fine-tuning runs on a local model only (it updates every weight); NDIF runs forward passes "
            "and the zero-shot preview. Load the model locally: load_model(name, device='cuda')."
        )
    if model.adapter is None:
        raise UnsupportedModelError(
            f"{model.name} is a plain module; removal fine-tuning needs a transformer."
        )
    if model.tokenizer is None:
        raise InputError(f"{model.name} has no tokenizer; removal fine-tuning needs one to know end-of-text.")


def _autocast(
    config: FinetuneConfig, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for this run: bf16 on GPUs ("auto"), none on CPUs."""
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _loader(tokens: torch.Tensor, rows_per_step: int, seed: int):
    """Rows for each optimizer step: a seeded permutation, reshuffled after every pass over the data."""
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(tokens), generator=gen), 0

    def next_rows() -> torch.Tensor:
        nonlocal order, cursor
        picked = []
        need = rows_per_step
        while need:
            if cursor >= len(order):
                order, cursor = torch.randperm(len(tokens), generator=gen), 0
            take = order[cursor : cursor + need]
            picked.append(take)
            cursor += len(take)
            need -= len(take)
        return tokens[torch.cat(picked)]

    def skip(n_steps: int) -> None:
        for _ in range(n_steps):
            next_rows()

    return next_rows, skip


@torch.no_grad()
def module_loss(
    module, tokens: torch.Tensor, *, batch_size: int = 16, autocast=contextlib.nullcontext
) -> float:
    """Mean next-token cross-entropy of a plain (not nnsight-wrapped) causal LM on `tokens` [row, pos]."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        with autocast():
            logits = module(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    module.train(was_training)
    return total / max(count, 1)


def _initial_scales(model, tokens: torch.Tensor, n_rows: int = 64) -> dict[str, float]:
    """Starting values of the moving averages: mean scales on the first training rows, position 0 excluded
    (as the paper's initial std dicts)."""
    sample = tokens[: min(n_rows, len(tokens))]
    scales = calibrate(model, sample, exclude_first=sample.shape[1] > 1, progress=False)
    return scales.as_dict()


def finetune(
    model,
    train,
    config: FinetuneConfig | str = "demo",
    *,
    remove: bool = True,
    val=None,
    eval_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> RemovalRun:
    """Fine-tune a copy of `model` while removing its norms (or, with ``remove=False``, the control run).

    Args:
        train: token ids [row, pos] or documents (packed into rows of ``config.seq_len``); rows are cycled.
        config: a `FinetuneConfig` or a preset name ("demo", "smoke", "gpt2", "gpt2-medium", "gpt2-large",
            "gpt2-xl"); see `workbench.lnfree.schedule`.
        remove: False runs the control (LayerNorm kept, no auxiliary loss, same steps and schedule).
        val: validation tokens or documents, evaluated before training, every `eval_every` steps and at the end.
        checkpoint_dir, checkpoint_every: save ``step_<n>.pt`` (weights, optimizer, history) every n steps and
            ``final.pt`` at the end; `resume` continues from such a file.
        progress: a tqdm bar (True), nothing (False), or a callback ``(done_steps, total_steps)``.
        cancel: a `CancelToken`; the run stops after the current step with `Cancelled`.
        run: a `workbench.core.Run` carrying `progress` and `cancel` instead.

    Returns a `RemovalRun` with the new model (the original is not modified) and its `TrainingHistory`.
    """
    _check(model)
    run = Run.of(run, progress=progress, cancel=cancel)
    config = preset(config) if isinstance(config, str) else config
    if not isinstance(config, FinetuneConfig):
        raise InputError("config must be a FinetuneConfig or a preset name such as 'demo' or 'gpt2'.")
    config.validate(model.cfg.n_layers, remove)
    if remove:
        check_surgery(model.adapter)
    tokens = text_tokens(model, train, seq_len=config.seq_len)
    val_tokens = text_tokens(model, val, seq_len=config.seq_len) if val is not None else None
    trainer = _Trainer(model, tokens, val_tokens, config, remove)
    start_step = trainer.resume(resume) if resume is not None else 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    try:
        if start_step == 0:
            trainer.evaluate(0)
        steps = run.steps(
            config.steps,
            start=start_step,
            desc="LN removal" if remove else "control fine-tune",
            postfix=trainer.postfix,
        )
        for step in steps:
            trainer.step(step)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < config.steps:
                trainer.evaluate(step + 1)
            if ckpt_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                trainer.save(ckpt_dir / f"step_{step + 1}.pt", step + 1)
        trainer.evaluate(config.steps)
        if ckpt_dir is not None:
            trainer.save(ckpt_dir / "final.pt", config.steps)
    finally:
        trainer.close()
    new_model, history = trainer.finish()
    return RemovalRun(model=new_model, history=history, checkpoint_dir=ckpt_dir)


class _Trainer:
    """The state of one fine-tuning run: a plain copy of the model with frozen-norm modules, its optimizer, the
    removal events, and the history so far."""

    def __init__(self, model, tokens, val_tokens, config: FinetuneConfig, remove: bool):
        self.model, self.tokens, self.val_tokens, self.config, self.remove = (
            model,
            tokens,
            val_tokens,
            config,
            remove,
        )
        self.started = time.time()
        self.eot = eot_id(model)
        self.n_layers = model.cfg.n_layers
        model.dispatch()  # lazily loaded weights are still on the meta device
        module = self.module = plain_copy(model.module)
        self.device = next(module.parameters()).device
        self.sites: dict[str, FrozenNorm] = {}
        if remove:
            initial = _initial_scales(model, tokens)
            self.sites = install_frozen_norms(module, model.adapter, momentum=config.momentum)
            for site, norm in self.sites.items():
                if site_path(site) in ("main", "qk"):
                    norm.set_running_scale(initial[site])
        if config.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.config.use_cache = False
        decay = [p for p in module.parameters() if p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            fused=self.device.type == "cuda",
        )
        self.events = removal_events(config, self.n_layers) if remove else {}
        self.history: dict[str, list] = {name: [] for name in _HISTORY_FIELDS}
        self.done_events: list[tuple[int, str]] = []
        self.frozen_scales: dict[str, float] = {}
        self.val_steps: list[int] = []
        self.val_losses: list[float] = []
        self.next_rows, self.skip_rows = _loader(tokens, config.micro_batch * config.grad_accum, config.seed)
        torch.manual_seed(config.seed)  # dropout
        self.final_norm = self.sites["final"] if remove else get_module(module, model.adapter.ln_final)
        self.captured: dict[str, torch.Tensor] = {}
        self.hook = self.final_norm.register_forward_pre_hook(
            lambda _m, args: self.captured.__setitem__("x", args[0])
        )
        self.autocast = _autocast(config, self.device)
        module.train()

    def resume(self, path) -> int:
        step = _resume(
            path, self.config, self.module, self.optimizer, self.history, self.done_events, self.frozen_scales,
            self.val_steps, self.val_losses, self.remove,
        )  # fmt: skip
        self.skip_rows(step)
        return step

    def evaluate(self, step: int) -> None:
        if self.val_tokens is not None:
            self.val_steps.append(step)
            loss = module_loss(
                self.module, self.val_tokens, batch_size=self.config.micro_batch, autocast=self.autocast
            )
            self.val_losses.append(loss)
            self.module.train()

    def step(self, step: int) -> None:
        """One optimizer step: removals due now, then gradient accumulation over the step's micro-batches."""
        config, module = self.config, self.module
        for site in self.events.get(step, []):
            self.frozen_scales[site] = self.sites[site].freeze(site_path(site))
            self.done_events.append((step, site))
        lr = config.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = self.next_rows()
        ce_sum, aux_sum = 0.0, 0.0
        for micro in rows.split(config.micro_batch):
            batch = micro.to(self.device)
            targets = batch[:, 1:].clone()
            if config.mask_eot_targets and self.eot is not None:
                # not trained to predict end-of-text, as the paper's collator
                targets[targets == self.eot] = -100
            with self.autocast():
                logits = module(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, :-1]
                ce = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
                )
                x = self.captured.pop("x")
                aux = _aux_loss(x, batch, self.eot, self.final_norm) if self.remove else ce.new_zeros(())
                loss = (ce + config.aux_weight * aux) / config.grad_accum
            loss.backward()
            ce_sum += float(ce.detach())
            aux_sum += float(config.aux_weight * aux.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = math.ceil(len(rows) / config.micro_batch)
        values = (step, ce_sum / n, aux_sum / n, lr, float(grad_norm), len(self.done_events))
        for name, value in zip(_HISTORY_FIELDS, values):
            self.history[name].append(value)

    def postfix(self) -> dict:
        """What the progress bar shows beside the step count."""
        h = self.history
        if not h["loss"]:
            return {}
        frozen = f"{len(self.done_events)}/{3 * self.n_layers + 1}" if self.remove else "-"
        return {"loss": f"{h['loss'][-1]:.3f}", "aux": f"{h['aux_loss'][-1]:.3g}", "frozen": frozen}

    def save(self, path: Path, step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": "workbench.lnfree.finetune/1",
                "step": step,
                "remove": self.remove,
                "config": self.config.to_dict(),
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "history": {k: list(v) for k, v in self.history.items()},
                "events": list(self.done_events),
                "frozen_scales": dict(self.frozen_scales),
                "val": [list(self.val_steps), list(self.val_losses)],
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            path,
        )

    def close(self) -> None:
        self.hook.remove()

    def finish(self):
        """The fine-tuned model (consolidated when every norm is frozen) and the `TrainingHistory`."""
        module, model, config, remove = self.module, self.model, self.config, self.remove
        module.eval()
        if config.gradient_checkpointing:
            module.gradient_checkpointing_disable()
        lnfree = remove and all(self.sites[s].is_frozen(site_path(s)) for s in paper_order(self.n_layers))
        if lnfree:
            consolidate(module, model.adapter)
        new_model = load_model(module, model.tokenizer)
        new_model.name = f"{model.name}-{'lnfree' if lnfree else ('ln-partial' if remove else 'control')}"
        history = TrainingHistory(
            model=model.name,
            removed=remove,
            lnfree=lnfree,
            **{name: torch.tensor(self.history[name], dtype=torch.float64) for name in _HISTORY_FIELDS},
            events=self.done_events,
            frozen_scales=self.frozen_scales,
            val_step=torch.tensor(self.val_steps, dtype=torch.long),
            val_loss=torch.tensor(self.val_losses, dtype=torch.float64),
            config=config.to_dict(),
            wall_time_s=time.time() - self.started,
            provenance=Provenance.capture(
                model.name,
                remove=remove,
                config=config.to_dict(),
                n_train_rows=len(self.tokens),
                seq_len=self.tokens.shape[1],
            ),
        )
        return new_model, history


def _aux_loss(x: torch.Tensor, tokens: torch.Tensor, eot: int | None, norm: FrozenNorm) -> torch.Tensor:
    """Mean squared distance of every token's scale at the final norm's input from the mean scale of tokens that
    are neither position 0 nor end-of-text (the paper's eq. 3, without its weight)."""
    sigma = token_scale(x, norm.kind, norm.eps)  # [batch, pos]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    if eot is not None:
        mask &= tokens != eot
    target = sigma[mask].mean().detach() if mask.any() else sigma.mean().detach()
    return (sigma - target).pow(2).mean()


def _resume(
    path, config, module, optimizer, history, events, frozen_scales, val_steps, val_losses, remove
) -> int:
    path = Path(path)
    if not path.exists():
        raise InputError(f"No checkpoint at {path}.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "workbench.lnfree.finetune/1":
        raise InputError(f"{path} is not a checkpoint written by workbench.lnfree.finetune.")
    if state["remove"] != remove:
        raise InputError(
            f"{path} is a {'removal' if state['remove'] else 'control'} run; resume it with remove={state['remove']}."
        )
    if state["config"] != config.to_dict():
        raise InputError(
            f"{path} was written by a run with another FinetuneConfig; resume with the same config."
        )
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    for name, values in state["history"].items():
        history[name].extend(values)
    events.extend(tuple(e) for e in state["events"])
    frozen_scales.update(state["frozen_scales"])
    val_steps.extend(state["val"][0])
    val_losses.extend(state["val"][1])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def load_checkpoint(path: str | Path) -> dict:
    """The contents of a fine-tuning checkpoint (for inspection): step, config, history, events, scales."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k not in ("module", "optimizer", "rng", "cuda_rng")}
