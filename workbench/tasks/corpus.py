"""Text corpora: the bundled demo corpus (generated, seeded) and a loader for real corpora.

The demo corpus is what the demo model is trained on and what calibration or loss evaluation on it should
use. Each document is one of: an IOI story (half on train templates, half composed from openings, scenes and
actions so that the model learns the task rather than the templates' wording; train name pairs only; with the
answer), a few facts about the invented world (train phrasings only), or a short narrative paragraph from a
small grammar whose people, places and things overlap with the tasks. Held-out IOI templates, held-out name
pairs and held-out fact phrasings never occur in it. The train and validation splits are drawn from the same
mixture with different fixed seeds; any prefix of a split is reproducible (``demo_corpus("train", 100)`` is the
start of ``demo_corpus("train", 1000)``).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from workbench.errors import InputError, WorkbenchError
from workbench.tasks import ioi, world
from workbench.tasks.pairs import as_tokenizer

# datasets is imported where a real corpus is loaded: it is optional and slow to import.

SPLIT_SEEDS = {"train": 0, "validation": 1}
MIXTURE = {"ioi": 0.4, "facts": 0.15, "story": 0.45}
"""Fraction of documents of each kind."""

ADJECTIVES = (
    "old", "new", "small", "big", "red", "blue", "green", "quiet", "bright", "heavy", "warm", "cold",
    "dark", "tall", "busy", "happy", "tired", "clever", "strange", "empty", "wooden", "famous", "little",
    "young", "careful", "friendly", "hungry",
)  # fmt: skip
PEOPLE = (
    "the farmer", "the old man", "a young woman", "the teacher", "the children", "my brother", "her sister",
    "the doctor", "the captain", "the baker", "our neighbour", "the king", "the queen", "a stranger",
    "the driver", "the students", "his father", "their mother", "the painter", "the guard",
)  # fmt: skip
ANIMALS = ("a small dog", "the cat", "an old horse", "a bird", "the goat", "two ducks", "a fox", "the sheep")
NOUNS = (
    "map", "lamp", "chair", "window", "door", "basket", "coat", "hat", "boat", "cart", "box", "song",
    "story", "garden", "river", "bridge", "road", "tree", "apple", "bread", "cup", "table", "picture",
    "candle", "clock", "blanket", "shoe", "letter", "book", "key", "ball", "cake", "bag", "ticket", "ring",
)  # fmt: skip
VERBS_T = (
    "found", "carried", "painted", "sold", "bought", "cleaned", "fixed", "opened", "watched", "lost",
    "borrowed", "cooked", "built", "washed", "read", "wrote", "dropped", "hid", "picked up", "moved",
    "brought", "offered", "lent",
)  # fmt: skip
VERBS_I = (
    "slept", "laughed", "waited", "smiled", "arrived early", "walked home", "sang quietly", "sat down",
    "ran away", "stayed inside", "worked late", "woke up", "looked around", "listened carefully",
)  # fmt: skip
TIMES = (
    "In the morning,", "Later that week,", "On Sunday,", "Before dinner,", "At noon,", "That evening,",
    "Every summer,", "Last winter,", "After the rain,", "The next day,", "At night,", "Once,",
)  # fmt: skip
WEATHER = ("rainy", "sunny", "windy", "cold", "warm", "foggy", "snowy")
SAYINGS = (
    "Where is the {noun}?", "I like this {noun}.", "The {noun} is {adj}.", "Let us go to the {place}.",
    "Have you seen my {noun}?", "It is a {adj} day.", "We should leave now.", "Thank you for the {noun}.",
)  # fmt: skip
NUMBERS = ("two", "three", "four", "five", "six", "ten", "twelve", "2", "3", "5", "7", "10", "12", "20")


class _Writer:
    """Sentences for one document; a document keeps a small cast of names so names recur, as in real text."""

    def __init__(self, rng: random.Random, names: bool = True):
        self.rng = rng
        self.cast = rng.sample(ioi.NAMES, rng.randint(1, 3)) if names else []

    def pick(self, seq):
        return self.rng.choice(seq)

    def subject(self) -> str:
        r = self.rng.random()
        if self.cast and r < 0.5:
            return self.pick(self.cast)
        if r < 0.9:
            return self.pick(PEOPLE)
        return self.pick(ANIMALS)

    def thing(self) -> str:
        r = self.rng.random()
        noun = self.pick(NOUNS + ioi.OBJECTS)
        if r < 0.4:
            return f"the {self.pick(ADJECTIVES)} {noun}"
        if r < 0.7:
            return f"the {noun}"
        if r < 0.85:
            return f"{self.pick(NUMBERS)} {noun}s"
        adj = self.pick(ADJECTIVES)
        return f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {noun}"

    def where(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return f"{self.pick(('at', 'near', 'behind', 'inside'))} the {self.pick(ioi.PLACES)}"
        if r < 0.8:
            return f"in {self.pick(world.CAPITALS)}"
        return f"{self.pick(('by', 'across', 'along'))} the {self.pick(('river', 'bridge', 'road', 'hill'))}"

    def sentence(self) -> str:
        kind = self.rng.randrange(10)
        cap = _capitalise
        if kind == 0:
            return f"{self.pick(TIMES)} {self.subject()} {self.pick(VERBS_T)} {self.thing()} {self.where()}."
        if kind == 1:
            return cap(f"{self.subject()} {self.pick(VERBS_I)} {self.where()}.")
        if kind == 2:
            return cap(f"{self.subject()} {self.pick(VERBS_T)} {self.thing()}.")
        if kind == 3:
            return cap(
                f"{self.subject()} felt {self.pick(ADJECTIVES)} because {self.subject()} {self.pick(VERBS_I)}."
            )
        if kind == 4:
            city, other = self.rng.sample(world.CAPITALS, 2)
            return cap(f"{self.subject()} travelled from {city} to {other}.")
        if kind == 5:
            country = self.pick(world.COUNTRIES)
            capital, language, _ = world.WORLD[country]
            return cap(
                self.pick(
                    (
                        f"{self.subject()} lives in {capital}, in {country}.",
                        f"{self.subject()} learned {language} as a child.",
                        f"{self.subject()} wants to visit {country} next year.",
                    )
                )
            )
        if kind == 6:
            return f"It was {self.pick(WEATHER)} in {self.pick(world.CAPITALS)} that day."
        if kind == 7:
            said = self.pick(SAYINGS).format(
                noun=self.pick(NOUNS), adj=self.pick(ADJECTIVES), place=self.pick(ioi.PLACES)
            )
            return f'"{said}" said {self.subject()}.'
        if kind == 8:
            return cap(f"{self.subject()} and {self.subject()} {self.pick(VERBS_T)} {self.thing()} together.")
        # Words of the held-out IOI templates and fact phrasings, in other sentences: held-out prompts then test
        # new frames made of known words, not untrained embeddings.
        return cap(
            self.pick(
                (
                    f"Because it was {self.pick(WEATHER)}, {self.subject()} {self.pick(VERBS_I)}.",
                    f"As {self.subject()} {self.pick(VERBS_I)}, {self.subject()} {self.pick(VERBS_T)} {self.thing()}.",
                    f"{self.subject()} met {self.subject()} {self.where()}.",
                    f"The government met {self.where()}.",
                    f"{self.subject()} sits {self.where()} every day.",
                    f"Shops {self.where()} take coins.",
                    f"{self.subject()} made a payment for {self.thing()}.",
                    "Most of the students learn a new song every week.",
                )
            )
        )

    def paragraph(self, lo: int = 2, hi: int = 5) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


# Pieces of IOI stories beyond the fixed training templates: an opening, what the two people did at a place,
# and what the subject then gave. None of them is a held-out template's frame or verb, so the held-out templates
# stay new sentences; the variety makes the model learn the task rather than the training templates' wording.
IOI_OPENINGS = ("When", "After", "While", "Before", "Since", "Once", "Just after")
IOI_SCENES = (
    "{A} and {B} went to the {place}", "{A} and {B} were working at the {place}", "{A} and {B} arrived at the {place}",
    "{A} and {B} were walking to the {place}", "{A} and {B} visited the {place}", "{A} and {B} were at the {place}",
    "{A} and {B} cleaned the {place}", "{A} and {B} came back from the {place}", "{A} and {B} left the {place}",
    "{A} and {B} played in the {place}", "{A} and {B} cooked at the {place}", "{A} and {B} got a {object} at the {place}",
    "{A} and {B} were sitting in the {place}", "{A} and {B} found a {object} near the {place}",
)  # fmt: skip
IOI_ACTIONS = (
    "{S} gave a {object} to", "{S} handed the {object} to", "{S} passed a {object} to", "{S} threw a {object} to",
    "{S} sent a {object} to", "{S} mailed the {object} to", "{S} showed a {object} to", "{S} gave it to",
    "{S} decided to give a {object} to", "{S} wanted to give the {object} to", "{S} said to", "{S} waved to",
)  # fmt: skip


IOI_PLACE_FIRST = (
    "At the {place}",
    "In the {place}",
    "Outside the {place}",
    "Near the {place}",
    "Back at the {place}",
)
IOI_ACTIVITIES = (
    "talked for a while", "had lunch", "played a game", "looked around", "stood by the door", "sat together",
    "read the news", "worked all morning", "laughed a lot", "found a {object}", "cleaned up", "had a long talk",
)  # fmt: skip
IOI_LINKS = (". ", ", and ", ", and then ", ", so ", ". Later, ", ". After that, ")


def _ioi_story(rng: random.Random, io: str, s: str, order: str) -> str:
    """An IOI story put together from `IOI_OPENINGS`, `IOI_SCENES`, `IOI_PLACE_FIRST`, `IOI_ACTIVITIES` and
    `IOI_ACTIONS`, ending before the answer."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    fill = dict(A=a, B=b, S=s, place=rng.choice(ioi.PLACES), object=rng.choice(ioi.OBJECTS))
    action = rng.choice(IOI_ACTIONS).format(**fill)
    r = rng.random()
    if r < 0.35:
        where, what = rng.choice(IOI_PLACE_FIRST).format(**fill), rng.choice(IOI_ACTIVITIES).format(**fill)
        link = rng.choice(IOI_LINKS)
        return f"{where}, {a} and {b} {what}{link}{_capitalise(action) if link.startswith('.') else action}"
    scene = rng.choice(IOI_SCENES).format(**fill)
    if r < 0.75:
        return f"{rng.choice(IOI_OPENINGS)} {scene}, {action}"
    return f"{_capitalise(scene)}{rng.choice(('. ', ', and then ', ', so '))}{action}"


