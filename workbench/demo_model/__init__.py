"""The bundled demo model: a small GPT-2 (with LayerNorm) trained here on the demo corpus, with its own tokenizer.

`DEMO_DIR` is a Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer files,
``MODEL_CARD.md`` with the measured numbers). ``load_model("demo")`` loads it; the training and evaluation
scripts are ``python -m workbench.demo_model.train`` and ``python -m workbench.demo_model.evaluate``.
"""

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent / "model"

__all__ = ["DEMO_DIR"]
