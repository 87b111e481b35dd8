"""Prompt sets and text corpora: IOI pairs, factual recall over an invented world, induction sequences, and the
demo corpus (plus a loader for real corpora).

Everything is seeded and returned as strings plus tokens, for any tokenizer::

    from workbench.tasks import ioi_pairs
    pairs = ioi_pairs(8, templates=0)                  # one template: one token length, ready to patch
    toks = pairs.tokens(model)                         # clean/corrupt [pair, pos], answers [pair, 2]
"""

from workbench.tasks import ioi, world
from workbench.tasks.corpus import REAL_CORPORA, demo_corpus, load_corpus, pack
from workbench.tasks.induction import InductionSequences, induction_sequences
from workbench.tasks.ioi import NAME_PAIRS, NAMES, OBJECTS, PLACES, TEMPLATES, ioi_pairs
from workbench.tasks.pairs import PairTokens, PromptPairs, encode, single_token_id
from workbench.tasks.world import FACT_TEMPLATES, WORLD, factual_pairs

__all__ = [
    "FACT_TEMPLATES",
    "NAMES",
    "NAME_PAIRS",
    "OBJECTS",
    "PLACES",
    "REAL_CORPORA",
    "TEMPLATES",
    "WORLD",
    "InductionSequences",
    "PairTokens",
    "PromptPairs",
    "demo_corpus",
    "encode",
    "factual_pairs",
    "induction_sequences",
    "ioi_pairs",
    "load_corpus",
    "pack",
    "single_token_id",
]


def single_token_words() -> list[str]:
    """Every word the tasks need as one token (with its leading space): names, places, objects, and the
    invented world's countries, capitals, languages and currencies."""
    words = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *world.COUNTRIES, *world.CAPITALS, *world.LANGUAGES]
    return [" " + w for w in (*words, *world.CURRENCIES)]
