"""SAEs on tiny local models: the maps, SAELens files, training, evaluation two ways, dashboards, attribution,
the synthetic-activation tests' building blocks and invariants, stable regions. No network, no demo model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from workbench.core import CancelToken
from workbench.errors import Cancelled, InputError, ModelLoadError
from workbench.models.toy import random_model
from workbench.results import load_result
from workbench.sae import (
    SAE,
    evaluate_sae,
    latent_attribution,
    latent_directions,
    load_sae,
    reinitialised,
    save_sae,
    stable_regions,
    synthetic_activation_test,
    top_contexts,
    train_sae,
)
from workbench.sae import synthetic as syn
from workbench.sae.evaluate import _next_token_loss
from workbench.sae.model import SAEConfig, hook_name, site_of_hook
from workbench.sae.train import TrainSettings

PROMPTS = [
    "When Mary and John went to the store , John gave a drink to",
    "The capital of France is Paris",
    "Then Tom and Anna had fun at the park",
    "The big red dog sat on the mat",
    "Paul gave a book to Kate at school",
    "one two three four five six seven",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and fair to other work on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", "tiny", seed=3)


@pytest.fixture(scope="module")
def rows(model):
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(1, model.cfg.d_vocab, (48, 12), generator=gen)
    toks[:, 0] = 0  # BOS first, as packed rows
    return toks


SMALL = dict(steps=40, batch_size=128, buffer_tokens=2048, expansion=4, l1_coefficient=0.3, resample_every=20)


@pytest.fixture(scope="module")
def sae(model, rows):
    trained = train_sae(model, rows, progress=False, **SMALL)
    freq = (trained.encode(_acts(model, rows)) > 0).float().mean(0)
    return trained.with_frequency(freq)


def _acts(model, rows, site="resid_pre", layer=1, skip=1):
    from workbench.sae import activations as acts

    return acts.stream(model, rows, site, layer, skip_positions=skip)


def _random_sae(d_in=8, d_sae=32, arch="relu", k=None, seed=0, **cfg):
    gen = torch.Generator().manual_seed(seed)
    config = SAEConfig(arch, d_in, d_sae, "resid_pre", 1, k=k, **cfg)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    thr = torch.rand(d_sae, generator=gen) if arch == "jumprelu" else None
    return SAE(config, torch.randn(d_in, d_sae, generator=gen), torch.randn(d_sae, generator=gen) * 0.1, W_dec,
               torch.randn(d_in, generator=gen) * 0.1, thr, torch.rand(d_sae, generator=gen))  # fmt: skip


# -- the maps --------------------------------------------------------------------------------------------------


def test_encode_decode_by_architecture():
    x = torch.randn(5, 8)
    relu = _random_sae()
    pre = (x - relu.b_dec) @ relu.W_enc + relu.b_enc
    assert torch.allclose(relu.encode(x), pre.clamp(min=0))
    assert torch.allclose(relu.decode(relu.encode(x)), relu.encode(x) @ relu.W_dec + relu.b_dec)
    topk = _random_sae(arch="topk", k=3)
    f = topk.encode(x)
    assert ((f > 0).sum(-1) <= 3).all()
    pre = topk.pre_activations(x)
    kept = pre.topk(3, dim=-1)
    assert torch.allclose(f.gather(-1, kept.indices), kept.values.clamp(min=0))
    jump = _random_sae(arch="jumprelu")
    pre = jump.pre_activations(x)
    assert torch.equal(jump.encode(x), pre * (pre > jump.threshold))
    no_b = _random_sae(apply_b_dec_to_input=False)
    assert torch.allclose(no_b.pre_activations(x), x @ no_b.W_enc + no_b.b_enc)


def test_centred_input_and_reconstruct():
    sae = _random_sae(centre_input=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) + 3.0
    centred = x - x.mean(-1, keepdim=True)
    # (float32: centring inside the SAE and here round differently, by about 1e-7 per unit of activation)
    assert torch.allclose(sae.encode(x), sae.encode(centred), atol=1e-5)
    # the mean component comes back, so x - reconstruct(x) is the SAE's own error in its space
    assert torch.allclose(x - sae.reconstruct(x), centred - sae.decode(sae.encode(x)), atol=1e-5)


def test_latent_directions():
    sae = _random_sae()
    d = sae.latent(3)
    assert d.index == 3 and torch.allclose(d.vector.norm(), torch.tensor(1.0))
    assert torch.allclose(d.vector, sae.W_dec[3] / sae.W_dec[3].norm())
    assert sae.directions([1, 2])["sae latents"].shape == (2, 8)
    x = torch.randn(6, 8)
    act = latent_directions(sae, x, k=2)
    top = sae.pre_activations(x).topk(2).indices
    assert torch.allclose(act, sae.W_dec[top] / sae.W_dec[top].norm(dim=-1, keepdim=True))
    off = latent_directions(sae, x, k=2, kind="inactive")
    chosen = (off[:, :, None, :] - sae.W_dec[None, None]).norm(dim=-1).argmin(-1)
    assert not (sae.encode(x).gather(-1, chosen) > 0).any()
    with pytest.raises(InputError):
        sae.latent(32)
    with pytest.raises(InputError):
        sae.encode(torch.randn(3, 9))


def test_hook_names():
    assert hook_name("resid_pre", 1) == "blocks.1.hook_resid_pre"
    assert hook_name("ln_final", None) == "ln_final.hook_normalized"
    for site, layer in [("resid_pre", 0), ("mlp_post", 11), ("z", 3), ("embed", None), ("resid_post", 10)]:
        assert site_of_hook(hook_name(site, layer)) == (site, layer)
    with pytest.raises(InputError):
        site_of_hook("blocks.1.attn.hook_pattern")


# -- files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_saelens_round_trip(tmp_path, arch):
    sae = _random_sae(arch=arch, k=4 if arch == "topk" else None, centre_input=arch == "relu")
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # what SAELens 6 reads: architecture, shapes, hook in the metadata, a version that is not pre-6
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (cfg["d_in"], cfg["d_sae"]) == (8, 32) and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert (tmp_path / "sae_weights.safetensors").is_file() and (tmp_path / "sparsity.safetensors").is_file()
    back = load_sae(tmp_path)
    assert back.same_as(sae)
    assert torch.equal(back.firing_frequency, sae.firing_frequency)
    x = torch.randn(3, 8)
    assert torch.equal(back.encode(x), sae.encode(x))


def _old_layout(tmp_path, cfg: dict, state: dict, log_sparsity=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sae_weights.safetensors"))
    if log_sparsity is not None:
        save_file({"sparsity": log_sparsity}, str(tmp_path / "sparsity.safetensors"))


def test_reads_pre_6_saelens_configs(tmp_path):
    ref = _random_sae(d_in=8, d_sae=16)
    old = {  # the shape of the JB GPT-2 SAEs' cfg.json (SAELens 0.x)
        "model_name": "gpt2-small", "hook_point": "blocks.1.hook_resid_pre", "hook_point_layer": 1,
        "hook_point_head_index": None, "d_in": 8, "expansion_factor": 2, "dtype": "torch.float32",
        "context_size": 128, "dataset_path": "Skylion007/openwebtext", "l1_coefficient": 8e-5,
    }  # fmt: skip
    log = torch.tensor([-12.0, -10.0, -2.0, -1.0] * 4)
    _old_layout(tmp_path / "old", old, ref.state(), log)
    sae = load_sae(tmp_path / "old")
    assert (sae.cfg.architecture, sae.cfg.site, sae.cfg.layer, sae.d_sae) == ("relu", "resid_pre", 1, 16)
    assert sae.cfg.model_name == "gpt2-small" and not sae.cfg.centre_input
    assert torch.equal(sae.firing_frequency[:4], torch.tensor([0.0, 0.0, 0.01, 0.1]))
    assert torch.equal(sae.W_enc, ref.W_enc)
    assert load_sae(tmp_path / "old", centre_input=True).cfg.centre_input
    # topk with its k in activation_fn_kwargs, and decoder-norm rescaling folded into unit rows
    scaled = {k: v.clone() for k, v in ref.state().items()}
    norms = torch.linspace(0.5, 2.0, 16)
    scaled["W_dec"] = scaled["W_dec"] * norms[:, None]
    cfg = {**old, "activation_fn": "topk", "activation_fn_kwargs": {"k": 3}, "d_sae": 16,
           "rescale_acts_by_decoder_norm": True}  # fmt: skip
    _old_layout(tmp_path / "topk", cfg, scaled)
    topk = load_sae(tmp_path / "topk")
    assert topk.cfg.architecture == "topk" and topk.cfg.k == 3
    assert torch.allclose(topk.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)
    x = torch.randn(5, 8)
    # SAELens with rescaling: pre * |W_dec|, top 3, then decode with acts / |W_dec| @ W_dec
    pre = ((x - scaled["b_dec"]) @ scaled["W_enc"] + scaled["b_enc"]) * norms
    top = pre.topk(3, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
    expected = (f / norms) @ scaled["W_dec"] + scaled["b_dec"]
    assert torch.allclose(topk.reconstruct(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architecture": "gated"}, "not supported"),
        ({"normalize_activations": "expected_average_only_in"}, "normalises"),
        ({"hook_point_head_index": 2}, "head"),
        ({"hook_point": "blocks.0.attn.hook_pattern"}, "no workbench site"),
    ],
)
def test_unsupported_saelens_files_are_refused(tmp_path, change, match):
    ref = _random_sae(d_in=8, d_sae=16)
    cfg = {"hook_point": "blocks.1.hook_resid_pre", "d_in": 8, "d_sae": 16, **change}
    _old_layout(tmp_path, cfg, ref.state())
    with pytest.raises(InputError, match=match):
        load_sae(tmp_path)


def test_hub_loading_path_offline(tmp_path, monkeypatch):
    """The hub path is exercised up to the download; offline it says what is wrong (never tested online)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_sae("gpt2-small-res-jb", "blocks.1.hook_resid_pre")
    with pytest.raises(InputError, match="sae_id"):
        load_sae("gpt2-small-res-jb", "blocks.99.hook_resid_pre")
    with pytest.raises(InputError):
        load_sae("not a path or a repo")
    with pytest.raises(ModelLoadError):
        load_sae(tmp_path)  # a directory without the files


def test_hub_loading_reads_the_release_layout(tmp_path, monkeypatch):
    """With the download replaced by local files laid out as on the hub, a release loads with its overrides."""
    from workbench.sae import io

    ref = _random_sae(d_in=8, d_sae=16)
    folder = tmp_path / "repo" / "blocks.1.hook_resid_pre"
    _old_layout(folder, {"hook_point": "blocks.1.hook_resid_pre", "d_in": 8, "d_sae": 16}, ref.state())
    asked = []

    def fake(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        path = tmp_path / "repo" / filename
        if not path.exists():
            err = type("EntryNotFoundError", (Exception,), {})
            raise err(filename)
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    sae = io.load_sae("gpt2-small-res-jb", "blocks.1.hook_resid_pre", revision="abc")
    assert asked[0] == ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre/cfg.json", "abc")
    assert sae.cfg.centre_input and sae.cfg.model_name == "openai-community/gpt2"
    assert sae.cfg.metadata["neuronpedia"] == "gpt2-small/1-res-jb" and sae.firing_frequency is None
    assert torch.equal(sae.W_dec, ref.W_dec)


# -- training ----------------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_keeps_unit_rows(model, rows, sae):
    again = train_sae(model, rows, progress=False, **SMALL)
    assert all(torch.equal(again.state()[k], sae.state()[k]) for k in again.state())
    other = train_sae(model, rows, progress=False, **{**SMALL, "seed": 1})
    assert not torch.equal(other.W_dec, sae.W_dec)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.d_sae), atol=1e-5)
    info = sae.cfg.metadata["training"]
    assert info["settings"]["steps"] == 40 and info["tokens_seen"] >= 40 * 128
    fvu = info["history"]["fvu"]
    assert fvu[-1] < fvu[0]  # it learned something


