"""`SAE`: a sparse autoencoder on one site of a model, and the latent directions it defines.

Encoder and decoder follow the SAELens conventions, so weights move between the two without conversion:

    pre  = (prepare(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      W_enc [d_in, d_sae]
    f    = act(pre)                                                           relu | topk(k) | jumprelu(threshold)
    x_hat = f @ W_dec + b_dec                                                 W_dec [d_sae, d_in], unit-norm rows

`prepare` centres the input over its last axis for SAEs trained on TransformerLens models loaded with
``center_writing_weights`` (GPT-2's public SAEs): there the residual stream has no component along the all-ones
direction, while the Hugging Face model's residual does. LayerNorm removes that component, so the model's output
does not depend on it; `reconstruct` adds it back so a spliced-in reconstruction differs from the input only by the
SAE's error.

Latents are addressed by index. `sae.latent(i)` is a `LatentDirection` (its unit decoder row and where it lives),
the object patching, steering and plateau probes take; `sae.directions([...])` gives the rows as a
``{name: [k, d_in]}`` dict for ``probe(directions=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from workbench.errors import InputError

ARCHITECTURES = ("relu", "topk", "jumprelu")
"""relu: ReLU (trained with an L1 penalty; SAELens "standard"); topk: the k largest pre-activations, ReLU'd;
jumprelu: pre-activation kept where it exceeds a per-latent threshold (loaded, e.g. Gemma Scope; not trained here)."""

SITE_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "z": "blocks.{layer}.attn.hook_z",
    "ln1": "blocks.{layer}.ln1.hook_normalized",
    "ln2": "blocks.{layer}.ln2.hook_normalized",
    "ln_final": "ln_final.hook_normalized",
    "embed": "hook_embed",
}
"""Workbench site names and their TransformerLens hook names (the names SAELens stores as ``hook_name``)."""


def hook_name(site: str, layer: int | None) -> str:
    """The TransformerLens hook name of a workbench site, e.g. ``("resid_pre", 1) -> "blocks.1.hook_resid_pre"``."""
    if site not in SITE_HOOKS:
        raise InputError(f"SAEs can live at {', '.join(SITE_HOOKS)}; got site {site!r}.")
    pattern = SITE_HOOKS[site]
    if "{layer}" in pattern and layer is None:
        raise InputError(f"Site {site!r} is per layer: give a layer.")
    return pattern.format(layer=layer)


def site_of_hook(name: str) -> tuple[str, int | None]:
    """The workbench (site, layer) of a TransformerLens hook name; `InputError` for hooks without a site."""
    for site, pattern in SITE_HOOKS.items():
        if "{layer}" not in pattern:
            if name == pattern:
                return site, None
            continue
        head, tail = pattern.split("{layer}")
        if name.startswith(head) and name.endswith(tail):
            middle = name[len(head) : len(name) - len(tail)]
            if middle.isdigit():
                return site, int(middle)
    raise InputError(
        f"The SAE's hook {name!r} has no workbench site; known hooks look like "
        f"{', '.join(p.format(layer=0) for p in SITE_HOOKS.values())}."
    )


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it reads.

    Attributes:
        architecture: one of `ARCHITECTURES`.
        d_in, d_sae: input width and number of latents.
        site, layer: the workbench site it encodes (``z`` SAEs read the heads flattened, [.., n_heads * d_head]).
        k: active latents per input (topk only).
        apply_b_dec_to_input: subtract b_dec before encoding (SAELens default True).
        centre_input: subtract each input's mean over its last axis first (TransformerLens models loaded with
            ``center_writing_weights``; see the module docstring).
        model_name: the model it was trained on (a workbench or hub name).
        skip_positions: leading positions it was not trained on (1: BOS excluded); splicing leaves them alone.
        metadata: everything else (training settings, SAELens fields kept for a faithful round trip).
    """

    architecture: str
    d_in: int
    d_sae: int
    site: str
    layer: int | None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    centre_input: bool = False
    model_name: str = ""
    skip_positions: int = 1
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}."
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise InputError("d_in and d_sae must be positive.")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= self.d_sae):
            raise InputError(f"A topk SAE needs k in 1..{self.d_sae}, got {self.k!r}.")
        hook_name(self.site, self.layer)

    @property
    def hook_name(self) -> str:
        return hook_name(self.site, self.layer)


