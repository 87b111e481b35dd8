"""Text sets for calibration, previews, evaluation and fine-tuning: token rows of equal length.

Every engine here takes either a LongTensor [row, pos] of token ids or a list of documents (strings), which are
packed into rows of `seq_len` tokens with ``<|endoftext|>`` before each document (`workbench.tasks.pack`), as
GPT-2-style language-model training data is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.errors import InputError
from workbench.tasks import pack

DEFAULT_SEQ_LEN = 128


def text_tokens(
    model, data: torch.Tensor | Sequence[str], *, seq_len: int | None = None, n_rows: int | None = None
) -> torch.Tensor:
    """[row, pos] token ids from a token tensor (checked) or from documents (packed)."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data.unsqueeze(0)
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError("Token data must be an integer tensor of shape [row, pos].")
        if data.shape[0] == 0 or data.shape[1] < 2:
            raise InputError(
                f"Token data of shape {tuple(data.shape)} is too small: give at least one row of 2 tokens."
            )
        cfg = getattr(model, "cfg", None)
        if cfg is not None:
            if int(data.max()) >= cfg.d_vocab or int(data.min()) < 0:
                raise InputError(f"Token ids must lie in 0..{cfg.d_vocab - 1} for {model.name}.")
            if data.shape[1] > cfg.n_ctx:
                raise InputError(
                    f"Rows of {data.shape[1]} tokens are longer than {model.name}'s context of {cfg.n_ctx}; "
                    "cut them (tokens[:, :n_ctx])."
                )
        rows = data.long()
        return rows[:n_rows] if n_rows is not None else rows
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or not data or not all(isinstance(d, str) for d in data):
        raise InputError("Give the text set as a list of documents (strings) or as token ids [row, pos].")
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"{model.name} has no tokenizer; pass token ids [row, pos] instead of text.")

    n_ctx = model.cfg.n_ctx if getattr(model, "cfg", None) is not None else DEFAULT_SEQ_LEN
    seq_len = min(seq_len or DEFAULT_SEQ_LEN, n_ctx)
    return pack(model, list(data), seq_len, n_rows)


def eot_id(model, override: int | None = None) -> int | None:
    """The end-of-text token id (GPT-2's ``<|endoftext|>``), or None when the model has no tokenizer."""
    if override is not None:
        return int(override)
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return None


def eot_mask(tokens: torch.Tensor, eot: int | None) -> torch.Tensor:
    """[row, pos] bool: where the token is end-of-text."""
    if eot is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == eot
