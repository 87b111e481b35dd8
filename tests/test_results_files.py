"""Result files and the remote result cache on disk: data only (nothing named in a file is imported or called),
atomic saves, shapes checked on load, old files still read, and cache entries that cannot hurt or lose results.

Error messages of bad files and paths are rows of tests/test_bad_input.py; this file checks what happens around
them (round trips, side effects, files left behind).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import io
import json
import os
import zipfile

import pytest
import torch

from workbench.errors import InputError
from workbench.patching.result import PatchingResult
from workbench.remote import ResultCache
from workbench.remote.cache import CacheWriteWarning, Uncacheable, _plain
from workbench.results import (
    _BUILTIN,
    _BUILTIN_SHAPES,
    FORMAT_VERSION,
    Provenance,
    Result,
    load_result,
    result_classes,
    to_bytes,
)


def patching_result(n_layers: int = 2, heads: tuple[int, ...] | None = None) -> PatchingResult:
    """A small PatchingResult built directly: [metric 2, pair 3, site 1, layer, position 4(, head)]."""
    shape = (2, 3, 1, n_layers, 4) + ((len(heads),) if heads else ())
    return PatchingResult(
        method="exact",
        direction="denoising",
        sites=("z",) if heads else ("resid_pre",),
        layers=tuple(range(n_layers)),
        positions=((0,), (1,), (2,), (3,)),
        position_labels=("a", "b", "c/d", "e"),
        heads=heads,
        metrics=("logit_diff", "kl"),
        metric_labels=("logit difference", "KL"),
        metric="logit_diff",
        raw=torch.randn(shape, generator=torch.Generator().manual_seed(0)),
        clean=torch.tensor([[2.0, 1.5, 3.0], [0.0, 0.0, 0.0]]),
        corrupt=torch.tensor([[-1.0, -2.0, -0.5], [0.5, float("nan"), 1.0]]),
        clean_tokens=(("a", "b", "c", "e"),) * 3,
        corrupt_tokens=(("a", "b", "d", "e"),) * 3,
        answers=((" Mary", " John"),) * 3,
        provenance=Provenance.capture("demo", clean=["x"], layers=None, scale=1e-3),
        warnings=("a warning",),
    )


def rewrite(path, edit) -> None:
    """Apply `edit` to the JSON description inside a saved result file (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tree = json.loads(meta["result"])
    edit(tree, tensors)
    meta["result"] = json.dumps(tree)
    path.write_bytes(save(tensors, metadata=meta))


def format_1_file(path, tree) -> None:
    """A file as version 1 wrote it: torch.save({"format": 1, "result": tree})."""
    torch.save({"format": 1, "result": tree}, path)


def format_1_tree(value):
    """What version 1's encoder made of a value (kept here to write old files)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: format_1_tree(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        return {"__dict__": [[format_1_tree(k), format_1_tree(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [format_1_tree(v) for v in value]}
    if isinstance(value, list):
        return [format_1_tree(v) for v in value]
    return value


def assert_same(a: PatchingResult, b: PatchingResult) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), f.name
        else:
            assert x == y and type(x) is type(y), f.name


# -- the format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [None, (0, 1, 2)])
def test_round_trip_keeps_every_field_and_type(tmp_path, heads):
    result = patching_result(heads=heads)
    path = result.save(tmp_path / "grid.safetensors")
    back = PatchingResult.load(path)
    assert_same(result, back)
    assert torch.equal(back.values(), result.values())
    assert back.provenance.options["scale"] == 1e-3 and back.provenance.options["layers"] is None


def test_the_file_is_safetensors_with_a_json_description(tmp_path):
    from safetensors import safe_open

    path = patching_result().save(tmp_path / "grid.wb")
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["workbench_result_format"] == str(FORMAT_VERSION) and len(keys) == 3  # raw, clean, corrupt
    tree = json.loads(meta["result"])
    assert tree["class"] == "PatchingResult" and tree["fields"]["raw"] == {"tensor": "t0"}
    assert not zipfile.is_zipfile(path)  # not a torch.save (pickle) archive


def test_plain_values_of_every_kind_survive(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Everything(Result):
        ints: dict[int, str]
        nested: tuple[tuple[torch.Tensor, ...], ...]
        items: list[tuple[int, str]]
        maybe: torch.Tensor | None
        flags: torch.Tensor
        half: torch.Tensor
        empty: torch.Tensor
        number: float
        provenance: Provenance

    value = Everything(
        ints={1: "a", -2: "b"},
        nested=((torch.arange(3), torch.ones(2, 2)[0]),),
        items=[(1, "x")],
        maybe=None,
        flags=torch.tensor([True, False]),
        half=torch.arange(4, dtype=torch.bfloat16).reshape(2, 2).T,  # not contiguous
        empty=torch.zeros(0, 5),
        number=float("inf"),
        provenance=Provenance.capture("m"),
    )
    back = load_result(value.save(tmp_path / "all"))
    assert back.ints == {1: "a", -2: "b"} and back.items == [(1, "x")] and back.maybe is None
    assert torch.equal(back.nested[0][1], torch.ones(2)) and back.flags.dtype == torch.bool
    assert torch.equal(back.half, value.half) and back.empty.shape == (0, 5) and back.number == float("inf")


def test_values_outside_the_format_are_refused_before_writing(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Holder(Result):
        thing: object

    with pytest.raises(TypeError, match="cannot save a value of type object"):
        Holder(object()).save(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_every_result_class_of_the_package_is_on_the_allow_list():
    """Scans the package's source (its git-tracked files when in a checkout) for `class X(... Result ...)`."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "workbench"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.split()
        files = [root / f for f in tracked if f.endswith(".py")]
    except (OSError, subprocess.CalledProcessError):
        files = list((root / "workbench").rglob("*.py"))
    found = {}
    for file in files:
        module = ".".join(file.relative_to(root).with_suffix("").parts)
        for name, bases in re.findall(r"^class (\w+)\(([^)]*)\):", file.read_text(), flags=re.M):
            if re.search(r"\bResult\b", bases):
                found[name] = module
    missing = {name: module for name, module in found.items() if _BUILTIN.get(name) != module}
    assert not missing, f"add these to workbench.results._BUILTIN: {missing}"


def test_every_builtin_class_is_a_result_with_the_fields_its_shapes_name():
    for name, module in _BUILTIN.items():
        cls = getattr(importlib.import_module(module), name)
        assert dataclasses.is_dataclass(cls) and (issubclass(cls, Result) or cls is Provenance), name
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(_BUILTIN_SHAPES.get(name, {})) <= fields, name
    assert set(_BUILTIN) <= set(result_classes())


def test_every_result_with_axes_has_a_default_figure_found_by_its_type():
    from workbench import viz

    for name, module in _BUILTIN.items():
        cls = getattr(importlib.import_module(module), name)
        if cls in (Provenance,) or name == "RefStats":  # records, not something one looks at
            continue
        assert viz.builder_for(cls) is not None, (
            f"register {name}'s figure with @draws({name}) in workbench.viz"
        )
    assert viz.builder_for(PatchingResult) is viz.patching.heatmap


def test_a_subclass_gets_its_bases_figure_and_a_class_without_one_says_so():
    from workbench import viz

    @dataclasses.dataclass(frozen=True)
    class Finer(PatchingResult):
        pass

    @dataclasses.dataclass(frozen=True)
    class Bare(Result):
        x: int = 0

    assert viz.builder_for(Finer) is viz.patching.heatmap
    with pytest.raises(InputError, match="Bare has no default figure"):
        Bare().plot()
    with pytest.raises(RuntimeError, match="already has a default figure"):
        viz.draws(PatchingResult)(lambda result: None)


# -- the exploit stays dead ---------------------------------------------------------------------------------------
def exploit_trees(tmp_path):
    """Old-format and new-format descriptions that name os.system and os.remove through a workbench module."""
    marker, victim = tmp_path / "ran", tmp_path / "victim.txt"
    victim.write_text("keep me")
    system = {"__dataclass__": "workbench.casper.data:os.system", "fields": {"command": f"touch {marker}"}}
    remove = {"__dataclass__": "workbench.casper.data:os.remove", "fields": {"path": str(victim)}}
    return (
        marker,
        victim,
        [
            ("format 1", system),
            ("format 1", remove),
            (
                "format 1",
                {"__dataclass__": "workbench.results:os.system", "fields": {"command": f"touch {marker}"}},
            ),
            (
                "format 2",
                {"class": "workbench.casper.data:os.system", "fields": {"command": f"touch {marker}"}},
            ),
            ("format 2", {"class": "os.remove", "fields": {"path": str(victim)}}),
            ("format 2", {"class": "system", "fields": {"command": f"touch {marker}"}}),
        ],
    )


def write_exploit(path, kind, tree) -> None:
    if kind == "format 1":
        format_1_file(path, tree)
    else:
        from safetensors.torch import save

        meta = {"workbench_result_format": "2", "result": json.dumps(tree)}
        path.write_bytes(save({"t0": torch.zeros(1)}, metadata=meta))


def test_a_tampered_result_file_cannot_run_code_or_touch_a_file(tmp_path):
    marker, victim, trees = exploit_trees(tmp_path)
    for i, (kind, tree) in enumerate(trees):
        path = tmp_path / f"evil{i}.pt"
        write_exploit(path, kind, tree)
        for load in (load_result, PatchingResult.load):
            with pytest.raises(InputError, match="not a workbench result class|unknown result class"):
                load(path)
        assert not marker.exists() and victim.read_text() == "keep me"


def test_a_tampered_cache_file_cannot_run_code_and_counts_as_a_miss(tmp_path):
    marker, victim, trees = exploit_trees(tmp_path)
    cache = ResultCache(directory=tmp_path / "cache")
    cache.directory.mkdir()
    for i, (kind, tree) in enumerate(trees):
        write_exploit(cache._path(f"key{i}"), kind, tree)
        assert cache.get(f"key{i}", "miss") == "miss"
    assert not marker.exists() and victim.read_text() == "keep me" and cache.misses == len(trees)


# -- version 1 files ----------------------------------------------------------------------------------------------
def test_files_written_by_version_1_still_load(tmp_path):
    result = patching_result()
    format_1_file(tmp_path / "old.pt", format_1_tree(result))
    assert_same(result, PatchingResult.load(tmp_path / "old.pt"))


def test_version_1_files_are_checked_like_new_ones(tmp_path):
    tree = format_1_tree(dataclasses.replace(patching_result(), raw=torch.zeros(2, 3)))
    format_1_file(tmp_path / "old.pt", tree)
    with pytest.raises(InputError, match=r"PatchingResult.raw has shape \(2, 3\)"):
        load_result(tmp_path / "old.pt")
    buffer = io.BytesIO()
    torch.save({"format": 1, "result": {"__dataclass__": "x"}, "evil": print}, buffer)  # outside weights_only
    (tmp_path / "pickle.pt").write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match="not a readable workbench result") as err:
        load_result(tmp_path / "pickle.pt")
    assert "weights_only=False" not in str(err.value)


