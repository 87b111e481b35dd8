"""The shared code renderer: every value it writes reads back as the same value, every block it writes is valid
Python, long calls are broken one argument per line."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.codegen import WIDTH, Expr, Name, Script, call, literal, render_call

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.lists(inner, max_size=6).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=40,
)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def run(expr: Expr):
    namespace = {}
    exec(Script().add(expr, assign="value").render(), namespace)
    return namespace["value"]


@settings(max_examples=150, deadline=None)
@given(VALUES)
def test_every_literal_reads_back_as_the_same_value(value):
    assert same(run(literal(value)), value)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.bool]),
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_tensors_and_arrays_read_back_exactly(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 10).to(dtype)
    back = run(literal(t))
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    a = t.numpy()
    back = run(literal(a))
    assert back.dtype == a.dtype and np.array_equal(back, a)


def test_evenly_spaced_sizes_are_a_linspace():
    sizes = torch.linspace(0, 3.0, 33)
    assert literal(sizes).text == "torch.linspace(0.0, 3.0, 33)"
    assert torch.equal(run(literal(sizes)), sizes)
    uneven = torch.tensor([0.0, 1.0, 3.0])
    assert literal(uneven).text == "torch.tensor([0.0, 1.0, 3.0])"


def test_render_call_is_valid_readable_python():
    prompts = [f"When Mary and John went to the store, John gave a drink to {i}" for i in range(3)]
    code = render_call(
        "workbench.patching",
        "sweep",
        [Name("model")],
        {
            "clean": prompts,
            "answers": (" Mary", " John"),
            "site": "resid_pre",
            "sizes": torch.linspace(0, 1, 5),
        },
        preamble_lines=[Expr("model = load_model('demo')", (("workbench.models", "load_model"),))],
    )
    ast.parse(code)
    lines = code.splitlines()
    assert lines[:4] == [
        "import torch",
        "from workbench.models import load_model",
        "from workbench.patching import sweep",
        "",
    ]
    assert lines[4] == "model = load_model('demo')"
    assert lines[5] == "result = sweep("  # too long for one line: one argument per line
    assert "    answers=(' Mary', ' John')," in lines
    assert all(len(line) <= WIDTH + 12 for line in lines)
    short = render_call("workbench.lnfree", "preview", [Name("model"), Name("tokens")], {"n_rows": 8})
    assert short == "from workbench.lnfree import preview\n\nresult = preview(model, tokens, n_rows=8)"


def test_nested_calls_and_names():
    expr = call("workbench.tasks", "demo_corpus", ["validation", 16])
    code = render_call("workbench.lnfree", "preview", [Name("model"), expr], {}, assign=None)
    assert code.splitlines()[:2] == [
        "from workbench.lnfree import preview",
        "from workbench.tasks import demo_corpus",
    ]
    assert code.endswith("preview(model, demo_corpus('validation', 16))")
    with pytest.raises(ValueError):
        Name("not a name")
    with pytest.raises(TypeError, match="Name"):
        literal(object())
