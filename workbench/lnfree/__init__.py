"""LayerNorm removal: preview it, do it, load and export LN-free models, and check what it buys.

"Transformers Don't Need LayerNorm at Inference Time" (Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim,
arXiv 2507.02559; precursor Heimersheim, arXiv 2409.13710) replaces each norm's per-token scale by a frozen
scalar and fine-tunes the model to live without it. A LayerNorm computes ``(x - mean(x)) / sigma(x) * w + b``;
everything but the division by the token's own ``sigma(x)`` is linear. With the scale frozen (`FrozenNorm`, the
paper's FakeLN) the whole residual stream is read linearly, so direct logit attribution becomes exact.

Norm sites, in the paper's removal order (`paper_order`): every MLP norm ``"mlp.L"``, the attention norm as seen
by queries and keys ``"qk.L"``, the same norm as seen by values ``"v.L"``, and the final norm ``"final"``.

    from workbench.models import load_model
    from workbench.tasks import demo_corpus
    from workbench import lnfree

    model = load_model("demo")
    docs = demo_corpus("validation", 500)
    result = lnfree.preview(model, docs, n_rows=32)             # zero-shot: what breaks if frozen now
    result.plot()
    run = lnfree.finetune(model, demo_corpus("train", 20_000), "demo", val=docs)   # remove, step by step
    control = lnfree.finetune(model, demo_corpus("train", 20_000), "demo", val=docs, remove=False)
    lnfree.dla_exactness(run.model, docs).mean_nmae            # ~0: DLA equals the direct effect
    lnfree.export_lnfree(run.model, "demo-lnfree")              # loads in plain transformers
    lnfree.load_lnfree("schaeff/gpt2-small_LNFree300")          # a released LN-free GPT-2 (needs the hub)

The preview, calibration and evaluation run inside nnsight traces and therefore also on remote (NDIF) models;
fine-tuning and export need the weights locally.
"""

from workbench.lnfree.calibration import FrozenScales, NormStatistics, calibrate, norm_statistics
from workbench.lnfree.checkpoints import RELEASED, export_lnfree, is_lnfree, load_lnfree
from workbench.lnfree.evaluation import DLAExactness, LossStats, dla_exactness, evaluate_loss
from workbench.lnfree.finetune import RemovalRun, TrainingHistory, finetune, load_checkpoint
from workbench.lnfree.norms import FrozenNorm
from workbench.lnfree.preview import RemovalPreview, preview
from workbench.lnfree.schedule import PRESETS, FinetuneConfig, RemovalSchedule, preset
from workbench.lnfree.sites import paper_order, paper_prefix, parse_sites

__all__ = [
    "PRESETS",
    "RELEASED",
    "DLAExactness",
    "FinetuneConfig",
    "FrozenNorm",
    "FrozenScales",
    "LossStats",
    "NormStatistics",
    "RemovalPreview",
    "RemovalRun",
    "RemovalSchedule",
    "TrainingHistory",
    "calibrate",
    "dla_exactness",
    "evaluate_loss",
    "export_lnfree",
    "finetune",
    "is_lnfree",
    "load_checkpoint",
    "load_lnfree",
    "norm_statistics",
    "paper_order",
    "paper_prefix",
    "parse_sites",
    "preset",
    "preview",
]
