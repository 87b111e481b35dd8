"""Text to token ids, one way for the whole workbench: the tokenizer's plain ids (no special tokens of its own,
such as an EOS some tokenizers append), with the BOS token first when asked and not already there."""

from __future__ import annotations


def encode(tokenizer, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of `text`; BOS first when `prepend_bos` and the tokenizer has one (once: a text that starts
    with the BOS token, e.g. "<|endoftext|>When", keeps just that one)."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids
