"""Norm sites: the places whose scale LayerNorm removal freezes, named as in the paper.

- ``"mlp.L"``: the norm before block L's MLP (the paper's LN_MLP^L; GPT-2's ``ln_2``);
- ``"qk.L"``: the norm before block L's attention, as seen by the queries and keys (LN_qk^L);
- ``"v.L"``: the same norm as seen by the values (LN_v^L);
- ``"final"``: the final norm before the unembedding (LN_f).

The paper removes them in this order: every MLP norm by layer, then every q/k path, then every v path, then the
final norm (`paper_order`). `parse_sites` also accepts shorthands: ``"mlp"`` (all layers of a kind), ``"attn.3"``
(both paths of layer 3), ``"ln_f"``, ``("mlp", 3)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from workbench.errors import InputError

KINDS = ("mlp", "qk", "v", "final")
KIND_LABELS = {"mlp": "MLP", "qk": "attn q/k", "v": "attn v", "final": "final"}
MODULE_OF_KIND = {"mlp": "ln2", "qk": "ln1", "v": "ln1", "final": "ln_final"}


def paper_order(n_layers: int) -> list[str]:
    """All 3 * n_layers + 1 sites in the paper's removal order: MLP norms, q/k paths, v paths, final."""
    return [f"{kind}.{layer}" for kind in ("mlp", "qk", "v") for layer in range(n_layers)] + ["final"]


def split_site(site: str) -> tuple[str, int | None]:
    """``"qk.3"`` -> ("qk", 3); ``"final"`` -> ("final", None)."""
    if site == "final":
        return "final", None
    kind, _, layer = site.partition(".")
    return kind, int(layer)


def site_label(site: str) -> str:
    """A readable label: "MLP 3", "attn q/k 3", "attn v 3", "final"."""
    kind, layer = split_site(site)
    return KIND_LABELS[kind] if layer is None else f"{KIND_LABELS[kind]} {layer}"


def norm_module(site: str) -> str:
    """The norm module a site belongs to: "ln2.L", "ln1.L" or "ln_final"."""
    kind, layer = split_site(site)
    return "ln_final" if layer is None else f"{MODULE_OF_KIND[kind]}.{layer}"


def norm_modules(n_layers: int) -> list[str]:
    """Every norm module in forward order: "ln1.0", "ln2.0", "ln1.1", ..., "ln_final"."""
    return [f"ln{i}.{layer}" for layer in range(n_layers) for i in (1, 2)] + ["ln_final"]


_KIND_ALIASES = {
    "final": "final", "ln_f": "final", "lnf": "final", "ln_final": "final",
    "mlp": "mlp", "ln2": "mlp", "ln_2": "mlp",
    "attn": "attn", "ln1": "attn", "ln_1": "attn",
    "qk": "qk", "v": "v",
}  # fmt: skip
_PATTERN = re.compile(r"(?P<kind>ln_?[12f]|ln_final|[a-z]+)(?:[._ ]?(?P<layer>-?\d+))?")
_HELP = (
    "Give sites as 'mlp.3', 'qk.3', 'v.3', 'attn.3' (both attention paths), 'final', a whole kind ('mlp', "
    "'qk', 'v', 'attn'), or tuples like ('mlp', 3)."
)


def _one(item, n_layers: int) -> list[str]:
    if isinstance(item, tuple) and len(item) == 2:
        kind, layer = str(item[0]).lower(), item[1]
    elif isinstance(item, str) and (m := _PATTERN.fullmatch(item.strip().lower())):
        kind, layer = m["kind"], int(m["layer"]) if m["layer"] is not None else None
    else:
        raise InputError(f"Cannot read the norm site {item!r}. {_HELP}")
    kind = _KIND_ALIASES.get(kind)
    if kind is None:
        raise InputError(f"Unknown norm site {item!r}. {_HELP}")
    if kind == "final":
        if layer is not None:
            raise InputError(f"The final norm has no layer (got {item!r}). {_HELP}")
        return ["final"]
    kinds = ["qk", "v"] if kind == "attn" else [kind]
    if layer is None:
        return [f"{k}.{i}" for k in kinds for i in range(n_layers)]
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise InputError(
            f"Layer {layer!r} in site {item!r} is out of range: the model has layers 0..{n_layers - 1}."
        )
    return [f"{k}.{layer % n_layers}" for k in kinds]


def parse_sites(sites: str | Iterable | None, n_layers: int) -> list[str]:
    """Canonical site names, without duplicates, in the paper's order. None or "all" means every site."""
    if sites is None or (isinstance(sites, str) and sites.strip().lower() == "all"):
        return paper_order(n_layers)
    if isinstance(sites, (str, tuple)):
        sites = [sites]
    if not isinstance(sites, Iterable):
        raise InputError(f"Cannot read the norm sites {sites!r}. {_HELP}")
    chosen: set[str] = set()
    for item in sites:
        chosen.update(_one(item, n_layers))
    return [s for s in paper_order(n_layers) if s in chosen]


def paper_prefix(k: int, n_layers: int) -> list[str]:
    """The first `k` sites of the paper's order: the preset "paper order up to step k"."""
    order = paper_order(n_layers)
    if not 0 <= k <= len(order):
        raise InputError(f"k={k}: the paper's order has {len(order)} steps (0..{len(order)}).")
    return order[:k]
