"""Train the demo SAE on the demo model's residual stream, measure it, and write its card.

    python -m workbench.sae.train_demo             # train (a few minutes on 2 cores), measure, write everything
    python -m workbench.sae.train_demo --card      # re-measure the committed weights, rewrite the card

The site is the one Giglemiani et al. use in GPT-2: the residual stream after block 0 (`resid_pre` of layer 1).
Training rows are documents of the demo corpus's train split, one per row with BOS first and cut at `SEQ_LEN`
tokens, as the demo model saw text in training; every measured number comes from the validation split: firing
frequencies on `FREQUENCY_DOCS` documents, the splice-in losses on `EVAL_DOCS` documents, and the last-token
statistics on `PROMPTS` prompts of BOS + 10 tokens (the first tokens of validation documents, as the paper's
10-token prompts). Files (SAELens layout, `workbench.sae.io`):
``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``, plus ``train_info.json`` (the run),
``evaluation.json`` (the numbers) and ``SAE_CARD.md`` (written from them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from workbench.core import Run
from workbench.models import load_model
from workbench.sae import activations as acts
from workbench.sae.activations import token_rows
from workbench.sae.demo import DEMO_SAE_DIR, LAYER, PROMPT_TOKENS, SITE, document_starts
from workbench.sae.evaluate import evaluate_sae
from workbench.sae.io import load_sae, save_sae
from workbench.sae.train import TrainSettings, train_sae
from workbench.tasks import demo_corpus

TRAIN_DOCS, SEQ_LEN = 20_000, 32
FREQUENCY_DOCS, EVAL_DOCS, PROMPTS = 6_000, 256, 1_000
SETTINGS = TrainSettings(
    architecture="batchtopk", k=21, expansion=8, steps=4000, batch_size=1024, lr=1e-3, seed=0
)
"""BatchTopK rather than ReLU + L1: on this site a ReLU + L1 SAE of the same size trades explained variance for
sparsity much worse (below 0.9 at the L0 the paper's SAE has), while BatchTopK keeps a variable number of latents
per token (at inference a JumpReLU with one threshold) at a fixed mean. k = 21, the paper's L0 at the last of
10 tokens."""
THREADS = 1
"""Training threads: the weights depend on the thread count (the order of floating-point sums)."""
TARGETS = {"l0_last_token": (10.0, 25.0), "explained_variance": (0.9, 1.0)}
"""Pass marks: L0 at the last of 10 tokens near the paper's 21 (the research note's 10-25), explained variance
at least 0.9."""


def train_rows(model) -> list[torch.Tensor]:
    """One row per training document (BOS first, cut at `SEQ_LEN` tokens), as the demo model was trained."""
    return token_rows(model, demo_corpus("train", TRAIN_DOCS), SEQ_LEN)


def validation_data(model) -> dict:
    """Held-out data from disjoint validation documents, one per row: {"frequency": rows of 6000 documents,
    "eval": rows of 256 documents, "prompts": [1000, 11] document starts}."""
    docs = demo_corpus("validation", 9_000)
    return {
        "frequency": token_rows(model, docs[:FREQUENCY_DOCS], SEQ_LEN),
        "eval": token_rows(model, docs[FREQUENCY_DOCS : FREQUENCY_DOCS + EVAL_DOCS], SEQ_LEN),
        "prompts": document_starts(model, docs[7_000:], PROMPT_TOKENS, PROMPTS),
    }


def measure(sae, model=None, *, progress: bool = False) -> dict:
    """Every number of the card, measured on `sae` with the demo model and the validation data."""
    model = model or load_model("demo")
    data = validation_data(model)
    run = Run(progress=progress)
    x = acts.stream(model, data["frequency"], SITE, LAYER, rows_per_chunk=256, run=run)
    with torch.no_grad():
        freq = (sae.encode(x) > 0).float().mean(0)
    ev = evaluate_sae(model, sae, data["eval"], run=run)
    last = acts.site_activations(model, data["prompts"], SITE, LAYER)[:, -1]
    with torch.no_grad():
        codes = sae.encode(last)
        rec = sae.reconstruct(last)
    l0 = (codes > 0).sum(-1).float()
    top_share = codes.amax(-1) / codes.sum(-1).clamp(min=1e-12)
    ev_last = 1 - float((rec - last).pow(2).sum() / (last - last.mean(0)).pow(2).sum())
    out = {
        "site": SITE,
        "layer": LAYER,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "frequency_tokens": int(len(x)),
        "dead": int((freq == 0).sum()),
        "dense": int((freq > 0.1).sum()),
        "frequency_median": float(freq[freq > 0].median()),
        "eval_rows": ev.n_rows,
        "eval_tokens": ev.n_tokens,
        "l0": ev.l0,
        "explained_variance": ev.explained_variance,
        "loss_clean": ev.loss_clean,
        "loss_spliced": ev.loss_spliced,
        "loss_zero": ev.loss_zero,
        "loss_mean": ev.loss_mean,
        "frac_recovered": ev.frac_recovered,
        "frac_recovered_mean": ev.frac_recovered_mean,
        "kl_spliced": ev.kl_spliced,
        "prompts": PROMPTS,
        "l0_last_token": float(l0.mean()),
        "l0_last_token_std": float(l0.std()),
        "explained_variance_last_token": ev_last,
        "top_latent_share_median": float(top_share[l0 > 0].median()),
        "code_norm_last_token": float(codes.norm(dim=-1).mean()),
    }
    out["targets"] = {
        k: {"range": list(r), "value": out[k], "met": r[0] <= out[k] <= r[1]} for k, r in TARGETS.items()
    }
    return out, freq


def card(results: dict, info: dict) -> str:
    """The SAE card, written from `measure`'s results and the training run's ``train_info.json``."""
    s = info["settings"]
    t = results["targets"]
    verdict = (
        "All targets are met."
        if all(v["met"] for v in t.values())
        else ("**Missed targets: " + ", ".join(k for k, v in t.items() if not v["met"]) + ".**")
    )
    targets = "\n".join(
        f"| `{k}` | {v['range'][0]} to {v['range'][1]} | {v['value']:.3f} | {'met' if v['met'] else '**missed**'} |"
        for k, v in t.items()
    )
    r = results
    return f"""# Demo SAE card