@dataclasses.dataclass(frozen=True)
class LatentDirection:
    """One SAE latent as a direction in the model's activation space.

    Attributes:
        index: the latent's index in its SAE.
        vector: [d_in] its decoder row, unit L2 norm.
        site, layer: where the direction lives.
        label: a short name for plots ("latent 17").
    """

    index: int
    vector: torch.Tensor
    site: str
    layer: int | None
    label: str

    def __repr__(self) -> str:
        return f"LatentDirection({self.label}, {self.site} {self.layer}, d={self.vector.shape[-1]})"


class SAE(torch.nn.Module):
    """A sparse autoencoder (see the module docstring for the maths). Build one with `SAE.init`, `train_sae`,
    `load_sae` or `load_demo_sae`.

    Attributes:
        cfg: `SAEConfig`.
        W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]: parameters (float32 by default).
        threshold: [d_sae] JumpReLU thresholds (jumprelu only).
        firing_frequency: [d_sae] fraction of (non-skipped) tokens on which each latent fires, measured on
            held-out data when known (SAELens stores it as log10 in ``sparsity.safetensors``), else None.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
        firing_frequency: torch.Tensor | None = None,
    ):
        super().__init__()
        d_in, d_sae = cfg.d_in, cfg.d_sae
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        for name, shape in shapes.items():
            value = torch.as_tensor(given[name])
            if tuple(value.shape) != shape:
                raise InputError(f"SAE weight {name} has shape {tuple(value.shape)}; expected {shape}.")
            self.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
        if cfg.architecture == "jumprelu":
            if threshold is None or tuple(threshold.shape) != (d_sae,):
                raise InputError(f"A jumprelu SAE needs a threshold of shape ({d_sae},).")
            self.register_buffer("threshold", torch.as_tensor(threshold).detach().clone())
        else:
            self.threshold = None
        if firing_frequency is not None:
            firing_frequency = torch.as_tensor(firing_frequency, dtype=torch.float32).detach().clone()
            if tuple(firing_frequency.shape) != (d_sae,):
                raise InputError(f"firing_frequency must have shape ({d_sae},).")
        self.firing_frequency = firing_frequency
        self.cfg = cfg
        self.source: dict | None = (
            None  # how it was loaded (set by the loaders; panels print it in their code)
        )

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        d_in: int,
        d_sae: int,
        *,
        site: str = "resid_pre",
        layer: int | None = 1,
        architecture: str = "relu",
        k: int | None = None,
        seed: int = 0,
        **cfg: Any,
    ) -> SAE:
        """A freshly initialised SAE: unit-norm random decoder rows, encoder = decoder transposed, zero biases."""
        config = SAEConfig(
            architecture=architecture, d_in=d_in, d_sae=d_sae, site=site, layer=layer, k=k, **cfg
        )
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        return cls(config, W_dec.T.clone(), torch.zeros(d_sae), W_dec, torch.zeros(d_in))

    def __repr__(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.architecture == "topk" else ""
        model = f" of {c.model_name}" if c.model_name else ""
        return f"SAE({c.architecture}{extra}, {c.d_in} -> {c.d_sae}, {c.site} {c.layer}{model})"

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- the maps --------------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the SAE sees it, [..., d_in]: centred over the last axis when `cfg.centre_input`."""
        x = x.to(self.W_enc.dtype)
        return x - x.mean(-1, keepdim=True) if self.cfg.centre_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] encoder pre-activations of inputs [..., d_in]."""
        x = self.prepare(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations, [..., d_sae]."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] latent activations of inputs [..., d_in] (raw activations of the model at the site)."""
        self._check_width(x)
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[..., d_in] the vector a code [..., d_sae] stands for (in the SAE's input space: centred when
        `cfg.centre_input`)."""
        if f.shape[-1] != self.d_sae:
            raise InputError(f"A code for this SAE has {self.d_sae} entries; got {f.shape[-1]}.")
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] decode(encode(x)), plus the mean component `prepare` removed (so x - reconstruct(x) is
        the SAE's error)."""
        out = self.decode(self.encode(x))
        if self.cfg.centre_input:
            out = out + x.to(out.dtype).mean(-1, keepdim=True)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(
                f"This SAE reads vectors of width {self.d_in} ({self.cfg.site} {self.cfg.layer}); got {x.shape[-1]}."
            )

    # -- latents ---------------------------------------------------------------------------------------------
    def _index(self, latent: int) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int) or not -self.d_sae <= latent < self.d_sae:
            raise InputError(f"Latent {latent!r} is out of range: this SAE has latents 0..{self.d_sae - 1}.")
        return latent % self.d_sae

    def latent(self, latent: int) -> LatentDirection:
        """One latent as a `LatentDirection` (its unit decoder row)."""
        i = self._index(latent)
        row = self.W_dec[i].detach().float()
        return LatentDirection(i, row / row.norm(), self.cfg.site, self.cfg.layer, f"latent {i}")

    def directions(self, latents: Sequence[int], name: str = "sae latents") -> dict[str, torch.Tensor]:
        """{name: [k, d_in]} unit decoder rows of `latents`, the form ``probe(directions=...)`` takes."""
        rows = torch.stack([self.latent(i).vector for i in latents]) if len(latents) else None
        if rows is None:
            raise InputError("Give at least one latent.")
        return {name: rows}

    def decoder_cosines(self) -> torch.Tensor:
        """[d_sae, d_sae] cosine similarity between decoder rows."""
        w = self.W_dec.detach().float()
        w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return w @ w.T

    def live(self) -> torch.Tensor:
        """[d_sae] bool: latents that fired on the data `firing_frequency` was measured on (all when unknown)."""
        if self.firing_frequency is None:
            return torch.ones(self.d_sae, dtype=torch.bool)
        return self.firing_frequency > 0

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The weights as a SAELens state dict (float32 copies)."""
        out = {n: getattr(self, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach().clone()
        return out

    def with_frequency(self, firing_frequency: torch.Tensor) -> SAE:
        """This SAE with `firing_frequency` [d_sae] set (the weights are shared)."""
        out = SAE(self.cfg, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, firing_frequency)
        out.source = None  # its frequencies are not those of the files it came from
        return out

    def same_as(self, other: SAE) -> bool:
        """Identical configuration and weights (and firing frequencies, when both have them)."""
        if self.cfg != other.cfg:
            return False
        a, b = self.state(), other.state()
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
        fa, fb = self.firing_frequency, other.firing_frequency
        if (fa is None) != (fb is None):
            return False
        return fa is None or bool(torch.allclose(fa, fb, rtol=1e-6, atol=0))


def latent_directions(sae: SAE, x: torch.Tensor, k: int = 4, kind: str = "active") -> torch.Tensor:
    """[n, k, d_in] unit decoder rows per activation x [n, d_in]: its `k` most active latents ("active"; when
    fewer are active, the rest are the next latents by pre-activation), or `k` latents that are not active
    ("inactive", those with the highest pre-activation below zero: directions the SAE says are near).

    The per-base latent family a plateau probe would push along (`probe` takes one set of directions for all
    bases today; see the module docstring of `workbench.sae`)."""
    if kind not in ("active", "inactive"):
        raise InputError(f"kind must be 'active' or 'inactive', got {kind!r}.")
    if not isinstance(k, int) or not 1 <= k <= sae.d_sae:
        raise InputError(f"k must be in 1..{sae.d_sae}.")
    with torch.no_grad():
        pre = sae.pre_activations(torch.as_tensor(x).float())
        if kind == "inactive":
            pre = torch.where(sae.encode(x) > 0, torch.full_like(pre, -float("inf")), pre)
        idx = pre.topk(k, dim=-1).indices
        rows = sae.W_dec.detach().float()[idx]
    return rows / rows.norm(dim=-1, keepdim=True)