def test_training_resamples_dead_latents_and_streams(model, rows):
    # a huge L1 kills latents; a buffer smaller than the data forces refills from the token rows
    settings = {
        **SMALL,
        "steps": 60,
        "lr": 0.02,
        "l1_coefficient": 5.0,
        "buffer_tokens": 256,
        "resample_until": 1.0,
    }
    sae = train_sae(model, rows, progress=False, **settings)
    info = sae.cfg.metadata["training"]
    assert info["resampled_latents"] > 0
    assert info["passes_over_data"] >= 2 and info["tokens_seen"] >= 60 * 128


def test_topk_training(model, rows):
    sae = train_sae(model, rows, progress=False, **{**SMALL, "architecture": "topk", "k": 4})
    assert sae.cfg.architecture == "topk"
    assert ((sae.encode(_acts(model, rows)) > 0).sum(-1) <= 4).all()


def test_batchtopk_training_saves_a_jumprelu_sae(model, rows, tmp_path):
    sae = train_sae(model, rows, progress=False, **{**SMALL, "architecture": "batchtopk", "k": 6})
    theta = sae.cfg.metadata["training"]["batchtopk_threshold"]
    assert sae.cfg.architecture == "jumprelu" and theta > 0
    assert torch.allclose(sae.threshold, torch.full((sae.d_sae,), theta))
    l0 = (sae.encode(_acts(model, rows)) > 0).sum(-1).float()
    assert l0.std() > 0 and 1 <= l0.mean() <= 30  # variable per token, around k
    save_sae(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert load_sae(tmp_path).same_as(sae)


def test_training_progress_cancel_and_errors(model, rows):
    seen = []
    train_sae(model, rows, progress=lambda d, t: seen.append((d, t)), **{**SMALL, "steps": 5})
    assert seen[-1] == (5, 5)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        train_sae(model, rows, cancel=token, **SMALL)
    with pytest.raises(InputError):
        train_sae(model, rows, architecture="gated")
    with pytest.raises(InputError):
        train_sae(model, rows, steps=0)
    with pytest.raises(InputError):
        train_sae(model, rows, settings=TrainSettings(architecture="topk"))  # no k
    with pytest.raises(InputError):
        train_sae(model, rows, site="pattern")


# -- evaluation: the splice-in loss two ways ------------------------------------------------------------------


def _plain_losses(model, sae, rows):
    """Clean, spliced and zero-ablated loss with a plain PyTorch pre-hook on the block (no nnsight)."""
    hf = model.module
    block = hf.transformer.h[sae.cfg.layer]
    skip = sae.cfg.skip_positions
    out = {}
    for mode in ("clean", "sae", "zero"):

        def hook(mod, args, kwargs, mode=mode):
            x = args[0] if args else kwargs["hidden_states"]
            new = x.clone()
            if mode == "sae":
                new[:, skip:] = sae.reconstruct(x[:, skip:])
            elif mode == "zero":
                new[:, skip:] = 0
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = block.register_forward_pre_hook(hook, with_kwargs=True) if mode != "clean" else None
        try:
            with torch.no_grad():
                logits = hf(rows).logits
        finally:
            if handle:
                handle.remove()
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        out[mode] = float(-logp.gather(-1, rows[:, 1:, None])[..., 0].mean())
    return out


def test_splice_loss_two_ways(model, rows, sae):
    ev = evaluate_sae(model, sae, rows[:24], rows_per_chunk=7, progress=False)
    plain = _plain_losses(model, sae, rows[:24])
    assert ev.loss_clean == pytest.approx(plain["clean"], abs=1e-5)
    assert ev.loss_spliced == pytest.approx(plain["sae"], abs=1e-5)
    assert ev.loss_zero == pytest.approx(plain["zero"], abs=1e-5)
    assert ev.frac_recovered == pytest.approx(
        (plain["zero"] - plain["sae"]) / (plain["zero"] - plain["clean"]), abs=1e-4
    )
    x = _acts(model, rows[:24])
    f = sae.encode(x)
    assert ev.l0 == pytest.approx(float((f > 0).sum(-1).float().mean()), abs=1e-6)
    ev_plain = 1 - (sae.reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev.explained_variance == pytest.approx(float(ev_plain), abs=1e-4)
    assert torch.allclose(ev.firing_frequency, (f > 0).float().mean(0), atol=1e-6)
    assert ev.dead == int(((f > 0).sum(0) == 0).sum())
    assert torch.isnan(ev.l0_by_position[0]) and len(ev.l0_per_token) == ev.n_tokens == 24 * 11
    # a perfect SAE recovers everything: an identity-like SAE (d_sae = 2 d_in, +/- rows) reconstructs exactly
    d = model.cfg.d_model
    eye = torch.eye(d)
    perfect = SAE(SAEConfig("relu", d, 2 * d, "resid_pre", 1, apply_b_dec_to_input=False),
                  torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye]), torch.zeros(d))  # fmt: skip
    ev_perfect = evaluate_sae(model, perfect, rows[:8], progress=False)
    assert ev_perfect.frac_recovered == pytest.approx(1.0, abs=1e-4)
    assert ev_perfect.explained_variance == pytest.approx(1.0, abs=1e-5) and ev_perfect.kl_spliced < 1e-6


