"""The bundled demo model: committed files, the model card's numbers, the mechanisms, and the training script."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel

from workbench.demo_model import DEMO_DIR
from workbench.demo_model import evaluate as ev
from workbench.demo_model import train as tr


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((DEMO_DIR / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def measured() -> dict:
    return ev.evaluate(DEMO_DIR)


def test_committed_files():
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "MODEL_CARD.md",
    ):
        assert (DEMO_DIR / name).is_file(), name
    assert (DEMO_DIR / "model.safetensors").stat().st_size < 20 * 2**20
    assert all(t.dtype == torch.float32 for t in load_file(DEMO_DIR / "model.safetensors").values())


def test_files_match_the_recorded_digests():
    from workbench.models.loading import DEMO_DIGESTS, check_digests

    check_digests(DEMO_DIR, DEMO_DIGESTS)  # load_model("demo") checks the same
    recorded = json.loads(DEMO_DIGESTS.read_text())["sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} == set(recorded)


def test_loads_as_gpt2_with_its_tokenizer():
    model = GPT2LMHeadModel.from_pretrained(DEMO_DIR, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n_params <= 10e6
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert (
        tok("When Mary", add_special_tokens=True).input_ids
        == tok("When Mary", add_special_tokens=False).input_ids
    )
    assert model.config.vocab_size == len(tok) and model.config.bos_token_id == tok.bos_token_id
    assert tok.model_max_length == model.config.n_positions


_TOLERANCE = {
    "accuracy": 0.005,
    "top1": 0.005,
    "logit_diff": 0.01,
    "loss": 0.005,
    "first_copy_accuracy": 0.005,
}


def test_reproduces_the_model_card_numbers(recorded, measured):
    assert abs(measured["validation_loss"] - recorded["validation_loss"]) < 0.005
    for name, values in recorded.items():
        if not isinstance(values, dict) or name == "targets" or name.startswith("patching"):
            continue
        for key, tol in _TOLERANCE.items():
            if key in values:
                assert measured[name][key] == pytest.approx(values[key], abs=tol), (name, key)
    for got, want in zip(
        measured["ioi_heldout_by_template"], recorded["ioi_heldout_by_template"], strict=True
    ):
        assert (got["template"], got["order"]) == (want["template"], want["order"])
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.005)
    for name in ("patching_train_template", "patching_heldout_template"):
        got, want = torch.tensor(measured[name]["grid"]), torch.tensor(recorded[name]["grid"])
        assert torch.allclose(got, want, atol=0.01), name


def test_model_card_is_written_from_the_recorded_numbers(recorded):
    info = json.loads((DEMO_DIR / "train_info.json").read_text())
    assert (DEMO_DIR / "MODEL_CARD.md").read_text() == ev.model_card(recorded, info, DEMO_DIR)


# Targets the committed model misses, as its card says. Listed here so that any other miss fails, and so that
# this list must be updated (with the card) when a retrained model meets them.
KNOWN_MISSES = {"induction.accuracy"}


def test_targets(measured, recorded):
    missed = {k for k, t in measured["targets"].items() if not t["met"]}
    assert missed == KNOWN_MISSES, {k: measured["targets"][k] for k in missed ^ KNOWN_MISSES}
    assert all(recorded["targets"][k]["met"] is False for k in KNOWN_MISSES)
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert all(f"`{k}` | >= {measured['targets'][k]['at_least']} |" in card for k in KNOWN_MISSES)
    assert f"**Missed targets: {', '.join(sorted(KNOWN_MISSES))}.**" in card


def _cell(result: dict, label: str, layer: int) -> float:
    pos = [i for i, p in enumerate(result["positions"]) if p.endswith(f"({label})")]
    assert len(pos) == 1, (label, result["positions"])
    return result["grid"][layer][pos[0]]


@pytest.mark.parametrize("name", ["patching_train_template", "patching_heldout_template"])
def test_ioi_patching_picture(measured, name):
    """resid_pre patching localises the task: the repeated subject (S2) in the first layer, the final
    position (END) in the last, and nothing at the non-name positions of the first layer."""
    result = measured[name]
    grid = torch.tensor(result["grid"])
    last = grid.shape[0] - 1
    assert _cell(result, "S2", 0) > 0.5
    assert _cell(result, "END", last) > 0.5
    assert _cell(result, "END", 0) < 0.2 and _cell(result, "S2", last) < 0.2
    names = [i for i, p in enumerate(result["positions"]) if p.endswith(("(IO)", "(S1)", "(S2)"))]
    others = [i for i in range(grid.shape[1]) if i not in names]
    assert grid[0, others].abs().max() < 0.1


def test_smoke_training_is_deterministic(tmp_path):
    cfg = tr.CONFIGS["smoke"]
    info = tr.train(cfg, tmp_path / "a", progress=False)
    tr.train(cfg, tmp_path / "b", progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert info["config"]["steps"] == cfg.steps and info["n_params"] > 0
    model, tok = ev.load(tmp_path / "a")
    assert model.config.n_layer == cfg.n_layer and tok.bos_token == "<|endoftext|>"
    quick = ev.quick_eval(model, tok)
    assert set(quick) == {"ioi_acc", "ioi_ld", "induction", "fact"}


def test_train_main_smoke(tmp_path):
    info = tr.main(["--config", "smoke", "--out", str(tmp_path), "--set", "steps=2"])
    assert info["config"]["steps"] == 2
    assert json.loads((tmp_path / "train_info.json").read_text())["command"].endswith("--set steps=2")
