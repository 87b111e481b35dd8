"""Task datasets: shapes, token lengths, seeds, train/held-out separation, error messages."""

from __future__ import annotations

import random
import re
import sys
import types

import pytest
import torch
from transformers import AutoTokenizer

from workbench.demo_model import DEMO_DIR
from workbench.errors import InputError, WorkbenchError
from workbench.tasks import (
    NAME_PAIRS,
    NAMES,
    TEMPLATES,
    PromptPairs,
    demo_corpus,
    encode,
    factual_pairs,
    induction_sequences,
    ioi_pairs,
    load_corpus,
    pack,
    single_token_id,
    single_token_words,
)
from workbench.tasks import corpus as corpus_mod
from workbench.tasks import ioi as ioi_mod
from workbench.tasks import world as world_mod
from workbench.tasks.induction import HELDOUT_SEED
from workbench.tasks.ioi import template_ids


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def train_docs():
    return demo_corpus("train", 6000)


# --- tokenizer and encoding -------------------------------------------------------------------------------


def test_task_words_are_single_tokens_with_leading_space(tok):
    words = single_token_words()
    assert len(words) == len(set(words))
    for w in words:
        assert w.startswith(" ")
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_encode_prepends_bos_once(tok):
    ids = encode(tok, "When Mary and John")
    assert ids[0] == tok.bos_token_id and tok.bos_token == "<|endoftext|>"
    assert ids[1:] == tok("When Mary and John", add_special_tokens=False).input_ids
    assert encode(tok, "<|endoftext|>When").count(tok.bos_token_id) == 1
    assert encode(tok, "When", prepend_bos=False)[0] != tok.bos_token_id


def test_model_or_tokenizer_argument(tok):
    class Wrapped:
        tokenizer = tok

    assert encode(Wrapped(), "hi") == encode(tok, "hi")
    with pytest.raises(InputError, match="tokenizer"):
        encode(object(), "hi")


# --- IOI --------------------------------------------------------------------------------------------------


def test_ioi_pairs_shapes_and_answers(tok):
    pairs = ioi_pairs(40, templates=0)
    assert len(pairs) == 40 and pairs.task == "ioi"
    toks = pairs.tokens(tok)
    assert toks.clean.shape == toks.corrupt.shape and toks.clean.shape[0] == 40
    assert toks.answers.shape == (40, 2)
    assert (toks.clean[:, 0] == tok.bos_token_id).all()
    for i, (io, s) in enumerate(pairs.answers):
        assert toks.answers[i].tolist() == [single_token_id(tok, io), single_token_id(tok, s)]
        assert io == " " + pairs.info[i]["io"] and s == " " + pairs.info[i]["s"]
        assert pairs.clean[i].count(s.strip()) == 2 and pairs.clean[i].count(io.strip()) == 1


def test_every_template_has_one_token_length_and_corrupt_matches(tok):
    for t in range(len(TEMPLATES)):
        for corruption in ("swap", "abc"):
            toks = ioi_pairs(24, templates=t, name_pairs="all", corruption=corruption, seed=t).tokens(tok)
            assert toks.clean.shape == toks.corrupt.shape


def test_swap_and_abc_corruptions():
    swap = ioi_pairs(30, templates="all", corruption="swap", seed=3)
    abc = ioi_pairs(30, templates="all", corruption="abc", seed=3)
    assert swap.clean == abc.clean  # the corruption draws its names after the clean prompt's
    for clean, corrupt, info in zip(swap.clean, swap.corrupt, swap.info):
        io, s = info["io"], info["s"]
        assert corrupt == clean.replace(io, "#").replace(s, io).replace("#", s)
    for corrupt, info in zip(abc.corrupt, abc.info):
        words = re.findall(r"\w+", corrupt)
        assert info["io"] not in words and info["s"] not in words
        assert len({w for w in words if w in NAMES}) == 3


def test_orders():
    both = ioi_pairs(8, templates=0)
    assert [i["order"] for i in both.info] == ["ABBA", "BABA"] * 4
    assert {i["order"] for i in ioi_pairs(8, templates=0, order="BABA").info} == {"BABA"}
    for p, info in zip(
        ioi_pairs(8, templates=0, order="ABBA").clean, ioi_pairs(8, templates=0, order="ABBA").info
    ):
        assert p.startswith(f"When {info['io']} and {info['s']}")


def test_ioi_seeds_reproducible():
    a = ioi_pairs(50, templates="all", seed=5)
    assert a == ioi_pairs(50, templates="all", seed=5)
    assert a.clean != ioi_pairs(50, templates="all", seed=6).clean


def test_name_pair_split_is_disjoint_and_covers_every_name():
    train, held = set(NAME_PAIRS["train"]), set(NAME_PAIRS["heldout"])
    assert not train & held and len(held) > 100
    for split in (train, held):
        assert {n for pair in split for n in pair} == set(NAMES)
    for split in ("train", "heldout"):
        pairs = ioi_pairs(300, templates="all", name_pairs=split, seed=1)
        assert {tuple(sorted((i["io"], i["s"]))) for i in pairs.info} <= set(NAME_PAIRS[split])


