"""Indirect-object identification (IOI) prompt pairs, after Wang et al. (arXiv 2211.00593).

A prompt names two people, repeats one of them (the subject S), and ends where the other one (the indirect
object IO) is the natural next word::

    When Mary and John went to the store, John gave a drink to   ->  " Mary" (correct), " John" (incorrect)

The names before the repeat come in either order ("ABBA": IO first, "BABA": S first). Corruptions keep the
token length: ``"swap"`` exchanges the two names everywhere (the answer flips to the other name) and
``"abc"`` replaces IO, S and the repeated S by three other distinct names (the prompt no longer says who the
answer is). Templates and unordered name pairs are split into train and held-out sets; every name occurs in
both, so a held-out pair tests the mechanism rather than an untrained name embedding. All names, places and
objects are single tokens (with their leading space) in the demo model's tokenizer, so all prompts of one
template share a token length, and the names are common English first names (single tokens in GPT-2 as well).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence

from workbench.errors import InputError
from workbench.tasks.pairs import PromptPairs

NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Andrew", "Anna", "Arthur", "Brian",
    "Charles", "Daniel", "David", "Edward", "Emily", "Eric", "Frank", "George", "Henry", "Jack",
    "Jacob", "James", "Jane", "Jason", "John", "Kate", "Kevin", "Laura", "Lisa", "Luke",
    "Mark", "Martin", "Mary", "Michael", "Paul", "Peter", "Rachel", "Robert", "Ryan", "Sarah",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "market",
    "library", "beach",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "ring", "bone", "computer", "drink", "snack", "book", "letter", "ball", "cake", "key", "bag", "ticket",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt frame with slots {A} {B} (the two names, in order), {S} (the repeated subject), {place},
    {object}. The prompt ends right before the answer."""

    text: str
    split: str  # "train" or "heldout"


TEMPLATES: tuple[Template, ...] = (
    tuple(
        Template(t, "train")
        for t in (
            "When {A} and {B} went to the {place}, {S} gave a {object} to",
            "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
            "After {A} and {B} went to the {place}, {S} gave a {object} to",
            "Then, {A} and {B} were working at the {place}. {S} decided to give a {object} to",
            "Then, {A} and {B} had a long argument, and afterwards {S} said to",
            "While {A} and {B} were walking to the {place}, {S} handed a {object} to",
            "After the lunch, {A} and {B} went to the {place}. {S} gave a {object} to",
            "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
            "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
            "The {place} was busy when {A} and {B} arrived, so {S} passed the {object} to",
            "Yesterday {A} and {B} cleaned the {place}, and then {S} threw a {object} to",
            "When {A} and {B} arrived at the {place}, {S} sent a {object} to",
            "Once {A} and {B} had left the {place}, {S} mailed a {object} to",
            "In the morning {A} and {B} visited the {place}, where {S} showed a {object} to",
            "When {A} and {B} were at the {place}, {S} wanted to give a {object} to",
            "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {object} to",
        )
    )
    + tuple(
        Template(t, "heldout")
        for t in (
            "Later that day, {A} and {B} met at the {place}, and {S} brought a {object} to",
            "Because {A} and {B} were hungry at the {place}, {S} offered a {object} to",
            "As {A} and {B} waited at the {place}, {S} lent a {object} to",
            "After a long day at the {place}, {A} and {B} sat down, and {S} passed a {object} to",
            "Then, {A} and {B} walked home from the {place}. {S} gave the {object} to",
        )
    )
    + tuple(
        # More training frames (after the held-out ones, so that template indices above stay as they were).
        Template(t, "train")
        for t in (
            "When {A} and {B} came back from the {place}, {S} gave a {object} to",
            "Before {A} and {B} left the {place}, {S} handed a {object} to",
            "Since {A} and {B} were tired at the {place}, {S} gave the {object} to",
            "At the {place}, {A} and {B} found a {object}, and {S} gave it to",
            "{A} and {B} went to the {place}, and {S} sent a {object} to",
            "While {A} and {B} were sitting in the {place}, {S} passed a {object} to",
            "On Sunday {A} and {B} played in the {place}. {S} threw the {object} to",
            "That evening {A} and {B} cooked at the {place}, and {S} showed a {object} to",
            "When {A} and {B} got home from the {place}, {S} wanted to give a {object} to",
            "After {A} and {B} cleaned the {place}, {S} decided to hand a {object} to",
        )
    )
)

_PAIR_SPLIT_SEED = 11  # fixes which name combinations are held out; never change it (the demo model used it)
_HELDOUT_PAIR_FRACTION = 0.2