def test_evaluation_on_rows_of_different_lengths(model, rows, sae):
    var = [rows[i][: 4 + i % 6] for i in range(12)]  # one document per row, as models are trained
    ev = evaluate_sae(model, sae, var, rows_per_chunk=3, progress=False)
    weights = torch.tensor([len(r) - 1.0 for r in var])
    per_row = [_plain_losses(model, sae, r[None]) for r in var]
    for key, mode in (("loss_clean", "clean"), ("loss_spliced", "sae"), ("loss_zero", "zero")):
        expected = float((torch.tensor([p[mode] for p in per_row]) * weights).sum() / weights.sum())
        assert getattr(ev, key) == pytest.approx(expected, abs=1e-5), key
    for pos in (1, 5, 8):
        reach = [r for r in var if len(r) > pos]
        l0 = [float((sae.encode(_acts(model, r[None], skip=0)[pos]) > 0).sum()) for r in reach]
        assert float(ev.l0_by_position[pos]) == pytest.approx(sum(l0) / len(l0), abs=1e-5)
    assert ev.n_tokens == sum(len(r) - 1 for r in var) and ev.seq_len == 9


def test_next_token_loss_definition():
    logits = torch.randn(2, 4, 6)
    tokens = torch.randint(0, 6, (2, 4))
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 6), tokens[:, 1:].reshape(-1), reduction="none"
    )
    assert torch.allclose(_next_token_loss(logits, tokens).reshape(-1), ce, atol=1e-6)