def test_template_split():
    held = template_ids("heldout")
    assert held and set(held).isdisjoint(template_ids("train"))
    pairs = ioi_pairs(20, templates="heldout")
    assert {i["template"] for i in pairs.info} == set(held)
    assert set(pairs.by_template()) == {f"ioi/{t}" for t in held}


def _template_regex(text: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", text)
    return re.compile("".join(r"(\w+)" if p.startswith("{") else re.escape(p) for p in parts))


def test_corpus_has_no_heldout_templates_or_name_pairs(train_docs):
    for t in (TEMPLATES[i] for i in template_ids("heldout")):
        assert not any(_template_regex(t.text).search(d) for d in train_docs), t.text
    held = set(NAME_PAIRS["heldout"])
    seen = 0
    for i in template_ids("train"):
        rx = _template_regex(TEMPLATES[i].text)
        slots = re.findall(r"\{(\w+)\}", TEMPLATES[i].text)
        for d in train_docs:
            for m in rx.finditer(d):
                names = dict(zip(slots, m.groups()))
                assert tuple(sorted((names["A"], names["B"]))) not in held
                seen += 1
    assert seen > 1000  # the check above did look at the IOI stories


def test_corpus_has_no_heldout_fact_phrasings(train_docs):
    text = "\n".join(train_docs)
    for t in world_mod.FACT_TEMPLATES:
        found = sum(t.sentence(c) in text for c in world_mod.COUNTRIES)
        assert (found == 0) if t.split == "heldout" else (found > 0), t.text


def test_prompt_pairs_length_errors(tok):
    mixed = ioi_pairs(20, templates="heldout")
    with pytest.raises(InputError, match="token lengths"):
        mixed.tokens(tok)
    groups = mixed.by_length(tok)
    assert sum(len(g) for g in groups.values()) == 20 and len(groups) > 1
    for n, g in groups.items():
        assert g.tokens(tok).clean.shape[1] == n
    bad = PromptPairs(
        clean=("When Mary and John went to the store, John gave a drink to",),
        corrupt=("When Mary and John went to the store, John gave a drink",),
        answers=((" Mary", " John"),),
        template=("x",),
        info=({},),
    )
    with pytest.raises(InputError, match="equal lengths"):
        bad.tokens(tok)
    assert bad.by_length(tok) == {}


def test_multi_token_answer_error(tok):
    pairs = ioi_pairs(1)
    pairs = PromptPairs(pairs.clean, pairs.corrupt, ((" xylophone", " John"),), pairs.template, pairs.info)
    with pytest.raises(InputError, match="not one"):
        pairs.tokens(tok)


def test_prompt_pairs_indexing_and_validation():
    pairs = ioi_pairs(10, templates="all")
    assert pairs[2].clean == (pairs.clean[2],)
    assert pairs[1:4].clean == pairs.clean[1:4]
    assert pairs[[0, 9]].answers == (pairs.answers[0], pairs.answers[9])
    assert "PromptPairs(ioi, n=10" in repr(pairs)
    with pytest.raises(InputError, match="different lengths"):
        PromptPairs(("a",), (), ((" a", " b"),), ("t",), ({},))
    with pytest.raises(InputError, match="empty"):
        pairs[[]].tokens(None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "positive"),
        ({"n": 5, "templates": "nope"}, "templates="),
        ({"n": 5, "templates": 99}, "indices run"),
        ({"n": 5, "templates": []}, "indices run"),
        ({"n": 5, "name_pairs": "some"}, "name_pairs="),
        ({"n": 5, "corruption": "noise"}, "corruption="),
        ({"n": 5, "order": "AB"}, "order="),
    ],
)
def test_ioi_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        ioi_pairs(**kwargs)


# --- factual recall ---------------------------------------------------------------------------------------


def test_factual_pairs(tok):
    pairs = factual_pairs()
    # the phrasings that name the country before the answer ("The {answer} is the currency of ..." does not)
    assert len(pairs) == 9 * len(world_mod.COUNTRIES)
    assert all(c.split()[-1] != "The" for c in pairs.clean)
    assert pairs.clean[0] == "The capital of Veloria is" and pairs.answers[0][0] == " Marrowby"
    for clean, corrupt, (good, bad), info in zip(pairs.clean, pairs.corrupt, pairs.answers, pairs.info):
        assert info["country"] != info["corrupt_country"]
        assert good.strip() == world_mod.fact(info["country"], info["relation"])
        assert bad.strip() == world_mod.fact(info["corrupt_country"], info["relation"])
        assert corrupt == clean.replace(info["country"], info["corrupt_country"])
    for group in pairs.by_template().values():
        toks = group.tokens(tok)
        assert toks.clean.shape == toks.corrupt.shape
    held = factual_pairs(phrasings="heldout", relations="capital")
    assert len(held) == len(world_mod.COUNTRIES) and {i["phrasing"] for i in held.info} == {"heldout"}
    assert factual_pairs(7, seed=2) == factual_pairs(7, seed=2) and len(factual_pairs(7)) == 7


