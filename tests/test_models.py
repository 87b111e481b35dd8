"""The model layer: every site of every family has the right shape, reads what plain PyTorch hooks see, and a
write through a site changes the output exactly as the equivalent plain PyTorch hook does."""

from __future__ import annotations

import importlib

import nnsight
import pytest
import torch
import transformers

from workbench.errors import InputError, ModelLoadError, SiteError, UnsupportedModelError
from workbench.models import SITES, load_model
from workbench.models.toy import FAMILIES, random_model, toy_tokenizer

PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return random_model(request.param, seed=1)


def _sites_for(model):
    names = [n for n in SITES if SITES[n].per_layer]
    if model.cfg.parallel_residual:
        names.remove("resid_mid")
    return sorted(names, key=lambda n: SITES[n].rank)


def _expected_shape(model, name, batch, pos):
    c = model.cfg
    return {
        "embed": (batch, pos, c.d_model),
        "pos_embed": (batch, pos, c.d_model),
        "resid_pre": (batch, pos, c.d_model),
        "ln1": (batch, pos, c.d_model),
        "q_input": (batch, pos, c.n_heads, c.d_model),
        "k_input": (batch, pos, c.n_kv_heads, c.d_model),
        "v_input": (batch, pos, c.n_kv_heads, c.d_model),
        "mlp_in": (batch, pos, c.d_model),
        "q": (batch, pos, c.n_heads, c.d_head),
        "k": (batch, pos, c.n_kv_heads, c.d_head),
        "v": (batch, pos, c.n_kv_heads, c.d_head),
        "z": (batch, pos, c.n_heads, c.d_head),
        "result": (batch, pos, c.n_heads, c.d_model),
        "pattern": (batch, c.n_heads, pos, pos),
        "attn_out": (batch, pos, c.d_model),
        "resid_mid": (batch, pos, c.d_model),
        "ln2": (batch, pos, c.d_model),
        "mlp_post": (batch, pos, c.d_mlp),
        "mlp_out": (batch, pos, c.d_model),
        "resid_post": (batch, pos, c.d_model),
        "ln_final": (batch, pos, c.d_model),
        "logits": (batch, pos, c.d_vocab),
    }[name]


def test_every_site_has_its_shape(model):
    tokens = model.to_tokens([PROMPT, PROMPT.replace("Mary", "Anna")])
    batch, pos = tokens.shape
    with torch.no_grad(), model.trace(tokens):
        shapes = {"embed": model.site("embed").value.shape}
        for layer in range(model.cfg.n_layers):
            for name in _sites_for(model):
                shapes[(name, layer)] = model.site(name, layer).value.shape
        shapes["ln_final"] = model.site("ln_final").value.shape
        shapes["logits"] = model.site("logits").value.shape
        shapes.save()
    for key, shape in shapes.items():
        name = key if isinstance(key, str) else key[0]
        assert tuple(shape) == _expected_shape(model, name, batch, pos), key


# ---- independent references: plain torch hooks on the HF modules --------------------------------------------


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _qkv_slice(model, out, which):
    """Independent of workbench.models.sites: the q/k/v part of a projection output, as HF splits it."""
    c, a = model.cfg, model.adapter
    idx = "qkv".index(which)
    if a.qkv == "gpt2_fused":
        return out[..., idx * c.d_model : (idx + 1) * c.d_model]
    if a.qkv == "neox_fused":
        return out.view(*out.shape[:-1], c.n_heads, 3 * c.d_head)[..., idx * c.d_head : (idx + 1) * c.d_head]
    return out


