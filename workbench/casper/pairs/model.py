"""Casper's challenge 2: a one-layer transformer that labels integer pairs (A, B), 0 <= A, B < 113, as 0 or 1.

The architecture is Neel Nanda's grokking transformer without LayerNorm (d_vocab 114, n_ctx 3, d_model 128,
8 heads of 16, d_mlp 1024, ReLU). Parameter names and shapes follow his checkpoint, so the challenge's
`transformer_model.pt` loads with no conversion; every activation of interest is the output of an identity
submodule named as in TransformerLens (``blocks[0].attn.hook_pattern``, ``blocks[0].hook_resid_mid``, ...), so
nnsight can read or overwrite it.

Also here: finding, loading and verifying the original weights (trust on first use), and the model's label rule.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.casper import data
from workbench.casper.measures import agreement
from workbench.casper.pairs.labels import P, PairLabels, all_pairs, load_labels
from workbench.errors import ModelLoadError


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
# The original weights
# ----------------------------------------------------------------------------------------------------------------

WEIGHTS_FILE = "transformer_model.pt"
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
# The model's labels, and a fixed thread count for training and fitting
# ----------------------------------------------------------------------------------------------------------------


def _labels_of(logits: torch.Tensor) -> torch.Tensor:
    """The model's label from logits [..., d_vocab]: 1 iff the logit of token 1 beats that of token 0."""
    return (logits[..., 1] > logits[..., 0]).long()


def predict_labels(model: PairTransformer) -> torch.Tensor:
    """The model's label for every pair, [A, B] long."""
    with torch.no_grad():
        return _labels_of(model.final_logits(all_pairs())).view(P, P)


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