def _ioi_document(rng: random.Random) -> str:
    io, s = rng.sample(rng.choice(ioi.NAME_PAIRS["train"]), 2)
    order = rng.choice(("ABBA", "BABA"))
    if rng.random() < 0.5:
        t = rng.choice(ioi.template_ids("train"))
        story = ioi.fill(t, io, s, order, rng.choice(ioi.PLACES), rng.choice(ioi.OBJECTS))
    else:
        story = _ioi_story(rng, io, s, order)
    text = f"{story} {io}."
    # Generic sentences around the story carry no names, so the story alone determines the answer.
    if rng.random() < 0.3:
        text = _Writer(rng, names=False).sentence() + " " + text
    if rng.random() < 0.5:
        text += " " + _Writer(rng, names=False).sentence()
    return text


def _fact_document(rng: random.Random) -> str:
    train = [t for t in world.FACT_TEMPLATES if t.split == "train"]
    facts = []
    for _ in range(rng.randint(1, 3)):
        t, c = rng.choice(train), rng.choice(world.COUNTRIES)
        facts.append(_capitalise(t.sentence(c)))
    return " ".join(facts)


def demo_corpus(split: str = "train", n_docs: int = 10_000) -> list[str]:
    """`n_docs` documents of the demo corpus's ``"train"`` or ``"validation"`` split (strings)."""
    if split not in SPLIT_SEEDS:
        raise InputError(f"split={split!r}: the demo corpus has splits {tuple(SPLIT_SEEDS)}")
    if not isinstance(n_docs, int) or n_docs < 1:
        raise InputError(f"n_docs={n_docs!r}: ask for a positive number of documents")
    rng = random.Random(SPLIT_SEEDS[split])
    kinds, weights = list(MIXTURE), list(MIXTURE.values())
    docs = []
    for _ in range(n_docs):
        kind = rng.choices(kinds, weights)[0]
        if kind == "ioi":
            docs.append(_ioi_document(rng))
        elif kind == "facts":
            docs.append(_fact_document(rng))
        else:
            docs.append(_Writer(rng).paragraph())
    return docs


