"""Evaluate the demo model on held-out task sets and write its model card from the measured numbers.

    python -m workbench.demo_model.evaluate                # print the numbers (JSON)
    python -m workbench.demo_model.evaluate --write-card   # also write evaluation.json and MODEL_CARD.md

Plain PyTorch on the Hugging Face model (no workbench engine), so the numbers are an independent reference.
All sets are fixed by their seeds: IOI on held-out templates and held-out name pairs, factual recall on every
fact, induction on held-out random sequences, loss on the validation split of the demo corpus, and a
`resid_pre` activation-patching sweep (layer x position) on IOI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from workbench.demo_model import DEMO_DIR
from workbench.models import load_model
from workbench.patching import sweep
from workbench.tasks import (
    PromptPairs,
    demo_corpus,
    encode,
    factual_pairs,
    induction_sequences,
    ioi_pairs,
)
from workbench.tasks.ioi import template_ids
from workbench.tasks.pairs import PairTokens, single_token_id

# (name, description, arguments of ioi_pairs); the seeds differ from the corpus's, so these are fresh samples
IOI_SETS = (
    ("ioi_heldout", "held-out templates x held-out name pairs", {"templates": "heldout", "name_pairs": "heldout"}),
    ("ioi_heldout_templates", "held-out templates x train name pairs", {"templates": "heldout", "name_pairs": "train"}),
    ("ioi_heldout_names", "train templates x held-out name pairs", {"templates": "train", "name_pairs": "heldout"}),
    ("ioi_train", "train templates x train name pairs (fresh samples)", {"templates": "train", "name_pairs": "train"}),
)  # fmt: skip
IOI_N, IOI_SEED = 1000, 101
INDUCTION_N, INDUCTION_LENGTH = 500, 20
VALIDATION_DOCS = 2000
# resid_pre patching: one template, one name order (so each role sits at one position), held-out name pairs
PATCHING_SETS = (
    ("patching_train_template", {"templates": 0}),
    ("patching_heldout_template", {"templates": 16}),
)
PATCHING_N = 32
TARGETS = {
    "ioi_heldout.accuracy": 0.95,
    "ioi_heldout.logit_diff": 1.0,
    "induction.accuracy": 0.5,
    "factual_train.top1": 0.9,
}
"""Pass marks (at least): IOI accuracy as the issue asks; "clearly positive" logit difference read as at
least 1; induction "well above chance" read as at least half the predictable tokens right (chance is
1 / vocabulary); factual recall as top-1 over the whole vocabulary for nine in ten facts."""


def load(model_dir: Path | str = DEMO_DIR) -> tuple[GPT2LMHeadModel, object]:
    """The demo model (fp32, eager attention, eval mode) and its tokenizer, as plain transformers objects."""
    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tok


@torch.no_grad()
def final_logits(model, tok, prompts: tuple[str, ...] | list[str], batch: int = 256) -> torch.Tensor:
    """Logits at the last position of each prompt (BOS prepended): [prompt, vocab]. Prompts of different
    token lengths are batched by length."""
    ids = [encode(tok, p) for p in prompts]
    out = torch.empty(len(ids), model.config.vocab_size)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        for k in range(0, len(idx), batch):
            chunk = idx[k : k + batch]
            out[chunk] = model(torch.tensor([ids[i] for i in chunk])).logits[:, -1].float()
    return out


def pair_metrics(model, tok, pairs: PromptPairs) -> dict[str, float]:
    """On the clean prompts: accuracy (correct answer's logit above the incorrect one's), mean logit
    difference, and top-1 (correct answer is the argmax over the whole vocabulary)."""
    logits = final_logits(model, tok, pairs.clean)
    ans = torch.tensor([[single_token_id(tok, a) for a in pair] for pair in pairs.answers])
    rows = torch.arange(len(pairs))
    diff = logits[rows, ans[:, 0]] - logits[rows, ans[:, 1]]
    return {
        "n": len(pairs),
        "accuracy": (diff > 0).double().mean().item(),
        "logit_diff": diff.mean().item(),
        "top1": (logits.argmax(-1) == ans[:, 0]).double().mean().item(),
    }


@torch.no_grad()
def induction_metrics(model, tok, n: int = INDUCTION_N, length: int = INDUCTION_LENGTH) -> dict[str, float]:
    """Next-token accuracy on the predictable part of the second copy of held-out random sequences, with the
    first copy's accuracy and chance for comparison."""
    seqs = induction_sequences(tok, n, length)
    logits = model(seqs.tokens).logits
    pred = logits.argmax(-1)
    pos, target = seqs.targets
    first = torch.arange(1, length)  # predicting r_2 .. r_L from the first copy: nothing to copy yet
    logp = logits.log_softmax(-1)
    return {
        "n": n,
        "length": length,
        "accuracy": (pred[:, pos] == target).double().mean().item(),
        "loss": -logp[:, pos].gather(-1, target[..., None]).mean().item(),
        "first_copy_accuracy": (pred[:, first] == seqs.tokens[:, first + 1]).double().mean().item(),
        "chance": 1 / (len(tok) - len(tok.all_special_ids)),
    }


