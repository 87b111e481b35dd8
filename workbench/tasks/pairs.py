"""Clean/corrupt prompt pairs, the unit every patching experiment consumes.

A `PromptPairs` holds strings only, so one set can be tokenised for any model. `.tokens(model_or_tokenizer)`
turns it into tensors with the same beginning-of-sequence rule as `WorkbenchModel.to_tokens`: the tokenizer's
BOS token (``<|endoftext|>`` for GPT-2-style tokenizers) is prepended when the tokenizer has one and does not
add it itself, as TransformerLens does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from workbench.errors import InputError
from workbench.models import tokens


def as_tokenizer(model_or_tokenizer: Any) -> Any:
    """The tokenizer of a workbench/nnsight/HF model, or the argument itself when it is a tokenizer."""
    if hasattr(model_or_tokenizer, "convert_ids_to_tokens"):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        return tok
    raise InputError(
        f"expected a model with a .tokenizer or a Hugging Face tokenizer, got {type(model_or_tokenizer).__name__}; "
        "pass e.g. load_model('demo') or AutoTokenizer.from_pretrained(...)"
    )


def encode(model_or_tokenizer: Any, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of one text, with BOS first, exactly as `WorkbenchModel.to_tokens` gives them."""
    return tokens.encode(as_tokenizer(model_or_tokenizer), text, prepend_bos)


def single_token_id(model_or_tokenizer: Any, answer: str) -> int:
    """The id of an answer that must be exactly one token (e.g. ``" Mary"``, with its leading space)."""
    tok = as_tokenizer(model_or_tokenizer)
    ids = tok(answer, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tok.convert_ids_to_tokens(ids)
        raise InputError(
            f"answer {answer!r} is {len(ids)} tokens {pieces} for this tokenizer, not one; choose answers that are "
            "single tokens (mind the leading space) or use a model whose tokenizer has them"
        )
    return ids[0]


class PairTokens(NamedTuple):
    """Tokenised pairs: ``clean`` and ``corrupt`` [pair, pos] (BOS first), ``answers`` [pair, 2] = (correct,
    incorrect) ids for the clean prompt."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answers: torch.Tensor


@dataclasses.dataclass(frozen=True)
class PromptPairs:
    """Clean/corrupt prompt pairs with their answers.

    ``answers[i] = (correct, incorrect)`` are the clean prompt's next-token answers (strings with their leading
    space); a logit difference is ``logit[correct] - logit[incorrect]``. ``template[i]`` labels the prompt frame
    (e.g. ``"ioi/3"``): pairs sharing a template share a token length when the fillers are single tokens.
    ``info[i]`` holds the per-pair details (names, place, order, ...).
    """

    clean: tuple[str, ...]
    corrupt: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]
    template: tuple[str, ...]
    info: tuple[dict[str, Any], ...]
    task: str = ""
    corruption: str = ""

    def __post_init__(self):
        for name in ("clean", "corrupt", "answers", "template", "info"):  # lists given: kept as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.clean)
        if not (len(self.corrupt) == len(self.answers) == len(self.template) == len(self.info) == n):
            raise InputError(
                f"PromptPairs fields have different lengths: clean {n}, corrupt {len(self.corrupt)}, "
                f"answers {len(self.answers)}, template {len(self.template)}, info {len(self.info)}"
            )

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: int | slice | Sequence[int]) -> PromptPairs:
        """A subset as a new `PromptPairs` (an int gives a set of one pair)."""
        if isinstance(index, int):
            idx = [range(len(self))[index]]
        elif isinstance(index, slice):
            idx = list(range(len(self)))[index]
        else:
            idx = [range(len(self))[int(i)] for i in index]
        return dataclasses.replace(
            self,
            clean=tuple(self.clean[i] for i in idx),
            corrupt=tuple(self.corrupt[i] for i in idx),
            answers=tuple(self.answers[i] for i in idx),
            template=tuple(self.template[i] for i in idx),
            info=tuple(self.info[i] for i in idx),
        )

    def __repr__(self) -> str:
        first = f"{self.clean[0]!r} -> {self.answers[0][0]!r}" if len(self) else "empty"
        return f"PromptPairs({self.task or 'pairs'}, n={len(self)}, corruption={self.corruption!r}, e.g. {first})"

    def by_template(self) -> dict[str, PromptPairs]:
        """The pairs grouped by template label, in first-seen order."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.template):
            groups.setdefault(t, []).append(i)
        return {t: self[idx] for t, idx in groups.items()}

    def by_length(self, model_or_tokenizer: Any) -> dict[int, PromptPairs]:
        """The pairs grouped by token length of the clean prompt (BOS included), shortest first.

        Pairs whose corrupt prompt has a different length from the clean one are left out (they cannot be
        patched position by position)."""
        groups: dict[int, list[int]] = {}
        for i, (c, k) in enumerate(zip(self.clean, self.corrupt)):
            n = len(encode(model_or_tokenizer, c))
            if n == len(encode(model_or_tokenizer, k)):
                groups.setdefault(n, []).append(i)
        return {n: self[groups[n]] for n in sorted(groups)}

    def tokens(self, model_or_tokenizer: Any) -> PairTokens:
        """Token ids: clean and corrupt [pair, pos] and answers [pair, 2].

        Raises `InputError` when a corrupt prompt's length differs from its clean prompt's, when the pairs
        do not all share one length (select one template, or use `.by_length`), or when an answer is not a
        single token."""
        if not len(self):
            raise InputError("this PromptPairs is empty; ask for at least one pair")
        clean = [encode(model_or_tokenizer, t) for t in self.clean]
        corrupt = [encode(model_or_tokenizer, t) for t in self.corrupt]
        for i, (c, k) in enumerate(zip(clean, corrupt)):
            if len(c) != len(k):
                raise InputError(
                    f"pair {i}: the clean prompt is {len(c)} tokens and the corrupt prompt {len(k)} "
                    f"({self.clean[i]!r} vs {self.corrupt[i]!r}); patching needs equal lengths: use names and "
                    "fillers that are single tokens for this tokenizer"
                )
        lengths = sorted({len(c) for c in clean})
        if len(lengths) > 1:
            raise InputError(
                f"the pairs have token lengths {lengths}; a batch needs one length: select one template "
                "(e.g. ioi_pairs(..., templates=0)) or pick a group from pairs.by_length(tokenizer)"
            )
        answers = [[single_token_id(model_or_tokenizer, a) for a in pair] for pair in self.answers]
        return PairTokens(
            clean=torch.tensor(clean, dtype=torch.long),
            corrupt=torch.tensor(corrupt, dtype=torch.long),
            answers=torch.tensor(answers, dtype=torch.long),
        )