def pack(model_or_tokenizer: Any, docs: list[str], seq_len: int, n_rows: int | None = None) -> torch.Tensor:
    """Documents as [row, seq_len] token ids for language modelling.

    Every document is preceded by the BOS/EOS token (``<|endoftext|>``); a row starts at a document boundary
    (so position 0 is always BOS, as in the prompts) and is filled with whole documents, the last one cut at
    ``seq_len``. Stops after `n_rows` rows when given."""
    tok = as_tokenizer(model_or_tokenizer)
    bos = tok.bos_token_id
    if bos is None:
        raise InputError("this tokenizer has no BOS token to separate documents with")
    if seq_len < 2:
        raise InputError(f"seq_len={seq_len}: rows need at least 2 tokens")
    rows, row = [], []
    for ids in tok(docs, add_special_tokens=False).input_ids:
        row += [bos, *ids]
        if len(row) >= seq_len:
            rows.append(row[:seq_len])
            row = []
            if n_rows is not None and len(rows) >= n_rows:
                break
    if not rows:
        raise InputError(f"the documents give fewer than {seq_len} tokens; pass more documents")
    return torch.tensor(rows, dtype=torch.long)


REAL_CORPORA = {
    "openwebtext": ("Skylion007/openwebtext", "text"),
    "pile": ("monology/pile-uncopyrighted", "text"),
}
"""Short names for real corpora on the Hugging Face hub: (dataset id, text column)."""