def _hooked_logits(model, tokens, name, layer, edit):
    """Logits with `edit(old) -> new` applied to site (name, layer) by plain PyTorch hooks."""
    hf, a = model.module, model.adapter
    block = _get(hf, a.blocks)[layer] if layer is not None else None
    handles = []

    def on_output(module, path_fn):
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (path_fn(out[0]), *out[1:])
            return path_fn(out)

        handles.append(module.register_forward_hook(hook))

    def on_input(module, fn):
        def hook(mod, args):
            return (fn(args[0]), *args[1:])

        handles.append(module.register_forward_pre_hook(hook))

    if name == "embed":
        on_output(_get(hf, a.embed), edit)
    elif name == "logits":  # the model's final output, after any soft-cap
        with torch.no_grad():
            return edit(hf(tokens, use_cache=False).logits)
    elif name == "ln_final":
        on_output(_get(hf, a.ln_final), edit)
    elif name == "resid_pre":
        on_input(block, edit)
    elif name == "resid_post":
        on_output(block, edit)
    elif name in ("ln1", "ln2"):
        on_output(_get(block, a.ln1 if name == "ln1" else a.ln2), edit)
    elif name == "attn_out":
        on_output(_get(block, a.attn_out_norm or a.attn), edit)
    elif name == "mlp_out":
        on_output(_get(block, a.mlp_out_norm or a.mlp), edit)
    elif name == "mlp_post":
        on_input(_get(block, a.mlp_out_proj), edit)
    elif name == "z":
        c = model.cfg
        on_input(
            _get(block, a.out_proj),
            lambda flat: edit(flat.view(*flat.shape[:-1], c.n_heads, c.d_head)).reshape(flat.shape),
        )
    elif name in ("q", "k", "v"):
        c = model.cfg
        n = c.n_heads if name == "q" else c.n_kv_heads
        path = a.qkv_paths[0] if a.qkv != "separate" else a.qkv_paths["qkv".index(name)]

        def edit_proj(out, name=name, n=n):
            out = out.clone()
            part = _qkv_slice(model, out, name)
            part[...] = edit(part.reshape(*out.shape[:2], n, c.d_head)).reshape(part.shape)
            return out

        on_output(_get(block, path), edit_proj)
    elif name in ("q_input", "k_input", "v_input"):
        # each head's own residual input: normalised and projected by that head's slice of the projection
        # (`.forward` calls bypass the hooks registered here)
        c = model.cfg
        which = name[0]
        n = c.n_heads if which == "q" else c.n_kv_heads
        ln1 = _get(block, a.ln1)
        proj = _get(block, a.qkv_paths[0] if a.qkv != "separate" else a.qkv_paths["qkv".index(which)])
        state = {}
        handles.append(ln1.register_forward_pre_hook(lambda mod, args: state.__setitem__("x", args[0])))

        def edit_head_inputs(out, which=which, n=n):
            x = state["x"]
            new = edit(x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]))
            heads = []
            for h in range(n):
                projected = _qkv_slice(model, proj.forward(ln1.forward(new[:, :, h])), which)
                heads.append(projected.reshape(*x.shape[:-1], n, c.d_head)[:, :, h])
            out = out.clone()
            part = _qkv_slice(model, out, which)
            part[...] = torch.stack(heads, 2).reshape(part.shape)
            return out

        on_output(proj, edit_head_inputs)
    elif name == "mlp_in":
        # the MLP's input only: its norm's output is recomputed from the edited input
        ln2 = _get(block, a.ln2)
        state = {}
        handles.append(ln2.register_forward_pre_hook(lambda mod, args: state.__setitem__("x", args[0])))
        on_output(ln2, lambda out: ln2.forward(edit(state["x"])))
    elif name == "resid_mid":
        # replace the MLP norm's input, and shift the block output by the same change
        state = {}

        def pre(mod, args):
            state["old"] = args[0].clone()
            state["new"] = edit(args[0])
            return (state["new"], *args[1:])

        handles.append(_get(block, a.ln2).register_forward_pre_hook(pre))
        on_output(block, lambda out: out - state["old"] + state["new"])
    else:
        raise AssertionError(name)
    try:
        with torch.no_grad():
            return hf(tokens, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


WRITABLE = [n for n in SITES if SITES[n].writable and n not in ("pattern", "pos_embed")]


@pytest.mark.parametrize("name", WRITABLE)
def test_write_matches_plain_hook(model, name):
    if name == "resid_mid" and model.cfg.parallel_residual:
        pytest.skip("parallel-residual models have no resid_mid")
    tokens = model.to_tokens(PROMPT)
    layer = model.cfg.n_layers - 1 if SITES[name].per_layer else None
    torch.manual_seed(0)
    with torch.no_grad(), model.trace(tokens):
        old = model.site(name, layer).value.save()
    noise = torch.randn(old.shape)

    def edit(old):
        return 0.5 * old + noise.to(old.dtype)

    reference = _hooked_logits(model, tokens, name, layer, edit)
    with torch.no_grad(), model.trace(tokens):
        handle = model.site(name, layer)
        handle.value = edit(handle.value)
        logits = model.site("logits").value.save()
    with torch.no_grad():
        clean = model.module(tokens, use_cache=False).logits
    assert not torch.allclose(reference, clean, atol=1e-4), "the edit must change the output"
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)