@torch.no_grad()
def validation_loss(model, tok, n_docs: int = VALIDATION_DOCS) -> float:
    """Mean next-token cross-entropy (nats per predicted token) on the demo corpus's validation split, one
    document per row after ``<|endoftext|>`` as in training."""
    bos, n_ctx = tok.bos_token_id, model.config.n_positions
    docs = [
        [bos, *ids][:n_ctx]
        for ids in tok(demo_corpus("validation", n_docs), add_special_tokens=False).input_ids
    ]
    total, count = 0.0, 0
    for start in range(0, len(docs), 64):
        rows = docs[start : start + 64]
        ids = torch.full((len(rows), max(map(len, rows))), bos)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = labels[i, : len(r)] = torch.tensor(r)
        n = sum(len(r) - 1 for r in rows)
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return total / count


def resid_pre_patching(model, tok, toks: PairTokens) -> torch.Tensor:
    """Denoising activation patching of the residual stream before each block: [layer, pos].

    For each (layer, position), the corrupt prompts run with ``resid_pre`` at that layer and position taken from
    the clean run (`workbench.patching.sweep`); the grid is ``(LD_patched - LD_corrupt) / (LD_clean -
    LD_corrupt)`` with LD the mean logit difference over pairs: 1 where the position at that layer carries
    everything the answer needs, 0 where it carries nothing."""
    result = sweep(
        load_model(model, tok), toks.clean, toks.corrupt, answers=toks.answers, progress=False, warn=False
    )
    return result.values("logit_diff")[0]


def _patching(model, tok, kwargs) -> dict:
    pairs = ioi_pairs(
        PATCHING_N, name_pairs="heldout", order="ABBA", corruption="swap", seed=IOI_SEED, **kwargs
    )
    toks = pairs.tokens(tok)
    grid = resid_pre_patching(model, tok, toks)
    labels = tok.convert_ids_to_tokens(toks.clean[0].tolist())
    first = pairs.info[0]
    roles = {" " + first["io"]: "IO", " " + first["s"]: "S"}
    seen_s = 0
    for i, t in enumerate(labels):
        t = tok.convert_tokens_to_string([t])
        role = roles.get(t)
        if role == "S":
            seen_s += 1
            role = f"S{seen_s}"
        labels[i] = f"{t.strip() or repr(t)}({role})" if role else (t.strip() or repr(t))
    labels[-1] = labels[-1] + "(END)"
    return {"template": kwargs["templates"], "n": PATCHING_N, "prompt": pairs.clean[0],
            "positions": labels, "grid": [[round(v, 4) for v in row] for row in grid.tolist()]}  # fmt: skip