def _split_name_pairs() -> dict[str, tuple[tuple[str, str], ...]]:
    pairs = list(itertools.combinations(NAMES, 2))
    random.Random(_PAIR_SPLIT_SEED).shuffle(pairs)
    n_held = round(len(pairs) * _HELDOUT_PAIR_FRACTION)
    return {"heldout": tuple(sorted(pairs[:n_held])), "train": tuple(sorted(pairs[n_held:]))}


NAME_PAIRS: dict[str, tuple[tuple[str, str], ...]] = _split_name_pairs()
"""Unordered name pairs (alphabetical within a pair) by split: 80% train, 20% held out."""

CORRUPTIONS = ("swap", "abc")


def template_ids(templates: str | int | Sequence[int]) -> list[int]:
    """Indices into `TEMPLATES` for "train", "heldout", "all", one index, or a list of indices."""
    if isinstance(templates, str):
        if templates == "all":
            return list(range(len(TEMPLATES)))
        if templates in ("train", "heldout"):
            return [i for i, t in enumerate(TEMPLATES) if t.split == templates]
        raise InputError(f"templates={templates!r}: use 'train', 'heldout', 'all', or template indices")
    ids = [templates] if isinstance(templates, int) else list(templates)
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(TEMPLATES)]
    if bad or not ids:
        raise InputError(f"templates={templates!r}: template indices run from 0 to {len(TEMPLATES) - 1}")
    return ids


def _name_pool(name_pairs: str) -> tuple[tuple[str, str], ...]:
    if name_pairs == "all":
        return NAME_PAIRS["train"] + NAME_PAIRS["heldout"]
    if name_pairs not in NAME_PAIRS:
        raise InputError(f"name_pairs={name_pairs!r}: use 'train', 'heldout' or 'all'")
    return NAME_PAIRS[name_pairs]


def fill(template: int, io: str, s: str, order: str, place: str, obj: str, s2: str | None = None) -> str:
    """One prompt from template `template` with indirect object `io` and subject `s` (``s2`` overrides the
    repeated subject). ``order`` "ABBA" puts IO first, "BABA" puts S first."""
    if order not in ("ABBA", "BABA"):
        raise InputError(f"order={order!r}: use 'ABBA' (IO named first) or 'BABA' (subject named first)")
    a, b = (io, s) if order == "ABBA" else (s, io)
    return TEMPLATES[template].text.format(A=a, B=b, S=s if s2 is None else s2, place=place, object=obj)


def ioi_pairs(
    n: int,
    *,
    templates: str | int | Sequence[int] = "train",
    name_pairs: str = "train",
    corruption: str = "swap",
    order: str = "both",
    seed: int = 0,
) -> PromptPairs:
    """`n` IOI clean/corrupt pairs.

    templates: "train", "heldout", "all", or indices into `TEMPLATES` (cycled in order, so any `n` spreads
    evenly; one index gives pairs that all share a token length). name_pairs: "train", "heldout" or "all"
    (which unordered name combinations may appear). corruption: "swap" or "abc" (see the module docstring).
    order: "both" (ABBA and BABA alternate), "ABBA" or "BABA" (one order: every name role then sits at one
    position within a template). The same arguments always give the same pairs."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n={n!r}: ask for a positive number of pairs")
    if corruption not in CORRUPTIONS:
        raise InputError(f"corruption={corruption!r}: use one of {CORRUPTIONS}")
    if order not in ("both", "ABBA", "BABA"):
        raise InputError(
            f"order={order!r}: use 'both', 'ABBA' (IO named first) or 'BABA' (subject named first)"
        )
    orders = ("ABBA", "BABA") if order == "both" else (order,)
    ids = template_ids(templates)
    pool = _name_pool(name_pairs)
    rng = random.Random(seed)
    abc_rng = random.Random(f"abc/{seed}")  # own stream: the clean prompts do not depend on the corruption
    clean, corrupt, answers, labels, info = [], [], [], [], []
    for i in range(n):
        t = ids[i % len(ids)]
        o = orders[(i // len(ids)) % len(orders)]
        io, s = rng.sample(rng.choice(pool), 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        clean.append(fill(t, io, s, o, place, obj))
        if corruption == "swap":
            corrupt.append(fill(t, s, io, o, place, obj))
        else:
            x, y, z = abc_rng.sample([m for m in NAMES if m not in (io, s)], 3)
            corrupt.append(fill(t, x, y, o, place, obj, s2=z))
        answers.append((" " + io, " " + s))
        labels.append(f"ioi/{t}")
        info.append({"io": io, "s": s, "order": o, "template": t, "place": place, "object": obj})
    return PromptPairs(clean, corrupt, answers, labels, info, task="ioi", corruption=corruption)
