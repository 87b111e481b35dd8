"""Casper's challenge 2: a one-layer transformer that labels integer pairs (A, B), 0 <= A, B < 113, as 0 or 1.

The architecture is Neel Nanda's grokking transformer without LayerNorm (d_vocab 114, n_ctx 3, d_model 128,
8 heads of 16, d_mlp 1024, ReLU). Parameter names and shapes follow his checkpoint, so the challenge's
`transformer_model.pt` loads with no conversion; every activation of interest is the output of an identity
submodule named as in TransformerLens (``blocks[0].attn.hook_pattern``, ``blocks[0].hook_resid_mid``, ...), so
nnsight can read or overwrite it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.casper import data
from workbench.core import CancelToken, Run
from workbench.errors import InputError, ModelLoadError
from workbench.results import Provenance, Result

P = 113
"""Operands A and B range over 0..P-1."""
EQUALS = 113
"""The token in the third position (the "=" sign)."""


@dataclass(frozen=True)
class PairTransformerConfig:
    """Shape of the challenge model (the defaults are the challenge's)."""

    d_vocab: int = P + 1
    n_ctx: int = 3
    d_model: int = 128
    n_heads: int = 8
    d_head: int = 16
    d_mlp: int = 1024


class Hook(nn.Identity):
    """An identity module marking an activation, so that nnsight can read or set it as a module output."""


class Embed(nn.Module):
    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(cfg.d_model, cfg.d_vocab) / math.sqrt(cfg.d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, pos] -> [batch, pos, d_model]."""
        return self.W_E.T[tokens]


class PosEmbed(nn.Module):
    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) / math.sqrt(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.W_pos[: x.shape[-2]]


class Attention(nn.Module):
    """Causal multi-head attention without biases. W_Q/W_K/W_V are [head, d_head, d_model], W_O [d_model, head*d_head]."""

    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        shape = (cfg.n_heads, cfg.d_head, cfg.d_model)
        self.W_K = nn.Parameter(torch.randn(shape) / math.sqrt(cfg.d_model))
        self.W_Q = nn.Parameter(torch.randn(shape) / math.sqrt(cfg.d_model))
        self.W_V = nn.Parameter(torch.randn(shape) / math.sqrt(cfg.d_model))
        self.W_O = nn.Parameter(torch.randn(cfg.d_model, cfg.n_heads * cfg.d_head) / math.sqrt(cfg.d_model))
        self.register_buffer("mask", torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx)))
        self.d_head = cfg.d_head
        self.fixed_pattern: tuple[torch.Tensor, float] | None = None  # set by `fix_attention`, not saved
        self.hook_q = Hook()  # [batch, head, pos, d_head]
        self.hook_k = Hook()
        self.hook_v = Hook()
        self.hook_attn_scores = Hook()  # [batch, head, query, key], scaled and masked
        self.hook_pattern = Hook()  # [batch, head, query, key], rows sum to 1
        self.hook_z = Hook()  # [batch, head, query, d_head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        q = self.hook_q(torch.einsum("ihd,bpd->biph", self.W_Q, x))
        k = self.hook_k(torch.einsum("ihd,bpd->biph", self.W_K, x))
        v = self.hook_v(torch.einsum("ihd,bpd->biph", self.W_V, x))
        scores = torch.einsum("biqh,biph->biqp", q, k)
        # Same masking as the original: zero the future, then push it to -1e10.
        scores = torch.tril(scores) - 1e10 * (1 - self.mask[:n, :n])
        scores = self.hook_attn_scores(scores / math.sqrt(self.d_head))
        pattern = F.softmax(scores, dim=-1)
        if self.fixed_pattern is not None:
            fixed, mix = self.fixed_pattern
            last = fixed + mix * (pattern[:, :, -1] - fixed)
            pattern = torch.cat([pattern[:, :, :-1], last[:, :, None]], dim=2)
        pattern = self.hook_pattern(pattern)
        z = self.hook_z(torch.einsum("biph,biqp->biqh", v, pattern))
        return torch.einsum("df,bqf->bqd", self.W_O, z.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """ReLU MLP. W_in [d_mlp, d_model], W_out [d_model, d_mlp]."""

    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) / math.sqrt(cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) / math.sqrt(cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = Hook()  # [batch, pos, d_mlp]
        self.hook_post = Hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.W_in.T + self.b_in)
        post = self.hook_post(F.relu(pre))
        return post @ self.W_out.T + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = Hook()  # [batch, pos, d_model]
        self.hook_attn_out = Hook()
        self.hook_resid_mid = Hook()
        self.hook_mlp_out = Hook()
        self.hook_resid_post = Hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(x)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x)))


class Unembed(nn.Module):
    def __init__(self, cfg: PairTransformerConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.d_vocab) / math.sqrt(cfg.d_vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_U


class PairTransformer(nn.Module):
    """The challenge model: tokens [batch, 3] (A, B, 113) -> logits [batch, 3, 114].

    The label of (A, B) is 1 iff ``logits[:, -1, 1] > logits[:, -1, 0]``.
    """

    def __init__(self, cfg: PairTransformerConfig | None = None):
        super().__init__()
        self.cfg = cfg or PairTransformerConfig()
        self.embed = Embed(self.cfg)
        self.pos_embed = PosEmbed(self.cfg)
        self.blocks = nn.ModuleList([TransformerBlock(self.cfg)])
        self.unembed = Unembed(self.cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    def final_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position only, tokens [batch, 3] -> [batch, d_vocab].

        The same arithmetic as `forward` restricted to the one query the label depends on (about three times
        cheaper, which is what makes CPU training take minutes). The hooks are skipped.
        """
        attn, mlp, cfg = self.blocks[0].attn, self.blocks[0].mlp, self.cfg
        x = F.embedding(tokens, self.embed.W_E.T) + self.pos_embed.W_pos[: tokens.shape[-1]]
        batch, n = x.shape[:2]
        q = (x[:, -1] @ attn.W_Q.flatten(0, 1).T).view(batch, 1, cfg.n_heads, cfg.d_head)
        kv = x @ torch.cat([attn.W_K.flatten(0, 1), attn.W_V.flatten(0, 1)]).T
        k, v = kv.view(batch, n, 2, cfg.n_heads, cfg.d_head).unbind(2)  # [batch, key, head, d_head]
        pattern = ((k * q).sum(-1) / math.sqrt(cfg.d_head)).softmax(dim=1)  # [batch, key, head]
        if attn.fixed_pattern is not None:
            fixed, mix = attn.fixed_pattern
            pattern = fixed.T[:n] + mix * (pattern - fixed.T[:n])
        z = (pattern[..., None] * v).sum(1).flatten(1)  # [batch, head*d_head]
        resid_mid = x[:, -1] + z @ attn.W_O.T
        resid_post = (
            resid_mid + F.relu(torch.addmm(mlp.b_in, resid_mid, mlp.W_in.T)) @ mlp.W_out.T + mlp.b_out
        )
        return resid_post @ self.unembed.W_U


# ----------------------------------------------------------------------------------------------------------------
# The task: all 113 x 113 inputs, the published labels, the train/test split
# ----------------------------------------------------------------------------------------------------------------

N_PAIRS = P * P
WEIGHTS_FILE = "transformer_model.pt"
LABELS_FILE = "transformer_label_info.pkl"


def all_pairs() -> torch.Tensor:
    """Every input as tokens [P*P, 3] = (A, B, 113); row ``A*113 + B``, so ``.view(113, 113)`` gives [A, B]."""
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    return torch.stack([a.flatten(), b.flatten(), torch.full((N_PAIRS,), EQUALS)], dim=1)


def train_test_split(frac_train: float = 0.5, seed: int = 0) -> torch.Tensor:
    """is_train [A, B] (bool), the grokking code's split: shuffle the pairs with ``random.seed(seed)`` and take
    the first ``int(frac_train * 12769)``. The challenge does not say which split it used; with seed 0 the
    published model makes 19 of its 174 mistakes on the train half, so this is probably it."""
    if not 0 < frac_train < 1:
        raise InputError(f"frac_train must be between 0 and 1, got {frac_train}")
    pairs = [(a, b) for a in range(P) for b in range(P)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    is_train = torch.zeros(P, P, dtype=torch.bool)
    train = torch.tensor(pairs[: int(frac_train * N_PAIRS)])
    is_train[train[:, 0], train[:, 1]] = True
    return is_train


def casper_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """The challenge's "accuracy on the test half": ``1 - 2 * mean|predicted - truth|`` over all pairs. It equals
    test accuracy only if every mistake lies in the test half."""
    return 1.0 - 2.0 * (predicted.long() != truth.long()).double().mean().item()


def agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of pairs where two label maps agree (optionally within a boolean mask of the same shape)."""
    same = a.long().flatten() == b.long().flatten()
    if mask is not None:
        same = same[mask.flatten()]
    return same.double().mean().item()


@dataclass(frozen=True)
class PairLabels:
    """The published labels: ``labels`` (ground truth) and ``model_labels`` (the original model's), [A, B] long."""

    labels: torch.Tensor
    model_labels: torch.Tensor


def load_labels(
    path: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> PairLabels:
    """The challenge's `transformer_label_info.pkl`, found and checked by `workbench.casper.data` (a path, a
    data_dir, $WORKBENCH_CASPER_DIR, the cache, or a download)."""
    info = data.load_transformer_labels(path=path, data_dir=data_dir, download=download)
    return PairLabels(*(torch.as_tensor(info[k]).long() for k in ("labels", "model_labels")))


def row_transitions(labels: torch.Tensor) -> torch.Tensor:
    """Label changes along B in each row A: [A] long (the published labels have at most two per row)."""
    return (labels[:, 1:] != labels[:, :-1]).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The original weights
# ----------------------------------------------------------------------------------------------------------------

ORIGINAL_MIN_AGREEMENT = 0.999
"""A checkpoint counts as the original if its labels match the published `model_labels` on this fraction of the
12769 pairs (a few pairs may sit within float error of the decision boundary)."""


def _cache(cache: str | os.PathLike | None) -> Path:
    """Where replicas and the trust record live: `cache`, else the challenge download cache."""
    return Path(cache).expanduser() if cache is not None else data.cache_dir()


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> PairTransformer:
    """A `PairTransformer` from a checkpoint in the original's format: a dict whose "model" entry is the state
    dict (the grokking code's save format), or a bare state dict. Read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ModelLoadError(
            f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {exc}). "
            f"Download {WEIGHTS_FILE} again from {data.FILES[WEIGHTS_FILE].urls[0]}."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"{path} holds a {type(state).__name__}, not a state dict (or a dict with 'model')."
        )
    model = PairTransformer()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path} does not fit the challenge-2 architecture: {exc}") from exc
    return model.eval()


def trust_record(cache: str | os.PathLike | None = None) -> Path:
    """The file that keeps the sha256 of the first verified copy of the original weights."""
    return _cache(cache) / "trusted_sha256.json"


def _verified_original(
    file: Path, labels: PairLabels | None, cache: str | os.PathLike | None
) -> PairTransformer:
    """Load `file` after checking it is the original.

    The weights' sha256 is not known (no copy could be fetched when this was written), so: if the data registry
    pins a digest, it must match; else trust on first use: a sha256 recorded earlier in `trust_record()` must
    match; with no record yet, the model must reproduce the published `model_labels` (whose file is pinned), and
    then its sha256 is recorded for the next loads. Pin the recorded value in `workbench.casper.data.FILES`.
    """
    url = data.FILES[WEIGHTS_FILE].urls[0]
    if data.FILES[WEIGHTS_FILE].digest is not None:
        data.verify_file(file, WEIGHTS_FILE)
        return load_state(file)
    digest = data.file_digest(file)
    record_path = trust_record(cache)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    expected = record.get(WEIGHTS_FILE, {}).get("sha256")
    if expected is not None and digest != expected:
        raise ModelLoadError(
            f"{file} has sha256 {digest}, but the first verified copy of {WEIGHTS_FILE} (recorded in "
            f"{record_path}) has {expected}. The file is corrupt or not the original: download it again from "
            f"{url}, or delete {record_path} if you trust this copy."
        )
    model = load_state(file)
    if expected is None:
        labels = labels if labels is not None else load_labels()
        agree = agreement(predict_labels(model), labels.model_labels)
        if agree < ORIGINAL_MIN_AGREEMENT:
            raise ModelLoadError(
                f"{file} is not the challenge's original model: its labels match the published model_labels on "
                f"{agree:.2%} of pairs (the original's match them all). Download {WEIGHTS_FILE} from {url}."
            )
        record[WEIGHTS_FILE] = {
            "sha256": digest,
            "path": str(file),
            "verified": f"its labels match the published model_labels on {agree:.4%} of pairs",
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2))
    return model


def find_original(
    path: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None
) -> Path | None:
    """Where `transformer_model.pt` is: `path` (the file or its folder; must exist), else `data_dir` or
    $WORKBENCH_CASPER_DIR, else the download cache. None if nowhere."""
    if path is not None:
        file = Path(path).expanduser()
        file = file / WEIGHTS_FILE if file.is_dir() else file
        if not file.is_file():
            raise ModelLoadError(f"{file} does not exist: give the path of {WEIGHTS_FILE} or of its folder.")
        return file
    return data.find(WEIGHTS_FILE, data_dir=data_dir, verify=False)


def load_original(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    labels: PairLabels | None = None,
    cache: str | os.PathLike | None = None,
) -> PairTransformer:
    """The challenge's trained model from `path`, `data_dir`, $WORKBENCH_CASPER_DIR or the download cache, or
    downloaded from the challenge repository when ``download=True``. Every copy is verified (see
    `_verified_original`); `labels` are read from the data folder when not given. `cache` holds the trust record
    (default: the download cache)."""
    file = find_original(path, data_dir=data_dir)
    if file is None and download:
        file = data.fetch(WEIGHTS_FILE, verify=False)
        try:
            return _verified_original(file, labels, cache)
        except ModelLoadError:
            file.unlink(missing_ok=True)  # never leave an unverified download where the next call finds it
            raise
    if file is None:
        raise ModelLoadError(
            f"{WEIGHTS_FILE} (the challenge's original weights) was not found. To fix: pass its path, or a "
            f"data_dir holding it, or set {data.ENV_VAR} to that folder, or call with download=True to fetch it "
            f"from {data.FILES[WEIGHTS_FILE].urls[0]}. Without it, `load_challenge_model()` trains a replica on "
            "the published labels."
        )
    return _verified_original(file, labels, cache)


# ----------------------------------------------------------------------------------------------------------------
# A replica trained on the published labels
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaRecipe:
    """How a replica is trained: the grokking code's recipe as the challenge copied it (full batch, AdamW with
    betas (0.9, 0.98), weight decay 1.0, lr 5e-4, 10 warm-up steps, cross-entropy over the whole vocabulary at the
    last position, 50% split with seed 0), for the copied 5000 epochs by default; the tests and the notebook's CI
    run use 1000, which reach the reported accuracy but leave much of the random initialisation in the weights
    (see the notebook). Training is deterministic for a given recipe on a given machine (seeded init, fixed thread
    count)."""

    epochs: int = 5000
    lr: float = 5e-4
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 10
    frac_train: float = 0.5
    split_seed: int = 0
    init_seed: int = 0
    threads: int = 2
    eval_every: int = 50

    def __post_init__(self):
        if self.epochs < 1 or self.eval_every < 1 or self.threads < 1:
            raise InputError("epochs, eval_every and threads must be positive integers")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InputError(
                f"lr must be positive and weight_decay non-negative, got {self.lr}, {self.weight_decay}"
            )
        if not 0 < self.frac_train < 1:
            raise InputError(f"frac_train must be between 0 and 1, got {self.frac_train}")

    def key(self, labels: torch.Tensor) -> str:
        """Cache key: a hash of every hyper-parameter, the seeds and the labels trained on."""
        blob = json.dumps(
            {
                "recipe": dataclasses.asdict(self),
                "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReplicaReport(Result):
    """How a replica trained. Curves are [checkpoint] over `epochs`; accuracies are against the ground-truth
    labels, `agreement` against the original model's published labels (all 12769 pairs)."""

    viz_module: ClassVar[str] = "workbench.viz.casper_pairs"

    recipe: dict
    epochs: torch.Tensor
    train_loss: torch.Tensor
    train_accuracy: torch.Tensor
    test_accuracy: torch.Tensor
    agreement: torch.Tensor
    seconds: float
    cache_key: str
    provenance: Provenance

    @property
    def final(self) -> dict[str, float]:
        return {
            "train_accuracy": self.train_accuracy[-1].item(),
            "test_accuracy": self.test_accuracy[-1].item(),
            "agreement_with_original": self.agreement[-1].item(),
        }

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "epoch": self.epochs.numpy(),
                "train_loss": self.train_loss.numpy(),
                "train_accuracy": self.train_accuracy.numpy(),
                "test_accuracy": self.test_accuracy.numpy(),
                "agreement_with_original": self.agreement.numpy(),
            }
        )


class _Threads:
    """Run a block with a fixed torch thread count (and, optionally, deterministic kernels), then restore."""

    def __init__(self, n: int, deterministic: bool = False):
        self.n, self.deterministic = n, deterministic

    def __enter__(self):
        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        torch.set_num_threads(self.n)
        if self.deterministic:
            torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved[0])
        torch.use_deterministic_algorithms(self.saved[1])


def train_replica(
    labels: PairLabels,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    *,
    progress: bool = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    on_eval: Callable[[int, PairTransformer], None] | None = None,
) -> tuple[PairTransformer, ReplicaReport]:
    """Train a `PairTransformer` on the ground-truth labels of the train half. Returns the model (eval mode)
    and its `ReplicaReport`. `on_eval(epoch, model)` is called at every evaluation (e.g. to keep snapshots); it
    must not change the model. The default recipe takes about 10 minutes on two idle CPU cores."""
    is_train = train_test_split(recipe.frac_train, recipe.split_seed).flatten()
    tokens = all_pairs()
    truth = labels.labels.flatten()
    train_tokens, train_targets = tokens[is_train], truth[is_train]
    history: dict[str, list[float]] = {k: [] for k in ("epoch", "loss", "train", "test", "agree")}
    run = Run.of(run, progress=progress, cancel=cancel)
    start = time.perf_counter()
    with _Threads(recipe.threads, deterministic=True):
        torch.manual_seed(recipe.init_seed)
        model = PairTransformer()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas
        )
        warmup = max(recipe.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / warmup, 1.0))

        def evaluate(epoch: int) -> None:
            with torch.no_grad():
                logits = model.final_logits(tokens)
                predicted = _labels_of(logits)
                loss = F.cross_entropy(logits[is_train].double(), train_targets)
            history["epoch"].append(epoch)
            history["loss"].append(loss.item())
            history["train"].append(agreement(predicted, truth, is_train))
            history["test"].append(agreement(predicted, truth, ~is_train))
            history["agree"].append(agreement(predicted, labels.model_labels))
            if on_eval is not None:
                on_eval(epoch, model)

        for epoch in run.steps(recipe.epochs, desc="training the replica"):
            if epoch % recipe.eval_every == 0:
                evaluate(epoch)
            # Float64 loss over the whole vocabulary, as the original training code.
            loss = F.cross_entropy(model.final_logits(train_tokens).double(), train_targets)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        evaluate(recipe.epochs)
    seconds = time.perf_counter() - start
    model.eval()
    report = ReplicaReport(
        recipe=dataclasses.asdict(recipe),
        epochs=torch.tensor(history["epoch"]),
        train_loss=torch.tensor(history["loss"], dtype=torch.float64),
        train_accuracy=torch.tensor(history["train"], dtype=torch.float64),
        test_accuracy=torch.tensor(history["test"], dtype=torch.float64),
        agreement=torch.tensor(history["agree"], dtype=torch.float64),
        seconds=seconds,
        cache_key=recipe.key(labels.labels),
        provenance=Provenance.capture("casper-pair-replica", **dataclasses.asdict(recipe)),
    )
    return model, report


