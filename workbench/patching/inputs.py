"""Checking and normalising what a user asks to patch: prompt pairs, answers, sites, layers, positions, heads.

Every check raises an `InputError` (or `SiteError`) whose message says what was wrong and how to fix it, before
any model runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from workbench.core import selectors
from workbench.errors import InputError, SiteError, UnsupportedModelError
from workbench.models.model import WorkbenchModel

BLOCK_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("z", "pattern")
SITE_LABELS = {
    "resid_pre": "residual stream entering the block (resid_pre)",
    "resid_mid": "residual stream between attention and MLP (resid_mid)",
    "resid_post": "residual stream leaving the block (resid_post)",
    "attn_out": "attention output (attn_out)",
    "mlp_out": "MLP output (mlp_out)",
    "z": "head output (z)",
    "pattern": "attention pattern per head (pattern)",
}
DIRECTIONS = ("denoising", "noising")


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Tokenised prompt pairs: clean/corrupt [pair, pos], answers [pair, 2] = (correct, incorrect) ids."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answers: torch.Tensor
    clean_tokens: tuple[tuple[str, ...], ...]
    corrupt_tokens: tuple[tuple[str, ...], ...]
    answer_tokens: tuple[tuple[str, str], ...]
    clean_text: tuple[str, ...] | None
    corrupt_text: tuple[str, ...] | None

    @property
    def n_pairs(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def prompts(self) -> dict[str, list]:
        """{"clean": [...], "corrupt": [...]} as plain data: the texts where the prompts were given as text, else
        the token ids."""
        if self.clean_text is not None:
            return {"clean": list(self.clean_text), "corrupt": list(self.corrupt_text)}
        return {"clean": self.clean.tolist(), "corrupt": self.corrupt.tolist()}

    def halves(self, direction: str) -> tuple[slice, slice]:
        """(base, source) halves of a [clean; corrupt] batch: the run that is patched in `direction`, and where the
        patches come from."""
        n = self.n_pairs
        clean, corrupt = slice(0, n), slice(n, 2 * n)
        return (corrupt, clean) if direction == "denoising" else (clean, corrupt)


def check_model(model, needs: str) -> None:
    """Refuse anything but a `WorkbenchModel` with standard sites; `needs` names what needs them ("Patching")."""
    if not isinstance(model, WorkbenchModel):
        raise InputError(
            f"Expected a WorkbenchModel, got {type(model).__name__}; wrap it first: "
            "model = workbench.models.load_model(model, tokenizer)."
        )
    if model.adapter is None:
        raise UnsupportedModelError(
            f"{needs} needs a transformer with standard sites; {model.name!r} is a plain module."
        )


def _as_list(x, what: str) -> list:
    if isinstance(x, str):
        return [x]
    if isinstance(x, Sequence) and len(x) and all(isinstance(t, str) for t in x):
        return list(x)
    raise InputError(f"`{what}` must be a prompt, a list of prompts, or a [pair, pos] token tensor.")


def _decode(model, ids: Sequence[int]) -> tuple[str, ...]:
    if model.tokenizer is None:
        return tuple(str(int(i)) for i in ids)
    return tuple(model.to_str_tokens(list(ids)))


def _tokens(model, x, what: str) -> tuple[list[list[int]], tuple[str, ...] | None]:
    if isinstance(x, torch.Tensor):
        return model.to_tokens(x).tolist(), None
    texts = _as_list(x, what)
    return [model.tokenize(t) for t in texts], tuple(texts)


def _length_error(model, i: int, c: list[int], k: list[int]) -> InputError:
    cs, ks = _decode(model, c), _decode(model, k)
    first = next((j for j, (a, b) in enumerate(zip(cs, ks)) if a != b), min(len(cs), len(ks)))
    at = (
        f"they first differ at position {first}: clean {cs[first]!r} vs corrupt {ks[first]!r}"
        if first < min(len(cs), len(ks))
        else f"one is a prefix of the other up to position {first}"
    )
    return InputError(
        f"Pair {i}: the clean prompt has {len(c)} tokens and the corrupt prompt {len(k)}; {at}. "
        f"Clean tokens: {list(cs)}; corrupt tokens: {list(ks)}. Patching swaps activations position by "
        "position, so both prompts need the same number of tokens: use replacement words that are single "
        "tokens (mind the leading space)."
    )


def _answer_id(model, a, i: int) -> int:
    if isinstance(a, (int,)) or (isinstance(a, torch.Tensor) and a.dim() == 0):
        a = int(a)
        if model.cfg is not None and not 0 <= a < model.cfg.d_vocab:
            raise InputError(f"Pair {i}: answer id {a} is outside the vocabulary 0..{model.cfg.d_vocab - 1}.")
        return a
    if not isinstance(a, str):
        raise InputError(f"Pair {i}: an answer must be a string such as ' Mary' or a token id, got {a!r}.")
    try:
        return model.to_single_token(a)
    except InputError as err:
        raise InputError(f"Pair {i}: {err}") from None


def prepare_pairs(model, clean, corrupt=None, answers=None) -> Pairs:
    """Tokenise and check prompt pairs.

    clean/corrupt: a prompt, a list of prompts, or [pair, pos] token tensors; or `clean` is a
    `workbench.tasks.PromptPairs` (then `corrupt` and `answers` come from it unless given).
    answers: (correct, incorrect) for all pairs, or one such pair per prompt pair, as strings (single tokens)
    or ids; or a [pair, 2] tensor.
    """
    if hasattr(clean, "clean") and hasattr(clean, "corrupt") and hasattr(clean, "answers"):
        corrupt = clean.corrupt if corrupt is None else corrupt
        answers = clean.answers if answers is None else answers
        clean = list(clean.clean)
    if corrupt is None:
        raise InputError("Give corrupt prompts: one per clean prompt, with the same number of tokens.")
    if answers is None:
        raise InputError(
            "Give answers=(correct, incorrect), e.g. (' Mary', ' John'): the clean prompt's answer and the "
            "corrupt prompt's answer, each a single token."
        )
    clean_ids, clean_text = _tokens(model, clean, "clean")
    corrupt_ids, corrupt_text = _tokens(model, corrupt, "corrupt")
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(
            f"{len(clean_ids)} clean prompts but {len(corrupt_ids)} corrupt prompts; give one corrupt prompt "
            "per clean prompt."
        )
    for i, (c, k) in enumerate(zip(clean_ids, corrupt_ids)):
        if len(c) != len(k):
            raise _length_error(model, i, c, k)
    lengths = sorted({len(c) for c in clean_ids})
    if len(lengths) > 1:
        detail = ", ".join(f"pair {i}: {len(c)}" for i, c in enumerate(clean_ids))
        raise InputError(
            f"All pairs of one sweep need the same token length ({detail}). Sweep each length separately "
            "(PromptPairs.by_length helps) or edit the prompts."
        )
    n = len(clean_ids)
    if isinstance(answers, torch.Tensor):
        if answers.dim() == 1:
            answers = answers.unsqueeze(0)
        if answers.dim() != 2 or answers.shape[1] != 2:
            raise InputError(
                f"answers as a tensor must be [pair, 2] (correct, incorrect); got {tuple(answers.shape)}."
            )
        answers = answers.tolist()
    answers = list(answers) if not isinstance(answers, (str, int)) else [answers]
    if len(answers) == 2 and all(isinstance(a, (str, int)) for a in answers):
        answers = [tuple(answers)] * n  # one (correct, incorrect) pair for every prompt pair
    if len(answers) != n or any(
        not isinstance(a, Sequence) or isinstance(a, str) or len(a) != 2 for a in answers
    ):
        raise InputError(
            f"answers must be (correct, incorrect) for all pairs or a list of {n} such tuples, "
            f"e.g. [(' Mary', ' John'), ...]; got {answers!r}."
        )
    ids = [[_answer_id(model, a, i) for a in pair] for i, pair in enumerate(answers)]
    for i, (a, b) in enumerate(ids):
        if a == b:
            raise InputError(
                f"Pair {i}: the correct and incorrect answers are the same token; the logit difference would "
                "be 0 everywhere. Give the clean answer and the corrupt prompt's answer."
            )
    clean_t = torch.tensor(clean_ids, dtype=torch.long)
    corrupt_t = torch.tensor(corrupt_ids, dtype=torch.long)
    if torch.equal(clean_t, corrupt_t):
        raise InputError(
            "The clean and corrupt prompts are identical, so every patch changes nothing. The corrupt prompt "
            "should differ in the tokens whose information you want to trace (e.g. swap the names)."
        )
    return Pairs(
        clean=clean_t,
        corrupt=corrupt_t,
        answers=torch.tensor(ids, dtype=torch.long),
        clean_tokens=tuple(_decode(model, c) for c in clean_ids),
        corrupt_tokens=tuple(_decode(model, c) for c in corrupt_ids),
        answer_tokens=tuple(
            tuple(a if isinstance(a, str) else _decode(model, [x])[0] for a, x in zip(given, pair))
            for given, pair in zip(answers, ids)
        ),
        clean_text=clean_text,
        corrupt_text=corrupt_text,
    )


def resolve_sites(model, site) -> tuple[str, ...]:
    """Site names to patch; all block-level or all per-head (one result has one set of axes)."""
    if site is None or not isinstance(site, (str, list, tuple)):
        raise SiteError(
            f"site={site!r}: give a site name such as 'resid_pre', or a list of them. Patchable sites: "
            f"{', '.join(BLOCK_SITES + HEAD_SITES)}."
        )
    sites = (site,) if isinstance(site, str) else tuple(site)
    if not sites:
        raise SiteError("site=[]: give at least one site, e.g. 'resid_pre'.")
    for s in sites:
        if s not in BLOCK_SITES and s not in HEAD_SITES:
            raise SiteError(
                f"Cannot patch site {s!r}. Patchable sites: {', '.join(BLOCK_SITES + HEAD_SITES)} "
                "('z' is each head's output, 'pattern' each head's attention pattern)."
            )
        model.check_site(s, 0)
    kinds = {s in HEAD_SITES for s in sites}
    if len(kinds) > 1:
        raise SiteError(
            f"sites {list(sites)} mix per-head sites (z, pattern) with block sites; sweep them separately "
            "(a result has either a head axis or none)."
        )
    if len(set(sites)) != len(sites):
        raise SiteError(f"site lists {list(sites)} a site twice.")
    return sites


def resolve_layers(model, layers) -> tuple[int, ...]:
    return selectors.resolve_layers(model.cfg.n_layers, layers, model_name=model.name)


def resolve_positions(positions, n_pos: int) -> tuple[tuple[int, ...], ...]:
    """Position groups: each entry is the positions patched together in one run (see
    `workbench.core.selectors`: "each", "together", "last", "all-but-first", positions, or groups such as
    [[3, 4], [9]]). The old spelling "all" still means "together"."""
    return selectors.resolve_positions(positions, n_pos, legacy_all="together")


def resolve_heads(model, heads, sites: tuple[str, ...]) -> tuple[int, ...] | None:
    if sites[0] not in HEAD_SITES:
        if heads is not None:
            raise SiteError(f"heads= applies to per-head sites (z, pattern), not to {', '.join(sites)}.")
        return None
    return selectors.resolve_heads(model.cfg.n_heads, heads, model_name=model.name)


def resolve_direction(direction: str) -> str:
    aliases = {"denoise": "denoising", "noise": "noising"}
    d = aliases.get(direction, direction)
    if d not in DIRECTIONS:
        raise InputError(
            f"direction={direction!r}: use 'denoising' (clean activations into the corrupt run: are they "
            "sufficient?) or 'noising' (corrupt activations into the clean run: are they necessary?)."
        )
    return d


def position_labels(pairs: Pairs, groups: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    """Axis labels: the index and the first pair's clean token ("clean/corrupt" where they differ)."""
    clean, corrupt = pairs.clean_tokens[0], pairs.corrupt_tokens[0]
    out = []
    for g in groups:
        if len(g) == pairs.n_pos and len(g) > 1:
            out.append("all")
        elif len(g) == 1:
            t = g[0]
            tok = clean[t] if clean[t] == corrupt[t] else f"{clean[t]}/{corrupt[t]}"
            out.append(f"{t}:{tok}")
        else:
            out.append(",".join(str(t) for t in g) + ":" + "".join(clean[t] for t in g))
    return tuple(out)