def evaluate(model_dir: Path | str = DEMO_DIR) -> dict:
    """Every number of the model card, measured on the weights in `model_dir`."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load(model_dir)
    results: dict = {"n_params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok)}
    results["validation_loss"] = validation_loss(model, tok)
    for name, desc, kwargs in IOI_SETS:
        results[name] = {
            "description": desc,
            **pair_metrics(model, tok, ioi_pairs(IOI_N, seed=IOI_SEED, **kwargs)),
        }
    results["ioi_heldout_by_template"] = [
        {"template": t, "order": o, **pair_metrics(model, tok, ioi_pairs(200, templates=t, order=o, seed=IOI_SEED,
                                                                        name_pairs="heldout"))}
        for t in template_ids("heldout") for o in ("ABBA", "BABA")
    ]  # fmt: skip
    results["ioi_heldout_abc"] = {
        "description": "held-out templates x held-out name pairs, ABC corruption (corrupt prompts)",
        **pair_metrics(model, tok, _corrupt_as_clean(ioi_pairs(IOI_N, seed=IOI_SEED, corruption="abc",
                                                               templates="heldout", name_pairs="heldout"))),
    }  # fmt: skip
    results["factual_train"] = {
        "description": "every fact, corpus phrasings",
        **pair_metrics(model, tok, factual_pairs()),
    }
    results["factual_heldout"] = {
        "description": "every fact, phrasings never in the corpus",
        **pair_metrics(model, tok, factual_pairs(phrasings="heldout")),
    }
    results["induction"] = induction_metrics(model, tok)
    for name, kwargs in PATCHING_SETS:
        results[name] = _patching(model, tok, kwargs)
    results["targets"] = {key: {"at_least": v, "value": _get(results, key), "met": _get(results, key) >= v}
                          for key, v in TARGETS.items()}  # fmt: skip
    return results


def _corrupt_as_clean(pairs: PromptPairs) -> PromptPairs:
    """The ABC prompts scored against the clean answers (a logit difference near 0 means no preference)."""
    return dataclasses.replace(pairs, clean=pairs.corrupt)


def _get(results: dict, key: str) -> float:
    a, b = key.split(".")
    return results[a][b]


def quick_eval(model, tok) -> dict:
    """A few task numbers on small sets, for watching a training run."""
    ioi = pair_metrics(model, tok, ioi_pairs(200, templates="heldout", name_pairs="heldout", seed=IOI_SEED))
    return {
        "ioi_acc": round(ioi["accuracy"], 3),
        "ioi_ld": round(ioi["logit_diff"], 2),
        "induction": round(induction_metrics(model, tok, n=100)["accuracy"], 3),
        "fact": round(pair_metrics(model, tok, factual_pairs())["top1"], 3),
    }


def _grid_table(p: dict) -> str:
    head = "| layer | " + " | ".join(f"`{t}`" for t in p["positions"]) + " |"
    sep = "|---|" + "---|" * len(p["positions"])
    rows = [f"| {i} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in enumerate(p["grid"])]
    return "\n".join([head, sep, *rows])


def model_card(results: dict, info: dict, model_dir: Path | str = DEMO_DIR) -> str:
    """The model card, written from `evaluate()`'s results and the training run's ``train_info.json``."""
    size_mb = (Path(model_dir) / "model.safetensors").stat().st_size / 2**20
    return (
        _card_model(results, info["config"], size_mb)
        + _card_training(results, info)
        + _card_evaluation(results)
        + _card_patching(results, info)
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _card_model(results: dict, cfg: dict, size_mb: float) -> str:
    return f"""# Demo model card

A small GPT-2 (with LayerNorm) trained from scratch on the workbench's own demo corpus
(`workbench.tasks.demo_corpus`) so that offline demos, notebooks and CI have a model with real, findable
mechanisms: indirect-object identification (IOI), induction on arbitrary tokens, and recall of the facts of a
small invented world. It knows nothing else; its "language" is the corpus's simple English.

This card is written by `python -m workbench.demo_model.evaluate --write-card` from the numbers it measures on
the committed weights (`evaluation.json`) and from the training run's log (`train_info.json`).

## Model

| | |
|---|---|
| architecture | `GPT2LMHeadModel`, {cfg["n_layer"]} layers, {cfg["n_head"]} heads, d_model {cfg["d_model"]}, d_mlp {4 * cfg["d_model"]}, context {cfg["n_ctx"]}, tied embeddings, LayerNorm |
| parameters | {results["n_params"]:,} |
| tokenizer | byte-level BPE trained on the corpus, {results["vocab_size"]} tokens; `<\\|endoftext\\|>` is BOS/EOS/padding and is never added automatically |
| weights | `model.safetensors`, fp32, {size_mb:.1f} MiB |

Every training row starts with `<|endoftext|>`, and prompts are evaluated with it prepended (as
`WorkbenchModel.to_tokens` does). Every IOI name, place and object and every country, capital, language and
currency of the invented world is a single token with its leading space.

"""


def _card_training(results: dict, info: dict) -> str:
    cfg = info["config"]
    return f"""## Training

| | |
|---|---|
| command | `{info["command"]}` |
| seed | {cfg["seed"]} |
| data | {cfg["steps"]} steps x {cfg["batch_size"]} rows of at most {cfg["n_ctx"]} tokens, {info["train_tokens"]:,} tokens in all; per batch {cfg["batch_size"] - cfg["induction_rows"] - cfg.get("repeat_rows", 0)} corpus documents (one per row), {cfg["induction_rows"]} rows of repeated random tokens and {cfg.get("repeat_rows", 0)} of a corpus document written twice |
| optimiser | AdamW, lr {cfg["lr"]} (warm-up {cfg["warmup"]} steps, cosine to a tenth), weight decay {cfg["weight_decay"]}, betas (0.9, 0.95), clip 1.0 |
| wall time | {info["wall_time_s"] / 60:.1f} minutes on {info["threads"]} CPU threads (torch {info["versions"]["torch"]}) |
| final training loss | {info["final_train_loss"]:.3f} (mean of the last 50 steps, includes the random-token rows) |
| validation loss | {results["validation_loss"]:.3f} nats/token on {VALIDATION_DOCS} documents of the validation split, one per row as in training |

