"""Toy models of computation in superposition: rerun "Compressed Computation is (probably) not Computation in
Superposition" (Bhagat, Molas-Medina, Giglemiani & Heimersheim 2025, arXiv 2606.14673) step by step.

Braun et al.'s compressed-computation (CC) model (APD, arXiv 2501.14926) seems to compute 100 ReLUs with 50
neurons. Its residual stream reduces exactly to a plain MLP whose labels carry a mixing term, y = ReLU(x) + x M^T
with M = I - W_E W_E^T; the critique shows the advantage over the naive 1/12 comes from M and vanishes at M = 0.

    from workbench.toymodels import ToyConfig, train, evaluate, mechanism, naive_model, sigma_sweep, transplant
    model = train(ToyConfig(mixing="embed"))              # the simplified CC model, p = 0.01, 10k steps (~15 s)
    evaluate([model, naive_model()], default_ps()).plot()  # L/p against p, the naive line at 1/12
    mechanism(model).plot()                               # eigen-directions of M vs the learned W_in W_out
    sigma_sweep([0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08]).plot()

Pieces:
- `ToyConfig`: task (n_features, p, mixing kind and sigma, learned sigma, embedding sign, low rank, labels, data
  mode), model ("mlp" or the residual CC model), optimiser (AdamW 3e-3, wd 0.01, cosine, batch 2048, 10k steps),
  seeds. `train` / `train_many` (one thread per model, processes in parallel) cache by config.
- `evaluate`: L/p over densities, stratified over the number of active features (exact for bias-free models).
- Baselines: `naive_model` (1/12 clean), `offset_model` / `offset_sweep` (dense regime), `snmf_model` /
  `snmf_sweep` (semi-NMF of I + M^T or, as the critique's code, I + M).
- Analyses: `sigma_sweep`, `transplant`, `mechanism`, `responses`, `regimes`; `paper` holds the critique's
  figure values and the tolerances this reproduction meets.
"""

from workbench.toymodels.analysis import (
    FeatureResponse,
    Mechanism,
    SigmaSweep,
    Transplant,
    mechanism,
    regime_steps,
    regimes,
    responses,
    sigma_sweep,
    transplant,
)
from workbench.toymodels.baselines import (
    ORIENTATIONS,
    OffsetSweep,
    SNMFSweep,
    best_offset,
    naive_model,
    naive_weights,
    offset_loss,
    offset_model,
    offset_sweep,
    semi_nmf,
    snmf_model,
    snmf_sweep,
    snmf_target,
)
from workbench.toymodels.config import DATA_MODES, LABELS, MODELS, SCHEDULES, ToyConfig, paper_steps
from workbench.toymodels.data import MIXINGS, zero_fraction
from workbench.toymodels.evaluate import (
    LossCurves,
    combine,
    default_ps,
    evaluate,
    loss_per_feature,
    naive_loss,
)
from workbench.toymodels.models import KINDS, ToyModel, build_task, from_weights, residual_forward
from workbench.toymodels.train import (
    TrainingProgress,
    cache_dir,
    clear_cache,
    finetune,
    set_cache_dir,
    train,
    train_many,
)

__all__ = [
    "DATA_MODES",
    "KINDS",
    "LABELS",
    "MIXINGS",
    "MODELS",
    "ORIENTATIONS",
    "SCHEDULES",
    "FeatureResponse",
    "LossCurves",
    "Mechanism",
    "OffsetSweep",
    "SNMFSweep",
    "SigmaSweep",
    "ToyConfig",
    "ToyModel",
    "TrainingProgress",
    "Transplant",
    "best_offset",
    "build_task",
    "cache_dir",
    "clear_cache",
    "combine",
    "default_ps",
    "evaluate",
    "finetune",
    "from_weights",
    "loss_per_feature",
    "mechanism",
    "naive_loss",
    "naive_model",
    "naive_weights",
    "offset_loss",
    "offset_model",
    "offset_sweep",
    "paper_steps",
    "regime_steps",
    "regimes",
    "residual_forward",
    "responses",
    "semi_nmf",
    "set_cache_dir",
    "sigma_sweep",
    "snmf_model",
    "snmf_sweep",
    "snmf_target",
    "train",
    "train_many",
    "transplant",
    "zero_fraction",
]
