"""The argument checks every public function shares (signmask/_checks.py)."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from signmask import _checks


@given(st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-(2**70), max_value=2**70))
def test_check_int_takes_exactly_the_integers_from_its_minimum(value, minimum):
    if value >= minimum:
        assert _checks.check_int(value, "n", minimum=minimum) == value
    else:
        with pytest.raises(ValueError, match=f"n must be an int >= {minimum}, got {value}$"):
            _checks.check_int(value, "n", minimum=minimum)


@pytest.mark.parametrize("value", [np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor([3], dtype=torch.int16)])
def test_check_int_gives_a_plain_int_for_numpy_and_tensor_integers(value):
    # Plain ints: numpy ints and tensors do not pass torch.load(weights_only=True) or JSON.
    got = _checks.check_int(value, "rounds", minimum=1)
    assert type(got) is int and got == 3


@pytest.mark.parametrize("value", [
    True, False, np.True_,  # bool would read as 1
    2.0, "2", None, torch.tensor(2.0), torch.tensor([1, 2]), torch.tensor(True),
])
def test_check_int_refuses_what_is_no_integer_by_name(value):
    # The value as Python shows it (numpy >= 2 shows np.True_ as "np.True_", older as "True").
    text = f"points must be an int, got {type(value).__name__} {value!r}"
    with pytest.raises(TypeError, match=f"^{re.escape(text)}$"):
        _checks.check_int(value, "points", minimum=0)


@pytest.mark.parametrize("low_open, high_open, accepted", [
    (False, False, [0.0, 0.5, 1.0]), (True, False, [0.5, 1.0]), (False, True, [0.0, 0.5]), (True, True, [0.5]),
])
def test_check_real_honours_each_open_end(low_open, high_open, accepted):
    for value in (0.0, 0.5, 1.0):
        if value in accepted:
            assert _checks.check_real(value, "p", low=0, high=1, low_open=low_open, high_open=high_open) == value
        else:
            text = f"p must be a finite number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}"
            with pytest.raises(ValueError, match=f"^{re.escape(text)}$"):
                _checks.check_real(value, "p", low=0, high=1, low_open=low_open, high_open=high_open)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_real_refuses_what_is_not_finite_even_unbounded(value):
    with pytest.raises(ValueError, match="x must be a finite number in"):
        _checks.check_real(value, "x")


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, math.nan])
def test_check_fraction_refuses_the_ends_and_beyond(value):
    with pytest.raises(ValueError, match=r"^sparsity must be a finite number in \(0, 1\), got"):
        _checks.check_fraction(value, "sparsity")


@pytest.mark.parametrize("value, name", [(True, "bool"), (False, "bool"), ("0.2", "str")])
def test_check_fraction_refuses_a_bool_or_string_by_type(value, name):
    # bool is a numbers.Real (True == 1.0): refused by its type, not read as a number.
    with pytest.raises(TypeError, match=f"^rate must be a real number, got {name}"):
        _checks.check_fraction(value, "rate")


def test_check_fraction_gives_a_plain_float():
    got = _checks.check_fraction(np.float32(0.25), "rate")
    assert type(got) is float and got == 0.25


@given(st.one_of(st.text(max_size=4), st.none(), st.integers(), st.lists(st.text(max_size=2), max_size=2)))
def test_check_key_takes_exactly_the_valid_names(key):
    valid = {"b": 1, "a": 2, "": 3}
    if isinstance(key, str) and key in valid:
        assert _checks.check_key(key, valid, "kind", "thing") == key
    elif isinstance(key, str):
        expected = f"^kind={re.escape(repr(key))} is not a known thing; valid: \\['', 'a', 'b'\\]$"
        with pytest.raises(ValueError, match=expected):
            _checks.check_key(key, valid, "kind", "thing")
    else:  # no str: its kind is wrong, whatever its value (an unhashable list included)
        with pytest.raises(TypeError, match=r"^kind must be a str, one of \['', 'a', 'b'\], got "):
            _checks.check_key(key, valid, "kind", "thing")


@pytest.mark.parametrize("value", [True, np.False_, torch.tensor(True), torch.tensor([False])])
def test_check_bool_takes_python_numpy_and_one_element_tensor_bools(value):
    got = _checks.check_bool(value, "dense")
    assert type(got) is bool and got == bool(value)


@pytest.mark.parametrize("value", [torch.tensor([True, False]), torch.zeros(0, dtype=torch.bool), torch.tensor(1)])
def test_check_bool_refuses_a_tensor_of_other_than_one_bool_by_type(value):
    # bool() of several elements raises RuntimeError; of an int tensor it reads 1 as True.
    text = f"biases must be a bool, got torch.Tensor {value!r}"
    with pytest.raises(TypeError, match=f"^{re.escape(text)}$"):
        _checks.check_bool(value, "biases")


def _torchscript(how: str) -> torch.jit.ScriptModule:
    import signmask

    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    if how == "trace of a pruned model":
        return torch.jit.trace(signmask.prune(net, 0.5), torch.randn(2, 6))
    return torch.jit.trace(net, torch.randn(2, 6)) if how == "trace" else torch.jit.script(net)


@pytest.mark.parametrize("how", ["trace", "script", "trace of a pruned model"])
@pytest.mark.parametrize("call", ["prune", "apply", "transfer", "load_state_dict", "set_backend", "extract", "remove"])
def test_a_torchscript_model_is_refused_by_name_and_left_untouched(call, how):
    # A shipped TorchScript model (torch.jit.load) is no eager model: its submodules are no
    # nn.Linear and its _parameters no dict. prune, apply, transfer and load_state_dict crashed
    # in AttributeError 'OrderedDictWrapper' object has no attribute 'get'; extract and remove
    # of a traced pruned model said it held nothing pruned.
    import signmask

    model = _torchscript(how)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    donor = signmask.prune(net, 0.5)
    run = {
        "prune": lambda: signmask.prune(model, 0.5),
        "apply": lambda: signmask.apply(model, "lrr", optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
        "transfer": lambda: signmask.transfer(signmask.extract(donor), model),
        "load_state_dict": lambda: signmask.load_state_dict(model, donor.state_dict()),
        "set_backend": lambda: signmask.set_backend(model, "torch"),
        "extract": lambda: signmask.extract(model),
        "remove": lambda: signmask.remove(model),
    }[call]
    text = (f"model is a TorchScript module ({type(model).__name__}), which signmask cannot change or "
            "read: call it on the eager model (before torch.jit.trace or torch.jit.script)")
    with pytest.raises(TypeError, match=f"^{re.escape(text)}$"):
        run()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_some_names_a_few_of_many_and_says_when_there_are_more():
    some = _checks.some
    assert some(["a", "b", "c"]) == "['a', 'b', 'c']"
    assert some(["a", "b", "c", "d"]) == "['a', 'b', 'c'] ..."
    assert some((n for n in "abcdef"), 5) == "['a', 'b', 'c', 'd', 'e'] ..."
    assert some([]) == "[]"
