"""Where NDIF lives and which API key to use: read from nnsight's configuration, never from a notebook.

nnsight resolves both once at import, with this precedence: its shipped defaults < the user file
(``~/.config/nnsight/config.yaml``, written by ``nnsight login``) < the environment (``NDIF_API_KEY``,
``NDIF_HOST``) — or a Colab secret named ``NDIF_API_KEY``. The workbench reads the same settings
(``nnsight.CONFIG.API``) so that a key stored once works for nnsight and for the workbench alike.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from nnsight import CONFIG

from workbench.errors import RemoteError

KEY_HELP = (
    "Get a key at https://login.ndif.us, then either set the environment variable NDIF_API_KEY before "
    "starting Jupyter (on Binder or Colab: a secret named NDIF_API_KEY), or run `nnsight login` once in a "
    "terminal, which stores it in ~/.config/nnsight/config.yaml. Do not paste the key into a notebook."
)

DEFAULT_TIMEOUT = 1800.0
"""Seconds a remote job may take from submission to result unless a `RemoteRunner` is given another timeout
(30 minutes: NDIF's queue plus loading a large model can take minutes; a thread never waits forever)."""

INSECURE_OPT_IN = "WORKBENCH_ALLOW_INSECURE_NDIF"
"""Set this environment variable to 1 to send jobs to a plain-http NDIF host that is not this machine."""


@dataclass(frozen=True)
class Settings:
    """The NDIF connection the next job will use.

    Attributes:
        host: base URL of the NDIF API (``https://api.ndif.us`` unless ``NDIF_HOST`` says otherwise).
        key_source: where the API key came from: "environment", "nnsight config", or None when there is none.
    """

    host: str
    key_source: str | None

    @property
    def has_key(self) -> bool:
        return self.key_source is not None

    def __str__(self) -> str:
        key = f"API key from {self.key_source}" if self.has_key else "no API key"
        return f"NDIF at {self.host} ({key})"


def configured_key() -> str | None:
    """The key jobs will send: ``NDIF_API_KEY`` as the environment holds it now (so a key exported after nnsight
    was imported still counts), else nnsight's configured one. Never display it."""
    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def settings() -> Settings:
    """The current host and where the API key comes from (the key itself is never shown)."""
    key = configured_key()
    if not key:
        source = None
    elif os.environ.get("NDIF_API_KEY") == key:
        source = "environment"
    else:
        source = "nnsight config"
    return Settings(host=CONFIG.API.HOST.rstrip("/"), key_source=source)


def check_api_key() -> Settings:
    """`settings()` when an API key is configured; otherwise a `RemoteError` saying how to set one."""
    config = settings()
    if not config.has_key:
        raise RemoteError(f"No NDIF API key is configured. {KEY_HELP}")
    return config


def _is_loopback(hostname: str | None) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname or "").is_loopback
    except ValueError:
        return False


def check_host(host: str) -> str:
    """`host` when jobs may be sent there: https, or plain http to this machine (a local test server). Otherwise a
    `RemoteError`: over plain http the API key and the traces travel readable by anyone on the way, and a result
    could be replaced on the way. Setting ``WORKBENCH_ALLOW_INSECURE_NDIF=1`` accepts such a host anyway."""
    parts = urlsplit(host)
    if parts.scheme == "https" or os.environ.get(INSECURE_OPT_IN) == "1":
        return host
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return host
    raise RemoteError(
        f"NDIF host {host!r} is not an https:// address. Over plain http your API key and your traces travel "
        "unencrypted, and a result altered on the way would be loaded here. Set NDIF_HOST to an https:// URL "
        f"(the default is https://api.ndif.us); if you trust the network (a private cluster), set the environment "
        f"variable {INSECURE_OPT_IN}=1."
    )
