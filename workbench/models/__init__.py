"""Models: load any model once and reach its internals by standard site names.

from workbench.models import load_model
model = load_model("demo")
with model.trace(model.to_tokens("When Mary and John went to the store, John gave a drink to")):
    resid = model.site("resid_pre", 2).value.save()     # [batch, pos, d_model]
"""

from workbench.models.adapters import ADAPTERS, Adapter, ModelConfig
from workbench.models.loading import default_device, hub_reachable, load_model
from workbench.models.model import WorkbenchModel
from workbench.models.sites import SITES, SiteHandle, SiteSpec

__all__ = [
    "ADAPTERS",
    "SITES",
    "Adapter",
    "ModelConfig",
    "SiteHandle",
    "SiteSpec",
    "WorkbenchModel",
    "default_device",
    "hub_reachable",
    "load_model",
]
