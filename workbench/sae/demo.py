"""The demo SAE and the demo data the notebook, the panel and the tests share.

    sae = load_demo_sae()                         # the committed SAE on the demo model's resid_pre 1
    prompts = demo_prompts(model, 200)            # [200, 11]: BOS + the first 10 tokens of validation documents
    reference = demo_reference(model)             # RefStats of resid_pre 1 on 2000 x 11 validation activations

Everything is deterministic (the demo corpus is generated from fixed seeds), so a call written by a panel's
"Show code" gives the same data in a fresh kernel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from workbench.errors import InputError
from workbench.plateau import reference_stats
from workbench.results import Provenance
from workbench.sae.io import load_sae
from workbench.sae.model import SAE
from workbench.tasks import demo_corpus

DEMO_SAE_DIR: Path = Path(__file__).resolve().parent / "demo"
"""The committed demo SAE (SAELens layout), trained and measured by ``python -m workbench.sae.train_demo``."""
SITE, LAYER = "resid_pre", 1
PROMPT_TOKENS = 10

PROMPT_DOCS = (7_000, 9_000)
"""Validation documents the prompts come from (the card's last-token statistics use the same)."""
REFERENCE_DOCS = (0, 6_000)


def load_demo_sae() -> SAE:
    """The committed demo SAE (see its card, ``workbench/sae/demo/SAE_CARD.md``)."""
    if not (DEMO_SAE_DIR / "cfg.json").is_file():
        raise InputError(
            "The demo SAE is missing from this checkout; train it with `python -m workbench.sae.train_demo`."
        )
    sae = load_sae(DEMO_SAE_DIR)
    sae.source = {"demo": True}
    return sae


def _validation(n_docs: int) -> list[str]:
    return demo_corpus("validation", n_docs)


def document_starts(model, docs: list[str], n_tokens: int, n: int | None = None) -> torch.Tensor:
    """[rows, n_tokens + 1] BOS + the first `n_tokens` tokens of each document that has that many (one document
    per row, as the demo model saw text in training); at most `n` rows."""
    bos = model.tokenizer.bos_token_id
    ids = model.tokenizer(docs, add_special_tokens=False).input_ids
    rows = [[bos, *x[:n_tokens]] for x in ids if len(x) >= n_tokens]
    return torch.tensor(rows[:n] if n is not None else rows, dtype=torch.long)


def demo_prompts(model, n: int = 200, n_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """[n, n_tokens + 1] BOS + the first `n_tokens` tokens of validation documents (the paper's 10-token prompts,
    with the BOS the demo model expects)."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive whole number, got {n!r}.")
    rows = document_starts(model, _validation(PROMPT_DOCS[1])[PROMPT_DOCS[0] :], n_tokens, n)
    if len(rows) < n:
        raise InputError(f"Only {len(rows)} documents have {n_tokens} tokens; ask for fewer prompts.")
    return rows


def demo_reference(model, rows: int = 2_000, seq_len: int = 12, *, layer: int = LAYER, site: str = SITE):
    """`RefStats` (mean, Ledoit-Wolf covariance, median norm) of the demo model at `site` of `layer` on `rows`
    document starts of `seq_len` tokens (BOS first) from validation documents (position 0 excluded), disjoint
    from the prompts' documents."""
    docs = _validation(REFERENCE_DOCS[1])[REFERENCE_DOCS[0] :]
    starts = document_starts(model, docs, seq_len - 1, rows)
    ref = reference_stats(model, starts, layer=layer, site=site, progress=False)
    # say how it was made, so that panels can print the call
    made = {
        "made_by": "workbench.sae.demo_reference",
        "rows": rows,
        "seq_len": seq_len,
        "layer": layer,
        "site": site,
    }
    prov = ref.provenance
    return dataclasses.replace(
        ref, provenance=Provenance(prov.model, {**prov.options, **made}, prov.versions, prov.created)
    )
