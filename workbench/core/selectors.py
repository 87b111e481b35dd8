"""One vocabulary for choosing layers, positions and heads, the same in every engine.

Positions (a prompt of n tokens):
- ``"each"``: every position on its own (a sweep's position axis);
- ``"together"``: all positions at once, as one group;
- ``"last"``: the last position only;
- ``"all-but-first"``: every position but 0, each on its own (position 0 is an attention sink whose activation
  is an outlier);
- an int (negative counts from the end), a list of ints (each on its own), or a list holding lists (each inner
  list is one group, patched together), e.g. ``[[3, 4], 9]``.

Layers: an int, a list of ints, or None / "all" for every layer. Integers of any kind (numpy's too) are
accepted; bools are not, since ``True`` is not a layer.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from workbench.errors import InputError, SiteError, warn

POSITION_WORDS = ("each", "together", "last", "all-but-first")
Groups = tuple[tuple[int, ...], ...]


def as_int(value: Any) -> int | None:
    """`value` as an int if it is an integer of any kind (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def resolve_layers(n_layers: int, layers: Any, *, model_name: str = "the model") -> tuple[int, ...]:
    """Distinct layer indices in 0..n_layers-1, in the order given; None or "all" is every layer."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return tuple(range(n_layers))
    items = [layers] if as_int(layers) is not None or isinstance(layers, (str, bool)) else list(layers)
    out = [resolve_layer(n_layers, item, model_name=model_name) for item in items]
    if not out:
        raise SiteError("layers=[]: give at least one layer, or None for all.")
    if len(set(out)) != len(out):
        raise SiteError(f"layers={items} lists a layer twice.")
    return tuple(out)


def resolve_layer(n_layers: int, layer: Any, *, model_name: str = "the model") -> int:
    """One layer index in 0..n_layers-1 (negative counts from the end)."""
    index = as_int(layer)
    if index is None:
        raise SiteError(
            f"Layer {layer!r} is not a layer number: give an integer in 0..{n_layers - 1} (or -1 for the last)."
        )
    if not -n_layers <= index < n_layers:
        raise SiteError(f"Layer {index} is out of range: {model_name} has layers 0..{n_layers - 1}.")
    return index % n_layers


def resolve_heads(n_heads: int, heads: Any, *, model_name: str = "the model") -> tuple[int, ...]:
    """Distinct head indices in 0..n_heads-1; None is every head."""
    if heads is None:
        return tuple(range(n_heads))
    items = [heads] if as_int(heads) is not None or isinstance(heads, bool) else list(heads)
    out = []
    for h in items:
        index = as_int(h)
        if index is None or not 0 <= index < n_heads:
            raise SiteError(f"Head {h!r} is out of range: {model_name} has heads 0..{n_heads - 1} per layer.")
        out.append(index)
    if not out or len(set(out)) != len(out):
        raise SiteError(f"heads={heads!r}: give distinct heads, or None for all.")
    return tuple(out)


def resolve_positions(positions: Any, n_pos: int, *, legacy_all: str | None = None) -> Groups:
    """Position groups for a prompt of `n_pos` tokens; each group is patched (or perturbed) together.

    legacy_all: what the engine's old spelling ``"all"`` meant ("together" or "all-but-first"); it still works,
    with a DeprecationWarning naming the new word.
    """
    if isinstance(positions, str):
        word = positions
        if word == "all" and legacy_all is not None:
            warn(
                f"positions='all' is now spelled positions={legacy_all!r} (one vocabulary in every engine).",
                DeprecationWarning,
            )
            word = legacy_all
        if word == "each":
            return tuple((t,) for t in range(n_pos))
        if word == "together":
            return (tuple(range(n_pos)),)
        if word == "last":
            return ((n_pos - 1,),)
        if word == "all-but-first":
            if n_pos < 2:
                raise InputError("The prompt has one token; 'all-but-first' leaves no position.")
            return tuple((t,) for t in range(1, n_pos))
        raise InputError(
            f"positions={positions!r}: use {', '.join(repr(w) for w in POSITION_WORDS)}, a position, or a list "
            "of positions (inner lists are patched together)."
        )

    def one(p) -> int:
        index = as_int(p)
        if index is None or not -n_pos <= index < n_pos:
            raise InputError(
                f"Position {p!r} is out of range: the prompt has {n_pos} tokens (positions 0..{n_pos - 1}, "
                "or -1 for the last)."
            )
        return index % n_pos

    items = [positions] if as_int(positions) is not None or isinstance(positions, bool) else positions
    if not isinstance(items, Sequence) and not hasattr(items, "__iter__"):
        raise InputError(f"positions={positions!r}: give a word ({', '.join(POSITION_WORDS)}) or positions.")
    items = list(items)
    if not items:
        raise InputError("positions=[]: give at least one position, or 'each' / 'together'.")
    groups = []
    for item in items:
        if isinstance(item, (list, tuple)):
            group = tuple(sorted({one(p) for p in item}))
            if not group:
                raise InputError("positions contains an empty group.")
            groups.append(group)
        else:
            groups.append((one(item),))
    if len(set(groups)) != len(groups):
        raise InputError(f"positions={positions!r} lists a position (group) twice.")
    return tuple(groups)


def renamed(old: str, old_value: Any, new: str, new_value: Any, *, unset: Any = None) -> Any:
    """The value of an argument that was renamed from `old` to `new`: the old spelling still works, with a
    DeprecationWarning naming the new one (giving both is an error)."""
    if old_value is unset:
        return new_value
    if new_value is not unset:
        raise InputError(f"Give {new}= only; {old}= is its old name.")
    warn(f"{old}= is now spelled {new}= (one vocabulary in every engine).", DeprecationWarning)
    return old_value
