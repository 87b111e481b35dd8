"""Independent plain-PyTorch implementations of the circuit methods, imported by the circuit tests (no tests here).

Nothing here uses workbench code beyond reading the model's shape facts: a fresh copy of the Hugging Face
weights, forward hooks on its modules, one patched run per forward pass, autograd for gradients.
"""

from __future__ import annotations

import torch

PATHS = {  # blocks, ln1, ln2, attention output projection, qkv layout and paths, MLP, final norm
    "gpt2": (
        "transformer.h",
        "ln_1",
        "ln_2",
        "attn.c_proj",
        "fused",
        ("attn.c_attn",),
        "mlp",
        "transformer.ln_f",
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        "input_layernorm",
        "post_attention_layernorm",
        "attention.dense",
        "neox",
        ("attention.query_key_value",),
        "mlp",
        "gpt_neox.final_layer_norm",
    ),
    "llama": (
        "model.layers",
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.o_proj",
        "separate",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp",
        "model.norm",
    ),
}


def get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def first(x):
    return x[0] if isinstance(x, tuple) else x


class Reference:
    """Plain hooks on a fresh copy of `model`'s weights. Senders and receivers are the graph's labels."""

    def __init__(self, model):
        from transformers import AutoModelForCausalLM

        self.hf = AutoModelForCausalLM.from_config(model.module.config, attn_implementation="eager").eval()
        self.hf.load_state_dict(model.module.state_dict())
        fam = model.cfg.family
        self.family = "llama" if fam in ("llama", "qwen2", "mistral", "gemma") else fam
        self.blocks, self.ln1, self.ln2, self.out_proj, self.layout, self.qkv, self.mlp, self.lnf = PATHS[
            self.family
        ]
        c = model.cfg
        self.L, self.H, self.KV, self.dh, self.d = c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.d_model
        self.parallel = c.parallel_residual

    def block(self, layer):
        return get(self.hf, self.blocks)[layer]

    def w_o(self, layer):
        proj = get(self.block(layer), self.out_proj)
        w = proj.weight if self.family == "gpt2" else proj.weight.T  # [H * d_head, d_model]
        return w.reshape(self.H, self.dh, self.d)

    def proj_slice(self, out, which, head):
        """The part of a projection output [.., width] that is `which` of head `head` (HF's own layout)."""
        idx = "qkv".index(which)
        if self.layout == "fused":
            return out[
                ..., idx * self.H * self.dh + head * self.dh : idx * self.H * self.dh + (head + 1) * self.dh
            ]
        if self.layout == "neox":
            start = head * 3 * self.dh + idx * self.dh
            return out[..., start : start + self.dh]
        return out[..., head * self.dh : (head + 1) * self.dh]

    def proj_module(self, layer, which):
        paths = self.qkv if len(self.qkv) == 3 else self.qkv * 3
        return get(self.block(layer), paths["qkv".index(which)])

    # -- sender outputs ----------------------------------------------------------------------------------
    def _sender_hooks(self, store):
        """Hooks recording every sender's output into `store` (label -> [batch, pos, d_model])."""
        handles = [
            self.block(0).register_forward_pre_hook(
                lambda m, a, kw=None: store.__setitem__("embed", a[0].clone())
            )
        ]
        for layer in range(self.L):

            def z_hook(m, args, layer=layer):
                z = args[0].view(*args[0].shape[:-1], self.H, self.dh)
                res = torch.einsum("bphd,hdm->bphm", z, self.w_o(layer))
                for h in range(self.H):
                    store[f"L{layer}H{h}"] = res[:, :, h].clone()

            handles.append(get(self.block(layer), self.out_proj).register_forward_pre_hook(z_hook))
            handles.append(
                get(self.block(layer), self.mlp).register_forward_hook(
                    lambda m, a, o, layer=layer: store.__setitem__(f"MLP{layer}", first(o).clone())
                )
            )
        return handles

    def senders(self, tokens):
        store = {}
        handles = self._sender_hooks(store)
        try:
            with torch.no_grad():
                logits = self.hf(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return store, logits

    # -- one patched run ---------------------------------------------------------------------------------
    def edge_run(self, base_tokens, source, edges, positions=None):
        """Logits [batch, pos, vocab] of the base run with `edges` [(receiver label, sender label)] patched
        from `source` (sender label -> [batch, pos, d_model])."""
        current = {}
        handles = self._sender_hooks(current)
        mask = torch.zeros(base_tokens.shape[1], 1)
        mask[list(range(base_tokens.shape[1])) if positions is None else list(positions)] = 1.0

        def delta(receiver):
            total = 0
            for r, s in edges:
                if r == receiver:
                    total = total + (source[s] - current[s]) * mask
            return total

        by_layer = {}
        for r, _ in edges:
            if r != "logits" and not r.startswith("MLP"):
                layer = int(r[1 : r.index("H") if "H" in r else r.index("K")])
                by_layer.setdefault(layer, set()).add(r)
        state = {}
        for layer, recvs in by_layer.items():
            ln1 = get(self.block(layer), self.ln1)
            handles.append(
                ln1.register_forward_pre_hook(lambda m, a, layer=layer: state.__setitem__(layer, a[0]))
            )
            for which in "qkv":
                mine = [r for r in recvs if r.endswith("." + which)]
                if not mine:
                    continue
                proj = self.proj_module(layer, which)

                def edit(m, a, out, mine=mine, which=which, layer=layer, proj=proj, ln1=ln1):
                    out = out.clone()
                    for r in mine:
                        head = int(r.split(".")[0].split("H" if "H" in r else "KV")[-1])
                        new = proj.forward(ln1.forward(state[layer] + delta(r)))
                        self.proj_slice(out, which, head)[...] = self.proj_slice(new, which, head)
                    return out

                handles.append(proj.register_forward_hook(edit))
        for layer in range(self.L):
            label = f"MLP{layer}"
            if any(r == label for r, _ in edges):
                ln2 = get(self.block(layer), self.ln2)
                handles.append(
                    ln2.register_forward_pre_hook(lambda m, a, label=label: state.__setitem__(label, a[0]))
                )
                handles.append(
                    ln2.register_forward_hook(
                        lambda m, a, o, ln2=ln2, label=label: ln2.forward(state[label] + delta(label))
                    )
                )
        if any(r == "logits" for r, _ in edges):
            handles.append(
                get(self.hf, self.lnf).register_forward_pre_hook(lambda m, a: (a[0] + delta("logits"),))
            )
        try:
            with torch.no_grad():
                return self.hf(base_tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()


def logit_diff(logits, answers):
    last = logits[:, -1]
    return last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:2])[:, 0]


