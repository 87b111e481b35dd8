"""A replica of the challenge-2 model trained on the published labels, its cache, and the model a tutorial runs
on (`load_challenge_model`: the original when its weights are found, else a replica)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from workbench.casper.measures import agreement
from workbench.casper.pairs.labels import LABELS_FILE, PairLabels, all_pairs, load_labels, train_test_split
from workbench.casper.pairs.model import (
    PairTransformer,
    _atomic_save,
    _cache,
    _labels_of,
    _Threads,
    find_original,
    load_original,
)
from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


@dataclass(frozen=True)
class ReplicaRecipe:
    """How a replica is trained: the grokking code's recipe as the challenge copied it (full batch, AdamW with
    betas (0.9, 0.98), weight decay 1.0, lr 5e-4, 10 warm-up steps, cross-entropy over the whole vocabulary at the
    last position, 50% split with seed 0), for the copied 5000 epochs by default; the tests and the notebook's CI
    run use 1000, which reach the reported accuracy but leave much of the random initialisation in the weights
    (see the notebook). Training is deterministic for a given recipe on a given machine (seeded init, fixed thread
    count)."""

    epochs: int = 5000
    lr: float = 5e-4
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10
    frac_train: float = 0.5
    split_seed: int = 0
    init_seed: int = 0
    threads: int = 2
    eval_every: int = 50

    def __post_init__(self):
        if self.epochs < 1 or self.eval_every < 1 or self.threads < 1:
            raise InputError("epochs, eval_every and threads must be positive integers")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InputError(
                f"lr must be positive and weight_decay non-negative, got {self.lr}, {self.weight_decay}"
            )
        if not 0 < self.frac_train < 1:
            raise InputError(f"frac_train must be between 0 and 1, got {self.frac_train}")

    def key(self, labels: torch.Tensor) -> str:
        """Cache key: a hash of every hyper-parameter, the seeds and the labels trained on."""
        blob = json.dumps(
            {
                "recipe": dataclasses.asdict(self),
                "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReplicaReport(Result):
    """How a replica trained. Curves are [checkpoint] over `epochs`; accuracies are against the ground-truth
    labels, `agreement` against the original model's published labels (all 12769 pairs)."""

    recipe: dict
    epochs: torch.Tensor
    train_loss: torch.Tensor
    train_accuracy: torch.Tensor
    test_accuracy: torch.Tensor
    agreement: torch.Tensor
    seconds: float
    cache_key: str
    provenance: Provenance

    @property
    def final(self) -> dict[str, float]:
        return {
            "train_accuracy": self.train_accuracy[-1].item(),
            "test_accuracy": self.test_accuracy[-1].item(),
            "agreement_with_original": self.agreement[-1].item(),
        }

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "epoch": self.epochs.numpy(),
                "train_loss": self.train_loss.numpy(),
                "train_accuracy": self.train_accuracy.numpy(),
                "test_accuracy": self.test_accuracy.numpy(),
                "agreement_with_original": self.agreement.numpy(),
            }
        )