def test_world_entities_are_distinct():
    words = [*world_mod.COUNTRIES, *world_mod.CAPITALS, *world_mod.LANGUAGES, *world_mod.CURRENCIES, *NAMES]
    assert len({w.lower() for w in words}) == len(words)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: factual_pairs(0), "positive"),
        (lambda: factual_pairs(relations="weather"), "unknown relation"),
        (lambda: factual_pairs(phrasings="new"), "phrasings="),
        (lambda: world_mod.fact("Atlantis", "capital"), "unknown country"),
        (lambda: world_mod.fact("Veloria", "weather"), "unknown relation"),
    ],
)
def test_factual_bad_arguments(call, match):
    with pytest.raises(InputError, match=match):
        call()


# --- induction --------------------------------------------------------------------------------------------


def test_induction_sequences(tok):
    seqs = induction_sequences(tok, 16, length=12)
    assert seqs.tokens.shape == (16, 25) and len(seqs) == 16 and seqs.length == 12
    assert (seqs.tokens[:, 0] == tok.bos_token_id).all()
    assert torch.equal(seqs.tokens[:, 1:13], seqs.tokens[:, 13:])
    assert not torch.isin(seqs.tokens[:, 1:], torch.tensor(tok.all_special_ids)).any()
    pos, target = seqs.targets
    assert pos.tolist() == list(range(13, 24)) and torch.equal(target, seqs.tokens[:, 14:])
    assert len(seqs.strings) == 16
    assert torch.equal(induction_sequences(tok, 16, 12).tokens, seqs.tokens)
    # the training run draws its sequences from its own seed (0 by default), never the held-out one
    other = induction_sequences(tok, 16, 12, seed=0).tokens
    assert HELDOUT_SEED != 0 and not (other == seqs.tokens).all(dim=1).any()


@pytest.mark.parametrize(
    "kwargs, match", [({"n": 0}, "positive"), ({"length": 1}, "at least 2"), ({"length": 500}, "more than")]
)
def test_induction_bad_arguments(tok, kwargs, match):
    with pytest.raises(InputError, match=match):
        induction_sequences(tok, **{"n": 4, **kwargs})


# --- corpora ----------------------------------------------------------------------------------------------


def test_demo_corpus_is_fixed_and_split(train_docs):
    assert demo_corpus("train", 200) == train_docs[:200]
    val = demo_corpus("validation", 200)
    assert val != train_docs[:200] and len(val) == 200
    with pytest.raises(InputError, match="splits"):
        demo_corpus("test")
    with pytest.raises(InputError, match="positive"):
        demo_corpus("train", 0)


def test_pack(tok, train_docs):
    rows = pack(tok, train_docs[:500], 64)
    assert rows.shape[1] == 64 and rows.shape[0] > 50
    assert (rows[:, 0] == tok.bos_token_id).all()
    first = [tok.bos_token_id, *tok(train_docs[0], add_special_tokens=False).input_ids]
    assert rows[0, : min(64, len(first))].tolist() == first[:64]
    assert pack(tok, train_docs[:500], 64, n_rows=3).shape == (3, 64)
    with pytest.raises(InputError, match="fewer than"):
        pack(tok, ["tiny"], 64)


def test_load_corpus_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(WorkbenchError, match="pip install datasets"):
        load_corpus("openwebtext", n_docs=3)


def test_load_corpus_offline(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(WorkbenchError, match="could not load 'monology/pile-uncopyrighted'.*network"):
        load_corpus("pile", n_docs=3)


def test_load_corpus_reads_a_stream(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda dataset_id, split, streaming, **kw: iter(
        [{"text": f"doc {i}"} for i in range(10)]
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_corpus("someone/corpus", n_docs=3) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(InputError, match="no column 'body'"):
        load_corpus("someone/corpus", n_docs=3, text_column="body")


@pytest.mark.parametrize("name, n, match", [("wikipedia", 3, "unknown corpus"), ("pile", 0, "positive")])
def test_load_corpus_bad_arguments(name, n, match):
    with pytest.raises(InputError, match=match):
        load_corpus(name, n_docs=n)


def test_composed_ioi_stories_answer_the_indirect_object_of_a_train_pair():
    rng, held = random.Random(0), set(NAME_PAIRS["heldout"])
    for _ in range(2000):
        doc = corpus_mod._ioi_document(rng)
        names = [w for w in re.findall(r"[A-Z][a-z]+", doc) if w in ioi_mod.NAMES]
        assert len(set(names)) == 2 and tuple(sorted(set(names))) not in held, doc
        answer = names[-1]
        assert names.count(answer) == 2 and names[:-1].count(answer) == 1, doc  # the name said once before
