"""The workbench's own exception types.

Every error a user can cause is raised as one of these, with a sentence saying what was wrong and how to fix
it. Widgets catch `WorkbenchError` and show its message in their status line; anything else is a bug.
"""

from __future__ import annotations

import sys
import warnings


class WorkbenchError(Exception):
    """Base class for errors the workbench raises on purpose."""


class InputError(WorkbenchError, ValueError):
    """Bad user input: prompts, answers, positions, layers, options."""


class SiteError(InputError):
    """An unknown site, a layer or head out of range, or a site the model's architecture does not have."""


class ModelLoadError(WorkbenchError):
    """A model could not be loaded (hub unreachable, missing directory, unreadable checkpoint)."""


class UnsupportedModelError(WorkbenchError):
    """The model's architecture has no adapter, or an engine cannot run on it."""


class RemoteError(WorkbenchError):
    """Remote execution on NDIF failed: missing key, unreachable host, model not served, job error."""


class JobTooLarge(RemoteError):
    """NDIF refused a job as too large (the request, or the server's memory): the same work may pass in smaller
    jobs."""


class Cancelled(WorkbenchError):
    """A long run was cancelled by the user; partial results are discarded."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue a warning attributed to the first caller outside the workbench package (the user's line)."""
    level, frame = 2, sys._getframe(1)
    package = __name__.rpartition(".")[0] + "."
    while frame is not None and frame.f_globals.get("__name__", "").startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
