"""SAE files in the SAELens layout: a directory with ``cfg.json``, ``sae_weights.safetensors`` and (optionally)
``sparsity.safetensors``.

    save_sae(sae, "my_sae/")                       # SAELens 6 layout; SAELens' SAE.load_from_disk reads it
    load_sae("my_sae/")                            # ours or SAELens' (6.x, and the older 0.x-5.x configs)
    load_sae("gpt2-small-res-jb", "blocks.1.hook_resid_pre")   # a release on the Hugging Face hub (online)
    load_sae("owner/repo", "folder/in/repo")       # any SAELens-layout folder in a hub repository (online)

Why not `sae_lens` itself: it requires TransformerLens (and with it wandb, accelerate, beartype, typeguard,
sentencepiece, transformers-stream-generator, nltk, babe, datasets, simple-parsing), a second model stack beside
nnsight that the workbench does not use; the layout is three small files, read and written here with
`safetensors` and `json`. The hub path uses `huggingface_hub`, which transformers already brings.

The weights of SAELens' "standard" (ReLU), "topk" and "jumprelu" architectures load; gated SAEs, per-head
(``hook_head_index``) SAEs and activation normalisations other than "none" are refused with a sentence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import InputError, ModelLoadError
from workbench.sae.model import SAE, SAEConfig, site_of_hook

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
LAYOUT_VERSION = "6.0.0"
"""The SAELens version whose ``cfg.json`` layout `save_sae` writes (its loaders key on it: below 6.0 they
rewrite the config as an old one)."""
DEAD_LOG10 = -10.0
"""SAELens stores firing frequencies as log10(f + 1e-10); at or below -10 a latent never fired."""

_ARCH_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_ARCH_FROM_SAELENS = {v: k for k, v in _ARCH_TO_SAELENS.items()}


PRETRAINED: dict[str, dict[str, Any]] = {
    "gpt2-small-res-jb": {
        "repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
        "model": "openai-community/gpt2",
        "sae_ids": [f"blocks.{layer}.hook_resid_pre" for layer in range(12)] + ["blocks.11.hook_resid_post"],
        # trained on TransformerLens' GPT-2 with center_writing_weights=True (SAELens' config_overrides)
        "centre_input": True,
        "neuronpedia": "gpt2-small/{layer}-res-jb",
        "description": "Joseph Bloom's residual-stream SAEs for GPT-2 small (24,576 latents, ReLU + L1); "
        "the SAE of Giglemiani et al. (2024) is blocks.1.hook_resid_pre",
    },
}
"""Hub releases known by name (the SAELens release names). Any other SAELens-layout folder loads with
``load_sae("owner/repo", "folder")``."""


# -- writing -------------------------------------------------------------------------------------------------


def sae_lens_config(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict of `sae` in the SAELens 6 layout; workbench fields under ``metadata.workbench``."""
    c = sae.cfg
    metadata: dict[str, Any] = {
        "model_name": c.model_name,
        "hook_name": c.hook_name,
        "hook_head_index": None,
        "prepend_bos": bool(c.metadata.get("prepend_bos", True)),
        "context_size": c.metadata.get("context_size"),
        "dataset_path": c.metadata.get("dataset_path"),
        "sae_lens_version": LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "workbench": {
            "site": c.site,
            "layer": c.layer,
            "architecture": c.architecture,
            "centre_input": c.centre_input,
            "skip_positions": c.skip_positions,
            "metadata": c.metadata,
        },
    }
    if c.centre_input:
        metadata["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    cfg: dict[str, Any] = {
        "architecture": _ARCH_TO_SAELENS[c.architecture],
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.site == "z" else "none",
        "metadata": metadata,
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Write `sae` to the directory `path` in the SAELens layout; returns the directory.

    ``sparsity.safetensors`` holds SAELens' ``sparsity`` (log10 of the firing frequency + 1e-10) and, for an exact
    round trip, the frequencies themselves under ``firing_frequency`` (SAELens ignores extra keys).
    """
    if not isinstance(sae, SAE):
        raise InputError(f"save_sae takes a workbench SAE, got {type(sae).__name__}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.float().contiguous() for k, v in sae.state().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(sae_lens_config(sae), indent=2) + "\n")
    sparsity = path / SPARSITY_FILE
    if sae.firing_frequency is not None:
        freq = sae.firing_frequency.float().contiguous()
        save_file({"sparsity": torch.log10(freq + 1e-10), "firing_frequency": freq}, str(sparsity))
    elif sparsity.exists():
        sparsity.unlink()  # a stale file from an earlier SAE would be read back as this one's
    return path


# -- reading -------------------------------------------------------------------------------------------------


def _version_at_least_6(cfg: dict[str, Any]) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return False
    try:
        return int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def _architecture(cfg: dict[str, Any], new: bool) -> str:
    if new:
        arch = cfg.get("architecture", "standard")
    else:  # SAELens < 6 wrote the activation function, not the architecture
        arch = cfg.get("architecture") or "standard"
        fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        if fn == "topk":
            arch = "topk"
        elif fn != "relu" and arch == "standard":
            raise InputError(
                f"This SAE uses the activation function {fn!r}; the workbench reads relu and topk."
            )
    if arch not in _ARCH_FROM_SAELENS:
        raise InputError(
            f"SAE architecture {arch!r} is not supported; the workbench reads {', '.join(_ARCH_FROM_SAELENS)}."
        )
    return _ARCH_FROM_SAELENS[arch]


def config_from_sae_lens(cfg: dict[str, Any], *, centre_input: bool | None = None) -> tuple[SAEConfig, dict]:
    """An `SAEConfig` from a ``cfg.json`` dict (SAELens 6, older SAELens, or ours), and the folding to apply to
    the weights (``{"rescale_by_decoder_norm": bool}``)."""
    new = _version_at_least_6(cfg)
    meta = dict(cfg.get("metadata") or {}) if new else {}
    ours = meta.pop("workbench", None)
    top = cfg if not new else {**cfg, **meta}
    hook = top.get("hook_name") or top.get("hook_point")
    if not hook:
        raise InputError("The SAE config names no hook (hook_name / hook_point): where does it read?")
    if top.get("hook_head_index", top.get("hook_point_head_index")) is not None:
        raise InputError("Per-head SAEs (hook_head_index) are not supported; use SAEs on whole sites.")
    norm = top.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise InputError(
            f"This SAE normalises its inputs ({norm!r}); fold the scaling into its weights first "
            "(SAELens: fold_activation_norm_scaling_factor) and save it again."
        )
    if top.get("finetuning_scaling_factor"):
        raise InputError("This SAE has a fine-tuning scaling factor; fold it into W_dec first.")
    arch = _architecture(cfg, new)
    d_in = int(cfg["d_in"])
    d_sae = cfg.get("d_sae") or (int(cfg["expansion_factor"]) * d_in if cfg.get("expansion_factor") else None)
    if d_sae is None:
        raise InputError("The SAE config gives neither d_sae nor expansion_factor.")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if ours is not None:
        site, layer = ours["site"], ours["layer"]
        centre = ours.get("centre_input", False)
        skip = ours.get("skip_positions", 1)
        extra = dict(ours.get("metadata") or {})
    else:
        site, layer = site_of_hook(hook)
        pretrained_kwargs = top.get("model_from_pretrained_kwargs") or {}
        centre = bool(pretrained_kwargs.get("center_writing_weights", False))
        skip = 0 if top.get("prepend_bos", True) is False else 1
        keep = ("context_size", "dataset_path", "prepend_bos", "neuronpedia_id", "sae_lens_training_version")
        extra = {key: top[key] for key in keep if top.get(key) is not None}
        extra["source_config"] = {key: v for key, v in cfg.items() if _plain(v)}
    if centre_input is not None:
        centre = bool(centre_input)
    config = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=int(d_sae),
        site=site,
        layer=layer,
        k=int(k) if arch == "topk" else None,
        apply_b_dec_to_input=bool(top.get("apply_b_dec_to_input", True)),
        centre_input=centre,
        model_name=str(top.get("model_name") or ""),
        skip_positions=int(skip),
        metadata=extra,
    )
    return config, {"rescale_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False))}


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _from_files(
    cfg_path: Path, weights_path: Path, sparsity_path: Path | None, centre_input: bool | None
) -> SAE:
    try:
        cfg = json.loads(Path(cfg_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"Cannot read the SAE config {cfg_path}: {err}") from err
    config, fold = config_from_sae_lens(cfg, centre_input=centre_input)
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    if missing:
        raise ModelLoadError(f"{weights_path} lacks the SAE weights {missing}.")
    if fold["rescale_by_decoder_norm"]:  # fold the decoder norms into the encoder: the same maps, unit rows
        norms = state["W_dec"].norm(dim=-1).clamp(min=1e-12)
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
        if "threshold" in state:
            state["threshold"] = state["threshold"] * norms
    freq = None
    if sparsity_path is not None and Path(sparsity_path).exists():
        sp = load_file(str(sparsity_path))
        if "firing_frequency" in sp:
            freq = sp["firing_frequency"].float()
        elif "sparsity" in sp:
            freq = frequency_from_log10(sp["sparsity"])
    return SAE(
        config,
        state["W_enc"],
        state["b_enc"],
        state["W_dec"],
        state["b_dec"],
        state.get("threshold"),
        freq,
    )


def _hub_file(repo_id: str, filename: str, revision: str | None, optional: bool = False) -> Path | None:
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except Exception as err:
        name = type(err).__name__
        if optional and name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return None
        if optional and name == "LocalEntryNotFoundError" and os.environ.get("HF_HUB_OFFLINE") != "1":
            return None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set and the file is not in the local cache"
            if offline
            else "check the network, the repository name and the folder"
        )
        raise ModelLoadError(
            f"Could not fetch {filename} from the hub repository {repo_id!r} ({name}: {err}); {hint}."
        ) from err


def load_sae(
    source: str | os.PathLike,
    sae_id: str | None = None,
    *,
    revision: str | None = None,
    centre_input: bool | None = None,
) -> SAE:
    """An SAE from a local SAELens-layout directory, a known hub release, or a hub repository folder.

    Args:
        source: a directory (with ``cfg.json``), a release name from `PRETRAINED` (with `sae_id`), or a hub
            repository id "owner/name" (with `sae_id` the folder inside it; None for the repository root).
        sae_id: which SAE of a release, e.g. "blocks.1.hook_resid_pre"; or the folder in a repository.
        revision: a hub revision (branch, tag or commit) to pin.
        centre_input: override whether inputs are centred (see `workbench.sae.model`); None reads it from the
            config or the release.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{path} is not an SAE directory: it needs {CFG_FILE} and {WEIGHTS_FILE}.")
        sae = _from_files(path / CFG_FILE, path / WEIGHTS_FILE, path / SPARSITY_FILE, centre_input)
        sae.source = {"path": str(path), "centre_input": centre_input}
        return sae
    source = str(source)
    if source in PRETRAINED:
        release = PRETRAINED[source]
        if sae_id not in release["sae_ids"]:
            raise InputError(
                f"Release {source!r} has the SAEs {', '.join(release['sae_ids'])}; choose one as sae_id."
            )
        repo, folder = release["repo_id"], sae_id
        if centre_input is None:
            centre_input = release.get("centre_input")
    elif "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
        repo, folder = source, sae_id or ""
    else:
        raise InputError(
            f"{source!r} is neither an SAE directory, a known release ({', '.join(PRETRAINED)}) nor a hub "
            "repository id 'owner/name'."
        )
    prefix = f"{folder.strip('/')}/" if folder else ""
    cfg_path = _hub_file(repo, prefix + CFG_FILE, revision)
    weights = _hub_file(repo, prefix + WEIGHTS_FILE, revision)
    sparsity = _hub_file(repo, prefix + SPARSITY_FILE, revision, optional=True)
    sae = _from_files(cfg_path, weights, sparsity, centre_input)
    if source in PRETRAINED:
        meta = {**sae.cfg.metadata, "release": source, "sae_id": sae_id, "repo_id": repo}
        if PRETRAINED[source].get("neuronpedia") and sae.cfg.layer is not None:
            meta["neuronpedia"] = PRETRAINED[source]["neuronpedia"].format(layer=sae.cfg.layer)
        cfg = dataclasses.replace(sae.cfg, metadata=meta, model_name=PRETRAINED[source]["model"])
        sae = SAE(cfg, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, sae.firing_frequency)
    sae.source = {"hub": source, "sae_id": sae_id, "revision": revision, "centre_input": centre_input}
    return sae


def frequency_from_log10(log_sparsity: torch.Tensor) -> torch.Tensor:
    """Firing frequencies from SAELens' log10 sparsities (at or below -10: never fired, 0)."""
    log = torch.as_tensor(log_sparsity, dtype=torch.float64)
    return torch.where(log <= DEAD_LOG10, torch.zeros_like(log), 10**log).float()