def initialisation_left(model: PairTransformer, recipe: ReplicaRecipe) -> dict[str, float]:
    """For each weight matrix, how much of the replica's random initialisation is still in it: the coefficient
    of the trained weights' projection on their initial values (rebuilt from the recipe's seed). AdamW's decoupled
    weight decay alone shrinks it by ``exp(-lr * weight_decay * epochs)``."""
    torch.manual_seed(recipe.init_seed)
    initial = PairTransformer().state_dict()
    out = {}
    for name, trained in model.state_dict().items():
        start = initial[name].double().flatten()
        if name.endswith("mask") or start.norm() == 0:
            continue  # the mask buffer and the zero-initialised biases
        out[name] = (trained.double().flatten() @ start / (start @ start)).item()
    return out


def replica_path(labels: PairLabels, recipe: ReplicaRecipe, cache: str | os.PathLike | None = None) -> Path:
    """The cache file of the replica that `recipe` trains on `labels`."""
    return _cache(cache) / f"pair_replica_{recipe.key(labels.labels)}.pt"


def load_replica(
    labels: PairLabels,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    *,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[PairTransformer, ReplicaReport]:
    """The replica for `recipe`: read from the cache, or trained (minutes) and cached. The cache file holds the
    state dict in the original's format ({"model": ..., "epoch": ...}) plus the training report."""
    file = replica_path(labels, recipe, cache)
    if file.is_file() and not retrain:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
            model = PairTransformer()
            model.load_state_dict(data["model"])
            return model.eval(), _report_from_dict(data["report"])
        except Exception as exc:  # a cache file from an older version or a broken write: train again
            warnings.warn(
                f"ignoring the unreadable cached replica {file} ({exc}); training it again", stacklevel=2
            )
    model, report = train_replica(labels, recipe, progress=progress)
    save_replica(model, report, file)
    return model, report


def save_replica(model: PairTransformer, report: ReplicaReport, file: str | os.PathLike) -> Path:
    """Write a replica as `load_replica` caches it (the original's checkpoint format plus the report)."""
    file = Path(file)
    _atomic_save(
        {"model": model.state_dict(), "epoch": report.recipe["epochs"], "report": _report_to_dict(report)},
        file,
    )
    return file


def _report_to_dict(report: ReplicaReport) -> dict:
    out = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    # Through JSON: version strings are str subclasses that weights_only loading refuses.
    out["provenance"] = json.loads(json.dumps(dataclasses.asdict(report.provenance), default=str))
    return out


def _report_from_dict(data: dict) -> ReplicaReport:
    data = dict(data)
    data["provenance"] = Provenance(**data["provenance"])
    data["recipe"] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["recipe"].items()}
    return ReplicaReport(**data)


