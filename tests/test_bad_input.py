"""Bad inputs and faults, one row each: what is done, the exception it must raise, and a fragment of the sentence
that says what to fix. Rows are grouped by layer (result files, model loading, remote); engine rows can be added
as another section with the same `row` decorator. The last section checks what a panel shows after such an error.

A row is a function ``(tmp, monkeypatch) -> None`` that should raise: `tmp` is a fresh folder, `monkeypatch`
pytest's. No row uses the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from workbench.demo_model import DEMO_DIR
from workbench.errors import InputError, ModelLoadError, RemoteError, WorkbenchError
from workbench.models import load_model
from workbench.results import load_result, to_bytes


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Path, pytest.MonkeyPatch], object]
    exc: type[BaseException]
    fragment: str
    skip: str | None = None  # a reason to skip this row on this machine
    panel: bool = False  # also run it inside a panel (last section)


CASES: list[Case] = []


def row(exc: type[BaseException], fragment: str, *, skip: str | None = None, panel: bool = False):
    """Register the decorated function as a row named after it."""

    def register(fn):
        CASES.append(Case(fn.__name__, fn, exc, fragment, skip, panel))
        return fn

    return register


# -- helpers ------------------------------------------------------------------------------------------------------
def a_result():
    from test_results_files import patching_result

    return patching_result()


def saved(tmp: Path, result=None) -> Path:
    return (result or a_result()).save(tmp / "grid.safetensors")


def edit_description(path: Path, edit) -> Path:
    from test_results_files import rewrite

    rewrite(path, edit)
    return path


def demo_copy(tmp: Path) -> Path:
    return Path(shutil.copytree(DEMO_DIR, tmp / "model"))


_DEMO = None


def demo():
    global _DEMO
    if _DEMO is None:
        _DEMO = load_model("demo")
    return _DEMO


# == result files ==================================================================================================
@row(InputError, "is a folder; give a file name")
def save_to_a_folder(tmp, mp):
    a_result().save(tmp)


@row(InputError, "is a file, not a folder")
def save_under_a_file(tmp, mp):
    (tmp / "notes.txt").write_text("")
    a_result().save(tmp / "notes.txt" / "sub" / "grid.safetensors")


@row(InputError, "Could not write /proc/grid.safetensors")
def save_to_an_unwritable_place(tmp, mp):
    a_result().save("/proc/grid.safetensors")  # not writable, even for root


@row(InputError, "No saved result at")
def load_a_missing_file(tmp, mp):
    load_result(tmp / "nothing.safetensors")


@row(InputError, "is a folder, not a saved result")
def load_a_folder(tmp, mp):
    load_result(tmp)


@row(InputError, "not a readable workbench result")
def load_a_truncated_file(tmp, mp):
    path = saved(tmp)
    path.write_bytes(path.read_bytes()[:-100])
    load_result(path)


@row(InputError, "not a readable workbench result")
def load_a_truncated_version_1_file(tmp, mp):
    from test_results_files import format_1_file, format_1_tree

    format_1_file(tmp / "old.pt", format_1_tree(a_result()))
    data = (tmp / "old.pt").read_bytes()
    (tmp / "old.pt").write_bytes(data[: len(data) // 2])
    load_result(tmp / "old.pt")


@row(InputError, "not a readable workbench result")
def load_random_bytes(tmp, mp):
    path = tmp / "noise.pt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).byte().numpy().tobytes()
    )
    load_result(path)


@row(InputError, "not a readable workbench result")
def load_random_bytes_behind_a_zip_signature(tmp, mp):
    path = tmp / "noise.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    load_result(path)


@row(InputError, "without workbench metadata")
def load_a_safetensors_file_that_is_no_result(tmp, mp):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp / "weights.safetensors"))
    load_result(tmp / "weights.safetensors")


@row(InputError, "lacks the field(s) raw")
def load_a_result_missing_a_field(tmp, mp):
    load_result(edit_description(saved(tmp), lambda tree, t: tree["fields"].pop("raw")))


@row(InputError, "has no field(s) colour")
def load_a_result_with_an_unknown_field(tmp, mp):
    load_result(edit_description(saved(tmp), lambda tree, t: tree["fields"].update(colour="red")))


@row(InputError, "holds a PatchingResult, not a PlateauResult")
def load_the_wrong_class(tmp, mp):
    from workbench.plateau import PlateauResult

    PlateauResult.load(saved(tmp))


@row(InputError, "unknown result class 'Grid'")
def load_an_unknown_class(tmp, mp):
    load_result(edit_description(saved(tmp), lambda tree, t: tree.update({"class": "Grid"})))


@row(InputError, "unknown result class 'workbench.casper.data:os.system'")
def load_a_file_naming_os_system(tmp, mp):
    def evil(tree, tensors):
        tree["class"] = "workbench.casper.data:os.system"
        tree["fields"] = {"command": f"touch {tmp / 'ran'}"}

    try:
        load_result(edit_description(saved(tmp), evil))
    finally:
        assert not (tmp / "ran").exists()


@row(InputError, "'workbench.casper.data:os.remove', which is not a workbench result class")
def load_a_version_1_file_naming_os_remove(tmp, mp):
    (tmp / "victim").write_text("keep")
    tree = {"__dataclass__": "workbench.casper.data:os.remove", "fields": {"path": str(tmp / "victim")}}
    torch.save({"format": 1, "result": tree}, tmp / "evil.pt")
    try:
        load_result(tmp / "evil.pt")
    finally:
        assert (tmp / "victim").read_text() == "keep"


@row(InputError, "PatchingResult.raw has shape (5,)")
def load_a_raw_tensor_of_the_wrong_shape(tmp, mp):
    (tmp / "bad").write_bytes(to_bytes(dataclasses.replace(a_result(), raw=torch.zeros(5))))
    load_result(tmp / "bad")


@row(InputError, "tensor 't9' is missing")
def load_a_description_naming_a_missing_tensor(tmp, mp):
    load_result(edit_description(saved(tmp), lambda tree, t: tree["fields"].update(raw={"tensor": "t9"})))


@row(InputError, "written in result format 3")
def load_a_newer_format(tmp, mp):
    from safetensors.torch import save

    path = saved(tmp)
    meta = {"workbench_result_format": "3", "result": "{}"}
    path.write_bytes(save({"x": torch.ones(1)}, metadata=meta))
    load_result(path)


# == model loading =================================================================================================
@row(ModelLoadError, "model.safetensors is damaged")
def load_truncated_weights(tmp, mp):
    path = demo_copy(tmp)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    load_model(str(path))


@row(ModelLoadError, "model.safetensors is damaged: its header")
def load_weights_with_a_damaged_header(tmp, mp):
    path = demo_copy(tmp)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[0:8] = struct.pack("<Q", 10**9)
    (path / "model.safetensors").write_bytes(bytes(data))
    load_model(str(path))


@row(ModelLoadError, "does not match the sha256 digest", panel=True)
def load_a_bit_flipped_demo_model(tmp, mp):
    import workbench.demo_model

    path = demo_copy(tmp)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the middle of the weights: the header stays valid
    (path / "model.safetensors").write_bytes(bytes(data))
    mp.setattr(workbench.demo_model, "DEMO_DIR", path)
    load_model("demo")


@row(ModelLoadError, "The tokenizer file tokenizer.json is missing")
def load_without_tokenizer_files(tmp, mp):
    path = demo_copy(tmp)
    (path / "tokenizer.json").unlink()
    load_model(str(path))


@row(ModelLoadError, "The tokenizer file merges.txt is missing")
def load_with_vocab_json_but_no_merges(tmp, mp):
    path = demo_copy(tmp)
    (path / "tokenizer.json").unlink()
    (path / "vocab.json").write_text("{}")
    load_model(str(path))


@row(ModelLoadError, "config.json is not a valid model config: not JSON")
def load_a_garbage_config(tmp, mp):
    path = demo_copy(tmp)
    (path / "config.json").write_text("{garbage")
    load_model(str(path))


@row(ModelLoadError, 'has no "model_type" entry')
def load_a_config_without_model_type(tmp, mp):
    path = demo_copy(tmp)
    (path / "config.json").write_text('{"n_layer": 2}')
    load_model(str(path))


@row(ModelLoadError, "does not describe its weights: transformer.h.0.attn.c_attn.bias: [384] in the weights")
def load_a_config_that_does_not_fit_the_weights(tmp, mp):
    path = demo_copy(tmp)
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] *= 2
    (path / "config.json").write_text(json.dumps(config))
    load_model(str(path))


@row(ModelLoadError, "weight file")
def load_with_a_missing_weight_shard(tmp, mp):
    path = demo_copy(tmp)
    index = {"weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    load_model(str(path))


@row(ModelLoadError, "has no config.json")
def load_a_folder_that_is_no_model(tmp, mp):
    load_model(str(tmp))


@row(ModelLoadError, "dtype='int8' is not supported")
def load_in_int8(tmp, mp):
    load_model("demo", dtype="int8")


@row(ModelLoadError, "dtype='float99' is not a torch dtype")
def load_in_an_unknown_dtype(tmp, mp):
    load_model("demo", dtype="float99")


@row(
    ModelLoadError,
    "torch sees no GPU on this machine",
    skip="this machine has a GPU" if torch.cuda.is_available() else None,
)
def load_on_cuda_without_a_gpu(tmp, mp):
    load_model("demo", device="cuda")


@row(ModelLoadError, "device='gpu' is not a torch device")
def load_on_an_unknown_device(tmp, mp):
    load_model("demo", device="gpu")


@row(InputError, "The token tensor is 133 tokens long; demo takes at most 128")
def tokens_longer_than_the_context(tmp, mp):
    demo().to_tokens(torch.zeros(1, 133, dtype=torch.long))


@row(InputError, "The prompt is 201 tokens long; demo takes at most 128")
def a_prompt_longer_than_the_context(tmp, mp):
    demo().to_tokens(" the" * 200)


# == remote ========================================================================================================
@row(RemoteError, "WORKBENCH_ALLOW_INSECURE_NDIF=1")
def a_plain_http_ndif_host(tmp, mp):
    from workbench.remote.config import check_host

    check_host("http://ndif.example.com")


@row(RemoteError, "is not an https:// address", panel=True)
def a_trace_sent_to_a_plain_http_host(tmp, mp):
    from nnsight import CONFIG
    from nnsight.modeling.huggingface import _ID_CACHE

    path = demo_copy(tmp)
    mp.setattr(CONFIG.API, "HOST", "http://ndif.example.com")
    mp.setattr(CONFIG.API, "APIKEY", "a-key")
    mp.setitem(_ID_CACHE, str(path), "example/demo")
    model = load_model(str(path), remote=True)
    with model.trace(model.to_tokens("the cat")):
        model.site("logits").value.save()


@row(RemoteError, "holds an object the workbench does not load (posix.system is not allowed)")
def an_ndif_result_that_names_a_function(tmp, mp):
    import io

    from workbench.remote.backend import load_data_only

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'ran'}",))

    buffer = io.BytesIO()
    torch.save({"value": Evil()}, buffer)
    try:
        load_data_only(buffer.getvalue(), "the result of NDIF job x")
    finally:
        assert not (tmp / "ran").exists()


@row(RemoteError, "is 2,048.0 MB, above the limit of 1 MB (max_result_mb)")
def an_inline_ndif_result_above_the_limit(tmp, mp):
    """The frame header announces 2 GiB: refused after its 10 header bytes, before any of the payload is read."""
    from types import SimpleNamespace

    import websocket

    from workbench.remote.backend import NDIFJobBackend, _cap_frames

    server, client = socket.socketpair()
    server.sendall(bytes([0x82, 127]) + struct.pack("!Q", 2**31) + b"x" * 1000)  # binary frame, 64-bit length
    connection = websocket.WebSocket()
    connection.sock = client
    job = SimpleNamespace(runner=SimpleNamespace(max_result_bytes=2**20), job_id="x")
    _cap_frames(connection, 2**20, lambda size: NDIFJobBackend._too_large(job, size))
    try:
        connection.recv()
    finally:
        assert len(client.recv(4096, socket.MSG_DONTWAIT)) == 1000  # the payload is still unread
        server.close()
        client.close()


# == engines =======================================================================================================
IOI = (
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    (" Mary", " John"),
)


def patch(**kwargs):
    from workbench.patching import sweep

    return sweep(demo(), *IOI, progress=False, warn=False, **kwargs)


def probe_demo(**kwargs):
    from workbench.plateau import probe

    return probe(demo(), IOI[0], **{"families": ("isotropic",), "n_directions": 2, "progress": False, **kwargs})


@row(InputError, "batch_size must be a positive whole number, got -1", panel=True)
def sweep_with_batch_size_minus_one(tmp, mp):
    patch(batch_size=-1)


@row(InputError, "batch_size must be a positive whole number, got 0")
def sweep_with_batch_size_zero(tmp, mp):
    patch(batch_size=0)


@row(InputError, "batch_size must be a positive whole number, got nan")
def sweep_with_batch_size_nan(tmp, mp):
    patch(batch_size=float("nan"))


@row(InputError, "memory_budget must be a positive number of bytes, '2GB' or 'auto', got nan")
def sweep_with_a_nan_memory_budget(tmp, mp):
    patch(memory_budget=float("nan"))


@row(InputError, "memory_budget must be a positive number of bytes, got -1")
def sweep_with_a_negative_memory_budget(tmp, mp):
    patch(memory_budget=-1)


@row(InputError, "batch_size must be a positive whole number, got -1")
def preview_with_batch_size_minus_one(tmp, mp):
    from workbench.lnfree import preview

    preview(demo(), torch.randint(1, 100, (2, 8)), batch_size=-1, progress=False)


@row(InputError, "Layer True is not a layer number")
def sweep_with_a_bool_layer(tmp, mp):
    patch(layers=[True])


@row(InputError, "site=None: give a site name")
def sweep_with_site_none(tmp, mp):
    patch(site=None)


@row(InputError, "The clean run's logit_diff is nan for pair 0")
def sweep_on_nan_weights(tmp, mp):
    from workbench.models.toy import random_model

    model = random_model("gpt2", seed=1)
    with torch.no_grad():
        model.module.lm_head.weight.fill_(float("nan"))
    from workbench.patching import sweep

    sweep(model, "When Mary and John went to the store , John gave a drink to",
          "When Mary and John went to the store , Mary gave a drink to", (" Mary", " John"), progress=False)  # fmt: skip


@row(InputError, "The clean run's nan_metric is nan for pair 0")
def sweep_with_a_metric_returning_nan(tmp, mp):
    def nan_metric(logits, answers):
        return torch.full((len(logits),), float("nan"))

    patch(metric=nan_metric)


@row(InputError, "scale must be a positive finite number of L2 units, got inf")
def probe_with_an_infinite_scale(tmp, mp):
    probe_demo(scale=float("inf"))


@row(InputError, "sizes x scale overflows")
def probe_with_sizes_up_to_1e30(tmp, mp):
    probe_demo(scale=1e10, sizes=[0, 1e30])


@row(InputError, "n_directions must be a positive whole number")
def probe_with_zero_directions(tmp, mp):
    probe_demo(n_directions=0)


@row(InputError, "positions='every'")
def probe_with_an_unknown_position_word(tmp, mp):
    probe_demo(positions="every")


@row(InputError, "Give batch_size= only; chunk= is its old name")
def scrub_with_both_spellings_of_the_batch_size(tmp, mp):
    from workbench.scrubbing import Hypothesis, Resample, random_donors, scrub

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    scrub(net, torch.zeros(4, 2), Hypothesis("h", (Resample("0", random_donors()),)), chunk=2, batch_size=2)


def test_numpy_integer_layers_are_layers():
    import numpy as np

    result = patch(layers=[np.int64(1), np.int32(-1)])
    assert result.layers == (1, demo().cfg.n_layers - 1)


def test_non_finite_kls_give_nan_plateau_lengths_with_a_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = probe_demo(sizes=[0, 1e-30, 3e38])  # the median norm times 3e38 overflows float32
    assert any("not finite" in str(w.message) for w in caught)
    lengths = result.plateau_length()
    assert torch.isnan(lengths).any() and not torch.isinf(lengths[torch.isnan(result.kl).any(-1)]).any()


# == the table ====================================================================================================
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=pytest.mark.skipif(bool(c.skip), reason=c.skip or "")) for c in CASES],
)
def test_bad_input(case: Case, tmp_path, monkeypatch):
    with pytest.raises(case.exc) as info:
        case.call(tmp_path, monkeypatch)
    message = str(info.value)
    assert case.fragment in message, message
    assert isinstance(info.value, WorkbenchError), "bad input must raise the workbench's own errors"
    assert "weights_only=False" not in message  # torch's advice is the wrong one here


def test_a_config_mismatch_is_reported_once(tmp_path, monkeypatch, capfd):
    with pytest.raises(ModelLoadError) as info:
        load_a_config_that_does_not_fit_the_weights(tmp_path, monkeypatch)
    out, err = capfd.readouterr()
    assert "MISMATCH" not in out + err and "Traceback" not in str(info.value)
    assert str(info.value).count("does not describe its weights") == 1


# == panels after an error =========================================================================================
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES if c.panel])
def test_a_panel_keeps_its_last_result_after_the_error(case: Case, tmp_path, monkeypatch):
    from workbench.widgets.base import Panel

    panel = Panel()
    panel.background = False  # run in this thread
    panel.start(lambda progress, cancel: "good", lambda result: panel.figure.add_bar(y=[1, 2]))
    picture = panel.figure.to_dict()["data"]
    panel.start(lambda progress, cancel: case.call(tmp_path, monkeypatch), lambda result: None)
    assert case.fragment in panel.status_text
    assert panel.result == "good" and panel.figure.to_dict()["data"] == picture
    assert not panel.run_button.disabled and panel.stop_button.disabled