def receiver_grads(ref: Reference, tokens, answers, embed=None):
    """dM/d(input) of every receiver (label -> [batch, pos, d_model]) for M = logit difference summed over the
    batch: each receiver gets its own copy of its input, and autograd differentiates the copies. `embed`
    [batch, pos, d_model] replaces the residual entering layer 0."""
    copies, handles, state = {}, [], {}
    if embed is not None:
        embed = embed.clone().requires_grad_(True)
        handles.append(ref.block(0).register_forward_pre_hook(lambda m, a: (embed, *a[1:])))
    for layer in range(ref.L):
        ln1 = get(ref.block(layer), ref.ln1)
        handles.append(
            ln1.register_forward_pre_hook(lambda m, a, layer=layer: state.__setitem__(layer, a[0]))
        )
        for which in "qkv":
            n = ref.H if which == "q" else ref.KV
            label_of = (
                (lambda h, which=which, layer=layer: f"L{layer}H{h}.{which}")
                if (which == "q" or ref.KV == ref.H)
                else (lambda h, which=which, layer=layer: f"L{layer}KV{h}.{which}")
            )
            proj = ref.proj_module(layer, which)

            def edit(m, a, out, n=n, which=which, layer=layer, proj=proj, ln1=ln1, label_of=label_of):
                out = out.clone()
                for h in range(n):
                    x = state[layer].clone()
                    copies[label_of(h)] = x
                    new = proj.forward(ln1.forward(x))
                    ref.proj_slice(out, which, h)[...] = ref.proj_slice(new, which, h)
                return out

            handles.append(proj.register_forward_hook(edit))
        ln2 = get(ref.block(layer), ref.ln2)

        def mlp_in(m, a, o, layer=layer, ln2=ln2):
            x = a[0].clone()
            copies[f"MLP{layer}"] = x
            return ln2.forward(x)

        handles.append(ln2.register_forward_hook(mlp_in))

    def final(m, a):
        x = a[0].clone()
        copies["logits"] = x
        return (x,)

    handles.append(get(ref.hf, ref.lnf).register_forward_pre_hook(final))
    try:
        logits = ref.hf(tokens, use_cache=False).logits
        metric = logit_diff(logits, answers).sum()
        labels = list(copies)
        grads = torch.autograd.grad(metric, [copies[k] for k in labels])
    finally:
        for h in handles:
            h.remove()
    return dict(zip(labels, grads))
