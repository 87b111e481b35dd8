"""Run the workbench's engines on models hosted by NDIF (https://ndif.us), without blocking the kernel.

    from workbench import remote
    from workbench.models import load_model

    remote.settings()                       # host, and where the API key comes from (never the key itself)
    remote.served_models()                  # what NDIF serves now
    model = load_model("meta-llama/Llama-3.1-8B", remote=True)   # nothing is downloaded
    job = remote.submit(patching.sweep, model, clean, corrupt)    # returns at once
    job.status; job.result(); job.cancel()

Every ``model.trace(...)`` of a remote model is one NDIF job; an engine call may send several. The
`RemoteRunner` of the engine call's `Run` (``Run(reporter=runner)``), or one entered with ``with runner:``,
receives each job's status updates (job id, RECEIVED -> QUEUED ->
RUNNING -> COMPLETED or ERROR, elapsed time), stops waiting when its cancel token is set, and gives up after
its timeout. `call`/`RemoteRunner.run` cache results by (model, engine, inputs, options). Errors are
`RemoteError`s with a sentence saying what to do: no API key, NDIF unreachable, model not served, the server's
message when a job fails, timeout, result too large.

``load_model(path, remote="local")`` runs the same code through nnsight's serialising dry run on this machine:
what works there is what NDIF will be sent.
"""

from workbench.remote.backend import backend_for
from workbench.remote.cache import RESULTS, ResultCache, cache_key
from workbench.remote.config import Settings, check_api_key, settings
from workbench.remote.jobs import LIFECYCLE, JobUpdate
from workbench.remote.runner import (
    RemoteCall,
    RemoteRunner,
    VersionDriftWarning,
    active_runner,
    call,
    current_runner,
    submit,
)
from workbench.remote.service import ServedModel, served_models, version_drift

__all__ = [
    "LIFECYCLE",
    "RESULTS",
    "JobUpdate",
    "RemoteCall",
    "RemoteRunner",
    "ResultCache",
    "ServedModel",
    "Settings",
    "VersionDriftWarning",
    "active_runner",
    "check_api_key",
    "backend_for",
    "cache_key",
    "call",
    "current_runner",
    "served_models",
    "settings",
    "submit",
    "version_drift",
]