def test_evaluation_errors(model, rows):
    wrong = _random_sae(d_in=16)
    with pytest.raises(InputError, match="width"):
        evaluate_sae(model, wrong, rows, progress=False)


# -- dashboard and attribution -------------------------------------------------------------------------------


def test_top_contexts_match_brute_force(model, rows, sae):
    latents = [int(i) for i in sae.firing_frequency.topk(3).indices]
    res = top_contexts(model, sae, rows, latents, k=4, before=2, after=1, rows_per_chunk=5, progress=False)
    from workbench.sae import activations as acts

    f = sae.encode(acts.site_activations(model, rows, "resid_pre", 1))[..., latents]
    f[:, :1] = 0
    for i in range(3):
        vals, where = f[..., i].flatten().topk(4)
        assert torch.allclose(res.values[i], vals, atol=1e-6)
        r, p = where // rows.shape[1], where % rows.shape[1]
        assert torch.equal(res.row[i], r) and torch.equal(res.position[i], p)
        assert int(res.context_ids[i, 0, res.center]) == int(rows[r[0], p[0]])
        assert float(res.context_acts[i, 0, res.center]) == pytest.approx(float(vals[0]), abs=1e-6)
        assert float(res.frequency[i]) == pytest.approx(float((f[:, 1:, i] > 0).float().mean()), abs=1e-6)
        assert int(res.histogram[i].sum()) == int((f[:, 1:, i] > 0).sum())
    assert "[[" in res.context_text(latents[0]) and len(res.to_frame()) == 12


