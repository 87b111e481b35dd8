"""Direction families: unit vectors along which a base activation x0 is pushed, x0 + s * d.

Every direction is normalised to unit L2 norm, so a size s means the same distance for every family.
Families that point at a target t ("toward" families: d = (t - x0) / |t - x0|) include a -x0 component: they also
shrink x0 toward the target's scale. Lee & Heimersheim (2024) pointed out that this confound makes them look
more sensitive, and proposed the `cov_mixture` baseline, which does not depend on x0 at all.
"""

from __future__ import annotations

import torch

from workbench.errors import InputError
from workbench.plateau.stats import RefStats

FAMILIES: dict[str, str] = {
    "isotropic": "isotropic random: N(0, I), normalised",
    "cov_random": "toward a random activation with the real mean and covariance: t ~ N(mean, cov), d = t - x0",
    "cov_mixture": "difference of two independent N(mean, cov) samples (Lee & Heimersheim's baseline)",
    "toward_real": "toward another real activation r: d = r - x0",
    "real_mixture": "difference of two other real activations r_i - r_j",
}
"""Built-in families and what they are. User-given directions (e.g. SAE decoder rows) join them by name."""

NEEDS_COVARIANCE = ("cov_random", "cov_mixture")
NEEDS_SAMPLE = ("toward_real", "real_mixture")


def unit(v: torch.Tensor) -> torch.Tensor:
    """Rows of `v` [k, d] scaled to unit L2 norm; all-zero rows are an error."""
    norms = v.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise InputError("A direction has zero length; remove all-zero vectors.")
    return v / norms


def check_user_directions(directions, d_model: int) -> dict[str, torch.Tensor]:
    """Validate user-given directions {name: [k, d_model] or [d_model]} and normalise each row."""
    if directions is None:
        return {}
    if isinstance(directions, torch.Tensor):
        directions = {"user": directions}
    if not isinstance(directions, dict):
        raise InputError("directions must be a dict {name: tensor [k, d_model]} or one tensor.")
    out = {}
    for name, v in directions.items():
        if name in FAMILIES:
            raise InputError(f"{name!r} is a built-in family name; give your directions another name.")
        v = torch.as_tensor(v).detach().float().cpu()
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[-1] != d_model:
            raise InputError(
                f"Directions {name!r} have shape {tuple(v.shape)}; expected [k, {d_model}] (one row per direction)."
            )
        if not torch.isfinite(v).all():
            raise InputError(f"Directions {name!r} contain NaN or inf.")
        out[str(name)] = unit(v)
    return out


def _others(sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Rows of the real sample other than x0 itself (x0 may be one of them)."""
    far = (sample - x0).norm(dim=-1) > 1e-6 * max(float(x0.norm()), 1e-12)
    return sample[far]


def draw(
    family: str,
    k: int,
    x0: torch.Tensor,
    ref: RefStats | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """[k, d_model] unit directions of a built-in `family` for the base activation `x0` [d_model]."""
    d = x0.shape[-1]
    if family == "isotropic":
        return unit(torch.randn(k, d, generator=generator))
    if ref is None:
        raise InputError(f"The {family!r} family needs reference statistics (reference=...).")
    if family == "cov_random":
        return unit(ref.sample_normal(k, generator) - x0)
    if family == "cov_mixture":
        return unit(ref.sample_normal(k, generator) - ref.sample_normal(k, generator))
    others = _others(ref.sample, x0)
    if len(others) < 2:
        raise InputError(
            f"The {family!r} family needs real activations other than the base; the reference has "
            f"{len(others)}. Give more reference data."
        )
    if family == "toward_real":
        idx = torch.randint(len(others), (k,), generator=generator)
        return unit(others[idx] - x0)
    if family == "real_mixture":
        i = torch.randint(len(others), (k,), generator=generator)
        j = (i + torch.randint(1, len(others), (k,), generator=generator)) % len(others)  # j != i
        return unit(others[i] - others[j])
    raise InputError(f"Unknown direction family {family!r}; families: {', '.join(FAMILIES)}.")
