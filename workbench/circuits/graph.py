"""The component graph: who writes into the residual stream, who reads from it, and the edges between them.

A transformer's residual stream is a sum. Every *sender* adds its output to it: the embedding, each attention
head (its ``z @ W_O``), each MLP. Every *receiver* reads a sum of the senders before it: a head's query, key and
value inputs (three receivers per head), an MLP's input, and the logits (through the final norm). An *edge*
u -> v is sender u's term in receiver v's input. Patching an edge changes that one term and nothing else: v's
input becomes ``(v's input in this run) + (u in the source run - u in this run)``, everything downstream of v is
recomputed, and every other reader of u still sees u's value in this run (Wang et al. 2022; Goldowsky-Dill et al.
2023; the edge definition of Syed et al. 2023 and Hanna et al. 2024).

Labels: senders ``"embed"``, ``"L3H1"`` (layer 3, head 1), ``"MLP2"``; receivers ``"L3H1.q"``, ``"L3H1.k"``,
``"L3H1.v"`` (``"L3KV0.k"`` for grouped-query keys and values), ``"MLP2"``, ``"logits"``.

Where a sender sits, as a *slot* of the residual stream: the embedding writes slot 0, layer l's attention slot
2l + 1 and its MLP slot 2l + 2. Layer l's attention reads slots up to 2l; its MLP reads up to 2l + 1 (only up to
2l in a parallel-residual model, whose MLP reads the block's input); the logits read everything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch

from workbench.errors import InputError, UnsupportedModelError

_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_HEAD_INPUT = re.compile(r"^L(\d+)(H|KV)(\d+)\.([qkv])$")
_MLP = re.compile(r"^MLP(\d+)$")


@dataclasses.dataclass(frozen=True)
class Node:
    """One sender or receiver. kind: "embed", "head", "mlp" (senders); "q", "k", "v", "mlp", "logits"
    (receivers). layer and head are None where they do not apply (head is the kv head for GQA keys/values)."""

    kind: str
    layer: int | None = None
    head: int | None = None
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Graph:
    """The component graph of one model shape (see the module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool
    senders: tuple[Node, ...]
    receivers: tuple[Node, ...]

    @classmethod
    def of(cls, model) -> Graph:
        """The graph of a `WorkbenchModel` (a transformer with an architecture adapter)."""
        if getattr(model, "adapter", None) is None:
            raise UnsupportedModelError(
                f"Circuits need a transformer with standard sites; {getattr(model, 'name', model)!r} is not one."
            )
        if model.adapter.attn_out_norm is not None:
            raise UnsupportedModelError(
                f"{model.cfg.family} models normalise the attention output before adding it to the residual stream "
                "(a 'sandwich' norm), so single heads do not write additive terms and the head graph does not "
                "exist. Use activation patching (workbench.patching.sweep) on attn_out instead."
            )
        c = model.cfg
        return cls.build(c.n_layers, c.n_heads, c.n_kv_heads, c.parallel_residual)

    @classmethod
    def build(
        cls, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel: bool = False
    ) -> Graph:
        kv = n_heads if n_kv_heads is None else n_kv_heads
        senders = [Node("embed", label="embed")]
        receivers = []
        for layer in range(n_layers):
            senders += [Node("head", layer, h, f"L{layer}H{h}") for h in range(n_heads)]
            senders.append(Node("mlp", layer, label=f"MLP{layer}"))
            receivers += [Node("q", layer, h, f"L{layer}H{h}.q") for h in range(n_heads)]
            tag = "H" if kv == n_heads else "KV"
            for which in "kv":
                receivers += [Node(which, layer, g, f"L{layer}{tag}{g}.{which}") for g in range(kv)]
            receivers.append(Node("mlp", layer, label=f"MLP{layer}"))
        receivers.append(Node("logits", label="logits"))
        return cls(n_layers, n_heads, kv, parallel, tuple(senders), tuple(receivers))

    # -- positions in the residual stream ---------------------------------------------------------------
    @staticmethod
    def slot(node: Node) -> int:
        """Where a sender writes (see the module docstring)."""
        if node.kind == "embed":
            return 0
        return 2 * node.layer + (1 if node.kind == "head" else 2)

    def reads_up_to(self, node: Node) -> int:
        """The last slot a receiver reads."""
        if node.kind == "logits":
            return 2 * self.n_layers
        if node.kind == "mlp":
            return 2 * node.layer + (0 if self.parallel else 1)
        return 2 * node.layer

    @property
    def adjacency(self) -> torch.Tensor:
        """[receiver, sender] bool: which edges exist."""
        limits = torch.tensor([self.reads_up_to(r) for r in self.receivers])
        slots = torch.tensor([self.slot(s) for s in self.senders])
        return slots[None, :] <= limits[:, None]

    @property
    def n_edges(self) -> int:
        return int(self.adjacency.sum())

    def edge_label(self, receiver: int, sender: int) -> str:
        return f"{self.senders[sender].label} -> {self.receivers[receiver].label}"

    def edges(self) -> list[tuple[int, int]]:
        """All edges as (receiver index, sender index), receivers in forward order."""
        return [tuple(e) for e in self.adjacency.nonzero().tolist()]

    # -- names -> indices -------------------------------------------------------------------------------
    def sender_index(self, label: str) -> int:
        for i, s in enumerate(self.senders):
            if s.label == label:
                return i
        raise InputError(self._unknown("sender", label))

    def receiver_index(self, label: str) -> int:
        for i, r in enumerate(self.receivers):
            if r.label == label:
                return i
        raise InputError(self._unknown("receiver", label))

    def _unknown(self, what: str, label) -> str:
        examples = (
            "'embed', 'L0H1', 'MLP0'"
            if what == "sender"
            else f"'L{min(1, self.n_layers - 1)}H0.q', 'L{min(1, self.n_layers - 1)}H0' (its q, k and v), 'MLP0', "
            "'logits'"
        )
        return (
            f"Unknown {what} {label!r}. {what.capitalize()}s are named like {examples}; this model has layers "
            f"0..{self.n_layers - 1} and heads 0..{self.n_heads - 1}. Groups: "
            + (
                "'heads', 'mlps', 'components' (embed, heads and MLPs), 'layer N' (that layer's heads and MLP)."
                if what == "sender"
                else "'logits', 'q', 'k', 'v', 'qkv' (every head's q, k and v, each on its own), 'heads' (each "
                "head's q, k and v together), 'mlps', 'all'."
            )
        )

    def _check_layer(self, layer: int, label: str) -> None:
        if not 0 <= layer < self.n_layers:
            raise InputError(
                f"{label!r}: layer {layer} is out of range; this model has layers 0..{self.n_layers - 1}."
            )

    def _head_receivers(self, layer: int, head: int, which: str) -> list[int]:
        group = self.n_heads // self.n_kv_heads
        out = []
        for w in which:
            h = head if w == "q" else head // group
            label = (
                f"L{layer}H{h}.{w}" if w == "q" or self.n_kv_heads == self.n_heads else f"L{layer}KV{h}.{w}"
            )
            out.append(self.receiver_index(label))
        return out

    def resolve_senders(self, spec) -> tuple[tuple[int, ...], ...]:
        """Sender groups (each patched together) from labels, lists of labels or group words."""
        return self._resolve(spec, self._sender_word, self._sender_label)

    def resolve_receivers(self, spec) -> tuple[tuple[int, ...], ...]:
        """Receiver groups (each patched together) from labels, lists of labels or group words."""
        return self._resolve(spec, self._receiver_word, self._receiver_label)

    def _resolve(self, spec, word, label) -> tuple[tuple[int, ...], ...]:
        if isinstance(spec, str):
            groups = word(spec)
            if groups is None:
                groups = [label(spec)]
        elif isinstance(spec, Sequence) and len(spec) > 0:
            groups = []
            for item in spec:
                if isinstance(item, str):
                    groups += word(item) or [label(item)]
                elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) > 0:
                    group = []
                    for part in item:
                        if not isinstance(part, str):
                            raise InputError(f"{part!r} is not a label such as 'L0H1'.")
                        group += label(part)
                    groups.append(tuple(group))
                else:
                    raise InputError(f"{item!r} is neither a label such as 'L0H1' nor a list of labels.")
        else:
            raise InputError(f"{spec!r}: give a label such as 'L0H1', a group word, or a list of them.")
        out = [tuple(dict.fromkeys(g)) for g in groups]
        if len(set(out)) != len(out):
            raise InputError(f"{spec!r} names the same node (group) twice.")
        return tuple(out)

    def _sender_label(self, label: str) -> tuple[int, ...]:
        if label == "embed":
            return (0,)
        m = _HEAD.match(label) or _MLP.match(label)
        if m is None:
            raise InputError(self._unknown("sender", label))
        self._check_layer(int(m.group(1)), label)
        if _HEAD.match(label) and not 0 <= int(m.group(2)) < self.n_heads:
            raise InputError(
                f"{label!r}: head {m.group(2)} is out of range; heads are 0..{self.n_heads - 1}."
            )
        return (self.sender_index(label),)

    def _sender_word(self, word: str):
        heads = [(i,) for i, s in enumerate(self.senders) if s.kind == "head"]
        mlps = [(i,) for i, s in enumerate(self.senders) if s.kind == "mlp"]
        if word == "heads":
            return heads
        if word == "mlps":
            return mlps
        if word in ("components", "all"):
            return [(i,) for i in range(len(self.senders))]
        m = re.match(r"^layer (\d+)$", word)
        if m:
            self._check_layer(int(m.group(1)), word)
            return [(i,) for i, s in enumerate(self.senders) if s.layer == int(m.group(1))]
        return None

    def _receiver_label(self, label: str) -> tuple[int, ...]:
        if label == "logits":
            return (len(self.receivers) - 1,)
        m = _HEAD_INPUT.match(label)
        if m:
            self._check_layer(int(m.group(1)), label)
            return (self.receiver_index(label),)
        m = _HEAD.match(label)
        if m:  # a head: its query, key and value inputs together
            layer, head = int(m.group(1)), int(m.group(2))
            self._check_layer(layer, label)
            if not 0 <= head < self.n_heads:
                raise InputError(f"{label!r}: head {head} is out of range; heads are 0..{self.n_heads - 1}.")
            return tuple(self._head_receivers(layer, head, "qkv"))
        m = _MLP.match(label)
        if m:
            self._check_layer(int(m.group(1)), label)
            return (self.receiver_index(label),)
        raise InputError(self._unknown("receiver", label))

    def _receiver_word(self, word: str):
        if word in ("q", "k", "v"):
            return [(i,) for i, r in enumerate(self.receivers) if r.kind == word]
        if word == "qkv":
            return [(i,) for i, r in enumerate(self.receivers) if r.kind in ("q", "k", "v")]
        if word == "heads":
            return [
                tuple(self._head_receivers(layer, h, "qkv"))
                for layer in range(self.n_layers)
                for h in range(self.n_heads)
            ]
        if word == "mlps":
            return [(i,) for i, r in enumerate(self.receivers) if r.kind == "mlp"]
        if word == "all":
            return [(i,) for i in range(len(self.receivers))]
        return None

    def group_label(self, group: tuple[int, ...], side: str) -> str:
        nodes = self.senders if side == "sender" else self.receivers
        labels = [nodes[i].label for i in group]
        if (
            side == "receiver"
            and len(labels) == 3
            and all(label.endswith((".q", ".k", ".v")) for label in labels)
        ):
            first = nodes[group[0]]
            if first.kind == "q":
                return f"L{first.layer}H{first.head}"
        return labels[0] if len(labels) == 1 else "+".join(labels)