def test_latent_attribution_matches_plain_autograd(model, sae):
    prompts = PROMPTS[:1] * 2
    res = latent_attribution(model, sae, prompts, (" Mary", " John"), progress=False)
    hf, tok = model.module, model.to_tokens(prompts)
    grabbed = {}

    def hook(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        grabbed["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = hf.transformer.h[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        logits = hf(tok).logits[:, -1]
    finally:
        handle.remove()
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    metric = logits[:, mary] - logits[:, john]
    (g,) = torch.autograd.grad(metric.sum(), grabbed["x"])
    x = grabbed["x"].detach()
    f = sae.encode(x)
    expected = f * (g @ sae.W_dec.T)
    assert torch.allclose(res.metric_value, metric.detach(), atol=1e-5)
    got = torch.zeros_like(expected)
    got[res.prompt, res.position, res.latent] = res.attribution
    expected[:, :1] = 0
    assert torch.allclose(got, expected, atol=1e-5)
    # first order: latents + error + b_dec account for x . dM/dx at every position after BOS
    total = got.sum(-1) + res.error_attribution + (g * sae.b_dec).sum(-1)
    assert torch.allclose(total[:, 1:], (x * g).sum(-1)[:, 1:], atol=1e-4)
    assert res.by_latent().abs_attribution.is_monotonic_decreasing


# -- synthetic activations: model-independent checks --------------------------------------------------------------


def test_baseline_code_keeps_values_and_picks_close_live_latents():
    gen = torch.Generator().manual_seed(0)
    d = 200
    freq = torch.rand(d, generator=gen)
    live = torch.rand(d, generator=gen) > 0.1
    code = torch.zeros(d)
    active = torch.tensor([3, 50, 51, 120, 199])
    code[active] = torch.tensor([2.0, 0.5, 0.5, 1.25, 3.0])
    out = syn.baseline_code(code, freq, live, n_neighbours=5, generator=gen)
    assert sorted(out[out > 0].tolist()) == sorted(code[code > 0].tolist())  # the exact multiset
    picked = torch.nonzero(out).flatten()
    assert live[picked].all() and len(picked) == 5
    for i in active.tolist():  # each value went to one of the 5 closest-frequency latents of its source
        j = int(torch.nonzero(out == code[i]).flatten()[0]) if (code == code[i]).sum() == 1 else None
        if j is None:
            continue
        dist = (freq - freq[i]).abs()
        dist[i] = float("inf")
        dist[~live] = float("inf")
        assert dist[j] <= dist.topk(5, largest=False).values.max() + 1e-12 and j != i


def test_structured_code_anchor_and_profile():
    gen = torch.Generator().manual_seed(1)
    d_sae, d_in = 400, 16
    dec = torch.randn(d_sae, d_in, generator=gen)
    dec /= dec.norm(dim=-1, keepdim=True)
    freq = torch.rand(d_sae, generator=gen)
    live = torch.ones(d_sae, dtype=torch.bool)
    code = torch.zeros(d_sae)
    code[[5, 17, 90, 301]] = torch.tensor([1.0, 4.0, 0.5, 2.0])
    out, anchor = syn.structured_code(code, freq, live, dec, anchor_cosine=0.42, n_anchor_candidates=50)
    t = 17
    dist = (freq - freq[t]).abs()
    dist[t] = float("inf")
    cands = dist.topk(50, largest=False).indices
    cos_t = dec @ dec[t]
    assert anchor == int(cands[(cos_t[cands] - 0.42).abs().argmin()])
    assert sorted(out[out > 0].tolist()) == sorted(code[code > 0].tolist())
    assert out[anchor] == code[t]  # the top latent's value goes to the anchor (cosine 1 to itself)
    cos_c = dec @ dec[anchor]
    for i in (5, 90, 301):  # every other latent's cosine to the anchor approximates its cosine to the top
        j = int(torch.nonzero(out == code[i]).flatten()[0])
        assert abs(float(cos_c[j] - cos_t[i])) <= float((cos_c - cos_t[i]).abs().min()) + 0.05


def test_reencoding_recovers_chosen_latents():
    d = 8
    eye = torch.eye(d)
    sae = SAE(SAEConfig("relu", d, 2 * d, "resid_pre", 1, apply_b_dec_to_input=False),
              torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye]), torch.zeros(d))  # fmt: skip
    codes = torch.zeros(3, 2 * d)
    codes[0, [0, 3]] = 1.0
    codes[1, [1, 9]] = 2.0  # latents 1 and 9 (= -e1) cancel: nothing comes back
    overlap = syn.reencoding_overlap(sae, codes)
    assert overlap[0] == 1.0 and overlap[1] == 0.0 and torch.isnan(overlap[2])


def test_mvn_samples_have_the_target_covariance():
    from workbench.plateau import stats_from_activations

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen)
    data = torch.randn(20_000, 32, generator=gen) @ mix + 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = stats_from_activations(data, site="resid_pre", layer=1)
    draws = ref.sample_normal(100_000, torch.Generator().manual_seed(1)).double()
    err = torch.linalg.norm(torch.cov(draws.T) - ref.cov) / torch.linalg.norm(ref.cov)
    assert err < 0.02


def test_curve_statistics():
    curves = torch.tensor([[0.0, 0.1, 0.2, 5.0, 5.1], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 3.1, 3.2, 9.0]])
    assert syn.max_slope_step(curves, flat=0.01).tolist() == [3, 4, 4]  # flat curve: the last step
    reach = torch.tensor([5, 5, 3])
    assert syn.plateau_steps(curves, 1.0, reach).tolist() == [3, 5, 1]
    assert syn.plateau_steps(curves, 1.0, torch.tensor([3, 5, 1])).tolist() == [
        5,
        5,
        5,
    ]  # targets passed first


