"""Sparse autoencoders: train, load, evaluate and inspect them, and probe activations built from their latents.

An SAE maps an activation x at one site to a sparse code f = act((x - b_dec) W_enc + b_enc) and back,
x_hat = f W_dec + b_dec; each latent i is a direction (the unit decoder row d_i) that the model's activations
are, ideally, sparse sums of.

    from workbench.models import load_model
    from workbench.sae import load_demo_sae, train_sae, evaluate_sae, top_contexts, latent_attribution
    model = load_model("demo")
    sae = load_demo_sae()                                  # 128 -> 1024 BatchTopK SAE on resid_pre 1 (its card)
    sae = train_sae(model, rows, site="resid_pre", layer=1, l1_coefficient=1.0)    # or train your own
    evaluate_sae(model, sae, held_out_rows)                # L0, explained variance, splice-in loss, dead latents
    top_contexts(model, sae, rows, [17, 42])               # where latents fire most (a small dashboard)
    latent_attribution(model, sae, prompts, (" Mary", " John"))   # which latents move the logit difference
    latent_sweep(model, sae, prompts, [17, 42], (" Mary", " John"), mode="ablate")  # latent x position, exact
    save_sae(sae, "dir/"); load_sae("dir/")                # the SAELens layout (cfg.json + safetensors)
    load_sae("gpt2-small-res-jb", "blocks.1.hook_resid_pre")      # from the hub, when online

Giglemiani et al. (2024)'s tests of synthetic activations and Janiak et al. (2024)'s stable regions:

    from workbench.sae import synthetic_activation_test, stable_regions, reinitialised
    synthetic_activation_test(model, sae, prompts, test="blowup", reference=ref)   # test 1
    synthetic_activation_test(model, sae, prompts, test="plateau", reference=ref)  # test 2
    stable_regions({"trained": model, "re-initialised": reinitialised(model)}, prompts)

Latents as directions: ``sae.latent(i)`` is a `LatentDirection` (unit decoder row, site, layer);
``probe(model, prompts, directions=sae.directions([3, 17]))`` pushes activations along latents with the plateau
probe; ``latent_directions(sae, x0s, "active")`` gives each base its own active latents.
"""

from workbench.sae.attribution import LatentAttribution, latent_attribution
from workbench.sae.dashboard import LatentContexts, top_contexts
from workbench.sae.demo import demo_prompts, demo_reference, load_demo_sae
from workbench.sae.evaluate import SAEEvaluation, evaluate_sae
from workbench.sae.io import PRETRAINED, load_sae, save_sae
from workbench.sae.model import SAE, LatentDirection, SAEConfig, latent_directions
from workbench.sae.stable import StableRegionsResult, reinitialised, stable_regions
from workbench.sae.sweep import LatentSweep, latent_sweep
from workbench.sae.synthetic import FAMILIES, PAPER_GPT2, SyntheticTestResult, synthetic_activation_test
from workbench.sae.train import TrainSettings, train_sae

__all__ = [
    "FAMILIES",
    "PAPER_GPT2",
    "PRETRAINED",
    "SAE",
    "LatentAttribution",
    "LatentSweep",
    "latent_sweep",
    "LatentContexts",
    "LatentDirection",
    "SAEConfig",
    "SAEEvaluation",
    "StableRegionsResult",
    "SyntheticTestResult",
    "TrainSettings",
    "demo_prompts",
    "demo_reference",
    "evaluate_sae",
    "latent_attribution",
    "latent_directions",
    "load_demo_sae",
    "load_sae",
    "reinitialised",
    "save_sae",
    "stable_regions",
    "synthetic_activation_test",
    "top_contexts",
    "train_sae",
]