def load_corpus(
    name: str, split: str = "train", n_docs: int = 1_000, text_column: str | None = None, **load_kwargs: Any
) -> list[str]:
    """The first `n_docs` documents of a real corpus through the `datasets` library (streamed).

    name: "openwebtext", "pile", or any dataset id on the hub (give its `text_column` if it is not "text").
    Needs the optional `datasets` package and access to the hub (or its local cache). Raises `WorkbenchError`
    with what to do when either is missing."""
    if not isinstance(n_docs, int) or n_docs < 1:
        raise InputError(f"n_docs={n_docs!r}: ask for a positive number of documents")
    if name in REAL_CORPORA:
        dataset_id, column = REAL_CORPORA[name]
    elif isinstance(name, str) and "/" in name:
        dataset_id, column = name, "text"
    else:
        raise InputError(
            f"unknown corpus {name!r}: use one of {sorted(REAL_CORPORA)} or a hub dataset id like 'owner/name', "
            "or demo_corpus() for the bundled corpus"
        )
    column = text_column or column
    try:
        import datasets
    except ImportError as err:
        raise WorkbenchError(
            f"loading {name!r} needs the `datasets` package, which is not installed: `pip install datasets` "
            "(or use demo_corpus(), which needs nothing)"
        ) from err
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True, **load_kwargs)
        docs = []
        for row in stream:
            docs.append(row[column])
            if len(docs) >= n_docs:
                break
    except KeyError as err:
        raise InputError(f"dataset {dataset_id!r} has no column {column!r}; pass text_column=...") from err
    except Exception as err:
        raise WorkbenchError(
            f"could not load {dataset_id!r} (split {split!r}) through `datasets`: {type(err).__name__}: {err}. "
            "It needs the Hugging Face hub (check the network and that HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are "
            "unset) or a local copy in the datasets cache; demo_corpus() works offline"
        ) from err
    return docs