@dataclass(frozen=True)
class ChallengeModel:
    """The model a tutorial runs on: the original when its weights are found, else a replica."""

    model: PairTransformer
    kind: Literal["original", "replica"]
    source: str
    labels: PairLabels
    report: ReplicaReport | None = None

    @property
    def is_original(self) -> bool:
        return self.kind == "original"


def load_challenge_model(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    recipe: ReplicaRecipe = ReplicaRecipe(),
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> ChallengeModel:
    """The original model if `transformer_model.pt` is found (or downloaded with ``download=True``), else the
    replica for `recipe` (cached, or trained now). An explicit `path` that does not exist is an error, not a
    reason to fall back to a replica."""
    beside = None if path is None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    if data_dir is None and beside is not None and (beside / LABELS_FILE).is_file():
        labels = load_labels(beside / LABELS_FILE)
    else:
        labels = load_labels(data_dir=data_dir)
    file = find_original(path, data_dir=data_dir)
    if file is not None or download:
        model = load_original(file, data_dir=data_dir, download=download, labels=labels, cache=cache)
        source = file or find_original(data_dir=data_dir)
        return ChallengeModel(model, "original", str(source), labels)
    model, report = load_replica(labels, recipe, cache=cache, progress=progress)
    return ChallengeModel(model, "replica", str(replica_path(labels, recipe, cache)), labels, report)


# ----------------------------------------------------------------------------------------------------------------
# Running the model on every pair
# ----------------------------------------------------------------------------------------------------------------


def _labels_of(logits: torch.Tensor) -> torch.Tensor:
    """The model's label from logits [..., d_vocab]: 1 iff the logit of token 1 beats that of token 0."""
    return (logits[..., 1] > logits[..., 0]).long()


def predict_labels(model: PairTransformer) -> torch.Tensor:
    """The model's label for every pair, [A, B] long."""
    with torch.no_grad():
        return _labels_of(model.final_logits(all_pairs())).view(P, P)


@dataclass(frozen=True)
class PairRun:
    """Activations at the last position for all 12769 pairs (row ``A*113 + B``).

    pattern [pair, head, key]: attention of the last query; resid_mid, mlp_out, resid_post [pair, d_model];
    logit_diff [pair]: logit of token 1 minus token 0; labels [A, B].
    """

    pattern: torch.Tensor
    resid_mid: torch.Tensor
    mlp_out: torch.Tensor
    resid_post: torch.Tensor
    logit_diff: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return (self.logit_diff > 0).long().view(P, P)


def run_pairs(model: PairTransformer) -> PairRun:
    """Run every pair through `model` with nnsight and keep the last position's activations."""
    import nnsight

    net = nnsight.NNsight(model)
    with torch.no_grad(), net.trace(all_pairs()):
        block = net.blocks[0]
        pattern = block.attn.hook_pattern.output[:, :, -1].save()
        resid_mid = block.hook_resid_mid.output[:, -1].save()
        mlp_out = block.hook_mlp_out.output[:, -1].save()
        resid_post = block.hook_resid_post.output[:, -1].save()
        logits = net.unembed.output[:, -1].save()
    return PairRun(
        pattern=pattern.clone(),
        resid_mid=resid_mid.clone(),
        mlp_out=mlp_out.clone(),
        resid_post=resid_post.clone(),
        logit_diff=(logits[:, 1] - logits[:, 0]).clone(),
    )


def mean_pattern(run: PairRun) -> torch.Tensor:
    """The last query's attention averaged over all pairs, [head, key]."""
    return run.pattern.mean(0)


def fix_attention(model: PairTransformer, pattern: torch.Tensor, mix: float = 0.0) -> PairTransformer:
    """A copy of `model` whose last query attends with ``pattern + mix * (own pattern - pattern)``.

    pattern: [head, key] (usually `mean_pattern`). mix 0 fixes attention to `pattern` for every input; mix 1 is
    the unchanged model. The hook `hook_pattern` shows the pattern actually used.
    """
    cfg = model.cfg
    pattern = torch.as_tensor(pattern, dtype=torch.float32)
    if pattern.shape != (cfg.n_heads, cfg.n_ctx):
        raise InputError(
            f"pattern must be [head, key] = [{cfg.n_heads}, {cfg.n_ctx}], got {tuple(pattern.shape)}"
        )
    fixed = PairTransformer(cfg)
    fixed.load_state_dict(model.state_dict())
    fixed.blocks[0].attn.fixed_pattern = (pattern.clone(), float(mix))
    return fixed.eval()


def resid_to_logits(model: PairTransformer, resid_mid: torch.Tensor) -> torch.Tensor:
    """Finish the forward pass from resid_mid [..., d_model] at the last position: MLP, then unembed."""
    block = model.blocks[0]
    with torch.no_grad():
        x = resid_mid.to(torch.float32)
        return model.unembed(x + block.mlp(x))


def labels_from_resid_mid(model: PairTransformer, resid_mid: torch.Tensor) -> torch.Tensor:
    """Labels [A, B] the model gives when its last-position resid_mid is `resid_mid` [pair, d_model]."""
    return _labels_of(resid_to_logits(model, resid_mid)).view(P, P)


# ----------------------------------------------------------------------------------------------------------------
# resid_mid: PCA, the corner boundary, the two filters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCA:
    """Principal components of activations [n, d]: mean [d], components [d, d] (rows, orthonormal, by variance),
    explained [d] (fraction of variance). Each component's sign is chosen so that its largest loading is positive."""

    mean: torch.Tensor
    components: torch.Tensor
    explained: torch.Tensor

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> coordinates [..., d]."""
        return (x.double() - self.mean) @ self.components.T

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() @ self.components + self.mean


def fit_pca(x: torch.Tensor) -> PCA:
    """PCA of x [n, d] (float64 SVD)."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    largest = vh.abs().argmax(1)
    vh = vh * torch.sign(vh[torch.arange(len(vh)), largest])[:, None]
    return PCA(mean=mean, components=vh, explained=s**2 / (s**2).sum())


@dataclass(frozen=True)
class AndGate:
    """Class 1 iff two linear filters of resid_mid both pass: ``x @ directions[i] > thresholds[i]`` for i = 0 (alpha)
    and 1 (beta). Both directions lie in the span of the first k principal components (k = 2 in the solution).

    pca: the PCA of resid_mid. normals [2, k] (unit, pointing into class 1) and offsets [2]: the two boundaries in
    the coordinates of the first k components (``normals[i] @ pc_coords > offsets[i]``). directions [2, d] and
    thresholds [2]: the same filters in resid_mid space. moves [2, d]: adding ``s * moves[0]`` to resid_mid changes
    the alpha filter by s and leaves beta unchanged (and vice versa).
    """

    pca: PCA
    normals: torch.Tensor
    offsets: torch.Tensor
    directions: torch.Tensor
    thresholds: torch.Tensor
    moves: torch.Tensor

    @property
    def n_components(self) -> int:
        return self.normals.shape[1]

    @property
    def corner(self) -> torch.Tensor:
        """Where the two boundaries cross, in PC coordinates [k] (the point nearest the mean if k > 2)."""
        return torch.linalg.pinv(self.normals) @ self.offsets

    def filters(self, x: torch.Tensor) -> torch.Tensor:
        """Signed filter margins [..., 2]: positive where a filter passes."""
        return x.double() @ self.directions.T - self.thresholds

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """AND of the two filters, long [...]."""
        return (self.filters(x) > 0).all(-1).long()

    def basis(self) -> torch.Tensor:
        """The scrubbing basis [d, d]: rows moves[0], moves[1], then the rest of the span of the first k components
        (orthogonal to both filters), then components k+1...; resid_mid minus its mean is ``coords @ basis``, and
        coords[0], coords[1] are the two filter values (up to constants)."""
        k = self.n_components
        rest = torch.linalg.svd(self.normals, full_matrices=True).Vh[
            2:
        ]  # [k - 2, k]: null space of the normals
        return torch.cat([self.moves, rest @ self.pca.components[:k], self.pca.components[k:]])

    def boundary_line(self, extent: float = 1.0, n: int = 2) -> torch.Tensor:
        """The corner's two arms in the PC1-PC2 plane for plotting: [2 arms, n points, 2] (k = 2 only)."""
        if self.n_components != 2:
            raise InputError("the boundary is a pair of lines only for a gate fitted on two components")
        arms = []
        for i in range(2):
            along = torch.stack([-self.normals[i, 1], self.normals[i, 0]])  # along boundary i
            other = self.normals[1 - i]
            # The arm is the half of the line on the class-1 side of the other line.
            along = along if (along @ other) > 0 else -along
            t = torch.linspace(0, extent, n, dtype=torch.float64)
            arms.append(self.corner + t[:, None] * along)
        return torch.stack(arms)


def _fit_corners(u: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, steps: int):
    """Adam on the cross-entropy of a smooth AND, sigmoid(u.w0 - b0) * sigmoid(u.w1 - b1), for several starts at
    once: u [n, k], y [n], w [start, 2, k], b [start, 2]."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        margins = torch.einsum("nk,sfk->snf", u, w) - b[:, None, :]
        p = torch.sigmoid(margins).prod(-1).clamp(1e-9, 1 - 1e-9)
        loss = F.binary_cross_entropy(p, y.expand_as(p), reduction="none").mean(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return w.detach(), b.detach()


def fit_and_gate(
    x: torch.Tensor, labels: torch.Tensor, *, n_components: int = 2, pca: PCA | None = None, seed: int = 0
) -> AndGate:
    """Fit the corner boundary: class 1 iff two half-spaces of the first `n_components` principal components
    both hold (two half-planes of PC1-PC2, the solution's corner, for the default 2).

    x [pair, d] resid_mid of all pairs; labels [pair] or [A, B]. Maximises a smooth AND (product of two sigmoids)
    by gradient descent from 24 starting orientations and keeps the one with the best hard accuracy.
    """
    pca = pca or fit_pca(x)
    k = n_components
    if not 2 <= k <= x.shape[-1]:
        raise InputError(f"n_components must be between 2 and {x.shape[-1]}, got {k}")
    u = pca.transform(x)[:, :k]
    y = labels.flatten().double()
    scale = u[:, :2].std(0).mean()
    u = u / scale
    generator = torch.Generator().manual_seed(seed)
    # 24 starts (8 orientations x 3 opening angles in the PC1-PC2 plane): w [start, filter, k], b [start, filter].
    # They are screened on a subset of the points; the best is refined on all of them.
    theta = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    gaps = torch.tensor([math.pi / 3, math.pi / 2, 2 * math.pi / 3], dtype=torch.float64)
    angles = torch.stack([theta.repeat(3), (theta[None] + gaps[:, None]).flatten()], dim=1)
    w = torch.zeros(len(angles), 2, k, dtype=torch.float64)
    w[..., :2] = 4.0 * torch.stack([angles.cos(), angles.sin()], dim=-1)
    w[..., 2:] = 0.5 * torch.randn(len(angles), 2, k - 2, generator=generator, dtype=torch.float64)
    start = u.mean(0) + 0.1 * torch.randn(len(angles), 1, k, generator=generator, dtype=torch.float64)
    b = (w * start).sum(-1)
    subset = torch.randperm(len(u), generator=generator)[:3000]
    with _Threads(1):  # small tensors: one thread is faster, and far faster on a busy machine
        w, b = _fit_corners(u[subset], y[subset], w, b, steps=300)
        with torch.no_grad():
            margins = torch.einsum("nk,sfk->snf", u, w) - b[:, None, :]
            accuracy = ((margins > 0).all(-1).double() == y).double().mean(1)
        best = int(accuracy.argmax())
        w, b = _fit_corners(u, y, w[best : best + 1], b[best : best + 1], steps=200)
    w, b = w[0], b[0]
    # Undo the scaling: w.u/scale - b > 0  <=>  (w/|w|).u > b*scale/|w|.
    norms = w.norm(dim=1)
    normals, offsets = w / norms[:, None], b * scale / norms
    components = pca.components[:k]
    directions = normals @ components
    thresholds = offsets + directions @ pca.mean
    # moves: in the span, dual to the directions (directions @ moves.T = identity).
    moves = torch.linalg.solve(normals @ normals.T, normals) @ components
    # Order the filters so that alpha is the one that varies more with A (the first token).
    grid = (x.double() @ directions.T - thresholds).view(P, P, 2)
    a_share = grid.mean(1).var(0) / (grid.mean(1).var(0) + grid.mean(0).var(0))
    order = [1, 0] if a_share[1] > a_share[0] else [0, 1]
    return AndGate(pca, normals[order], offsets[order], directions[order], thresholds[order], moves[order])


def mlp_fold(run: PairRun, fractions: torch.Tensor | list[float], pca: PCA | None = None) -> torch.Tensor:
    """resid_mid + f * mlp_out for each fraction f, projected on the first two principal components of resid_post
    (or of `pca`): [fraction, pair, 2]. f = 0 is resid_mid, f = 1 is resid_post."""
    pca = pca or fit_pca(run.resid_post)
    f = torch.as_tensor(fractions, dtype=torch.float64)
    points = run.resid_mid.double()[None] + f[:, None, None] * run.mlp_out.double()[None]
    return pca.transform(points)[..., :2]


# ----------------------------------------------------------------------------------------------------------------
# Extended embeddings: resid_mid as a sum of a term in A, a term in B and a constant
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtendedEmbeddings:
    """Under a fixed attention pattern, the last position's resid_mid is ``W_A[A] + W_B[B] + const``.

    W_A, W_B [token, d_model] (tokens 0..112): each token's embedding passed through every head's OV circuit,
    weighted by that head's attention to position 0 (for A) or 1 (for B). const [d_model]: the "=" token, all
    position embeddings and their OV images.
    """

    W_A: torch.Tensor
    W_B: torch.Tensor
    const: torch.Tensor

    def resid_mid(self) -> torch.Tensor:
        """[pair, d_model], pairs in the usual order."""
        return (self.W_A[:, None] + self.W_B[None, :] + self.const).reshape(N_PAIRS, -1)


def extended_embeddings(model: PairTransformer, pattern: torch.Tensor) -> ExtendedEmbeddings:
    """W_A, W_B and const of `model` under a fixed last-query attention `pattern` [head, key]."""
    attn = model.blocks[0].attn
    with torch.no_grad():
        W_E, W_pos = model.embed.W_E.T.double(), model.pos_embed.W_pos.double()  # [vocab, d], [pos, d]
        W_O = attn.W_O.double().view(-1, model.cfg.n_heads, model.cfg.d_head)  # [d, head, d_head]
        # OV circuit of each head as a map on row vectors: x -> x @ ov[h], [head, d, d].
        ov = torch.einsum("hkd,mhk->hdm", attn.W_V.double(), W_O)
        weights = pattern.double()  # [head, key]

        def through(x: torch.Tensor, key: int) -> torch.Tensor:
            return torch.einsum("h,...d,hdm->...m", weights[:, key], x, ov)

        W_A, W_B = through(W_E[:P], 0), through(W_E[:P], 1)
        last = W_E[EQUALS] + W_pos[2]
        const = last + through(last, 2) + through(W_pos[0], 0) + through(W_pos[1], 1)
    return ExtendedEmbeddings(W_A=W_A, W_B=W_B, const=const)


def additive_fit(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best fit of a map [A, B] as ``a[A] + b[B]`` (row and column means): returns (a [A], b [B], r2, max error)."""
    grid = grid.double()
    total = grid.mean()
    a = grid.mean(1)
    b = grid.mean(0) - total
    fit = a[:, None] + b[None, :]
    residual = grid - fit
    r2 = 1 - residual.pow(2).sum().item() / (grid - total).pow(2).sum().item()
    return a, b, r2, residual.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Causal scrubbing of resid_mid (with the generic engine in workbench.scrubbing)
# ----------------------------------------------------------------------------------------------------------------

SCRUB_SITE = "blocks.0.hook_resid_mid"
SCHEMES = ("[1]", "[1*]", "[1+2]", "[1+3a]", "[1+3b]", "[1+2+3a]", "[1+2+3b]", "[1+2+3a+3b]")
SCHEME_DESCRIPTIONS = {
    "[1]": "every coordinate but the two filters resampled from a random pair",
    "[1*]": "as [1], but coordinate 3 kept (PC3 for a gate in two components)",
    "[1+2]": "[1], and each filter coordinate resampled from a pair on which that filter gives the same result",
    "[1+3a]": "[1], and the alpha coordinate resampled among all pairs whose beta filter fails",
    "[1+3b]": "[1], and the beta coordinate resampled among all pairs whose alpha filter fails",
    "[1+2+3a]": "[1+2], but alpha drawn within three groups: beta fails; beta and alpha pass; beta passes, alpha fails",
    "[1+2+3b]": "[1+2], but beta drawn within three groups: alpha fails; alpha and beta pass; alpha passes, beta fails",
    "[1+2+3a+3b]": "[1+2+3a], then beta as in [1+2+3b] but grouped by the alpha outcome after resampling alpha",
}


def _resample_within(mask: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
    """Group keys for `same_value`: pairs where `mask` holds share one group (or groups by `key`); every other
    pair is its own group, i.e. keeps its value."""
    n = len(mask)
    inside = torch.zeros(n, dtype=torch.long) if key is None else key.long()
    return torch.where(mask, inside, n + torch.arange(n))


def scrub_hypotheses(gate: AndGate, resid_mid: torch.Tensor, schemes: Sequence[str] = SCHEMES, seed: int = 0):
    """The solution's resampling schemes as `workbench.scrubbing.Hypothesis` objects.

    Coordinates are those of `AndGate.basis` (0: alpha, 1: beta, 2..: PC3...). gate: fitted on `resid_mid`
    [pair, d_model], the resid_mid of the model being scrubbed, whose filter results define the groups.
    A scheme's resampling of one coordinate draws, for each pair, a donor from its group (a random permutation
    within each group), as the solution does; where two steps touch the same coordinate, the later group applies.
    """
    from workbench.scrubbing import Hypothesis, Resample, fixed_donors, random_donors, same_value

    unknown = [s for s in schemes if s not in SCHEME_DESCRIPTIONS]
    if unknown:
        raise InputError(f"unknown scrubbing scheme(s) {unknown}; choose from {list(SCHEMES)}")
    basis = gate.basis()
    d = basis.shape[0]
    passes = gate.filters(resid_mid) > 0
    alpha, beta = passes[:, 0], passes[:, 1]
    generator = torch.Generator().manual_seed(seed)

    def rule(units, donors):
        return Resample(SCRUB_SITE, donors, units=list(units), basis=basis, at=(2,))

    hypotheses = []
    for name in schemes:
        rules = [rule(range(3 if name == "[1*]" else 2, d), random_donors())]
        if name in ("[1+2]", "[1+2+3b]"):
            rules.append(rule([0], same_value(alpha.long())))
        if name in ("[1+2]", "[1+2+3a]"):
            rules.append(rule([1], same_value(beta.long())))
        if name == "[1+3a]":
            rules.append(rule([0], same_value(_resample_within(~beta))))
        if name == "[1+3b]":
            rules.append(rule([1], same_value(_resample_within(~alpha))))
        if name in ("[1+2+3a]", "[1+2+3a+3b]"):
            # beta fails: alpha from any pair whose beta fails; beta passes: alpha from a pair with the same alpha
            key = torch.where(~beta, torch.full_like(alpha, 2, dtype=torch.long), alpha.long())
            alpha_donors = same_value(key).draw(len(key), generator)
            rules.append(rule([0], fixed_donors(alpha_donors)))
            if name == "[1+2+3a+3b]":
                new_alpha = alpha[alpha_donors]  # the alpha filter depends on coordinate 0 only
                key = torch.where(~new_alpha, torch.full_like(beta, 2, dtype=torch.long), beta.long())
                rules.append(rule([1], same_value(key)))
        if name == "[1+2+3b]":
            key = torch.where(~alpha, torch.full_like(beta, 2, dtype=torch.long), beta.long())
            rules.append(rule([1], same_value(key)))
        hypotheses.append(Hypothesis(name, tuple(rules)))
    return hypotheses


class _AgreesWith:
    """Scrubbing metric: 1.0 where the patched label equals a fixed reference label (e.g. the full model's),
    instead of the scrubbed model's own clean label. Needs the whole batch in one trace."""

    def __init__(self, reference: torch.Tensor):
        self.reference = reference.flatten().long()

    def __call__(self, clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        if len(patched) != len(self.reference):
            raise InputError(
                "the reference labels must cover the whole batch (scrub with batch_size >= all pairs)"
            )
        return (_labels_of(patched[:, -1]) == self.reference).float()

    def __repr__(self) -> str:
        return "agreement with the full model's labels"


def scrub_schemes(
    model: PairTransformer,
    gate: AndGate,
    resid_mid: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    schemes: Sequence[str] = SCHEMES,
    seed: int = 0,
    progress: bool = False,
):
    """Run the resampling schemes on `model` with `workbench.scrubbing.scrub` and return its `ScrubResult`.

    `kept` is the fraction of pairs whose label is unchanged, against `reference` labels [A, B] if given (the
    full model's labels, when scrubbing the fixed-attention model; `clean_score` is then the baseline), else
    against `model`'s own labels.
    """
    from workbench.scrubbing import labels_kept, scrub

    metric = _AgreesWith(reference) if reference is not None else labels_kept(position=-1, classes=(0, 1))
    hypotheses = scrub_hypotheses(gate, resid_mid, schemes, seed=seed)
    return scrub(
        model,
        all_pairs(),
        hypotheses,
        output="unembed",
        metric=metric,
        batch_size=N_PAIRS,
        seed=seed,
        progress=progress,
    )
