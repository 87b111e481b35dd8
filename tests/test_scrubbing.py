"""The causal-scrubbing engine on toy models whose answer is known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workbench.errors import InputError, SiteError, UnsupportedModelError
from workbench.scrubbing import (
    Hypothesis,
    Resample,
    ScrubResult,
    fixed_donors,
    labels_kept,
    nearest_value,
    random_donors,
    same_value,
    scrub,
)


class Reads(nn.Module):
    """logits = [-u, u] with u = hidden @ direction: the label is sign(u); nothing else matters."""

    def __init__(self, direction):
        super().__init__()
        self.hidden = nn.Identity()
        self.head = nn.Linear(2, 2, bias=False)
        d = torch.as_tensor(direction, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([-d, d]))

    def forward(self, x):
        return self.head(self.hidden(x))


class Positions(nn.Module):
    """x [N, 3, 2]; the logits read only x[:, 2, 0]."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Identity()

    def forward(self, x):
        h = self.hidden(x)
        u = h[:, 2, 0]
        return torch.stack([-u, u], -1)


class TwoSites(nn.Module):
    """a = x; b = 2 * a; logits read b[:, 0] only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.scale = nn.Linear(2, 2, bias=False)
        self.b = nn.Identity()
        with torch.no_grad():
            self.scale.weight.copy_(2 * torch.eye(2))

    def forward(self, x):
        b = self.b(self.scale(self.a(x)))
        return torch.stack([-b[:, 0], b[:, 0]], -1)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _Pair()

    def forward(self, x):
        return self.pair(x)[0]


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


@pytest.fixture
def x():
    return torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))


def _label(u):
    return (u > 0).long()


def test_irrelevant_unit_keeps_everything(x):
    r = scrub(
        Reads([1.0, 0.0]),
        x,
        Hypothesis("unit 1 irrelevant", (Resample("hidden", random_donors(), units=[1]),)),
        output="head",
        progress=False,
    )
    assert r.kept.tolist() == [1.0]
    assert r.clean_score == 1.0
    assert not torch.equal(r.donors[0][0], torch.arange(len(x)))  # something was actually resampled


def test_relevant_unit_random_matches_hand_computation(x):
    r = scrub(
        Reads([1.0, 0.0]),
        x,
        [Hypothesis("unit 0 random", (Resample("hidden", random_donors(), units=[0]),))],
        output="head",
        chunk=333,
        progress=False,
    )
    donors = r.donors[0][0]
    expected = (_label(x[donors, 0]) == _label(x[:, 0])).float().mean()
    assert r.kept[0] == pytest.approx(float(expected), abs=1e-7)
    assert 0.45 < r["unit 0 random"] < 0.55


def test_same_value_on_the_true_feature_keeps_everything(x):
    sign = x[:, 0] > 0
    r = scrub(
        Reads([1.0, 0.0]),
        x,
        Hypothesis("only the sign of unit 0 matters", (Resample("hidden", same_value(sign), units=[0]),)),
        output="head",
        progress=False,
    )
    assert r.kept.tolist() == [1.0]
    d = r.donors[0][0]
    assert torch.equal(sign[d], sign)
    assert sorted(d.tolist()) == list(range(len(x)))  # a permutation within groups


def test_same_value_accepts_feature_tuples():
    keys = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1], [0, 0]])
    d = same_value(keys).draw(5, torch.Generator().manual_seed(1))
    assert torch.equal(keys[d], keys)


def test_nearest_value_without_noise_is_the_input_itself(x):
    r = scrub(
        Reads([1.0, 0.0]),
        x,
        [
            Hypothesis("exact", (Resample("hidden", nearest_value(x[:, 0], noise=0.0)),)),
            Hypothesis("very noisy", (Resample("hidden", nearest_value(x[:, 0], noise=100.0)),)),
        ],
        output="head",
        progress=False,
    )
    assert torch.equal(r.donors[0][0], torch.arange(len(x)))
    assert r.kept[0] == 1.0
    assert r.kept[1] < 0.9


def test_nearest_value_picks_the_closest_value():
    values = torch.tensor([0.0, 10.0, 3.0, 7.0])
    # with no noise every input finds itself; check the search with shifted targets via a tiny helper model
    d = nearest_value(values).draw(4, torch.Generator().manual_seed(0))
    assert d.tolist() == [0, 1, 2, 3]
    from workbench.scrubbing.engine import _nearest

    g = torch.Generator().manual_seed(0)
    shifted = _nearest(torch.tensor([0.0, 1.0, 2.0, 9.0]), 0.0, g)
    assert shifted.tolist() == [0, 1, 2, 3]


def test_fixed_donors(x):
    donors = torch.roll(torch.arange(len(x)), 1)
    r = scrub(
        Reads([1.0, 0.0]), x, Hypothesis("shift", (Resample("hidden", fixed_donors(donors)),)), progress=False
    )
    expected = (_label(x[donors, 0]) == _label(x[:, 0])).float().mean()
    assert r.kept[0] == pytest.approx(float(expected), abs=1e-7)


def test_basis_swaps_coordinates_not_units(x):
    theta = 0.6
    r0 = torch.tensor([math.cos(theta), math.sin(theta)])
    r1 = torch.tensor([-math.sin(theta), math.cos(theta)])
    basis = torch.stack([r0, r1])
    model = Reads(r0)
    r = scrub(
        model,
        x,
        [
            Hypothesis("coord 1 irrelevant", (Resample("hidden", random_donors(), units=[1], basis=basis),)),
            Hypothesis("coord 0 random", (Resample("hidden", random_donors(), units=[0], basis=basis),)),
            Hypothesis("unit 1 random", (Resample("hidden", random_donors(), units=[1]),)),
        ],
        progress=False,
    )
    assert r.kept[0] == 1.0
    assert 0.45 < r.kept[1] < 0.55
    assert r.kept[2] < 0.95  # the standard basis is the wrong one for this model


def test_non_orthogonal_basis_keeps_the_other_coordinate():
    basis = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    current, donor = torch.tensor([[2.0, 3.0]]), torch.tensor([[5.0, 7.0]])
    from workbench.scrubbing.engine import _check_rule, _patch

    rule = Resample("h", random_donors(), units=[1], basis=basis)
    new = _patch(current, donor, rule, *_check_rule(rule, torch.Size([1, 2])))
    # coordinates: current (-1, 3), donor (-2, 7) -> (-1, 7) -> x = -1*(1,0) + 7*(1,1) = (6, 7)
    assert new.tolist() == [[6.0, 7.0]]


def test_positions_with_at():
    x = torch.randn(1500, 3, 2, generator=torch.Generator().manual_seed(2))
    r = scrub(
        Positions(),
        x,
        [
            Hypothesis("positions 0-1 irrelevant", (Resample("hidden", random_donors(), at=(slice(0, 2),)),)),
            Hypothesis("pos 2 unit 1 irrelevant", (Resample("hidden", random_donors(), units=[1], at=(2,)),)),
            Hypothesis("pos 2 unit 0 random", (Resample("hidden", random_donors(), units=[0], at=(2,)),)),
        ],
        progress=False,
    )
    assert r.kept[:2].tolist() == [1.0, 1.0]
    assert 0.44 < r.kept[2] < 0.56


def test_sites_are_run_in_forward_order_whatever_the_order_given(x):
    r = scrub(
        TwoSites(),
        x,
        Hypothesis(
            "b0 follows the sign; a irrelevant",
            (
                Resample("b", same_value(x[:, 0] > 0), units=[0]),
                Resample("a", random_donors()),
            ),
        ),
        output="",
        progress=False,
    )
    # b is overwritten from donors' clean b, so resampling a upstream cannot change the label
    assert r.kept.tolist() == [1.0]


def test_labels_kept_with_position_and_classes():
    clean = torch.tensor([[[0.0, 1.0, 9.0], [2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 5.0, 9.0]]])
    patched = clean.clone()
    patched[0, 1] = torch.tensor([0.0, 3.0, 0.0])
    patched[1, 1] = torch.tensor([5.0, 0.0, 0.0])
    assert labels_kept(position=-1, classes=(0, 1))(clean, patched).tolist() == [0.0, 0.0]
    assert labels_kept(position=0)(clean, patched).tolist() == [1.0, 1.0]


def test_custom_metric_and_recovered(x):
    def logit_diff_error(clean, patched):
        return -((clean[:, 1] - clean[:, 0]) - (patched[:, 1] - patched[:, 0])).abs()

    r = scrub(
        Reads([1.0, 0.0]),
        x,
        [
            Hypothesis("irrelevant", (Resample("hidden", random_donors(), units=[1]),)),
            Hypothesis("everything random", (Resample("hidden", random_donors()),)),
        ],
        metric=logit_diff_error,
        progress=False,
    )
    assert r.clean_score == 0.0
    assert r.kept[0] == 0.0
    assert r.kept[1] < -0.5
    assert r.recovered("everything random").tolist() == pytest.approx([1.0, 0.0])


def test_results_do_not_depend_on_chunk_size(x):
    hyp = Hypothesis("unit 0 random", (Resample("hidden", random_donors(), units=[0]),))
    a = scrub(Reads([1.0, 0.0]), x, hyp, chunk=128, seed=3, progress=False)
    b = scrub(Reads([1.0, 0.0]), x, hyp, chunk=2000, seed=3, progress=False)
    assert torch.equal(a.scores, b.scores)


def test_accepts_nnsight_and_workbench_models(x):
    import nnsight

    from workbench.models import load_model

    model = Reads([1.0, 0.0])
    hyp = Hypothesis("unit 0 random", (Resample("hidden", random_donors(), units=[0]),))
    direct = scrub(model, x, hyp, progress=False)
    wrapped = scrub(nnsight.NNsight(model), x, hyp, progress=False)
    held = scrub(load_model(model), x, hyp, progress=False)
    assert torch.equal(direct.scores, wrapped.scores) and torch.equal(direct.scores, held.scores)
    assert held.provenance.model == "Reads"


def test_result_save_load_frame_and_plot(x, tmp_path):
    r = scrub(
        Reads([1.0, 0.0]),
        x,
        [Hypothesis("a", (Resample("hidden", random_donors(), units=[1]),))],
        progress=False,
    )
    loaded = ScrubResult.load(r.save(tmp_path / "scrub.pt"))
    assert loaded.names == r.names and torch.equal(loaded.kept, r.kept)
    assert torch.equal(loaded.donors[0][0], r.donors[0][0])
    frame = r.to_frame()
    assert list(frame["hypothesis"]) == ["a"] and frame["kept"][0] == 1.0
    fig = r.plot()
    assert list(fig.data[0].x) == ["clean", "a"]


# --------------------------------------------------------------------------------------------------------------
# errors


def _one(rule):
    return Hypothesis("h", (rule,))


def test_unknown_site_names_the_real_ones(x):
    with pytest.raises(SiteError, match="hidden"):
        scrub(Reads([1.0, 0.0]), x, _one(Resample("hiden", random_donors())), progress=False)


def test_units_out_of_range(x):
    with pytest.raises(SiteError, match=r"\[0, 2\)"):
        scrub(Reads([1.0, 0.0]), x, _one(Resample("hidden", random_donors(), units=[2])), progress=False)


@pytest.mark.parametrize(
    "basis, message",
    [(torch.eye(3), "must be \\[2, 2\\]"), (torch.tensor([[1.0, 2.0], [2.0, 4.0]]), "singular")],
)
def test_bad_basis(x, basis, message):
    with pytest.raises(InputError, match=message):
        scrub(Reads([1.0, 0.0]), x, _one(Resample("hidden", random_donors(), basis=basis)), progress=False)


def test_at_must_index_middle_axes(x):
    with pytest.raises(InputError, match="middle axes"):
        scrub(Reads([1.0, 0.0]), x, _one(Resample("hidden", random_donors(), at=(0,))), progress=False)
    x3 = torch.randn(10, 3, 2)
    with pytest.raises(InputError, match="ints or slices"):
        scrub(Positions(), x3, _one(Resample("hidden", random_donors(), at=([0, 1],))), progress=False)
    with pytest.raises(SiteError, match="out of range"):
        scrub(Positions(), x3, _one(Resample("hidden", random_donors(), at=(3,))), progress=False)


def test_sampler_built_for_other_inputs(x):
    with pytest.raises(InputError, match="built for 5 inputs"):
        scrub(Reads([1.0, 0.0]), x, _one(Resample("hidden", same_value(torch.arange(5)))), progress=False)
    with pytest.raises(InputError, match="donors must be"):
        scrub(
            Reads([1.0, 0.0]),
            x,
            _one(Resample("hidden", fixed_donors(torch.full((2000,), 2000)))),
            progress=False,
        )


def test_bad_hypotheses_and_inputs(x):
    model = Reads([1.0, 0.0])
    rule = Resample("hidden", random_donors())
    with pytest.raises(InputError, match="at least one"):
        scrub(model, x, [], progress=False)
    with pytest.raises(InputError, match="unique"):
        scrub(model, x, [_one(rule), _one(rule)], progress=False)
    with pytest.raises(InputError, match="batch-first"):
        scrub(model, [[1.0, 2.0]], _one(rule), progress=False)
    with pytest.raises(InputError, match="DonorSampler"):
        scrub(model, x, _one(Resample("hidden", "random")), progress=False)
    with pytest.raises(InputError, match="one score per input"):
        scrub(model, x, _one(rule), metric=lambda c, p: (c == p).float(), progress=False)


def test_sampler_argument_checks():
    with pytest.raises(InputError, match="NaN"):
        nearest_value(torch.tensor([0.0, float("nan")]))
    with pytest.raises(InputError, match="non-negative"):
        nearest_value(torch.tensor([0.0, 1.0]), noise=-1.0)
    with pytest.raises(InputError, match="integer"):
        fixed_donors(torch.tensor([0.5]))
    with pytest.raises(InputError, match=r"\[n\] or \[n, k\]"):
        same_value(torch.zeros(2, 2, 2))


def test_tuple_output_site_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a tensor"):
        scrub(TupleOut(), torch.randn(4, 2), _one(Resample("pair", random_donors())), progress=False)