def test_in_place_write_at_one_position(model):
    """Editing part of a site in place is a write too (engines patch single positions this way)."""
    tokens = model.to_tokens(PROMPT)
    for name in ["resid_pre", "resid_mid", "z"] if model.cfg.has_resid_mid else ["resid_pre", "z"]:

        def edit(old):
            new = old.clone()
            new[:, 3] = 0.0
            return new

        reference = _hooked_logits(model, tokens, name, 1, edit)
        with torch.no_grad(), model.trace(tokens):
            model.site(name, 1).value[:, 3] = 0.0
            logits = model.site("logits").value.save()
        torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)


def test_reads_match_hidden_states_and_attentions(model):
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        out = model.module(tokens, use_cache=False, output_hidden_states=True, output_attentions=True)
    with torch.no_grad(), model.trace(tokens):
        pre, patterns = nnsight.save([]), nnsight.save([])
        for layer in range(model.cfg.n_layers):  # sites are read in forward order
            pre.append(model.site("resid_pre", layer).value.save())
            patterns.append(model.site("pattern", layer).value.save())
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(pre[layer], out.hidden_states[layer])
        torch.testing.assert_close(patterns[layer], out.attentions[layer])


def test_pattern_write_matches_patched_attention_function(model):
    """Writing a pattern equals running the model's own eager attention with that pattern after the softmax."""
    tokens = model.to_tokens(PROMPT)
    layer = model.cfg.n_layers - 1
    with torch.no_grad(), model.trace(tokens):
        old = model.site("pattern", layer).value.save()
    uniform = torch.tril(torch.ones_like(old))
    new = 0.5 * old + 0.5 * uniform / uniform.sum(-1, keepdim=True)

    hf_module = importlib.import_module(type(model.module).__module__)
    original = hf_module.eager_attention_forward
    attn = _get(_get(model.module, model.adapter.blocks)[layer], model.adapter.attn)

    def patched(module, query, key, value, *args, **kwargs):
        out, weights = original(module, query, key, value, *args, **kwargs)
        if module is not attn:
            return out, weights
        groups = new.shape[1] // value.shape[1]
        value = value.repeat_interleave(groups, dim=1)
        return torch.matmul(new.to(value.dtype), value).transpose(1, 2).contiguous(), new

    hf_module.eager_attention_forward = patched
    try:
        with torch.no_grad():
            reference = model.module(tokens, use_cache=False).logits
    finally:
        hf_module.eager_attention_forward = original
    with torch.no_grad(), model.trace(tokens):
        model.site("pattern", layer).value = new
        logits = model.site("logits").value.save()
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)


def test_pattern_write_for_one_head_leaves_others(model):
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad(), model.trace(tokens):
        z_before = model.site("z", 0).value.clone().save()
    with torch.no_grad(), model.trace(tokens):
        handle = model.site("pattern", 0)
        pos = tokens.shape[1]
        handle.set_pattern(torch.eye(pos).expand(1, 1, pos, pos), heads=[1])
        z_after = model.site("z", 0).value.clone().save()
    changed = (z_after - z_before).abs().amax(dim=(0, 1, 3))
    assert changed[1] > 0 and torch.all(changed[[0, 2, 3]] == 0)


