"""Train the bundled demo model: a small GPT-2 (with LayerNorm) and its own byte-level BPE tokenizer.

    python -m workbench.demo_model.train                   # the committed model (about 15 minutes, 2 cores)
    python -m workbench.demo_model.train --config smoke --out /tmp/demo-smoke   # seconds

Training data is the demo corpus (`workbench.tasks.demo_corpus("train")`: IOI stories, invented-world facts
and narrative text), one document per row after ``<|endoftext|>`` (so every row starts as the prompts do and
no document sees another's names), plus a few rows per batch of repeated random tokens and of a document
written twice, so that induction heads form and work on arbitrary tokens. Everything is seeded and the data order is fixed, so a run on the same software
reproduces the weights. Then evaluate and write the model card:

    python -m workbench.demo_model.evaluate --write-card
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workbench.demo_model import DEMO_DIR
from workbench.demo_model.evaluate import quick_eval
from workbench.tasks import demo_corpus, single_token_words
from workbench.tasks.induction import ordinary_token_ids, repeated_tokens

EOT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096  # an upper bound: BPE stops early when the corpus has no more pairs to merge
    n_ctx: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    batch_size: int = 32  # rows: one document each, plus the induction rows
    steps: int = 8000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    induction_rows: int = 4  # rows of repeated random tokens in every batch
    repeat_rows: int = 4  # rows of a training document written twice in every batch
    n_docs: int = 120_000  # training documents (cycled if the steps need more)
    tokenizer_docs: int = 20_000  # documents the tokenizer is trained on
    seed: int = 0
    threads: int = 2  # the weights depend on it (the order of floating-point sums): keep it to reproduce them


CONFIGS = {
    "full": TrainConfig(),
    "smoke": TrainConfig(
        vocab_size=2048, n_ctx=64, n_layer=2, n_head=2, d_model=32, batch_size=4, steps=5, warmup=2,
        induction_rows=1, repeat_rows=1, n_docs=300, tokenizer_docs=300,
    ),
}  # fmt: skip


def train_tokenizer(docs: list[str], vocab_size: int, n_ctx: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE in the GPT-2 style (``<|endoftext|>`` is BOS, EOS and padding; nothing is added
    automatically). The task words are added to the training text often enough to be merged into whole
    tokens; a word that still is not one token is an error."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = single_token_words()
    tk.train_from_iterator([*docs, *("".join([w] * 200) for w in words)], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=n_ctx,
    )
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"these task words are not single tokens; raise vocab_size: {split}")
    return tok


def build_model(cfg: TrainConfig, vocab_size: int, eot_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def doc_batches(n_tokens: list[int], text_rows: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches of document indices: a seeded shuffle, then documents of similar length batched
    together (within windows of 64 batches) so that little of each batch is padding."""
    order = torch.randperm(len(n_tokens), generator=gen).tolist()
    window = 64 * text_rows
    batches = []
    for start in range(0, len(order) - text_rows + 1, window):
        chunk = sorted(order[start : start + window], key=lambda i: n_tokens[i])
        batches += [chunk[k : k + text_rows] for k in range(0, len(chunk) - text_rows + 1, text_rows)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def make_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [row, pos] and labels (-100 on padding). Causal attention never lets a real
    token see the padding after it, so no attention mask is needed."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = ids[i, : len(r)]
    return ids, labels


def induction_rows(
    vocab: torch.Tensor, n: int, max_len: int, bos: int, gen: torch.Generator
) -> list[list[int]]:
    """`n` rows ``BOS r r`` of random tokens with copy lengths drawn from 5..30 (at most max_len tokens)."""
    rows = []
    for _ in range(n):
        length = min(int(torch.randint(5, 31, (1,), generator=gen)), (max_len - 1) // 2)
        rows.append(repeated_tokens(vocab, 1, length, bos, gen)[0].tolist())
    return rows


def repeated_docs(data: list[list[int]], n: int, max_len: int, gen: torch.Generator) -> list[list[int]]:
    """`n` rows ``BOS d d`` of random training documents `d` (token ids after their BOS), cut to fit."""
    rows = []
    for i in torch.randint(len(data), (n,), generator=gen).tolist():
        doc = data[i][1 : 1 + (max_len - 1) // 2]
        rows.append([data[i][0], *doc, *doc])
    return rows


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(cfg: TrainConfig, out_dir: Path, progress: bool = True, eval_every: int = 0) -> dict:
    """Train tokenizer and model, save both to `out_dir` (HF format) with ``train_info.json``; return the
    info."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, Path(out_dir), progress, eval_every)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, out_dir: Path, progress: bool, eval_every: int) -> dict:
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)

    docs = demo_corpus("train", cfg.n_docs)
    tok = train_tokenizer(docs[: cfg.tokenizer_docs], cfg.vocab_size, cfg.n_ctx)
    bos = tok.bos_token_id
    data = [[bos, *ids][: cfg.n_ctx] for ids in tok(docs, add_special_tokens=False).input_ids]
    model = build_model(cfg, len(tok), tok.bos_token_id)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = ordinary_token_ids(tok)
    text_rows = cfg.batch_size - cfg.induction_rows - cfg.repeat_rows
    n_tokens = [len(d) for d in data]
    batches, epoch = doc_batches(n_tokens, text_rows, gen), 0
    losses, evals, n_seen = [], [], 0
    model.train()
    bar = tqdm(range(cfg.steps), desc="training demo model", disable=not progress)
    for step in bar:
        if not batches:
            batches, epoch = doc_batches(n_tokens, text_rows, gen), epoch + 1
        rows = [data[i] for i in batches.pop()]
        rows += induction_rows(vocab, cfg.induction_rows, cfg.n_ctx, bos, gen)
        rows += repeated_docs(data, cfg.repeat_rows, cfg.n_ctx, gen)
        ids, labels = make_batch(rows, bos)
        n_seen += sum(map(len, rows))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            evals.append({"step": step + 1, **quick_eval(model, tok)})
            model.train()
            tqdm.write(json.dumps(evals[-1]))
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    # Name the classic fast-tokenizer class (transformers 5 writes its new backend name, unknown to 4.x).
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    tail = losses[-50:]
    info = {
        "config": dataclasses.asdict(cfg),
        "n_params": n_params,
        "vocab_size": len(tok),
        "train_tokens": n_seen,
        "corpus_docs": len(data),
        "epochs_started": epoch + 1,
        "final_train_loss": sum(tail) / len(tail),
        "wall_time_s": round(time.time() - start, 1),
        "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "threads": cfg.threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "evals": evals,
    }
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output directory (default {DEMO_DIR})")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override config fields, e.g. steps=100 seed=1",
    )
    parser.add_argument("--eval-every", type=int, default=0, help="print quick task metrics every N steps")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            parser.error(f"unknown config field {key!r}; fields: {', '.join(types)}")
        overrides[key] = {"int": int, "float": float}[types[key]](value)
    cfg = dataclasses.replace(cfg, **overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = train(cfg, args.out, eval_every=args.eval_every)
    command = "python -m workbench.demo_model.train " + " ".join(argv if argv is not None else sys.argv[1:])
    info["command"] = command.strip()
    (Path(args.out) / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out}: {info['n_params']:,} parameters, {info['wall_time_s']} s")
    return info


if __name__ == "__main__":
    main()
