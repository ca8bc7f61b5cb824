"""signmask.analysis.weight_correlation: R_p of Liu et al. 2021."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import signmask
from signmask import _select, analysis
from signmask.analysis._correlation import top_k_mask

from _util import Wrapper, tiny


def linear(values):
    """A bias-free Linear holding ``values`` (a 2-D tensor) as its weight."""
    net = nn.Linear(values.shape[1], values.shape[0], bias=False)
    with torch.no_grad():
        net.weight.copy_(values)
    return net


def test_a_network_with_itself_is_exactly_one():
    for p in (0.01, 0.1, 0.33, 0.5, 1.0):
        c = analysis.weight_correlation(tiny(0), tiny(0), p)
        assert c.overall == 1.0
        assert all(v == 1.0 or (math.isnan(v) and c.kept[k] == 0) for k, v in c.layers.items())
    # a pruned network is read from its _orig values: the same as the dense one
    assert analysis.weight_correlation(signmask.prune(tiny(0), 0.9), tiny(0), 0.2).overall == 1.0


def test_independent_inits_are_near_p():
    p, n = 0.2, 10_000
    torch.manual_seed(0)
    a, b = nn.Linear(100, 100), nn.Linear(100, 100)
    c = analysis.weight_correlation(a, b, p)
    k = round(p * n)
    mean = k * k / n  # hypergeometric: k draws from n with k successes
    sd = math.sqrt(k * (k / n) * (1 - k / n) * (n - k) / (n - 1))
    assert abs(c.shared["weight"] - mean) < 4 * sd
    assert abs(c.overall - p) < 4 * sd / k


def test_against_a_set_oracle_over_layers():
    a, b = tiny(0), tiny(1)
    p = 0.3
    c = analysis.weight_correlation(a, b, p)
    shared = kept = 0
    for name in ("conv1", "conv2", "fc"):
        wa, wb = getattr(a, name).weight.flatten().tolist(), getattr(b, name).weight.flatten().tolist()
        k = round(p * len(wa))
        top = lambda w: set(sorted(range(len(w)), key=lambda i: (-abs(w[i]), i))[:k])  # noqa: E731
        shared += len(top(wa) & top(wb))
        kept += k
        assert c.shared[f"{name}.weight"] == len(top(wa) & top(wb))
    assert c.overall == shared / kept
    assert c.numel == {"conv1.weight": 162, "conv2.weight": 324, "fc.weight": 30}


def test_agrees_with_liu_normalization_when_p_times_n_is_whole():
    c = analysis.weight_correlation(tiny(0), tiny(1), 0.5, names=["conv1.weight", "conv2.weight"])
    assert c.overall == sum(c.shared.values()) / (0.5 * (162 + 324))


def test_ties_break_by_lower_flat_index():
    assert top_k_mask(torch.tensor([1.0, -1.0, 1.0, 0.5]), 2).tolist() == [True, True, False, False]
    assert top_k_mask(torch.tensor([[0.0, -0.0], [0.0, 2.0]]), 2).tolist() == [[True, False], [False, True]]
    a = linear(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    b = linear(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert analysis.weight_correlation(a, b, 0.5).overall == 0.0  # a keeps entries 0, 1; b keeps 2, 3


weights_2d = st.integers(1, 6).flatmap(lambda rows: st.integers(1, 6).flatmap(
    lambda cols: st.tuples(*[st.lists(st.integers(-3, 3), min_size=rows * cols, max_size=rows * cols)] * 2)
    .map(lambda pair, r=rows, c=cols: tuple(torch.tensor(v, dtype=torch.float32).view(r, c) for v in pair))))


@settings(max_examples=60, deadline=None)
@given(pair=weights_2d, p=st.floats(0.01, 1.0))
def test_bounded_and_symmetric(pair, p):
    wa, wb = pair
    if round(p * wa.numel()) == 0:
        with pytest.raises(ValueError, match="keeps no weight"):
            analysis.weight_correlation(linear(wa), linear(wb), p)
        return
    ab = analysis.weight_correlation(linear(wa), linear(wb), p)
    ba = analysis.weight_correlation(linear(wb), linear(wa), p)
    assert 0.0 <= ab.overall <= 1.0
    assert ab.overall == ba.overall and ab.shared == ba.shared
    assert analysis.weight_correlation(linear(wa), linear(wa), p).overall == 1.0


def test_validation():
    with pytest.raises(ValueError, match=r"p must be a finite number in \(0.0, 1.0\]"):
        analysis.weight_correlation(tiny(0), tiny(1), 0.0)
    with pytest.raises(ValueError, match="p must"):
        analysis.weight_correlation(tiny(0), tiny(1), 1.5)
    with pytest.raises(TypeError, match="p must"):
        analysis.weight_correlation(tiny(0), tiny(1), "0.5")
    with pytest.raises(ValueError, match=r"conv1\.weight.*shape"):
        analysis.weight_correlation(tiny(0), tiny(1, width=8), 0.5)
    with pytest.raises(ValueError, match="differ"):
        analysis.weight_correlation(tiny(0), nn.Linear(6, 5), 0.5)
    with pytest.raises(ValueError, match="not conv/linear weights"):
        analysis.weight_correlation(tiny(0), tiny(1), 0.5, names=["bn1.weight"])
    broken = tiny(1)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'fc\.weight' of model_b holds NaN"):
        analysis.weight_correlation(tiny(0), broken, 0.5)
    with pytest.raises(ValueError, match="kept"):
        analysis.Correlation(0.5, {"w": 4}, {"w": 3}, {"w": 1})
    with pytest.raises(ValueError, match="shared"):
        analysis.Correlation(0.5, {"w": 4}, {"w": 2}, {"w": 3})


# ---------------------------------- analysis._correlation: behaviour pinned by mutation testing


def test_top_k_mask_breaks_ties_by_lower_index_in_large_tensors():
    # K01: argsort without stable=True reorders ties once a tensor has ~100+ entries
    w = torch.zeros(300)
    w[::3] = 1.0
    w[1::3] = -1.0  # 200 entries tie at |w| = 1, in index order 0, 1, 3, 4, 6, ...
    tied = [i for i in range(300) if i % 3 != 2]
    want = torch.zeros(300, dtype=torch.bool)
    want[tied[:50]] = True
    assert torch.equal(analysis._correlation.top_k_mask(w, 50), want)


def test_correlation_refuses_shared_counts_for_other_names():
    # an extra name in shared would inflate the overall sum past 1
    with pytest.raises(ValueError, match="shared"):
        analysis.Correlation(0.5, {"w": 4}, {"w": 2}, {"w": 1, "x": 2})


def test_a_pruned_model_b_is_read_from_its_orig_values():
    # model_b's masked weight has zeros where the trained values are: R_p reads _orig on both sides
    assert analysis.weight_correlation(tiny(0), signmask.prune(tiny(0), 0.9), 0.2).overall == 1.0


@pytest.mark.parametrize("a, b, arg", [(Wrapper, tiny, "model_a"), (tiny, Wrapper, "model_b")])
def test_two_weights_with_one_canonical_name_are_refused_naming_the_model(a, b, arg):
    with pytest.raises(ValueError, match=f"in {arg}, module.fc.weight and fc.weight are different tensors"):
        analysis.weight_correlation(a(0), b(1), 0.5)


@pytest.mark.parametrize("one_shot", [lambda names: (n for n in names), iter])
def test_names_may_be_a_one_shot_iterator(one_shot):
    # model_a's and model_b's lookups both need the names: they are read once, not once per model
    a, b, names = tiny(0), tiny(1), ["fc.weight", "conv1.weight"]
    got = analysis.weight_correlation(a, b, 0.3, names=one_shot(names))
    assert got == analysis.weight_correlation(a, b, 0.3, names=names)
    assert got.numel == {"fc.weight": 30, "conv1.weight": 162}


def _argsort_marks(weight, k):
    """The previous top_k_mask: a stable descending sort of |w|, the first k marked."""
    flat = weight.detach().reshape(-1).abs()
    marked = torch.zeros(flat.shape, dtype=torch.bool)
    marked[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return marked.view(weight.shape)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), rows=st.integers(1, 6), cols=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       transpose=st.booleans(), chunk=st.sampled_from([1, 3, 1 << 20]))
def test_top_k_mask_marks_what_a_stable_argsort_marks_with_heavy_ties(data, rows, cols, dtype,
                                                                       transpose, chunk):
    # few magnitudes, both zeros and a subnormal: most entries tie with others
    vals = data.draw(st.lists(st.sampled_from([0.0, -0.0, 1e-40, 0.5, -0.5, 2.0, -2.0, 3.0]),
                              min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(vals).view(rows, cols).to(dtype)
    w = w.t() if transpose else w  # strided: ranked in row-major order of its shape
    k = data.draw(st.integers(0, w.numel()))
    with mock.patch.object(_select, "_CHUNK", chunk):
        got = top_k_mask(w, k)
    assert got.shape == w.shape and torch.equal(got, _argsort_marks(w, k))


def test_top_k_mask_cuts_ties_spanning_many_slices_like_a_stable_argsort():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2**20, generator=gen).bfloat16()  # few magnitudes: millions of ties
    w[1] = -0.25
    for k in (1, 2**20, 2**20 + 5, 2 * 2**20 + 12345, 3 * 2**20):
        assert torch.equal(top_k_mask(w, k), _argsort_marks(w, k)), k
