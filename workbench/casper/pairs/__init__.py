"""Casper's challenge 2, the integer-pair transformer, and Heimersheim & Hobbhahn's solution.

- `model`: the architecture (`PairTransformer`), loading checkpoints, finding and verifying the original weights
  (`load_original`, trust on first use), the model's labels (`predict_labels`).
- `labels`: the task: all 12769 pairs, the published labels, the train/test split, Casper's accuracy.
- `replica`: a replica trained on the published labels (`train_replica`, `load_replica`) and
  `load_challenge_model` (the original when found, else a replica).
- `analysis`: activations on every pair, attention fixed to its mean, the AND gate in resid_mid's principal
  components, the MLP fold, the extended embeddings.
- `scrub`: the solution's causal-scrubbing schemes.

``from workbench.casper import pairs as pt`` gives all of it; `workbench.casper.pair_transformer` is the old name.
"""

from workbench.casper.measures import agreement
from workbench.casper.pairs.analysis import (
    AndGate,
    ExtendedEmbeddings,
    PairRun,
    additive_fit,
    extended_embeddings,
    fit_and_gate,
    fix_attention,
    labels_from_resid_mid,
    mean_pattern,
    mlp_fold,
    resid_to_logits,
    run_pairs,
)
from workbench.casper.pairs.labels import (
    EQUALS,
    LABELS_FILE,
    N_PAIRS,
    P,
    PairLabels,
    all_pairs,
    casper_accuracy,
    load_labels,
    row_transitions,
    train_test_split,
)
from workbench.casper.pairs.model import (
    MLP,
    ORIGINAL_MIN_AGREEMENT,
    WEIGHTS_FILE,
    Attention,
    Embed,
    Hook,
    PairTransformer,
    PairTransformerConfig,
    PosEmbed,
    TransformerBlock,
    Unembed,
    find_original,
    load_original,
    load_state,
    predict_labels,
    trust_record,
)
from workbench.casper.pairs.replica import (
    ChallengeModel,
    ReplicaRecipe,
    ReplicaReport,
    initialisation_left,
    load_challenge_model,
    load_replica,
    replica_path,
    save_replica,
    train_replica,
)
from workbench.casper.pairs.scrub import (
    SCHEME_DESCRIPTIONS,
    SCHEMES,
    SCRUB_SITE,
    scrub_hypotheses,
    scrub_schemes,
)
from workbench.casper.pca import PCA, fit_pca

__all__ = [
    "EQUALS",
    "LABELS_FILE",
    "MLP",
    "N_PAIRS",
    "ORIGINAL_MIN_AGREEMENT",
    "P",
    "PCA",
    "SCHEMES",
    "SCHEME_DESCRIPTIONS",
    "SCRUB_SITE",
    "WEIGHTS_FILE",
    "AndGate",
    "Attention",
    "ChallengeModel",
    "Embed",
    "ExtendedEmbeddings",
    "Hook",
    "PairLabels",
    "PairRun",
    "PairTransformer",
    "PairTransformerConfig",
    "PosEmbed",
    "ReplicaRecipe",
    "ReplicaReport",
    "TransformerBlock",
    "Unembed",
    "additive_fit",
    "agreement",
    "all_pairs",
    "casper_accuracy",
    "extended_embeddings",
    "find_original",
    "fit_and_gate",
    "fit_pca",
    "fix_attention",
    "initialisation_left",
    "labels_from_resid_mid",
    "load_challenge_model",
    "load_labels",
    "load_original",
    "load_replica",
    "load_state",
    "mean_pattern",
    "mlp_fold",
    "predict_labels",
    "replica_path",
    "resid_to_logits",
    "row_transitions",
    "run_pairs",
    "save_replica",
    "scrub_hypotheses",
    "scrub_schemes",
    "train_replica",
    "train_test_split",
    "trust_record",
]
