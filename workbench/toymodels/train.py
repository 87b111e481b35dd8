"""Training toy models: the critique's recipe, one thread per model, several models in parallel, a cache.

    model = train(ToyConfig(mixing="symmetric", sigma=0.03))          # ~15 s of one core at 10k steps
    models = train_many([cfg_a, cfg_b, cfg_c], n_workers=2)           # two processes, one thread each

Recipe (the critique's `mlpinsoup.py`): both weight matrices kaiming-uniform initialised (torch's default on the
stored tensors), AdamW(lr 3e-3, weight decay 0.01) over the weights (and sigma when learned), learning rate
cosine-annealed to 0 over the run and set before every step, batches of 2048 fresh samples from a seeded
generator, loss = mean over batch and features of (y_hat - y)^2.

Trained models are kept by their config's `key`: in memory always, and on disk (the workbench's safe Result
format) when `set_cache_dir(path)` was called or ``WORKBENCH_TOYMODELS_CACHE`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.results import Provenance, Result, load_result
from workbench.toymodels.config import ToyConfig
from workbench.toymodels.data import bernoulli_batch, bernoulli_dense, generator, one_hot_batch
from workbench.toymodels.models import ToyModel, build_task

DENSE_NNZ = 0.05
"""Batches with more than this fraction of nonzero inputs use dense matmuls (sparse gathers below it)."""


# -- cache ---------------------------------------------------------------------------------------------------

_MEMORY: dict[str, Result] = {}
_LOCK = threading.Lock()
_DISK: list[Path | None] = [None]


def set_cache_dir(path: str | os.PathLike | None) -> Path | None:
    """Also keep trained models on disk in `path` (None: memory only). Returns the directory."""
    _DISK[0] = None if path is None else Path(path)
    if _DISK[0] is not None:
        _DISK[0].mkdir(parents=True, exist_ok=True)
    return _DISK[0]


def cache_dir() -> Path | None:
    """The disk cache directory (`set_cache_dir`, else ``$WORKBENCH_TOYMODELS_CACHE``), or None."""
    if _DISK[0] is not None:
        return _DISK[0]
    env = os.environ.get("WORKBENCH_TOYMODELS_CACHE")
    return Path(env) if env else None


def cached(key: str, cls: type = Result) -> Any:
    """The cached result under `key` (memory first, then disk), or None."""
    with _LOCK:
        hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    folder = cache_dir()
    path = folder / f"{key.replace(':', '_')}.safetensors" if folder is not None else None
    if path is not None and path.exists():
        try:
            hit = load_result(path)
        except Exception:  # an unreadable or outdated file is a cache miss, not an error
            return None
        if isinstance(hit, cls):
            with _LOCK:
                _MEMORY[key] = hit
            return hit
    return None


def store(key: str, result: Result) -> None:
    """Keep `result` under `key` (memory, and disk when a cache directory is set)."""
    with _LOCK:
        _MEMORY[key] = result
    folder = cache_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        result.save(folder / f"{key.replace(':', '_')}.safetensors")


def clear_cache(disk: bool = False) -> None:
    """Forget cached models (and delete the disk cache's files when `disk`)."""
    with _LOCK:
        _MEMORY.clear()
    folder = cache_dir()
    if disk and folder is not None and folder.is_dir():
        for f in folder.glob("*.safetensors"):
            f.unlink()


# -- the training loop -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingProgress:
    """Work in progress handed to ``Run.on_partial``: the loss curve so far of model `index`."""

    index: int
    label: str
    step: int
    steps: int
    curve: torch.Tensor  # [step] loss / p so far


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run torch on `n` intra-op threads inside the block (None: leave as is)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def learning_rate(cfg: ToyConfig, step: int, steps: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * (1 + math.cos(math.pi * step / steps)) / 2
    if cfg.schedule == "apd":
        return cfg.lr * math.cos(0.5 * math.pi * step / max(steps - 1, 1))
    return cfg.lr


def _fit(
    cfg: ToyConfig,
    run: Run,
    *,
    index: int = 0,
    init: dict[str, torch.Tensor] | None = None,
    stream: str = "data",
) -> dict[str, Any]:
    """Train `cfg` (from `init` weights when given) and return its weights, sigma and loss curve."""
    task = build_task(cfg)
    n, d = cfg.n_features, cfg.d_mlp
    gen_init = generator(cfg.seed, "init")
    gen_data = generator(cfg.seed, stream)
    if cfg.model == "residual":
        W_1 = torch.empty(cfg.d_embed, d)
        W_2 = torch.empty(d, cfg.d_embed)
        shapes = {"W_1": W_1, "W_2": W_2}
    else:
        shapes = {"W_in": torch.empty(n, d), "W_out": torch.empty(d, n)}
    params = {}
    for name, t in shapes.items():
        torch.nn.init.kaiming_uniform_(t, generator=gen_init)
        if init is not None:
            t.copy_(init[name])
        params[name] = torch.nn.Parameter(t)
    sigma = torch.nn.Parameter(torch.tensor(float(cfg.sigma))) if cfg.learn_sigma else None
    opt = torch.optim.AdamW(
        list(params.values()) + ([sigma] if sigma is not None else []),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=True,  # one kernel per step instead of a dozen: a third of the step time at this size
    )
    W_E = task.W_E
    # labels: y = ReLU(x) + x M^T with M = fixed + sigma * unit; the part that does not train is a lookup table
    # [M_fixed^T; I] read by one embedding bag (rows: input features, then their ReLU)
    fixed_M = task.mixing(cfg.sigma) if sigma is None else task.fixed
    table = torch.cat([fixed_M.T, torch.eye(n)]).contiguous()
    unit_T = task.unit.T.contiguous() if sigma is not None else None
    clean = not bool(fixed_M.any())
    p_eval = cfg.p_eval
    curve = torch.empty(cfg.steps)
    sigma_curve = torch.empty(cfg.steps if sigma is not None else 0)
    every = max(25, cfg.steps // 200)
    dense = cfg.data == "bernoulli" and cfg.p > DENSE_NNZ
    scale = 1.0 / (cfg.batch_size * n)
    for step in run.steps(cfg.steps, desc=cfg.describe()):
        lr = learning_rate(cfg, step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        if cfg.data == "one_hot":
            batch = one_hot_batch(cfg.batch_size, n, gen_data)
        elif not dense:
            batch = bernoulli_batch(cfg.batch_size, n, cfg.p, gen_data)
        if W_E is not None:  # the residual model, folded: x W_E W_1 and W_2 W_E^T (same function, see models)
            V_in, V_out = W_E @ params["W_1"], params["W_2"] @ W_E.T
        else:
            V_in, V_out = params["W_in"], params["W_out"]
        if dense:
            x = bernoulli_dense(cfg.batch_size, n, cfg.p, gen_data)
            with torch.no_grad():
                y = torch.relu(x) if clean else torch.relu(x) + x @ fixed_M.T
            if sigma is not None:
                y = y + sigma * (x @ unit_T)
            err = torch.relu(x @ V_in) @ V_out - y
        else:
            # all-zero inputs have output 0 and label 0 (no biases): they add exact zeros to the loss and its
            # gradient, so only the non-empty rows are computed (rows of a batch come sorted)
            _, counts = torch.unique_consecutive(batch.rows, return_counts=True)
            offsets = torch.cumsum(counts, 0) - counts
            h = F.embedding_bag(batch.cols, V_in, offsets, mode="sum", per_sample_weights=batch.values)
            with torch.no_grad():
                idx = torch.stack([batch.cols, batch.cols + n], 1).flatten()
                w = torch.stack([batch.values, torch.relu(batch.values)], 1).flatten()
                y = F.embedding_bag(idx, table, 2 * offsets, mode="sum", per_sample_weights=w)
                if sigma is not None:
                    mix = F.embedding_bag(
                        batch.cols, unit_T, offsets, mode="sum", per_sample_weights=batch.values
                    )
            if sigma is not None:
                y = y + sigma * mix
            err = torch.relu(h) @ V_out - y
        sq = err * err
        loss = (sq.sum() if cfg.loss_power == 2 else (sq * sq).sum()) * (
            scale if not dense else 1 / sq.numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve[step] = float(loss.detach()) / p_eval
        if sigma is not None:
            sigma_curve[step] = float(sigma.detach())
        if run.on_partial is not None and (step % every == every - 1 or step == cfg.steps - 1):
            run.partial(
                TrainingProgress(index, cfg.describe(), step + 1, cfg.steps, curve[: step + 1].clone())
            )
    out = {k: v.detach().clone() for k, v in params.items()}
    if W_E is not None:
        out["W_in"], out["W_out"] = (W_E @ out["W_1"]).detach(), (out["W_2"] @ W_E.T).detach()
    final = float(sigma.detach()) if sigma is not None else cfg.sigma
    out["M"] = task.mixing(final).detach().clone()
    # a learned sigma may cross zero; -sigma draws the same law, so its size is what is reported
    out["sigma"] = abs(final) if cfg.has_sigma else math.nan
    out["curve"], out["sigma_curve"] = curve, sigma_curve
    return out


def _model(
    cfg: ToyConfig, state: dict[str, Any], *, kind: str = "trained", label: str | None = None, **opts
) -> ToyModel:
    return ToyModel(
        W_in=torch.as_tensor(state["W_in"]).float(),
        W_out=torch.as_tensor(state["W_out"]).float(),
        M=torch.as_tensor(state["M"]).float(),
        sigma=float(state["sigma"]),
        curve=torch.as_tensor(state["curve"]).float(),
        sigma_curve=torch.as_tensor(state["sigma_curve"]).float(),
        config=cfg.to_dict(),
        kind=kind,
        label=label or cfg.describe(),
        W_E=build_task(cfg).W_E if cfg.model == "residual" else None,
        W_1=torch.as_tensor(state["W_1"]).float() if "W_1" in state else None,
        W_2=torch.as_tensor(state["W_2"]).float() if "W_2" in state else None,
        provenance=Provenance.capture("toymodels", kind=kind, config=cfg.to_dict(), **opts),
    )


def as_config(cfg: ToyConfig | dict | None = None, **changes: Any) -> ToyConfig:
    """A `ToyConfig` from a config, a dict of fields, or keywords (applied on top)."""
    if cfg is None:
        return ToyConfig(**changes)
    if isinstance(cfg, dict):
        cfg = ToyConfig.from_dict(cfg)
    if not isinstance(cfg, ToyConfig):
        raise InputError(f"Expected a ToyConfig (or a dict of its fields), got {type(cfg).__name__}.")
    return cfg.replace(**changes) if changes else cfg


def train(
    cfg: ToyConfig | dict | None = None,
    *,
    cache: bool = True,
    threads_per_model: int | None = 1,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    **changes: Any,
) -> ToyModel:
    """Train one toy model (or return it from the cache).

    Args:
        cfg: a `ToyConfig` (or its fields as a dict); keywords change fields: ``train(mixing="embed")``.
        cache: look the config up first and keep the result.
        threads_per_model: torch threads while training (1: the measured fastest for this size under load).
        progress, cancel, run: the shared execution core (`workbench.core.Run`); ``run.on_partial`` receives a
            `TrainingProgress` (the loss curve so far) about every 0.5% of the steps.
    """
    cfg = as_config(cfg, **changes)
    if cache and (hit := cached(cfg.key, ToyModel)) is not None:
        return hit
    run = Run.of(run, progress=progress, cancel=cancel)
    with threads(threads_per_model):
        state = _fit(cfg, run)
    model = _model(cfg, state)
    if cache:
        store(cfg.key, model)
    return model


# -- several models ----------------------------------------------------------------------------------------


class _Ticker:
    """Advance ``run.steps(total)`` by hand: one tick per finished step of any model (cancel checked too)."""

    def __init__(self, run: Run, total: int, desc: str):
        self.steps = run.steps(total, desc=desc)
        self.left = total
        if total:
            next(self.steps)  # enter the progress context; the first step is counted by the first advance

    def advance(self, k: int) -> None:
        for _ in range(min(k, self.left)):
            self.left -= 1
            try:
                next(self.steps)
            except StopIteration:
                self.left = 0
                return

    def close(self) -> None:
        self.steps.close()


class _SharedCancel(CancelToken):
    """A cancel token backed by a multiprocessing event, so Stop in the parent reaches the workers."""

    def __init__(self, event) -> None:
        self._event = event


_WORKER: dict[str, Any] = {}


def _worker_init(messages, stop) -> None:
    torch.set_num_threads(1)
    _WORKER["messages"], _WORKER["stop"] = messages, stop


def _worker_train(index: int, config: dict[str, Any]) -> dict[str, Any]:
    """Train one config in a worker process, reporting progress and the curve to the parent's queue."""
    cfg = ToyConfig.from_dict(config)
    messages = _WORKER["messages"]
    last = [0]

    def report(part: TrainingProgress) -> None:
        messages.put((index, part.step, part.curve[last[0] : part.step].tolist()))
        last[0] = part.step

    run = Run(progress=False, cancel=_SharedCancel(_WORKER["stop"]), on_partial=report)
    state = _fit(cfg, run, index=index)
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def train_many(
    configs: Sequence[ToyConfig | dict],
    *,
    n_workers: int = 2,
    cache: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> list[ToyModel]:
    """Train several configs (cached ones are reused), `n_workers` processes at a time with one thread each.

    ``n_workers=1`` trains in this process, one after the other (bit-identical to the workers' results).
    Progress counts the steps of all models; ``run.on_partial`` receives each model's `TrainingProgress`
    with `index` into `configs`. Stop (the cancel token) reaches the workers within a few steps.
    """
    configs = [as_config(c) for c in configs]
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise InputError(f"n_workers must be a positive whole number, got {n_workers!r}.")
    run = Run.of(run, progress=progress, cancel=cancel)
    results: dict[str, ToyModel] = {}
    todo: dict[str, tuple[int, ToyConfig]] = {}
    for i, cfg in enumerate(configs):
        hit = cached(cfg.key, ToyModel) if cache else None
        if hit is not None:
            results[cfg.key] = hit
        elif cfg.key not in todo:
            todo[cfg.key] = (i, cfg)
    if todo:
        jobs = list(todo.values())
        ticker = _Ticker(run, sum(c.steps for _, c in jobs), f"training {len(jobs)} toy models")
        try:
            if n_workers == 1 or len(jobs) == 1:
                states = _sequential(jobs, run, ticker)
            else:
                states = _parallel(jobs, run, ticker, min(n_workers, len(jobs)))
        finally:
            ticker.close()
        for (_, cfg), state in zip(jobs, states):
            model = _model(cfg, state)
            results[cfg.key] = model
            if cache:
                store(cfg.key, model)
    return [results[c.key] for c in configs]


def _sequential(jobs, run: Run, ticker: _Ticker) -> list[dict[str, Any]]:
    states = []
    for index, cfg in jobs:
        done = [0]

        def tick(d: int, _total: int, done=done) -> None:
            ticker.advance(d - done[0])
            done[0] = d

        child = Run(progress=tick, cancel=run.cancel, on_partial=run.on_partial)
        with threads(1):
            states.append(_fit(cfg, child, index=index))
    return states


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawned workers need only this module: hide the caller's script from them, so a script without an
    ``if __name__ == "__main__"`` guard is not run again in every worker (Jupyter kernels have no script)."""
    main = sys.modules.get("__main__")
    saved = {a: getattr(main, a) for a in ("__file__", "__spec__") if main is not None and hasattr(main, a)}
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        yield
    finally:
        for attr, value in saved.items():
            setattr(main, attr, value)


def _parallel(jobs, run: Run, ticker: _Ticker, n_workers: int) -> list[dict[str, Any]]:

    ctx = mp.get_context("spawn")  # fork after torch has started threads can hang
    messages, stop = ctx.Queue(), ctx.Event()
    curves: dict[int, list[float]] = {i: [] for i, _ in jobs}
    labels = {i: (c.describe(), c.steps) for i, c in jobs}

    def handle(msg) -> None:
        index, step, values = msg
        curves[index].extend(values)
        ticker.advance(len(values))
        run.partial(
            TrainingProgress(index, labels[index][0], step, labels[index][1], torch.tensor(curves[index]))
        )

    pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init, initargs=(messages, stop))
    try:
        with _main_module_hidden():  # workers start while submitting
            futures = [pool.submit(_worker_train, i, cfg.to_dict()) for i, cfg in jobs]
        while not all(f.done() for f in futures):
            try:
                handle(messages.get(timeout=0.1))
            except queue_module.Empty:
                run.check()
        while True:  # messages sent just before a worker finished
            try:
                handle(messages.get_nowait())
            except queue_module.Empty:
                break
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def finetune(
    model: ToyModel,
    *,
    steps: int | None = None,
    cache: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    **changes: Any,
) -> ToyModel:
    """Continue training `model`'s weights on a changed task (default: the clean task, M = 0).

    A fresh AdamW and a fresh cosine schedule over `steps` (default: the model's own), a fresh data stream;
    the critique's "transplant" when the change is to M = 0. Returns a model of kind "transplanted".
    """
    if model.kind != "trained":
        raise InputError("Only trained models can be fine-tuned (this one was built, not trained).")
    src = model.cfg
    changes = {"mixing": "clean", "sigma": 0.0, "learn_sigma": False, **changes}
    if src.model == "residual":
        raise InputError(
            "Fine-tune the simplified model; the residual model's mixing is fixed by its embedding."
        )
    cfg = src.replace(steps=steps or src.steps, **changes)
    key = f"transplanted:{model.key}:{cfg.key}"
    if cache and (hit := cached(key, ToyModel)) is not None:
        return hit
    run = Run.of(run, progress=progress, cancel=cancel)
    init = {"W_in": model.W_in, "W_out": model.W_out}
    with threads(1):
        state = _fit(cfg, run, init=init, stream="transplant")
    label = f"{model.label} → {cfg.describe()}"
    out = _model(cfg, state, kind="transplanted", label=label, source=model.config)
    if cache:
        store(key, out)
    return out