def test_result_is_z_times_W_O(model):
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad(), model.trace(tokens):
        z = model.site("z", 0).value.save()
        result = model.site("result", 0).value.save()
        attn_out = model.site("attn_out", 0).value.save()
    torch.testing.assert_close(result, torch.einsum("bphd,hdm->bphm", z, model.W_O(0)))
    if model.adapter.attn_out_norm is None:  # the heads plus the output bias are the attention output
        bias = getattr(model.torch_submodule("out_proj", 0), "bias", None)
        total = result.sum(2) + (bias if bias is not None else 0)
        torch.testing.assert_close(total, attn_out, atol=1e-5, rtol=1e-4)


def test_unembedding_reproduces_logits(model):
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad(), model.trace(tokens):
        final = model.site("ln_final").value.save()
        logits = model.site("logits").value.save()
    if model.cfg.family.startswith("gemma2"):
        pytest.skip("Gemma 2 soft-caps its logits after the unembedding")
    torch.testing.assert_close(final @ model.W_U + model.b_U, logits, atol=1e-5, rtol=1e-4)


# ---- tokens ------------------------------------------------------------------------------------------------


def test_tokens_and_labels():
    model = random_model("gpt2")
    tokens = model.to_tokens(PROMPT)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_str_tokens(PROMPT)[:3] == ["<|endoftext|>", "When", "Mary"]
    assert model.to_tokens(PROMPT, prepend_bos=False).shape[1] == tokens.shape[1] - 1
    assert model.to_single_token("Mary") == model.tokenizer.convert_tokens_to_ids("Mary")
    assert model.to_str_tokens(tokens)[0][1] == "When"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.to_tokens(""), "empty"),
        (lambda m: m.to_tokens("   "), "empty"),
        (lambda m: m.to_tokens([]), "No prompts"),
        (lambda m: m.to_tokens(" ".join(["the"] * 100)), "at most 64"),
        (lambda m: m.to_tokens(["John went", "John went to the store"]), "same number of tokens"),
        (lambda m: m.to_single_token("Mary John"), "2 tokens"),
        (lambda m: m.to_single_token(""), "non-empty"),
        (lambda m: m.to_tokens(torch.tensor([[1, 2, 999]])), "Token ids must lie"),
    ],
)
def test_token_errors(call, message):
    with pytest.raises(InputError, match=message):
        call(random_model("gpt2"))


# ---- site errors -------------------------------------------------------------------------------------------


def test_site_errors():
    gpt2, neox, llama = random_model("gpt2"), random_model("gpt_neox"), random_model("llama")
    with pytest.raises(SiteError, match="Unknown site 'resid'"):
        gpt2.site("resid", 0)
    with pytest.raises(SiteError, match="out of range.*0..1"):
        gpt2.site("resid_pre", 2)
    with pytest.raises(SiteError, match="give a layer"):
        gpt2.site("resid_pre")
    with pytest.raises(SiteError, match="not per layer"):
        gpt2.site("logits", 0)
    with pytest.raises(SiteError, match="parallel"):
        neox.site("resid_mid", 0)
    with pytest.raises(SiteError, match="no learned position"):
        llama.site("pos_embed")
    with pytest.raises(SiteError, match="Head 4 is out of range"):
        gpt2.check_site("z", 0, head=4)
    with pytest.raises(SiteError, match="Head 2 is out of range"):
        llama.check_site("k", 0, head=2)  # 2 key/value heads
    with pytest.raises(SiteError, match="no head axis"):
        gpt2.check_site("resid_pre", 0, head=0)
    assert gpt2.site("resid_pre", -1).layer == 1


def test_result_site_is_read_only():
    model = random_model("gpt2")
    with pytest.raises(SiteError, match="write `z` instead"), model.trace(model.to_tokens(PROMPT)):
        model.site("result", 0).value = torch.zeros(1)


