"""Density schedules and rewind points: counts against direct arithmetic, errors for bad input."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from signmask import _schedule


@example(total=1000, sparsity=0.99, rate=0.05)  # compounded counts repeat near the end
@given(
    total=st.integers(1000, 10**7),
    sparsity=st.floats(0.01, 0.99),
    rate=st.floats(0.05, 0.95),
)
def test_kept_schedule_lands_on_target(total, sparsity, rate):
    steps = _schedule.prune_count(sparsity, rate, None)
    kept = _schedule.kept_schedule(total, sparsity, rate, steps)
    final = round(total * (1 - sparsity))
    compounded = [round(total * (1 - rate) ** i) for i in range(1, steps)] + [final]
    # Every step but the last keeps the rate of the initial count compounded; a step whose count
    # repeats the previous one is dropped, so every step prunes something.
    assert set(kept) == {k for k in compounded if k >= final} - {total} and kept[-1] == final
    assert all(a > b for a, b in zip([total] + kept, kept))
    assert len(kept) <= steps
    # One step fewer would not reach the target.
    assert steps == 1 or (1 - rate) ** (steps - 1) > 1 - sparsity - 1e-9


def test_prune_count_examples():
    assert _schedule.prune_count(0.8, 0.2, None) == 8  # 0.8**7 = 0.2097
    assert _schedule.prune_count(0.36, 0.2, None) == 2  # exactly 0.8**2 = 0.64 density
    assert _schedule.prune_count(0.965, 0.2, None) == 16
    assert _schedule.prune_count(0.9, None, 3) == 3


def test_steps_that_would_prune_nothing_are_dropped():
    # 516 * 0.8 ** 3 = 264.2 and 516 * (1 - 0.4887) = 263.8 both round to 264.
    assert _schedule.prune_count(0.4887, 0.2, None) == 4
    assert _schedule.kept_schedule(516, 0.4887, 0.2, 4) == [413, 330, 264]
    # Few weights, small rate: 10 * 0.95 ** i rounds to 10, 9, 9, 8, 8, 7, ...
    assert _schedule.kept_schedule(10, 0.5, 0.05, 14) == [9, 8, 7, 6, 5]


def test_even_steps_when_only_rounds_given():
    kept = _schedule.kept_schedule(10_000, 0.875, None, 3)
    assert kept == [5000, 2500, 1250]


@example(total=10, sparsity=0.5, rounds=5)  # every round prunes exactly one weight
@example(total=100, sparsity=0.99, rounds=90)  # even shares round to repeated counts near 1
@given(total=st.integers(2, 10**6), sparsity=st.floats(0.01, 0.999), rounds=st.integers(1, 200))
def test_given_rounds_each_prune_a_weight_or_are_refused(total, sparsity, rounds):
    final = round(total * (1 - sparsity))
    if not 1 <= final < total:
        return  # refused for the sparsity itself, tested elsewhere
    if rounds > total - final:
        with pytest.raises(ValueError, match=f"rounds={rounds} prunings cannot each prune a weight"):
            _schedule.kept_schedule(total, sparsity, None, rounds)
        return
    kept = _schedule.kept_schedule(total, sparsity, None, rounds)
    assert len(kept) == rounds and kept[-1] == final
    assert all(a > b for a, b in zip([total] + kept, kept))  # every round prunes something
    rate = 1 - (1 - sparsity) ** (1 / rounds)  # the even share, computed as documented
    even = [round(total * (1 - rate) ** i) for i in range(1, rounds)] + [final]
    if all(a > b for a, b in zip([total] + even, even)):
        assert kept == even  # the even shares themselves wherever rounding repeats none


@pytest.mark.parametrize(
    "spec, spe, step",
    [("init", None, 0), ("500it", None, 500), ("2ep", 30, 60), ("1ep50it", 100, 150), (7, None, 7), (None, None, None)],
)
def test_parse_rewind(spec, spe, step):
    assert _schedule.parse_rewind(spec, spe) == step


@pytest.mark.parametrize(
    "spec, spe, error, text",
    [
        ("2ep", None, ValueError, "pass steps_per_epoch="),
        ("ep", 10, ValueError, "cannot read rewind point 'ep'"),
        ("500", None, ValueError, "cannot read rewind point '500'"),
        ("it50ep", 10, ValueError, "cannot read rewind point"),
        ("", None, ValueError, "cannot read rewind point ''"),
        # `$` matched before a final newline: "2it\n" was read as step 2 and went into the
        # ticket's metadata as it was, while "2it " was refused
        ("2it\n", None, ValueError, r"cannot read rewind point '2it\\n'"),
        ("\u0661\u0662it", None, ValueError, "cannot read rewind point"),  # Arabic-Indic digits
        (-1, None, ValueError, "rewind must be a step >= 0, got -1"),
        (1.5, None, TypeError, "rewind must be a str or an int step, got float 1.5"),
        ("1ep", 0, ValueError, "steps_per_epoch must be an int >= 1, got 0"),
        ("500it", "abc", TypeError, "steps_per_epoch must be an int, got str 'abc'"),
        (None, -3, ValueError, "steps_per_epoch must be an int >= 1, got -3"),
    ],
)
def test_parse_rewind_errors(spec, spe, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        _schedule.parse_rewind(spec, spe)


@pytest.mark.parametrize("rounds, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_rounds_must_be_positive_int(rounds, error):
    with pytest.raises(error, match="rounds must be an int"):
        _schedule.prune_count(0.5, None, rounds)


def test_parse_rewind_returns_a_plain_int_for_numpy_steps_per_epoch():
    np = pytest.importorskip("numpy")
    step = _schedule.parse_rewind("2ep", np.int64(3))
    assert step == 6 and type(step) is int  # numpy ints would not load with weights_only=True


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_an_exact_power_does_not_ask_for_one_more_step():
    assert _schedule.prune_count(0.51, 0.3, None) == 2  # 1 - 0.51 = 0.7 ** 2


@pytest.mark.parametrize("rate, rounds", [(0.2, 8), (None, 3)])
def test_a_sparsity_that_keeps_no_weight_or_prunes_none_is_refused(rate, rounds):
    # 10 * (1 - 0.96) = 0.4 rounds to 0 kept; 10 * (1 - 0.04) = 9.6 rounds to all 10 kept.
    with pytest.raises(ValueError, match="sparsity=0.96 keeps no weight of 10"):
        _schedule.kept_schedule(10, 0.96, rate, rounds)
    with pytest.raises(ValueError, match=r"sparsity=0.04 prunes no weight of 10 \(rounded\)"):
        _schedule.kept_schedule(10, 0.04, rate, rounds)
    assert _schedule.kept_schedule(10, 0.9, rate, 1) == [1]  # the fewest kept that is allowed


def test_a_tiny_sparsity_still_takes_one_pruning_step():
    assert _schedule.prune_count(1e-12, 0.99, None) == 1
    assert _schedule.prune_count(0.5, 0.999999, None) == 1


@pytest.mark.parametrize("spec", [True, False])
def test_a_bool_rewind_is_not_read_as_a_step(spec):
    # bool is a numbers.Integral: rewind=True must not mean step 1.
    with pytest.raises(TypeError, match="rewind must be a str or an int step, got bool"):
        _schedule.parse_rewind(spec, None)


def test_int_step_zero_is_the_init_rewind():
    assert _schedule.parse_rewind(0, None) == _schedule.parse_rewind("init", None) == 0


def test_a_numpy_int_step_is_read_as_a_plain_int():
    np = pytest.importorskip("numpy")
    step = _schedule.parse_rewind(np.int64(5), None)
    assert step == 5 and type(step) is int  # numpy ints would not load with weights_only=True


def test_zero_epochs_still_count_epochs():
    # The spec names epochs, so it needs steps_per_epoch even when their count is 0.
    with pytest.raises(ValueError, match="rewind='0ep5it' counts epochs; pass steps_per_epoch="):
        _schedule.parse_rewind("0ep5it", None)
    assert _schedule.parse_rewind("0ep5it", 10) == 5
