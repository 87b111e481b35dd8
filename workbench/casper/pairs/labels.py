"""The task of Casper's challenge 2: all 113 x 113 inputs, the published labels, the train/test split."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from workbench.casper import data
from workbench.errors import InputError

P = 113
"""Operands A and B range over 0..P-1."""
EQUALS = 113
"""The token in the third position (the "=" sign)."""

N_PAIRS = P * P
LABELS_FILE = "transformer_label_info.pkl"


def all_pairs() -> torch.Tensor:
    """Every input as tokens [P*P, 3] = (A, B, 113); row ``A*113 + B``, so ``.view(113, 113)`` gives [A, B]."""
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    return torch.stack([a.flatten(), b.flatten(), torch.full((N_PAIRS,), EQUALS)], dim=1)


def train_test_split(frac_train: float = 0.5, seed: int = 0) -> torch.Tensor:
    """is_train [A, B] (bool), the grokking code's split: shuffle the pairs with ``random.seed(seed)`` and take
    the first ``int(frac_train * 12769)``. The challenge does not say which split it used; with seed 0 the
    published model makes 19 of its 174 mistakes on the train half, so this is probably it."""
    if not 0 < frac_train < 1:
        raise InputError(f"frac_train must be between 0 and 1, got {frac_train}")
    pairs = [(a, b) for a in range(P) for b in range(P)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    is_train = torch.zeros(P, P, dtype=torch.bool)
    train = torch.tensor(pairs[: int(frac_train * N_PAIRS)])
    is_train[train[:, 0], train[:, 1]] = True
    return is_train


def casper_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """The challenge's "accuracy on the test half": ``1 - 2 * mean|predicted - truth|`` over all pairs. It equals
    test accuracy only if every mistake lies in the test half."""
    return 1.0 - 2.0 * (predicted.long() != truth.long()).double().mean().item()


@dataclass(frozen=True)
class PairLabels:
    """The published labels: ``labels`` (ground truth) and ``model_labels`` (the original model's), [A, B] long."""

    labels: torch.Tensor
    model_labels: torch.Tensor


def load_labels(
    path: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> PairLabels:
    """The challenge's `transformer_label_info.pkl`, found and checked by `workbench.casper.data` (a path, a
    data_dir, $WORKBENCH_CASPER_DIR, the cache, or a download)."""
    info = data.load_transformer_labels(path=path, data_dir=data_dir, download=download)
    return PairLabels(*(torch.as_tensor(info[k]).long() for k in ("labels", "model_labels")))


def row_transitions(labels: torch.Tensor) -> torch.Tensor:
    """Label changes along B in each row A: [A] long (the published labels have at most two per row)."""
    return (labels[:, 1:] != labels[:, :-1]).sum(dim=1)