"""


def _card_evaluation(results: dict) -> str:
    ioi_rows = "\n".join(
        f"| {results[k]['description']} | {results[k]['n']} | {_pct(results[k]['accuracy'])} | "
        f"{results[k]['logit_diff']:.2f} | {_pct(results[k]['top1'])} |"
        for k in ("ioi_heldout", "ioi_heldout_templates", "ioi_heldout_names", "ioi_train")
    )
    by_template = "\n".join(
        f"| {r['template']} | {r['order']} | {_pct(r['accuracy'])} | {r['logit_diff']:.2f} |"
        for r in results["ioi_heldout_by_template"]
    )
    abc = results["ioi_heldout_abc"]
    fact_rows = "\n".join(
        f"| {results[k]['description']} | {results[k]['n']} | {_pct(results[k]['top1'])} | "
        f"{_pct(results[k]['accuracy'])} | {results[k]['logit_diff']:.2f} |"
        for k in ("factual_train", "factual_heldout")
    )
    ind = results["induction"]
    targets = "\n".join(
        f"| `{k}` | >= {t['at_least']} | {t['value']:.3f} | {'met' if t['met'] else '**missed**'} |"
        for k, t in results["targets"].items()
    )
    missed = [k for k, t in results["targets"].items() if not t["met"]]
    verdict = "All targets are met." if not missed else f"**Missed targets: {', '.join(missed)}.**"
    return f"""## Evaluation

IOI ({IOI_N} prompts per set, seed {IOI_SEED}; accuracy = logit of the indirect object above the subject's;
logit difference = mean of logit(IO) - logit(S); top-1 = the indirect object is the argmax over the vocabulary):

| set | n | accuracy | logit diff | top-1 |
|---|---|---|---|---|
{ioi_rows}

By held-out template and name order (200 prompts each, held-out name pairs; "ABBA": the indirect object is
named first; templates are `workbench.tasks.ioi.TEMPLATES[i]`):

| template | order | accuracy | logit diff |
|---|---|---|---|
{by_template}

On the ABC-corrupted versions of the held-out prompts (IO, S and the repeated S replaced by three other names,
so neither answer is in the prompt) the mean logit difference is {abc["logit_diff"]:.2f}: the clean answers
are no longer preferred, as a corrupt baseline should be.

Factual recall (every country x relation x prompt phrasing; pairwise accuracy against the corrupt country's
answer):

| set | n | top-1 | pairwise accuracy | logit diff |
|---|---|---|---|---|
{fact_rows}

Induction ({ind["n"]} held-out sequences of {ind["length"]} random tokens repeated once): accuracy on the
predictable part of the second copy **{_pct(ind["accuracy"])}** (loss {ind["loss"]:.3f}); on the first copy
{_pct(ind["first_copy_accuracy"])}; chance {ind["chance"]:.5f}.

### Targets

| quantity | target | measured | |
|---|---|---|---|
{targets}

{verdict}

At this size (4 layers x 4 heads) induction and held-out IOI compete for the same heads: as induction heads form
late in training, accuracy on held-out IOI templates falls. Recipes tried (8000 steps, seed 0): IOI stories on
fixed templates only gave 89% held-out IOI and 92% induction; the composed stories of the current corpus give
the numbers above; the same with 6 rows of random tokens per batch instead of 4 reached 99% induction by step
6000 with held-out IOI down to 88%. The recipe kept favours IOI, the task the notebooks are built on.

"""


def _card_patching(results: dict, info: dict) -> str:
    pt, ph = results["patching_train_template"], results["patching_heldout_template"]
    return f"""## What patching shows

Denoising activation patching of `resid_pre` (clean into corrupt, normalised logit difference: 1 = clean
behaviour restored, 0 = none) on {pt["n"]} IOI pairs with held-out name pairs, ABBA order, symmetric name swap.
Template {pt["template"]} (a training template; first prompt: "{pt["prompt"]}"):

{_grid_table(pt)}

Template {ph["template"]} (held out; first prompt: "{ph["prompt"]}"):

{_grid_table(ph)}

## Reproduce

```
python -m workbench.demo_model.train          # retrains and overwrites the weights ({info["wall_time_s"] / 60:.0f} min here)
python -m workbench.demo_model.evaluate --write-card
```

Training is seeded with a fixed data order; the same software on the same kind of CPU gives the same weights.
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEMO_DIR)
    parser.add_argument("--write-card", action="store_true", help="write evaluation.json and MODEL_CARD.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = evaluate(args.model_dir)
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("patching")}, indent=2))
    if args.write_card:
        info = json.loads((args.model_dir / "train_info.json").read_text())
        (args.model_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.model_dir / "MODEL_CARD.md").write_text(model_card(results, info, args.model_dir))
    return results


if __name__ == "__main__":
    main()
