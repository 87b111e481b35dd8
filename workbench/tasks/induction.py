"""Repeated random token sequences, the standard probe for induction heads (Olsson et al. 2022).

Each row is ``[BOS] r_1 .. r_L r_1 .. r_L`` with ``r`` drawn uniformly from the tokenizer's ordinary (non-special)
tokens. A model with induction heads predicts the second copy from the first: at position ``L + i`` it
predicts ``r_{i+1}``. The first half is unpredictable (chance is 1 / number of tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from workbench.errors import InputError
from workbench.tasks.pairs import as_tokenizer

HELDOUT_SEED = 1_000_003
"""Seed of the evaluation sequences. The demo model's training sequences use its training seed (0 by
default), so these are never seen in training."""


@dataclasses.dataclass(frozen=True)
class InductionSequences:
    """``tokens`` [seq, 1 + 2 * length] with BOS at position 0; ``length`` is L, the length of one copy."""

    tokens: torch.Tensor
    length: int
    strings: tuple[str, ...]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [L - 1], next tokens [seq, L - 1]) for the predictable part of the second copy: from
        position L + 1 on, where the previous token of the copy has already been seen twice."""
        pos = torch.arange(self.length + 1, 2 * self.length)
        return pos, self.tokens[:, pos + 1]


def ordinary_token_ids(model_or_tokenizer: Any) -> torch.Tensor:
    """Ids of every token that is not a special token, ascending."""
    tok = as_tokenizer(model_or_tokenizer)
    special = set(tok.all_special_ids)
    return torch.tensor([i for i in range(len(tok)) if i not in special], dtype=torch.long)


def repeated_tokens(
    vocab: torch.Tensor, n: int, length: int, bos_id: int, generator: torch.Generator
) -> torch.Tensor:
    """[n, 1 + 2 * length] rows of BOS + a random sequence over `vocab` (1-D ids) + the same sequence again."""
    half = vocab[torch.randint(len(vocab), (n, length), generator=generator)]
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), half, half], dim=1)


def induction_sequences(
    model_or_tokenizer: Any, n: int, length: int = 20, seed: int = HELDOUT_SEED
) -> InductionSequences:
    """`n` repeated random sequences of copy length `length`, seeded (the default seed gives the held-out
    evaluation set)."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n={n!r}: ask for a positive number of sequences")
    if not isinstance(length, int) or length < 2:
        raise InputError(f"length={length!r}: a copy needs at least 2 tokens for anything to be predictable")
    tok = as_tokenizer(model_or_tokenizer)
    if tok.bos_token_id is None:
        raise InputError("this tokenizer has no BOS token; induction sequences start with one")
    max_len = getattr(tok, "model_max_length", None)
    if isinstance(max_len, int) and 1 + 2 * length > max_len:
        raise InputError(f"length={length} gives {1 + 2 * length} tokens, more than the model's {max_len}")
    gen = torch.Generator().manual_seed(seed)
    tokens = repeated_tokens(ordinary_token_ids(tok), n, length, tok.bos_token_id, gen)
    strings = tuple(tok.decode(row[1:]) for row in tokens)
    return InductionSequences(tokens=tokens, length=length, strings=strings)
