"""Checks from the best practices of activation patching (Heimersheim & Nanda 2024; Zhang & Nanda 2023), as
sentences. Engines put them in their result's `warnings` and issue them as UserWarnings unless ``warn=False``.

- a no-op patch (the clean run patched with its own values) must give 1 within tolerance: if not, the patched
  runs are not the runs they claim to be (dropout, low precision, a broken intervention);
- baselines too close to normalise (a clean - corrupt gap under 1 logit, or pairs whose gap has the other sign):
  `workbench.patching.sweep.baseline_notes`, shared with activation patching;
- the model in training mode with dropout active: two runs of the same input differ, so estimates report effects
  for identical inputs (a known bug of attribution code that leaves dropout on);
- clean and corrupt prompts that look misaligned (shifted by a token, or differing at most positions);
- noising and denoising that disagree strongly, reported rather than hidden (`compare_directions`).
"""

from __future__ import annotations

import torch

from workbench.errors import warn as warn_user
from workbench.patching.sweep import baseline_notes

NOOP_TOLERANCE = 1e-3  # of the clean - corrupt gap


def checks(model, spec, clean: torch.Tensor, corrupt: torch.Tensor) -> list[str]:
    """The sentences every engine's result carries: dropout in training mode, the primary metric's baselines
    (`clean`, `corrupt` [metric, pair]) and misaligned prompt pairs (`spec`: the engine's `CircuitSpec`)."""
    i = spec.metric_index()
    return (
        training_mode(model)
        + baseline_notes(clean[i], corrupt[i], spec.metric)
        + misaligned(spec.pairs.clean_tokens, spec.pairs.corrupt_tokens)
    )


def training_mode(model) -> list[str]:
    """A sentence if the model is in training mode with dropout that would be active."""
    module = model.module
    active = [
        name
        for name, m in module.named_modules()
        if m.training and isinstance(m, torch.nn.Dropout) and m.p > 0
    ]
    config = getattr(module, "config", None)
    attn_drop = float(getattr(config, "attn_pdrop", 0) or getattr(config, "attention_dropout", 0) or 0)
    if not module.training or not (active or attn_drop > 0):
        return []
    where = f" ({len(active)} dropout modules, e.g. {active[0]})" if active else " (attention dropout)"
    return [
        f"The model is in training mode with dropout active{where}: two runs of the same prompt differ, so every "
        "patched and unpatched value is noisy and estimates report effects between identical inputs. Call "
        "model.module.eval() before patching."
    ]


def misaligned(clean_tokens, corrupt_tokens) -> list[str]:
    """A sentence when a pair's prompts look shifted against each other or differ at most positions: patching
    swaps activations position by position, so it then mixes unrelated tokens."""
    out = []
    for i, (c, k) in enumerate(zip(clean_tokens, corrupt_tokens)):
        n = len(c)
        differ = sum(a != b for a, b in zip(c, k))
        shifted = n > 3 and differ > n // 2 and (list(c[1:]) == list(k[:-1]) or list(c[:-1]) == list(k[1:]))
        if shifted:
            out.append(
                f"Pair {i}: the corrupt prompt is the clean prompt shifted by one token ({differ} of {n} positions "
                "differ). Positions no longer line up, so patching mixes unrelated tokens; align the prompts."
            )
        elif n > 4 and differ > n // 2:
            out.append(
                f"Pair {i}: the clean and corrupt prompts differ at {differ} of {n} positions. Patching compares "
                "them position by position; a corruption usually changes a few tokens (e.g. swapped names)."
            )
        if len(out) >= 3:
            break
    return out


def noop(noop: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, what: str) -> list[str]:
    """A sentence when the clean run patched with its own values [pair] is not the clean run (normalised != 1)."""
    gap = (clean - corrupt).abs().clamp_min(1e-6)
    err = ((noop - clean).abs() / gap).max()
    if not torch.isfinite(err) or float(err) > NOOP_TOLERANCE:
        return [
            f"A no-op patch ({what} from the clean run into the clean run) moved the metric by {float(err):.2g} of "
            "the clean - corrupt gap (it should be 0, i.e. a normalised 1): the patched runs do not reproduce the "
            "run they patch. Typical causes: dropout (training mode), low precision (bfloat16), or "
            "non-deterministic kernels."
        ]
    return []


def compare_directions(denoising, noising, *, metric: str | None = None, threshold: float = 0.5) -> list[str]:
    """Sentences for cells where denoising and noising disagree strongly.

    Takes two results over the same cells (path patching or activation patching), one per direction. Denoising
    scores how much a component restores (0 -> 1), noising how much corrupting it breaks (1 -> 0); the
    *sufficiency* (denoising value) and *necessity* (1 - noising value) of one component differ for AND- and
    OR-like circuits (Heimersheim & Nanda 2024). Cells where they differ by more than `threshold` (normalised)
    are listed.
    """
    d = denoising.values(metric, True).flatten()
    n = 1 - noising.values(metric, True).flatten()
    diff = (d - n).abs()
    bad = [
        i for i in diff.argsort(descending=True).tolist() if torch.isfinite(diff[i]) and diff[i] > threshold
    ]
    if not bad:
        return []
    labels = _cell_labels(denoising)
    shown = ", ".join(
        f"{labels[i]} (denoising {float(d[i]):.2f}, noising {1 - float(n[i]):.2f})" for i in bad[:5]
    )
    return [
        f"Noising and denoising disagree strongly at {len(bad)} cell{'s' * (len(bad) > 1)}: {shown}. The "
        "component is sufficient without being necessary (OR-like: a backup carries the information too) or "
        "necessary without being sufficient (AND-like: it needs others); report both directions."
    ]


def _cell_labels(result) -> list[str]:
    if hasattr(result, "senders") and hasattr(result, "receivers"):
        return [f"{s} -> {r}" for s in result.senders for r in result.receivers]
    if hasattr(result, "_cells"):
        return [result.cell_label(*c) for c in result._cells()]
    return [str(i) for i in range(result.values().numel())]


def issue(messages) -> None:
    """Issue each sentence as a UserWarning pointing at the user's line."""
    for message in messages:
        warn_user(message)