def train_replica(
    labels: PairLabels,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    *,
    progress: bool = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    on_eval: Callable[[int, PairTransformer], None] | None = None,
) -> tuple[PairTransformer, ReplicaReport]:
    """Train a `PairTransformer` on the ground-truth labels of the train half. Returns the model (eval mode)
    and its `ReplicaReport`. `on_eval(epoch, model)` is called at every evaluation (e.g. to keep snapshots); it
    must not change the model. The default recipe takes about 10 minutes on two idle CPU cores."""
    is_train = train_test_split(recipe.frac_train, recipe.split_seed).flatten()
    tokens = all_pairs()
    truth = labels.labels.flatten()
    train_tokens, train_targets = tokens[is_train], truth[is_train]
    history: dict[str, list[float]] = {k: [] for k in ("epoch", "loss", "train", "test", "agree")}
    run = Run.of(run, progress=progress, cancel=cancel)
    start = time.perf_counter()
    with _Threads(recipe.threads, deterministic=True):
        torch.manual_seed(recipe.init_seed)
        model = PairTransformer()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas
        )
        warmup = max(recipe.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / warmup, 1.0))

        def evaluate(epoch: int) -> None:
            with torch.no_grad():
                logits = model.final_logits(tokens)
                predicted = _labels_of(logits)
                loss = F.cross_entropy(logits[is_train].double(), train_targets)
            history["epoch"].append(epoch)
            history["loss"].append(loss.item())
            history["train"].append(agreement(predicted, truth, is_train))
            history["test"].append(agreement(predicted, truth, ~is_train))
            history["agree"].append(agreement(predicted, labels.model_labels.flatten()))
            if on_eval is not None:
                on_eval(epoch, model)

        for epoch in run.steps(recipe.epochs, desc="training the replica"):
            if epoch % recipe.eval_every == 0:
                evaluate(epoch)
            # Float64 loss over the whole vocabulary, as the original training code.
            loss = F.cross_entropy(model.final_logits(train_tokens).double(), train_targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        evaluate(recipe.epochs)
    seconds = time.perf_counter() - start
    model.eval()
    report = ReplicaReport(
        recipe=dataclasses.asdict(recipe),
        epochs=torch.tensor(history["epoch"]),
        train_loss=torch.tensor(history["loss"], dtype=torch.float64),
        train_accuracy=torch.tensor(history["train"], dtype=torch.float64),
        test_accuracy=torch.tensor(history["test"], dtype=torch.float64),
        agreement=torch.tensor(history["agree"], dtype=torch.float64),
        seconds=seconds,
        cache_key=recipe.key(labels.labels),
        provenance=Provenance.capture("casper-pair-replica", **dataclasses.asdict(recipe)),
    )
    return model, report


def initialisation_left(model: PairTransformer, recipe: ReplicaRecipe) -> dict[str, float]:
    """For each weight matrix, how much of the replica's random initialisation is still in it: the coefficient
    of the trained weights' projection on their initial values (rebuilt from the recipe's seed). AdamW's decoupled
    weight decay alone shrinks it by ``exp(-lr * weight_decay * epochs)``."""
    torch.manual_seed(recipe.init_seed)
    initial = PairTransformer().state_dict()
    out = {}
    for name, trained in model.state_dict().items():
        start = initial[name].double().flatten()
        if name.endswith("mask") or start.norm() == 0:
            continue  # the mask buffer and the zero-initialised biases
        out[name] = (trained.double().flatten() @ start / (start @ start)).item()
    return out


def replica_path(labels: PairLabels, recipe: ReplicaRecipe, cache: str | os.PathLike | None = None) -> Path:
    """The cache file of the replica that `recipe` trains on `labels`."""
    return _cache(cache) / f"pair_replica_{recipe.key(labels.labels)}.pt"


def load_replica(
    labels: PairLabels,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    *,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[PairTransformer, ReplicaReport]:
    """The replica for `recipe`: read from the cache, or trained (minutes) and cached. The cache file holds the
    state dict in the original's format ({"model": ..., "epoch": ...}) plus the training report."""
    file = replica_path(labels, recipe, cache)
    if file.is_file() and not retrain:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
            model = PairTransformer()
            model.load_state_dict(data["model"])
            return model.eval(), _report_from_dict(data["report"])
        except Exception as exc:  # a cache file from an older version or a broken write: train again
            warnings.warn(
                f"ignoring the unreadable cached replica {file} ({exc}); training it again", stacklevel=2
            )
    model, report = train_replica(labels, recipe, progress=progress)
    save_replica(model, report, file)
    return model, report


def save_replica(model: PairTransformer, report: ReplicaReport, file: str | os.PathLike) -> Path:
    """Write a replica as `load_replica` caches it (the original's checkpoint format plus the report)."""
    file = Path(file)
    _atomic_save(
        {"model": model.state_dict(), "epoch": report.recipe["epochs"], "report": _report_to_dict(report)},
        file,
    )
    return file


def _report_to_dict(report: ReplicaReport) -> dict:
    out = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    # Through JSON: version strings are str subclasses that weights_only loading refuses.
    out["provenance"] = json.loads(json.dumps(dataclasses.asdict(report.provenance), default=str))
    return out


def _report_from_dict(data: dict) -> ReplicaReport:
    data = dict(data)
    data["provenance"] = Provenance(**data["provenance"])
    data["recipe"] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["recipe"].items()}
    return ReplicaReport(**data)


@dataclass(frozen=True)
class ChallengeModel:
    """The model a tutorial runs on: the original when its weights are found, else a replica."""

    model: PairTransformer
    kind: Literal["original", "replica"]
    source: str
    labels: PairLabels
    report: ReplicaReport | None = None

    @property
    def is_original(self) -> bool:
        return self.kind == "original"


def load_challenge_model(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> ChallengeModel:
    """The original model if `transformer_model.pt` is found (or downloaded with ``download=True``), else the
    replica for `recipe` (cached, or trained now). An explicit `path` that does not exist is an error, not a
    reason to fall back to a replica."""
    beside = None if path is None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    if data_dir is None and beside is not None and (beside / LABELS_FILE).is_file():
        labels = load_labels(beside / LABELS_FILE)
    else:
        labels = load_labels(data_dir=data_dir)
    file = find_original(path, data_dir=data_dir)
    if file is not None or download:
        model = load_original(file, data_dir=data_dir, download=download, labels=labels, cache=cache)
        source = file or find_original(data_dir=data_dir)
        return ChallengeModel(model, "original", str(source), labels)
    model, report = load_replica(labels, recipe, cache=cache, progress=progress)
    return ChallengeModel(model, "replica", str(replica_path(labels, recipe, cache)), labels, report)
