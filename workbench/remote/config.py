"""Where NDIF lives and which API key to use: read from nnsight's configuration, never from a notebook.

nnsight resolves both once at import, with this precedence: its shipped defaults < the user file
(``~/.config/nnsight/config.yaml``, written by ``nnsight login``) < the environment (``NDIF_API_KEY``,
``NDIF_HOST``) — or a Colab secret named ``NDIF_API_KEY``. The workbench reads the same settings
(``nnsight.CONFIG.API``) so that a key stored once works for nnsight and for the workbench alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from workbench.errors import RemoteError

KEY_HELP = (
    "Get a key at https://login.ndif.us, then either set the environment variable NDIF_API_KEY before "
    "starting Jupyter (on Binder or Colab: a secret named NDIF_API_KEY), or run `nnsight login` once in a "
    "terminal, which stores it in ~/.config/nnsight/config.yaml. Do not paste the key into a notebook."
)


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
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def settings() -> Settings:
    """The current host and where the API key comes from (the key itself is never shown)."""
    from nnsight import CONFIG

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
