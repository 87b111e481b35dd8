"""Latent x position sweeps on the demo model and its SAE: each cell equals the same edit made with a plain PyTorch
hook; edits that change nothing give exactly 0 without a run; bad input is refused; results save and plot."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import InputError
from workbench.models import load_model
from workbench.results import load_result
from workbench.sae import latent_sweep, load_demo_sae
from workbench.tasks import ioi_pairs


@pytest.fixture(scope="module")
def model():
    return load_model("demo")


@pytest.fixture(scope="module")
def sae():
    return load_demo_sae()


@pytest.fixture(scope="module")
def pairs():
    return ioi_pairs(2, templates=0)


def _active_latents(model, sae, prompts, k=3) -> list[int]:
    """The k latents most active at the last position of the first prompt."""
    with torch.no_grad(), model.trace(model.to_tokens(prompts[:1])):
        x = model.site(sae.cfg.site, sae.cfg.layer).value.save()
    return sae.encode(x.float())[0, -1].topk(k).indices.tolist()


def _hooked_metric(model, sae, tokens, pos, vector, answers) -> float:
    """Logit difference at the last position with `vector` added to resid_pre of the SAE's layer at `pos`, by a
    forward pre-hook on that block of the Hugging Face model."""
    block = model.module.transformer.h[sae.cfg.layer]

    def hook(module, args, kwargs):
        hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        hidden[:, pos] += vector
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model.module(tokens[None]).logits[0, -1]
    finally:
        handle.remove()
    a, b = (model.to_single_token(t) for t in answers)
    return float(logits[a] - logits[b])


def test_ablation_cells_equal_a_plain_hook(model, sae, pairs):
    latents = _active_latents(model, sae, pairs.clean)
    result = latent_sweep(model, sae, pairs.clean, latents, pairs.answers, progress=False)
    tokens = model.to_tokens(pairs.clean)
    assert result.values.shape == (2, 3, tokens.shape[1])
    base = _hooked_metric(model, sae, tokens[0], 0, torch.zeros(model.cfg.d_model), pairs.answers[0])
    assert result.base_value[0].item() == pytest.approx(base, abs=1e-4)
    last = tokens.shape[1] - 1
    for i, latent in enumerate(latents):
        coef = result.coefficient[0, i, last]
        assert coef < 0  # active at the last position: switched off
        vector = coef * sae.W_dec.detach()[latent].float()
        expected = _hooked_metric(model, sae, tokens[0], last, vector, pairs.answers[0]) - base
        assert result.values[0, i, last].item() == pytest.approx(expected, abs=1e-4)
    inactive = result.coefficient == 0
    assert (result.values[inactive].nan_to_num(0.0) == 0).all()  # nothing edited, nothing changed
    assert result.values[:, :, : sae.cfg.skip_positions].isnan().all()
    assert result.provenance.options["patched_runs"] == int((result.coefficient != 0).sum())


def test_steering_and_patching(model, sae, pairs):
    latents = _active_latents(model, sae, pairs.clean, k=2)
    steer = latent_sweep(
        model, sae, pairs.clean, latents, pairs.answers, mode="steer", scale=4.0, progress=False
    )
    tokens = model.to_tokens(pairs.clean)
    base = steer.base_value[1].item()
    vector = 4.0 * sae.W_dec.detach()[latents[1]].float()
    expected = _hooked_metric(model, sae, tokens[1], 5, vector, pairs.answers[1]) - base
    assert steer.values[1, 1, 5].item() == pytest.approx(expected, abs=1e-4)
    # patching a prompt's own values changes nothing and runs nothing
    same = latent_sweep(model, sae, pairs.clean, latents, pairs.answers, mode="patch", source=pairs.clean)
    assert same.provenance.options["patched_runs"] == 0 and (same.values.nan_to_num(0.0) == 0).all()
    patched = latent_sweep(
        model, sae, pairs.clean, latents, pairs.answers, mode="patch", source=pairs.corrupt
    )
    assert torch.isfinite(patched.values[:, :, sae.cfg.skip_positions :]).all()


def test_saves_loads_and_plots(model, sae, pairs, tmp_path):
    result = latent_sweep(model, sae, pairs.clean[:1], [0, 1], pairs.answers[:1], progress=False)
    result.save(tmp_path / "sweep")
    again = load_result(tmp_path / "sweep")
    torch.testing.assert_close(again.values, result.values, equal_nan=True)
    fig = result.plot()
    assert fig.layout.title.text.startswith("Each latent ablated at one position")
    assert list(fig.data[0].y) == ["latent 0", "latent 1"]
    assert len(result.to_frame()) == result.values.numel()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "zero"}, "mode must be one of ablate, steer, patch"),
        ({"latents": [5000]}, "out of range: this SAE has latents 0..1023"),
        ({"latents": [True]}, "non-empty list of latent ids"),
        ({"latents": []}, "non-empty list of latent ids"),
        ({"mode": "patch"}, "Give source= prompts"),
        ({"source": ["a b"]}, "Give source= prompts"),
        ({"mode": "steer", "scale": float("nan")}, "scale must be a finite number"),
        ({"metric": "prob"}, "metric must be one of"),
        ({"batch_size": -1}, "batch_size must be a positive whole number"),
    ],
)
def test_bad_input_is_refused(model, sae, pairs, kwargs, fragment):
    args = {"latents": [0, 1], **kwargs}
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        latent_sweep(model, sae, pairs.clean, answers=pairs.answers, progress=False, **args)


def test_patch_source_of_another_length_is_refused(model, sae, pairs):
    with pytest.raises(InputError, match="same token length"):
        latent_sweep(
            model, sae, pairs.clean, [0], pairs.answers, mode="patch", source=["Hello there", "Hello there"]
        )
