"""The demo SAE: committed files, its card's numbers reproduced from the weights, the qualitative orderings of the
two papers on the demo model, and the panel's code rerun in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from workbench.models import load_model
from workbench.sae import (
    demo_prompts,
    demo_reference,
    load_demo_sae,
    reinitialised,
    stable_regions,
    synthetic_activation_test,
)
from workbench.sae import train_demo as td
from workbench.sae.demo import DEMO_SAE_DIR


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches: one thread is as fast, and much faster when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_model("demo")


@pytest.fixture(scope="module")
def sae():
    return load_demo_sae()


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((DEMO_SAE_DIR / "evaluation.json").read_text())


def test_committed_files(sae):
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "evaluation.json",
                 "train_info.json", "SAE_CARD.md"):  # fmt: skip
        assert (DEMO_SAE_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in DEMO_SAE_DIR.iterdir())
    assert total < 4 * 2**20
    cfg = json.loads((DEMO_SAE_DIR / "cfg.json").read_text())
    assert (
        cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["metadata"]["model_name"] == "demo"
    )
    assert (sae.cfg.site, sae.cfg.layer, sae.d_in) == ("resid_pre", 1, 128)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.d_sae), atol=1e-5)


def test_card_numbers_reproduced(model, sae, recorded):
    measured, freq = td.measure(sae, model)
    # sparsity.safetensors holds these (a latent exactly at its threshold may flip with the batch shape)
    assert torch.allclose(sae.firing_frequency, freq, atol=2e-5)
    for key, value in recorded.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert measured[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for key, target in recorded["targets"].items():
        assert measured["targets"][key]["met"] == target["met"]
        assert measured["targets"][key]["value"] == pytest.approx(target["value"], rel=1e-4)
    assert all(t["met"] for t in recorded["targets"].values()), recorded["targets"]
    info = json.loads((DEMO_SAE_DIR / "train_info.json").read_text())
    assert (DEMO_SAE_DIR / "SAE_CARD.md").read_text() == td.card(recorded, info)


def test_real_codes_are_found_again_when_re_encoded(model, sae):
    """The note's check that re-encoding recovers most chosen latents, on real codes (decode then encode). The
    synthetic codes' overlap is measured and reported by the tests (`reencoding`); on the demo SAE it is well
    under the note's 70% (notebook 09)."""
    from workbench.sae import activations as acts
    from workbench.sae.synthetic import reencoding_overlap

    x = acts.site_activations(model, demo_prompts(model, 200), "resid_pre", 1)[:, -1]
    assert float(reencoding_overlap(sae, sae.encode(x)).mean()) > 0.9


# -- the papers' orderings on the demo model -------------------------------------------------------------------
N, STEPS = 160, 50


@pytest.fixture(scope="module")
def data(model):
    return demo_prompts(model, N), demo_reference(model, 1000)


def _run(model, sae, data, test, families):
    prompts, reference = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return synthetic_activation_test(model, sae, prompts, test=test, families=families, reference=reference,
                                         n_steps=STEPS, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def plateau(model, sae, data):
    return _run(model, sae, data, "plateau", ("real", "random"))


def test_real_activations_sit_on_longer_plateaus_of_the_output(plateau):
    """Test 2 read at the output (KL > 0.1 nats): real activations are more stable than random ones."""
    table = plateau.summary("kl").set_index("family")
    assert table.loc["real", "mean"] > 1.3 * table.loc["random", "mean"], table
    assert table.loc["random", "ks_p"] < 1e-3


@pytest.mark.xfail(
    strict=True,
    reason="On the demo model, with the paper's read-out (L2 of the last block's residual), random activations sit "
    "on longer plateaus than real ones; notebook 09 says so. Revisit the notebook if this starts to hold.",
)
def test_real_activations_sit_on_longer_plateaus_of_the_last_residual(plateau):
    table = plateau.summary("l2").set_index("family")
    assert table.loc["real", "mean"] > table.loc["random", "mean"], table


@pytest.mark.xfail(
    strict=True,
    reason="On the demo model with the demo SAE, structured synthetic targets are further from real ones than "
    "random targets are (KS); notebook 09 says so. Revisit the notebook if this starts to hold.",
)
def test_structured_targets_are_closer_to_real_than_random_ones(model, sae, data):
    res = _run(model, sae, data, "blowup", ("real", "random", "synthetic_structured"))
    table = res.summary().set_index("family")
    assert table.loc["random", "ks_vs_real"] > table.loc["synthetic_structured", "ks_vs_real"], table


def test_trained_model_has_sharper_stable_regions(model, data):
    prompts, _ = data
    res = stable_regions({"trained": model, "re-initialised": reinitialised(model)}, prompts[:64], n_steps=11,
                         progress=False)  # fmt: skip
    table = res.summary()
    assert table.median_sharpness[0] > table.median_sharpness[1], table
    assert table.iloc[1, -1] < 0.01  # one-sided Mann-Whitney: trained sharper


# -- the panel's code in a fresh interpreter -------------------------------------------------------------------


def test_panel_code_reproduces_the_run(tmp_path, model, sae):
    from workbench.widgets.sae import SyntheticActivationProbe

    panel = SyntheticActivationProbe(model, sae, demo_prompts(model, 12), reference=demo_reference(model, 300),
                                     n_steps=8)  # fmt: skip
    panel.background = False
    panel.test_box.value = "plateau"
    panel.family_boxes["single_latent"].value = True
    panel.run()
    assert panel.status_text.startswith("Done"), panel.status_text
    out = tmp_path / "result.safetensors"
    code = panel.code()
    assert (
        "demo_prompts(model, 12)" in code
        and "demo_reference(model, 300" in code
        and "load_demo_sae()" in code
    )
    script = code + f"\nresult.save({str(out)!r})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, timeout=300)
    from workbench.results import load_result

    again = load_result(out)
    assert again.families == panel.synthetic.families and again.test == "plateau"
    assert torch.allclose(again.l2, panel.synthetic.l2, atol=1e-5)