def test_path_points():
    start, target = torch.randn(4, 8), torch.randn(4, 8)
    k = torch.tensor([0, 99, 50, 99])
    one = syn.path_points("blowup", start, target, k, 100, float("nan"))
    assert torch.allclose(one[0], start[0]) and torch.allclose(one[1], target[1], atol=1e-5)
    two = syn.path_points("plateau", start, target, k, 100, 0.3)
    assert torch.allclose((two - start).norm(dim=-1), 0.3 * k.float(), atol=1e-4)


# -- the tests on a model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model, rows):
    from workbench.plateau import reference_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference_stats(model, rows, layer=1, progress=False)


ALL = tuple(f for f in syn.FAMILIES if f != "real_own")  # real_own is test 2's control


@pytest.fixture(scope="module")
def blowup(model, sae, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return synthetic_activation_test(model, sae, PROMPTS, test="blowup", families=ALL, reference=reference,
                                         n_steps=6, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def plateau(model, sae, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return synthetic_activation_test(model, sae, PROMPTS, test="plateau", families=(*ALL, "real_own"),
                                         reference=reference, n_steps=6, progress=False)  # fmt: skip


def _last_resid_post(hf, tokens, vec):
    """The last block's output at the last position with `vec` written at resid_pre 1 there (plain hooks)."""
    got = {}

    def write(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, -1] = vec
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def read(mod, args, output):
        got["x"] = output[0] if isinstance(output, tuple) else output

    h1 = hf.transformer.h[1].register_forward_pre_hook(write, with_kwargs=True)
    h2 = hf.transformer.h[-1].register_forward_hook(read)
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        h1.remove()
        h2.remove()
    return got["x"][0, -1]


@pytest.mark.parametrize("which", ["blowup", "plateau"])
def test_tests_match_a_plain_loop(request, model, which):
    res = request.getfixturevalue(which)
    n_f = 6 if which == "blowup" else 7
    assert res.families[:6] == ALL and res.l2.shape == (n_f, len(PROMPTS), 6)
    # step 0 reproduces the start's own run (test 1: the clean run); the engine's path adds no noise
    assert res.l2[..., 0].abs().max() <= 1e-5 * res.typical_distance and res.kl[..., 0].abs().max() < 1e-6
    assert res.noise_floor.abs().max() < 1e-6
    if which == "blowup":  # the path starts at the real activation and ends at the family's target
        assert torch.allclose(res.start[0], res.start[3])
        assert torch.allclose(res.target[0], res.start[0][list(res.other_prompt)])
    else:  # test 2 starts at the family's activation: another prompt's, or (real_own) the prompt's own
        assert torch.allclose(res.start[6][list(res.other_prompt)], res.start[0])
    for f in (0, 1, 3):
        for n in (0, 4):
            tokens = model.to_tokens(PROMPTS[n])
            k = torch.tensor([0, 2, 5])
            xs = syn.path_points(
                res.test, res.start[f, n].expand(3, -1), res.target[f, n].expand(3, -1), k, 6, res.step_size
            )
            ref = _last_resid_post(model.module, tokens, res.start[f, n])
            for j, kk in enumerate(k.tolist()):
                d = float((_last_resid_post(model.module, tokens, xs[j]) - ref).norm())
                assert res.l2[f, n, kk] == pytest.approx(d, abs=1e-4, rel=1e-4)


def test_synthetic_families_are_built_from_codes(blowup, sae):
    fi = {f: i for i, f in enumerate(blowup.families)}
    n = len(PROMPTS)
    codes = sae.encode(blowup.start[0])
    assert torch.allclose(
        blowup.target[fi["sae_reconstruction"]], sae.decode(codes[list(blowup.other_prompt)]), atol=1e-5
    )
    # the baseline twin carries the real code's multiset of values (as stored for display, largest first)
    src = blowup.source_values
    twin = blowup.twin_values[fi["synthetic_baseline"]]
    assert torch.allclose(src, twin)
    single = blowup.twin_values[fi["single_latent"]]
    assert ((single > 0).sum(-1) == 1).all()
    assert torch.allclose(single[:, 0], torch.full((n,), blowup.single_latent_activation))
    assert blowup.single_latent_activation == pytest.approx(float(codes.norm(dim=-1).mean()), rel=1e-5)
    assert (
        torch.isnan(blowup.reencoding[fi["real"]]).all()
        and not torch.isnan(blowup.reencoding[fi["single_latent"]]).any()
    )


def test_plateau_statistics_and_threshold(plateau):
    assert plateau.threshold == pytest.approx(syn.DEFAULT_THRESHOLD * plateau.typical_distance)
    real = plateau.families.index("real")
    gap = (plateau.target - plateau.start).norm(dim=-1)
    assert plateau.step_size == pytest.approx(float(gap[real].median()) / 6, rel=1e-5)
    assert torch.equal(plateau.reach, torch.floor(gap / plateau.step_size).long().clamp(max=6))
    stat = plateau.statistic()
    assert torch.equal(stat, syn.plateau_steps(plateau.l2, plateau.threshold, plateau.reach))
    table = plateau.summary()
    assert list(table.family) == list(plateau.families) and table.ks_vs_real.isna().tolist()[0]
    assert set(plateau.paper().columns) >= {"this run: mean", "GPT-2 (paper): mean"}


def test_seeded_and_checked(model, sae, reference, blowup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = synthetic_activation_test(model, sae, PROMPTS, test="blowup", families=ALL, reference=reference,
                                          n_steps=6, progress=False)  # fmt: skip
    assert torch.equal(again.l2, blowup.l2) and torch.equal(again.target, blowup.target)
    bad = [
        dict(test="both"),
        dict(test="blowup", families=("real", "real_own")),
        dict(families=("real", "fake")),
        dict(n_steps=2),
        dict(threshold=0),
        dict(anchor_cosine=2.0),
    ]
    for kw in bad:
        with pytest.raises(InputError):
            synthetic_activation_test(model, sae, PROMPTS, reference=reference, progress=False, **kw)
    with pytest.raises(InputError, match="two prompts"):
        synthetic_activation_test(model, sae, PROMPTS[:1], reference=reference, progress=False)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        synthetic_activation_test(model, sae, PROMPTS, reference=reference, cancel=token)


# -- stable regions --------------------------------------------------------------------------------------------


def test_reinitialised_copy(model):
    state = torch.random.get_rng_state()
    fresh = reinitialised(model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = model.module.state_dict(), fresh.module.state_dict()
    assert a.keys() == b.keys() and not torch.equal(
        a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"]
    )
    assert torch.equal(
        reinitialised(model, seed=5).module.state_dict()["lm_head.weight"], b["lm_head.weight"]
    )
    assert fresh.tokenizer is model.tokenizer and "re-initialised" in fresh.name


def test_stable_regions_match_interpolate(model):
    from workbench.plateau import interpolate

    fresh = reinitialised(model)
    res = stable_regions({"trained": model, "fresh": fresh}, PROMPTS, n_steps=5, progress=False)
    direct = interpolate(fresh, PROMPTS[0::2], PROMPTS[1::2], n_steps=5, read_site="ln_final", read_layer=None,
                         progress=False)  # fmt: skip
    assert res.distance.shape == (2, 3, 5) and res.read_site == "ln_final"
    assert torch.allclose(res.distance[1], direct.distance) and torch.allclose(
        res.sharpness[1], direct.sharpness().float()
    )
    table = res.summary()
    assert list(table.model) == ["trained", "fresh"] and table.median_sharpness.notna().all()


# -- results -------------------------------------------------------------------------------------------------------


def test_results_save_and_load(tmp_path, model, rows, sae, blowup):
    ev = evaluate_sae(model, sae, rows[:4], progress=False)
    ctx = top_contexts(model, sae, rows[:8], [0, 1], k=2, progress=False)
    att = latent_attribution(model, sae, PROMPTS[:1], (" Mary", " John"), progress=False)
    sr = stable_regions(model, PROMPTS[:4], n_steps=3, progress=False)
    for res in (ev, ctx, att, sr, blowup):
        back = load_result(res.save(tmp_path / f"{type(res).__name__}.pt"))
        assert type(back) is type(res)
        for field in res.__dataclass_fields__:
            a, b = getattr(res, field), getattr(back, field)
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b) or (a.isnan() == b.isnan()).all(), field
            else:
                assert a == b or a != a, field
        assert len(res.to_frame()) > 0
        res.plot()  # every result has a figure
