"""What NDIF serves right now, and whether this machine's packages match the server's.

`served_models()` wraps ``nnsight.status()`` (the table of deployed models), telling "NDIF unreachable" apart
from "NDIF serves nothing" (nnsight prints a warning and returns an empty table for both). `version_drift()`
uses nnsight's environment comparison (what ``nnsight.compare()`` returns) and keeps only the packages whose
mismatch changes how interventions run: torch, transformers and nnsight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nnsight
from nnsight import CONFIG
from nnsight.ndif import EnvComparison, get_local_env

from workbench.errors import RemoteError
from workbench.remote.jobs import unreachable

# httpx is imported where NDIF is asked for its status: only that network call needs it.

_STATUS_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServedModel:
    """One model deployment on NDIF.

    Attributes:
        repo_id: the hub id to pass to ``load_model(repo_id, remote=True)``.
        revision: hub revision ("main" unless pinned).
        task: the transformers pipeline task it is deployed for (the workbench needs "text-generation").
        level: "HOT" (loaded on GPUs, answers at once) or "WARM" (loads on demand: the first job waits).
        state: "RUNNING", "DEPLOYING", "NOT_STARTED" or "UNHEALTHY".
    """

    repo_id: str
    revision: str
    task: str | None
    level: str
    state: str

    @property
    def ready(self) -> bool:
        return self.state == "RUNNING"

    def label(self) -> str:
        """For a model picker: ``meta-llama/Llama-3.1-8B (HOT, RUNNING)``."""
        return f"{self.repo_id} ({self.level}, {self.state})"


def _host(host: str | None) -> str:
    return (host or CONFIG.API.HOST).rstrip("/")


def _get_json(host: str, path: str, timeout: float = _STATUS_TIMEOUT):
    import httpx

    try:
        response = httpx.get(f"{host}{path}", timeout=timeout)
    except httpx.HTTPError as err:
        raise unreachable(host, err) from err
    if response.status_code >= 400:
        raise RemoteError(
            f"NDIF at {host} answered {path} with HTTP {response.status_code}: {response.text[:200]}"
        )
    return response.json()


def served_models(host: str | None = None, *, text_generation_only: bool = False) -> list[ServedModel]:
    """The models NDIF deploys now (HOT first, then by name); `RemoteError` when NDIF cannot be reached.

    Args:
        host: NDIF's URL (default: nnsight's configured host).
        text_generation_only: keep only deployments the workbench can drive (task "text-generation").
    """
    host = _host(host)
    table = {}
    if host == CONFIG.API.HOST.rstrip("/"):
        table = dict(nnsight.status().deployments)
    if not table:  # nnsight returns an empty table both when unreachable and when nothing is deployed
        raw = _get_json(host, "/status")
        for name, value in raw.get("deployments", {}).items():
            if value.get("deployment_level") in ("HOT", "WARM"):
                table[name] = {
                    "repo_id": value.get("repo_id", name),
                    "revision": value.get("revision") or "main",
                    "task": value.get("task"),
                    "level": value.get("deployment_level"),
                    "state": value.get("application_state", "UNHEALTHY"),
                }
    models = {
        ServedModel(
            repo_id=v["repo_id"],
            revision=v.get("revision") or "main",
            task=v.get("task"),
            level=v.get("level", "WARM"),
            state=v.get("state", "UNHEALTHY"),
        )
        for v in table.values()
    }
    if text_generation_only:
        models = {m for m in models if m.task in (None, "text-generation")}
    return sorted(models, key=lambda m: (m.level != "HOT", not m.ready, m.repo_id.lower()))


@functools.lru_cache(maxsize=1)
def _local_env() -> dict:
    return get_local_env()


def version_drift(host: str | None = None) -> list[str]:
    """Differences between this machine and NDIF in torch, transformers and nnsight, as sentences like
    ``"torch 2.13.0 here, 2.5.1 on NDIF"`` (empty when they match). `RemoteError` when unreachable."""
    comparison = EnvComparison(_local_env(), _get_json(_host(host), "/env", timeout=30.0))
    return [
        f"{name} {v['local']} here, {v['remote']} on NDIF"
        for name, v in sorted(comparison.critical_mismatches.items())
    ]
