"""Exact k-smallest selection against a sorting oracle."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from signmask import _select
from signmask._select import smallest_k


def _oracle(scores, alive, k):
    """Stable sort of (score, tensor index, flat index) over alive entries: the first k."""
    entries = []
    for i, (s, a) in enumerate(zip(scores, alive)):
        flat_s, flat_a = s.reshape(-1).tolist(), a.reshape(-1).tolist()
        entries += [(v, i, j) for j, (v, on) in enumerate(zip(flat_s, flat_a)) if on]
    chosen = sorted(entries)[:k]
    out = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    for _, i, j in chosen:
        out[i][j] = True
    return [o.view_as(s) for o, s in zip(out, scores)]


# Distinct in float64 only: equal, underflowing or overflowing once rounded to float32.
FLOAT64_ONLY = [1.0, 1.0 + 2e-12, 1.0 + 1e-12, 1e-50, 1e-60, 1e39, 1e300, 5e-324]


@st.composite
def problems(draw, dtype=torch.float32):
    n = draw(st.integers(1, 4))
    scores, alive = [], []
    for _ in range(n):
        numel = draw(st.integers(1, 40))
        # Few distinct values force many ties; floats cover the bit-pattern ordering.
        values = st.sampled_from([0.0, 1e-30, 0.5, 1.0, 1.5, 3.0e5, 7.25]) | st.floats(0, 1e6)
        if dtype == torch.float64:
            values = values | st.sampled_from(FLOAT64_ONLY) | st.floats(0, 1e308)
        vals = draw(st.lists(values, min_size=numel, max_size=numel))
        scores.append(torch.tensor(vals, dtype=dtype))
        alive.append(torch.tensor(draw(st.lists(st.booleans(), min_size=numel, max_size=numel))))
    total = int(sum(a.sum() for a in alive))
    return scores, alive, draw(st.integers(0, total))


@settings(max_examples=200, deadline=None)
@given(problems())
def test_selects_exactly_k_like_a_stable_sort(problem):
    scores, alive, k = problem
    got = smallest_k(lambda i: scores[i], alive, k)
    assert sum(int(g.sum()) for g in got) == k
    for g, a in zip(got, alive):
        assert not (g & ~a).any()
    for g, want in zip(got, _oracle(scores, alive, k)):
        assert torch.equal(g, want)


@settings(max_examples=200, deadline=None)
@given(problems(torch.float64))
def test_float64_scores_select_exactly_like_a_stable_sort(problem):
    scores, alive, k = problem
    got = smallest_k(lambda i: scores[i], alive, k, wide=True)
    for g, want in zip(got, _oracle(scores, alive, k)):
        assert torch.equal(g, want)


def test_float64_values_that_float32_merges_are_ranked_apart():
    scores = [torch.tensor(FLOAT64_ONLY, dtype=torch.float64)]
    alive = [torch.ones(len(FLOAT64_ONLY), dtype=torch.bool)]
    for k in range(len(FLOAT64_ONLY) + 1):
        assert torch.equal(smallest_k(lambda i: scores[i], alive, k, wide=True)[0], _oracle(scores, alive, k)[0])


def test_negative_zero_ties_with_zero():
    scores = [torch.tensor([-0.0, 0.0, 1.0]).abs()]
    got = smallest_k(lambda i: scores[i], [torch.ones(3, dtype=torch.bool)], 1)
    assert got[0].tolist() == [True, False, False]


def test_rejects_nan_scores_naming_the_tensor():
    scores = [torch.tensor([1.0, float("nan")])]
    try:
        smallest_k(lambda i: scores[i], [torch.ones(2, dtype=torch.bool)], 1, names=["fc.weight"])
    except ValueError as e:
        assert "fc.weight" in str(e)
    else:
        raise AssertionError("NaN scores were accepted")


def test_rejects_k_out_of_range():
    scores = [torch.ones(3)]
    for k in (-1, 3):
        alive = [torch.tensor([True, True, False])]
        try:
            smallest_k(lambda i: scores[i], alive, k)
        except ValueError as e:
            assert "2 alive" in str(e)
        else:
            raise AssertionError(f"k={k} accepted")


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_inf_scores_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        smallest_k(lambda i: torch.tensor([1.0, float("inf"), 2.0]), [torch.ones(3, dtype=torch.bool)], 1)


def test_selecting_every_alive_entry_returns_new_tensors():
    alive = [torch.tensor([True, False, True]), torch.tensor([[True, True]])]
    got = smallest_k(lambda i: torch.zeros(alive[i].shape), alive, 4)
    assert all(g is not a and torch.equal(g, a) for g, a in zip(got, alive))
    got[0].zero_()
    assert alive[0].tolist() == [True, False, True]


def test_signed_scores_are_ranked_by_absolute_value():
    # The contract says scores are ranked by |score|: the sign bit (even of -0.0) is not in the key.
    scores = [torch.tensor([-3.0, 2.0, -1.0, -0.0, 0.5])]
    alive = [torch.ones(5, dtype=torch.bool)]
    for k in range(6):
        got = smallest_k(lambda i: scores[i], alive, k)
        assert torch.equal(got[0], _oracle([scores[0].abs()], alive, k)[0]), k


def test_float64_inf_scores_are_refused_in_wide_mode():
    # 64-bit keys have their own +inf prefix (0x7FF0): an inf weight must not just rank last.
    scores = torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or inf"):
        smallest_k(lambda i: scores, [torch.ones(3, dtype=torch.bool)], 1, wide=True)


# ------------------------------------ the tie cut, counted slice by slice (no full-size cumsum)


def _cumsum_cut(flags, n):
    """The cut smallest_k used to make: the True entries whose running count is at most n."""
    return flags & (flags.reshape(-1).cumsum(0).view_as(flags) <= n)


@settings(max_examples=200, deadline=None)
@given(flags=st.lists(st.booleans(), min_size=1, max_size=60), data=st.data(),
       chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]))
def test_prefix_end_cuts_where_the_running_count_reaches_n(flags, data, chunk):
    t = torch.tensor(flags)
    if not t.any():
        return
    n = data.draw(st.integers(1, int(t.count_nonzero())))
    with mock.patch.object(_select, "_CHUNK", chunk):
        end = _select.prefix_end(t, n)
    cut = t.clone()
    cut[end:] = False
    assert torch.equal(cut, _cumsum_cut(t, n))
    assert t[end - 1]  # the shortest such prefix: it ends on the n-th True


# Few distinct magnitudes (both signs, a subnormal) force many exact ties in either dtype.
TIED = [0.0, -0.0, 2.0**-130, 0.5, -0.5, 1.0, -1.0, 3.0]


@st.composite
def tied_problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    scores, alive = [], []
    for _ in range(draw(st.integers(1, 3))):
        rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        vals = draw(st.lists(st.sampled_from(TIED), min_size=rows * cols, max_size=rows * cols))
        s = torch.tensor(vals).view(rows, cols).to(dtype)
        a = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols)))
        a = a.view(rows, cols)
        if draw(st.booleans()):  # strided (transposed) tensors rank in row-major order too
            s, a = s.t(), a.t()
        scores.append(s)
        alive.append(a)
    total = int(sum(a.count_nonzero() for a in alive))
    return scores, alive, draw(st.integers(0, total)), draw(st.sampled_from([1, 3, 1 << 20]))


@settings(max_examples=300, deadline=None)
@given(tied_problems())
def test_heavy_ties_in_fp32_and_bf16_select_like_a_stable_sort(problem):
    scores, alive, k, chunk = problem
    with mock.patch.object(_select, "_CHUNK", chunk):
        got = smallest_k(lambda i: scores[i], alive, k)
    want = _oracle([s.float().abs() for s in scores], alive, k)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_ties_spanning_many_slices_select_like_a_stable_sort():
    # bf16 has few distinct magnitudes: millions of entries tie, across several 2**20-entry slices.
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(shape, generator=gen).bfloat16() for shape in ((1500, 1500), (3, 2**20))]
    scores[1][:, : 2**19] = 0.5  # one value tied 1.5M times
    alive = [torch.rand(s.shape, generator=gen) < 0.9 for s in scores]
    keys = torch.cat([torch.where(a, s.double().abs(), torch.inf).reshape(-1)
                      for s, a in zip(scores, alive)])
    sizes = [s.numel() for s in scores]
    bound = int((keys < 0.5).count_nonzero())  # entries ranked before the tied 0.5s
    for k in (bound + 1, bound + 700_000, bound + 1_400_000, 3_000_000):
        want = torch.zeros(keys.numel(), dtype=torch.bool)
        want[torch.argsort(keys, stable=True)[:k]] = True
        got = smallest_k(lambda i: scores[i], alive, k)
        for g, w in zip(got, want.split(sizes)):
            assert torch.equal(g.reshape(-1), w)


def test_prefix_end_names_the_count_asked_for_when_short():
    flags = torch.tensor([True, False, True, True])
    assert _select.prefix_end(flags, 3) == 4
    with pytest.raises(ValueError, match="fewer than 5 True entries"):
        _select.prefix_end(flags, 5)
