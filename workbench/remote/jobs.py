"""What a remote job reports: its lifecycle states and `JobUpdate`s, and the error for an unreachable host."""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.errors import RemoteError

LIFECYCLE = ("RECEIVED", "QUEUED", "PROVISIONING", "DEPLOYING", "DISPATCHED", "RUNNING", "COMPLETED", "ERROR")
"""NDIF's job states in order (nnsight's `Status`, without the transient LOG)."""


@dataclass(frozen=True)
class JobUpdate:
    """One status report of a remote job, as shown in a status line.

    Attributes:
        job_id: NDIF's id for the job ("" before the server has answered).
        state: the lifecycle state (one of `LIFECYCLE`), or "CANCELLED" / "TIMEOUT" / "DISCONNECTED" when the
            workbench stopped waiting.
        elapsed: seconds since the job was submitted.
        description: the server's message for this state (for ERROR: why the job failed), or a log line.
        number: the job's position among the jobs of its `RemoteRunner` (an engine call may submit several).
        model: the model's name.
        where: "NDIF" (or the host when it is not the default) or "local dry run".
        log: True when this update is a server log line rather than a change of state.
        meta: what the server reported about the job's cost, when it did.
    """

    job_id: str
    state: str
    elapsed: float
    description: str = ""
    number: int = 1
    model: str = ""
    where: str = "NDIF"
    log: bool = False
    meta: dict | None = field(default=None, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in ("COMPLETED", "ERROR", "CANCELLED", "TIMEOUT", "DISCONNECTED")

    def text(self) -> str:
        """E.g. ``NDIF job 3f2a91c0 · RUNNING · 12.4 s (job 2)``, plus the server's message if any."""
        short = self.job_id[:8] if self.job_id else "(submitting)"
        line = f"{self.where} job {short} · {self.state} · {self.elapsed:.1f} s"
        if self.number > 1:
            line += f" (job {self.number})"
        if self.description and (self.log or self.state in ("ERROR", "LOG")):
            line += f" · {self.description}"
        return line


def unreachable(host: str, err: BaseException) -> RemoteError:
    return RemoteError(
        f"NDIF is unreachable at {host} ({type(err).__name__}: {err}). Check the internet connection and "
        "NDIF_HOST; `workbench.remote.served_models()` tests the connection, and https://discuss.ndif.us "
        "announces outages."
    )