A sparse autoencoder on the bundled demo model's residual stream after block 0 (`resid_pre` of layer 1), the
site Giglemiani et al. (2024) use in GPT-2 with Joseph Bloom's SAE. It exists so that the synthetic-activation
tests, the latent dashboard and attribution run offline; its numbers are demo-model numbers, not GPT-2's.

This card is written by `python -m workbench.sae.train_demo --card` from the numbers it measures on the committed
weights (`evaluation.json`) and from the training run's log (`train_info.json`). Files are in the SAELens layout
(`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`).

## SAE

| | |
|---|---|
| site | `{r["site"]}` layer {r["layer"]} (TransformerLens `blocks.{r["layer"]}.hook_resid_pre`), positions >= 1 (BOS excluded) |
| shape | {r["d_in"]} -> {r["d_sae"]} latents ({r["d_sae"] // r["d_in"]}x), unit-norm decoder rows, b_dec subtracted from the input |
| architecture | {_architecture_text(s, info)} |
| weights | fp32, {info["weights_bytes"] / 2**20:.2f} MiB |

## Training

| | |
|---|---|
| command | `{info["command"]}` |
| data | {info["train_rows"]} documents of the demo corpus's train split, one per row, BOS first, cut at {info["seq_len"]} tokens ({info["training_tokens_available"]:,} activations, position 0 excluded), {info["tokens_seen"]:,} seen ({info["passes_over_data"]} passes) |
| objective | {_objective_text(s)} (inputs scaled to mean squared norm d_in during training; folded into the weights) |
| optimiser | Adam, lr {s["lr"]} (linear decay to 0 over the last {100 * s["lr_decay"]:.0f}%), batch {s["batch_size"]}, {s["steps"]} steps, seed {s["seed"]} |
| dead latents | resampled every {s["resample_every"]} steps until {100 * s["resample_until"]:.0f}% of training ({info["resampled_latents"]} latents resampled) |
| wall time | {info["wall_time_s"] / 60:.1f} minutes on {info["threads"]} CPU thread{"s" if info["threads"] > 1 else ""} (torch {info["versions"]["torch"]}) |

## Measured on held-out data (validation split)

| quantity | value |
|---|---|
| L0, all positions ({r["eval_tokens"]:,} tokens of {r["eval_rows"]} documents) | {r["l0"]:.2f} |
| L0 at the last of 10 tokens ({r["prompts"]} prompts; GPT-2 + JB SAE: 21.2 ± 13.5) | {r["l0_last_token"]:.2f} ± {r["l0_last_token_std"]:.2f} |
| explained variance, all positions / last token | {r["explained_variance"]:.4f} / {r["explained_variance_last_token"]:.4f} |
| loss clean / spliced / zero-ablated / mean-ablated (nats per token) | {r["loss_clean"]:.4f} / {r["loss_spliced"]:.4f} / {r["loss_zero"]:.4f} / {r["loss_mean"]:.4f} |
| fraction of loss recovered (vs zero ablation / vs mean ablation) | {r["frac_recovered"]:.4f} / {r["frac_recovered_mean"]:.4f} |
| KL(clean ‖ spliced) per token | {r["kl_spliced"]:.4f} nats |
| dead latents (never fired on {r["frequency_tokens"]:,} tokens) / dense (> 10% of tokens) | {r["dead"]} / {r["dense"]} |
| median firing frequency of live latents | {r["frequency_median"]:.2e} |
| top latent's share of the summed activation, last token (median; GPT-2: about 0.5) | {r["top_latent_share_median"]:.3f} |
| mean L2 norm of the code at the last token (GPT-2: 25.93) | {r["code_norm_last_token"]:.3f} |

### Targets

| quantity | target | measured | |
|---|---|---|---|
{targets}

{verdict}

## Reproduce

```
python -m workbench.sae.train_demo          # retrains and overwrites the weights ({info["wall_time_s"] / 60:.0f} min here)
python -m workbench.sae.train_demo --card   # re-measures the committed weights and rewrites this card
```

Training is seeded with a fixed data order; the same software and thread count give the same weights.
"""


def _architecture_text(s: dict, info: dict) -> str:
    if s["architecture"] == "batchtopk":
        return (
            f"BatchTopK (Bussmann et al. 2024), k = {s['k']} per token on average over a batch; saved as a JumpReLU "
            f"SAE with one threshold, {info['batchtopk_threshold']:.4g}, the running mean of the smallest kept "
            "activation in training"
        )
    if s["architecture"] == "topk":
        return f"TopK, k = {s['k']}"
    return "ReLU"


def _objective_text(s: dict) -> str:
    if s["architecture"] == "relu":
        return (
            f"squared error + {s['l1_coefficient']} x L1 of the codes, L1 warm-up over "
            f"{100 * s['l1_warmup']:.0f}% of the steps"
        )
    return "squared error"


def write_card(sae_dir: Path = DEMO_SAE_DIR, progress: bool = False) -> dict:
    """Measure the SAE in `sae_dir`, store its firing frequencies, write ``evaluation.json`` and the card."""
    sae = load_sae(sae_dir)
    results, freq = measure(sae, progress=progress)
    save_sae(sae.with_frequency(freq), sae_dir)
    info = json.loads((sae_dir / "train_info.json").read_text())
    info["weights_bytes"] = (sae_dir / "sae_weights.safetensors").stat().st_size
    (sae_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (sae_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    (sae_dir / "SAE_CARD.md").write_text(card(results, info))
    return results


def train(
    out: Path = DEMO_SAE_DIR, settings: TrainSettings = SETTINGS, *, progress: bool = True, argv=None
) -> dict:
    """Train the demo SAE and save it (without firing frequencies: `write_card` measures them)."""
    threads = THREADS
    torch.set_num_threads(threads)
    model = load_model("demo")
    rows = train_rows(model)
    started = time.perf_counter()
    sae = train_sae(model, rows, site=SITE, layer=LAYER, settings=settings, dataset="workbench demo corpus (train)",
                    progress=progress)  # fmt: skip
    wall = time.perf_counter() - started
    save_sae(sae, out)
    training = sae.cfg.metadata["training"]
    info = {
        "command": "python -m workbench.sae.train_demo" + ("" if not argv else " " + " ".join(argv)),
        "settings": dataclasses.asdict(settings),
        "train_rows": len(rows),
        "seq_len": SEQ_LEN,
        "training_tokens_available": training["training_tokens_available"],
        "tokens_seen": training["tokens_seen"],
        "passes_over_data": training["passes_over_data"],
        "resampled_latents": training["resampled_latents"],
        "batchtopk_threshold": training["batchtopk_threshold"],
        "final_l0": training["history"]["l0"][-1],
        "final_fvu": training["history"]["fvu"][-1],
        "wall_time_s": round(wall, 1),
        "threads": threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_SAE_DIR)
    parser.add_argument(
        "--card", action="store_true", help="only re-measure the SAE in --out and rewrite its card"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--l1", type=float, default=None, help="override the L1 coefficient")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.card:
        settings = SETTINGS
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        if args.l1 is not None:
            settings = dataclasses.replace(settings, l1_coefficient=args.l1)
        info = train(args.out, settings, argv=argv if argv is not None else sys.argv[1:])
        print(json.dumps(info, indent=2))
    results = write_card(args.out, progress=True)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
