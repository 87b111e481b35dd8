"""Random-weight models built locally from a config: for tests, benchmarks and trying the API offline.

    random_model("gpt2")                        # 2 layers, d_model 32, word-level toy tokenizer
    random_model("llama", shape="tiny")         # GQA + RMSNorm
    random_model("gpt2", shape="gpt2-small")    # GPT-2-small shapes, vocab 50257, for benchmarks

Numbers from these models mean nothing; use the demo model (`load_model("demo")`) for pictures.
"""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from workbench.errors import InputError
from workbench.models.loading import load_model
from workbench.models.model import WorkbenchModel

SHAPES = {  # n_layers, d_model, n_heads
    "tiny": (2, 32, 4),
    "small": (4, 64, 4),
    "gpt2-small": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}

FAMILIES = ("gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "qwen2", "mistral", "gemma", "gemma2")

TOY_WORDS = (
    "<|endoftext|> <unk> When Mary and John went to the store , gave a drink book bag ball key to . "
    "Then Tom Anna Bob Lisa Paul Kate had fun at school park house office garden after while lunch "
    "The capital of France is Paris Rome Berlin Madrid cat dog sat on mat ran quickly slowly big small red "
    "blue green one two three four five six seven eight nine ten is was were it he she they we you I"
).split()


def toy_tokenizer():
    """A word-level tokenizer over `TOY_WORDS` with GPT-2's BOS/EOS convention (`<|endoftext|>`)."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(TOY_WORDS))}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )


def random_config(
    family: str = "gpt2", shape: str = "tiny", *, vocab_size: int | None = None, n_ctx: int = 64, **overrides
):
    """A transformers config of `family` with the layer/width/head counts of `shape`."""
    if shape not in SHAPES:
        raise InputError(f"Unknown shape {shape!r}; shapes: {', '.join(SHAPES)}.")
    if family not in FAMILIES:
        raise InputError(f"Unknown family {family!r}; families: {', '.join(FAMILIES)}.")
    n_layers, d_model, n_heads = SHAPES[shape]
    if vocab_size is None:
        vocab_size = 50257 if shape.startswith("gpt2-") else len(dict.fromkeys(TOY_WORDS))
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=n_layers,
            n_embd=d_model,
            n_head=n_heads,
            n_positions=max(n_ctx, 1024) if shape.startswith("gpt2-") else n_ctx,
            **common,
        )
    elif family.startswith("gpt_neox"):
        cfg = tf.GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            num_attention_heads=n_heads,
            intermediate_size=4 * d_model,
            max_position_embeddings=n_ctx,
            use_parallel_residual=family == "gpt_neox",
            **common,
        )
    else:
        config_cls = {
            "llama": tf.LlamaConfig,
            "qwen2": tf.Qwen2Config,
            "mistral": tf.MistralConfig,
            "gemma": tf.GemmaConfig,
            "gemma2": tf.Gemma2Config,
        }[family]
        extra = {"head_dim": d_model // n_heads} if family.startswith("gemma") else {}
        cfg = config_cls(
            num_hidden_layers=n_layers,
            hidden_size=d_model,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            intermediate_size=3 * d_model,
            max_position_embeddings=n_ctx,
            **extra,
            **common,
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def random_model(
    family: str = "gpt2",
    shape: str = "tiny",
    *,
    seed: int = 0,
    tokenizer: bool = True,
    device=None,
    dtype=None,
    **config_overrides,
) -> WorkbenchModel:
    """A `WorkbenchModel` with random weights (seeded), built offline from `random_config`."""
    cfg = random_config(family, shape, **config_overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    tok = toy_tokenizer() if tokenizer and cfg.vocab_size >= len(dict.fromkeys(TOY_WORDS)) else None
    model = load_model(hf_model, tok, device=device, dtype=dtype)
    model.name = f"random-{family}-{shape}"
    return model