# -- shapes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "raw",
            torch.zeros(2, 3),
            r"raw has shape \(2, 3\), but its axes \[metrics, pair, sites, layers, positions\]",
        ),
        ("raw", torch.zeros(2, 3, 1, 5, 4), r"axis 'layers' should have 2 entries"),
        ("clean", torch.zeros(2, 7), r"clean has 7 along axis 'pair', but raw has 3 there"),
        ("raw", "not a tensor", r"raw should be torch.Tensor, found str"),
        ("metric", 3, r"metric should be str, found int"),
        ("heads", [0, 1], r"heads should be tuple\[int, ...\] \| None, found list"),
    ],
)
def test_wrong_shapes_and_types_are_refused_on_load(tmp_path, field, value, message):
    path = tmp_path / "bad"
    path.write_bytes(to_bytes(dataclasses.replace(patching_result(), **{field: value})))
    with pytest.raises(InputError, match=message):
        load_result(path)


def test_a_class_can_declare_its_own_axes(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Curve(Result):
        xs: tuple[float, ...]
        ys: torch.Tensor
        shapes = {"ys": "run xs"}

    Curve((0.0, 1.0), torch.zeros(3, 2)).check()
    with pytest.raises(InputError, match="axis 'xs' should have 2 entries"):
        load_result(Curve((0.0, 1.0), torch.zeros(3, 4)).save(tmp_path / "c"))


# -- atomic saves ------------------------------------------------------------------------------------------------
def test_a_failed_save_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    path = patching_result(n_layers=2).save(tmp_path / "grid.safetensors")
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(InputError, match="No space left on device.*the file already there is unchanged"):
        patching_result(n_layers=3).save(path)
    assert path.read_bytes() == before and PatchingResult.load(path).raw.shape[3] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["grid.safetensors"]


def test_saving_over_a_file_replaces_it_whole(tmp_path):
    path = tmp_path / "sub" / "grid.pt"
    patching_result(n_layers=2).save(path)
    patching_result(n_layers=3).save(path)
    assert PatchingResult.load(path).layers == (0, 1, 2)
    assert [p.name for p in path.parent.iterdir()] == ["grid.pt"]


# -- the remote cache on disk -------------------------------------------------------------------------------------
def test_an_unreadable_cache_entry_is_a_miss_and_is_replaced(tmp_path):
    cache = ResultCache(directory=tmp_path)
    cache.put("k", patching_result())
    data = cache._path("k").read_bytes()
    cache._path("k").write_bytes(data[: len(data) // 2])  # half written
    fresh = ResultCache(directory=tmp_path)  # a new kernel: nothing in memory
    assert fresh.get("k", "miss") == "miss" and fresh.misses == 1
    fresh.put("k", patching_result())
    assert isinstance(ResultCache(directory=tmp_path).get("k"), PatchingResult)


def test_an_unwritable_cache_folder_warns_and_keeps_the_result(tmp_path):
    (tmp_path / "file").write_text("")
    cache = ResultCache(directory=tmp_path / "file" / "cache")  # under a file: cannot be created
    result = patching_result()
    with pytest.warns(CacheWriteWarning, match="kept in memory"):
        cache.put("k", result)
    assert_same(cache.get("k"), result)


def test_cache_files_use_the_data_only_format_and_clear_removes_them(tmp_path):
    cache = ResultCache(directory=tmp_path)
    cache.put("k", patching_result())
    assert isinstance(load_result(cache._path("k")), PatchingResult)
    (tmp_path / "old.pt").write_bytes(b"")
    cache.clear()
    assert list(tmp_path.iterdir()) == []


# -- functions in cache keys --------------------------------------------------------------------------------------
def scaled(scale):
    def metric(logits):
        return logits * scale

    return metric


def with_default(logits, power=2):
    return logits**power


def with_other_default(logits, power=3):
    return logits**power


OFFSET = 1.0


def reads_a_global(logits):
    return logits + OFFSET


def test_closures_with_different_captured_values_get_different_keys():
    assert _plain(scaled(1.0)) == _plain(scaled(1.0))
    assert _plain(scaled(1.0)) != _plain(scaled(2.0))
    assert _plain(scaled(torch.ones(2))) != _plain(scaled(torch.zeros(2)))
    other = with_other_default
    other.__qualname__ = "with_default"  # same name, other default
    assert _plain(with_default) != _plain(other)
    assert _plain(lambda x: x + 1) != _plain(lambda x: x + 2)


def test_a_global_a_function_reads_is_part_of_its_key(monkeypatch):
    before = _plain(reads_a_global)
    monkeypatch.setitem(reads_a_global.__globals__, "OFFSET", 2.0)
    assert _plain(reads_a_global) != before


def test_functions_that_cannot_be_described_are_not_cached():
    model = torch.nn.Linear(2, 2)

    def probe(x):
        return model(x)

    with pytest.raises(Uncacheable, match="Linear"):
        _plain(probe)
    with pytest.raises(Uncacheable, match="Linear"):
        _plain({"metric": probe})