def test_pattern_needs_eager_attention():
    from transformers import AutoModelForCausalLM

    from workbench.models.toy import random_config

    hf = AutoModelForCausalLM.from_config(random_config("gpt2"), attn_implementation="sdpa")
    model = load_model(hf, toy_tokenizer(), attn_implementation=None)
    with pytest.raises(SiteError, match="eager"), model.trace(model.to_tokens(PROMPT)):
        model.site("pattern", 0).value.save()


# ---- loading -----------------------------------------------------------------------------------------------


def test_hub_unreachable_says_how_to_fix():
    with pytest.raises(ModelLoadError, match="hub is unreachable.*hf download gpt2"):
        load_model("gpt2")


def test_hub_reachable_answers_at_once_offline(monkeypatch):
    from workbench.models import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_sharded_weights_are_checked_and_load(tmp_path):
    model = random_model("gpt2", seed=3)
    model.module.save_pretrained(tmp_path, max_shard_size="20KB")
    model.tokenizer.save_pretrained(tmp_path)
    assert (
        len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    )
    loaded = load_model(str(tmp_path), device="cpu", dispatch=True)
    tokens = loaded.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(tokens).logits, model.module(tokens).logits)
    (tmp_path / sorted(tmp_path.glob("*.safetensors"))[-1].name).unlink()
    with pytest.raises(ModelLoadError, match="weight file .* is missing"):
        load_model(str(tmp_path))


def test_missing_directory():
    with pytest.raises(ModelLoadError, match="No model directory"):
        load_model("./no/such/model")


def test_unknown_architecture():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
    )
    with pytest.raises(UnsupportedModelError, match="model_type='opt'.*Supported"):
        load_model(OPTForCausalLM(cfg))


def test_bad_input_type():
    with pytest.raises(ModelLoadError, match="Cannot load a model from int"):
        load_model(3)


def test_local_directory_is_lazy_and_matches(tmp_path):
    model = random_model("llama", seed=3)
    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.nnsight.dispatched is False  # weights load on the first trace
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad(), loaded.trace(tokens):
        logits = loaded.site("logits").value.save()
    with torch.no_grad():
        expected = model.module(tokens, use_cache=False).logits
    torch.testing.assert_close(logits, expected)
    assert loaded.cfg == model.cfg


def test_plain_module_has_no_sites_but_traces():
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    )
    model = load_model(cnn)
    assert model.cfg is None and "Sequential" in repr(model)
    with pytest.raises(UnsupportedModelError, match="plain module"):
        model.site("resid_pre", 0)
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad(), model.trace(x):
        hidden = model.nnsight[1].output.save()
    assert hidden.shape == (3, 2, 2, 2)


def test_dtype_and_device_choice():
    model = random_model("gpt2", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    with pytest.raises(ModelLoadError, match="not a torch dtype"):
        random_model("gpt2", dtype="float33")


def test_top_tokens_are_the_softmax_of_the_last_logits():
    model = random_model("gpt2", seed=2)
    top = model.top_tokens(PROMPT, k=3)
    with torch.no_grad():
        probs = model.module(model.to_tokens(PROMPT), use_cache=False).logits[0, -1].softmax(-1)
    best = probs.topk(3)
    assert [t for t, _ in top] == [model.tokenizer.decode([int(i)]) for i in best.indices]
    assert [p for _, p in top] == pytest.approx(best.values.tolist(), abs=1e-6)


def test_traces_from_several_threads_take_turns():
    """Panels trace in background threads while the notebook traces too; both must get right answers."""
    import threading

    model = random_model("gpt2", seed=4)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        expected = model.module(tokens, use_cache=False).logits[0, -1]
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                with torch.no_grad(), model.trace(tokens):
                    logits = model.site("logits").value[0, -1].save()
                results.append(logits)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20 and all(torch.allclose(r, expected) for r in results)


def test_demo_model_loads_without_the_weights_bar(capfd, tmp_path):
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    load_model("demo")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == bars_on  # the switch is restored
    model = random_model("gpt2", seed=3)
    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    load_model(str(tmp_path), device="cpu", dispatch=True)
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 4 has no such bar
        assert ("Loading weights" in capfd.readouterr().err) == bars_on  # other loads show it as before
