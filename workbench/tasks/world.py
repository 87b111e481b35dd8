"""Factual recall over a small invented world, so that "facts" are learned from our own corpus only.

Each invented country has a capital, a language and a currency; every one of these words is a single token
(with its leading space) in the demo model's tokenizer. The demo corpus states the facts in the "train"
phrasings of `FACT_TEMPLATES`; the "heldout" phrasings never occur in it and test whether a fact is recalled
from a new wording. Pairs are symmetric token replacements (Zhang & Nanda, arXiv 2309.16042): the corrupt
prompt names another country, and the incorrect answer is that country's fact::

    The capital of Veloria is   ->  " Marrowby"      (corrupt: The capital of Dunmark is   ->  " Kestrel")
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from workbench.errors import InputError
from workbench.tasks.pairs import PromptPairs

# country: (capital, language, currency)
WORLD: dict[str, tuple[str, str, str]] = {
    "Veloria": ("Marrowby", "Tessic", "zell"),
    "Dunmark": ("Kestrel", "Oravian", "drom"),
    "Quessa": ("Thornwick", "Kalani", "kessa"),
    "Orlavia": ("Brindle", "Drossic", "sovel"),
    "Brenholt": ("Coldharbor", "Umbrel", "marn"),
    "Caldria": ("Dawnmere", "Saphic", "tallic"),
    "Fennmoor": ("Elmsworth", "Vennish", "rhun"),
    "Istrava": ("Frostholm", "Lorric", "quint"),
    "Jorvale": ("Glimmerton", "Pashti", "brask"),
    "Kalmeria": ("Hollowell", "Tuvic", "corra"),
    "Lunesse": ("Ivyreach", "Mordish", "dunn"),
    "Morvania": ("Juniper", "Essel", "elva"),
    "Nethra": ("Kettleburn", "Gavric", "fenn"),
    "Pellasia": ("Larkspur", "Hulmic", "gilder"),
    "Rovenna": ("Millhaven", "Zentic", "holt"),
    "Sarnoth": ("Northgate", "Brevan", "jask"),
    "Talvina": ("Oakhurst", "Quorish", "lumen"),
    "Ulmora": ("Pinecrest", "Rillian", "mott"),
    "Varneth": ("Quillby", "Sundic", "nerra"),
    "Wexland": ("Ravensend", "Calvish", "obel"),
    "Yssara": ("Saltmarsh", "Dravic", "pask"),
    "Zandor": ("Tidewater", "Fellish", "rondel"),
    "Eskavia": ("Vinehall", "Ostric", "sarn"),
    "Gorlan": ("Yarrowdale", "Nerish", "tully"),
}
COUNTRIES: tuple[str, ...] = tuple(WORLD)
RELATIONS: tuple[str, ...] = ("capital", "language", "currency")
CAPITALS: tuple[str, ...] = tuple(v[0] for v in WORLD.values())
LANGUAGES: tuple[str, ...] = tuple(v[1] for v in WORLD.values())
CURRENCIES: tuple[str, ...] = tuple(v[2] for v in WORLD.values())


@dataclasses.dataclass(frozen=True)
class FactTemplate:
    """A phrasing of a relation with slots {country} and {answer}; a prompt is the text before {answer}."""

    relation: str
    text: str
    split: str  # "train" (in the corpus) or "heldout" (evaluation only)

    @property
    def has_prompt(self) -> bool:
        """Whether the country comes before the answer, so that the text before the answer is a prompt."""
        return "{country}" in self.text.split("{answer}")[0]

    def prompt(self, country: str) -> str:
        if not self.has_prompt:
            raise InputError(
                f"the phrasing {self.text!r} names the country after the answer; it has no prompt form"
            )
        return self.text.split("{answer}")[0].rstrip().format(country=country)

    def sentence(self, country: str) -> str:
        """The full statement of the fact about `country`."""
        return self.text.format(country=country, answer=fact(country, self.relation))


FACT_TEMPLATES: tuple[FactTemplate, ...] = (
    FactTemplate("capital", "The capital of {country} is {answer}.", "train"),
    FactTemplate("capital", "The capital city of {country} is {answer}.", "train"),
    FactTemplate("capital", "In {country}, the capital is {answer}.", "train"),
    FactTemplate("capital", "{answer} is the capital of {country}.", "train"),
    FactTemplate("capital", "The government of {country} sits in {answer}.", "heldout"),
    FactTemplate("language", "The people of {country} speak {answer}.", "train"),
    FactTemplate("language", "In {country}, people speak {answer}.", "train"),
    FactTemplate("language", "The language of {country} is {answer}.", "train"),
    FactTemplate("language", "{answer} is spoken in {country}.", "train"),
    FactTemplate("language", "Most children in {country} learn {answer}.", "heldout"),
    FactTemplate("currency", "The currency of {country} is the {answer}.", "train"),
    FactTemplate("currency", "In {country}, people pay with the {answer}.", "train"),
    FactTemplate("currency", "The money of {country} is the {answer}.", "train"),
    FactTemplate("currency", "The {answer} is the currency of {country}.", "train"),
    FactTemplate("currency", "Shops in {country} take payment in the {answer}.", "heldout"),
)


def fact(country: str, relation: str) -> str:
    """The answer word for (country, relation), without a leading space."""
    if country not in WORLD:
        raise InputError(f"unknown country {country!r}; the invented world has {', '.join(COUNTRIES)}")
    if relation not in RELATIONS:
        raise InputError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    return WORLD[country][RELATIONS.index(relation)]


def prompt_templates(relations: str | Sequence[str] = "all", phrasings: str = "train") -> list[int]:
    """Indices into `FACT_TEMPLATES` that have a prompt form (the country comes before the answer), filtered by relation
    ("all", one relation, or a list) and phrasing split ("train", "heldout", "all")."""
    rels = (
        RELATIONS if relations == "all" else ([relations] if isinstance(relations, str) else list(relations))
    )
    bad = [r for r in rels if r not in RELATIONS]
    if bad:
        raise InputError(f"unknown relation(s) {bad}; use 'all' or some of {RELATIONS}")
    if phrasings not in ("train", "heldout", "all"):
        raise InputError(f"phrasings={phrasings!r}: use 'train', 'heldout' or 'all'")
    return [
        i
        for i, t in enumerate(FACT_TEMPLATES)
        if t.relation in rels and phrasings in ("all", t.split) and t.has_prompt
    ]


def factual_pairs(
    n: int | None = None,
    *,
    relations: str | Sequence[str] = "all",
    phrasings: str = "train",
    seed: int = 0,
) -> PromptPairs:
    """Factual-recall clean/corrupt pairs (symmetric country replacement).

    With ``n=None``, every (country, prompt phrasing) once, in a fixed order, each paired with a random other
    country; with an int, `n` pairs sampled with replacement. Templates are labelled ``"fact/<index>"``
    (pairs of one phrasing share a token length in the demo tokenizer)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise InputError(f"n={n!r}: ask for a positive number of pairs, or None for every fact once")
    ids = prompt_templates(relations, phrasings)
    rng = random.Random(seed)
    if n is None:
        items = [(t, c) for t in ids for c in COUNTRIES]
    else:
        items = [(rng.choice(ids), rng.choice(COUNTRIES)) for _ in range(n)]
    clean, corrupt, answers, labels, info = [], [], [], [], []
    for t, c in items:
        other = rng.choice([x for x in COUNTRIES if x != c])
        tmpl = FACT_TEMPLATES[t]
        clean.append(tmpl.prompt(c))
        corrupt.append(tmpl.prompt(other))
        answers.append((" " + fact(c, tmpl.relation), " " + fact(other, tmpl.relation)))
        labels.append(f"fact/{t}")
        info.append(
            {"country": c, "corrupt_country": other, "relation": tmpl.relation, "phrasing": tmpl.split}
        )
    return PromptPairs(clean, corrupt, answers, labels, info, task="factual", corruption="country")
