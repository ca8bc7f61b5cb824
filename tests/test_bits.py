"""Bit packing: round trips, ternary bytes and the sign-bit table against plain per-element loops."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from signmask import _bits


def _loop_pack(codes, width):
    """The documented layout, element by element: code i at bit (i % per_byte) * width of byte i // per_byte."""
    per_byte = 8 // width
    out = [0] * ((len(codes) + per_byte - 1) // per_byte)
    for i, c in enumerate(codes):
        out[i // per_byte] |= c << ((i % per_byte) * width)
    return out


@settings(max_examples=100, deadline=None)
@given(width=st.sampled_from([1, 2]), data=st.data())
def test_pack_matches_the_documented_layout_and_round_trips(width, data):
    codes = data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=1, max_size=70))
    packed = _bits.pack(torch.tensor(codes), width)
    assert packed.dtype == torch.uint8 and packed.tolist() == _loop_pack(codes, width)
    assert _bits.unpack(packed, len(codes), width).tolist() == codes


@pytest.mark.parametrize(
    "pack, codes",
    [
        (lambda c: _bits.pack(c, 1), [0, 1, 2]),
        (lambda c: _bits.pack(c, 2), [3, 4]),
        (lambda c: _bits.pack(c, 2), [0, -1]),
        (_bits.pack_ternary, [0, 1, 2, 3]),
        (_bits.pack_ternary, [-1, 0]),
    ],
)
def test_packers_refuse_codes_that_would_spill_into_their_neighbours(pack, codes):
    with pytest.raises(ValueError, match=r"codes must lie in \[0, \d\), found values in"):
        pack(torch.tensor(codes))


def test_packers_accept_empty_and_bool_input():
    assert _bits.pack(torch.zeros(0, dtype=torch.int64), 2).numel() == 0
    assert _bits.pack_ternary(torch.zeros(0, dtype=torch.int64)).numel() == 0
    assert _bits.pack(torch.tensor([True, False, True]), 1).tolist() == [0b101]


def _loop_pack_ternary(codes):
    """The documented layout, element by element: code i adds c * 3**(i % 5) to byte i // 5."""
    out = [0] * ((len(codes) + 4) // 5)
    for i, c in enumerate(codes):
        out[i // 5] += c * 3 ** (i % 5)
    return out


@settings(max_examples=100, deadline=None)
@given(codes=st.lists(st.integers(0, 2), min_size=1, max_size=70))
def test_pack_ternary_matches_the_documented_layout_and_round_trips(codes):
    packed = _bits.pack_ternary(torch.tensor(codes))
    assert packed.dtype == torch.uint8 and packed.tolist() == _loop_pack_ternary(codes)
    assert _bits.unpack_ternary(packed, len(codes)).tolist() == codes


def test_every_valid_ternary_byte_round_trips():
    valid = torch.arange(243, dtype=torch.uint8)
    codes = _bits.unpack_ternary(valid, 5 * 243)
    assert int(codes.max()) <= 2
    assert torch.equal(_bits.pack_ternary(codes), valid)


def test_every_ternary_byte_above_242_unpacks_as_invalid_codes():
    invalid = torch.arange(243, 256, dtype=torch.uint8)
    codes = _bits.unpack_ternary(invalid, 5 * 13)
    assert (codes == _bits.CODE_INVALID).all()


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_sign_bits_equal_the_packed_negatives(shape, data):
    numel = int(torch.tensor(shape).prod())
    negative = torch.tensor(data.draw(st.lists(st.booleans(), min_size=numel, max_size=numel))).view(shape)
    bits = _bits.sign_bits(_bits.pack_signs(negative), torch.Size(shape))
    assert bits.dtype == torch.int8 and bits.shape == negative.shape
    assert torch.equal(bits, negative.to(torch.int8))


def test_signed_codes_round_trip():
    signed = torch.tensor([-1, 0, 1, 1, -1], dtype=torch.int8)
    codes = _bits.signed_to_codes(signed)
    assert codes.tolist() == [_bits.CODE_NEG, _bits.CODE_PRUNED, _bits.CODE_POS, _bits.CODE_POS, _bits.CODE_NEG]
    assert torch.equal(_bits.codes_to_signed(codes), signed)


def test_the_cached_sign_table_is_a_normal_tensor_when_first_built_in_inference_mode():
    # Built under torch.inference_mode(), an inference tensor would be cached for good, and
    # autograd refuses to save those for backward.
    _bits._table.cache_clear()
    try:
        with torch.inference_mode():
            first = _bits._table(torch.device("cpu"))
        assert not first.is_inference() and _bits._table(torch.device("cpu")) is first
    finally:
        _bits._table.cache_clear()


def test_compiled_sign_lookups_build_their_table_without_the_cache(monkeypatch):
    # Dynamo ignores lru_cache wrappers (it warns and traces the body), so compiled code must
    # build the table itself and never reach the cached one.
    def cached(device):
        raise AssertionError("the lru_cache'd table was used while compiling")

    monkeypatch.setattr(_bits, "_table", cached)
    negative = torch.tensor([True, False, True, True, False, False, True, False, True]).view(3, 3)
    packed = _bits.pack_signs(negative)
    torch._dynamo.reset()
    bits = torch.compile(lambda p: _bits.sign_bits(p, negative.shape), backend="eager", fullgraph=True)
    assert torch.equal(bits(packed), negative.to(torch.int8))


def test_sign_lookups_under_fake_tensors_leave_the_cached_table_real():
    # A first lookup under FakeTensorMode (shape propagation, make_fx) built the table there and
    # cached a FakeTensor: every later sign-locked forward of any model got data-less bits.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    negative = torch.tensor([True, False, True, True, False, False, True, False, True]).view(3, 3)
    packed = _bits.pack_signs(negative)
    _bits._table.cache_clear()
    try:
        with FakeTensorMode() as mode:
            fake = _bits.sign_bits(mode.from_tensor(packed), negative.shape)
        assert isinstance(fake, FakeTensor)
        bits = _bits.sign_bits(packed, negative.shape)
        assert not isinstance(bits, FakeTensor) and torch.equal(bits, negative.to(torch.int8))
    finally:
        _bits._table.cache_clear()


def _old_signed_to_codes(signed):  # the previous implementation, through int64
    return torch.where(signed < 0, _bits.CODE_NEG, signed.to(torch.int64)).to(torch.uint8)


def _old_codes_to_signed(codes):
    return torch.where(codes == _bits.CODE_NEG, -1, codes.to(torch.int64)).to(torch.int8)


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=60), data=st.data())
def test_signed_codes_in_int8_equal_the_int64_mapping(vals, data):
    signed = torch.tensor(vals, dtype=torch.int8)
    if len(vals) % 6 == 0 and data.draw(st.booleans()):
        signed = signed.view(6, -1).t()  # strided input maps entry by entry too
    for given_dtype in (torch.int8, torch.int64):
        codes = _bits.signed_to_codes(signed.to(given_dtype))
        want = _old_signed_to_codes(signed.to(given_dtype))
        assert codes.dtype == torch.uint8 and torch.equal(codes, want)
        back = _bits.codes_to_signed(codes)
        assert back.dtype == torch.int8 and torch.equal(back, _old_codes_to_signed(codes))
        assert torch.equal(back, signed)


@settings(max_examples=100, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=0, max_size=90), start=st.integers(0, 9), data=st.data())
def test_packed_signs_match_the_documented_layout_at_any_length_offset_and_layout(bits, start, data):
    # The int64 folds read 8 bools at a time: a tail of fewer, a view not starting on an 8-byte
    # boundary and a non-contiguous tensor must pack as the element-by-element layout says.
    negative = torch.tensor([False] * start + bits, dtype=torch.bool)[start:]
    assert _bits.pack_signs(negative).tolist() == _loop_pack([int(b) for b in bits], 1)
    if len(bits) >= 2 and data.draw(st.booleans()):
        rows = torch.tensor(bits[: len(bits) // 2 * 2]).view(2, -1).t()  # column-major view
        expected = _loop_pack([int(b) for b in rows.reshape(-1).tolist()], 1)
        assert _bits.pack_signs(rows).tolist() == expected


def test_same_bits_tells_signed_zeros_and_nan_payloads_apart():
    # torch.equal calls -0.0 equal to 0.0 and a NaN unequal to itself: neither tells whether a
    # tensor is the copy it was.
    a = torch.tensor([0.0, 1.5, float("nan")])
    assert _bits.same_bits(a, a.clone()) and not torch.equal(a, a.clone())
    assert not _bits.same_bits(a, torch.tensor([-0.0, 1.5, float("nan")]))
    other_nan = _bits.as_bits(a).clone()
    other_nan[2] += 1  # another NaN payload
    assert not _bits.same_bits(a, other_nan.view(torch.float32))
    z = torch.complex(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert _bits.same_bits(z, z.clone())
    assert not _bits.same_bits(z, torch.complex(torch.tensor([1.0, -0.0]), z.imag))
    assert not _bits.same_bits(a, a.double()) and not _bits.same_bits(a, a[:2])


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_same_bits_needs_the_same_dtype_not_just_the_same_bits():
    # A float and its integer view, or float16 and bfloat16, can hold identical bits.
    a = torch.tensor([0.5, -2.0, 3.25])
    assert not _bits.same_bits(a, _bits.as_bits(a)) and not _bits.same_bits(_bits.as_bits(a), a)
    h = a.half()
    assert not _bits.same_bits(h, h.view(torch.bfloat16))
    assert _bits.same_bits(_bits.as_bits(a), _bits.as_bits(a.clone()))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64])
def test_pack_signs_of_integer_zeros_and_ones_follows_the_documented_layout(dtype):
    # The int64 folds read one byte per element, true only of bools.
    bits = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    assert _bits.pack_signs(torch.tensor(bits, dtype=dtype)).tolist() == _loop_pack(bits, 1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_pack_signs_traces_and_compiles_to_the_documented_layout():
    # Neither torch.jit.trace nor dynamo can record the folds' dtype views.
    first, second = (torch.rand(3, 11, generator=torch.Generator().manual_seed(s)) > 0.5 for s in (0, 1))
    traced = torch.jit.trace(_bits.pack_signs, (first,))
    torch._dynamo.reset()
    compiled = torch.compile(_bits.pack_signs, backend="eager", fullgraph=True)
    for f in (traced, compiled):
        for negative in (first, second):
            assert f(negative).tolist() == _loop_pack([int(b) for b in negative.reshape(-1)], 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_codes_to_signed_reads_wider_integer_codes(dtype):
    codes = torch.tensor([_bits.CODE_PRUNED, _bits.CODE_POS, _bits.CODE_NEG, _bits.CODE_POS], dtype=dtype)
    signed = _bits.codes_to_signed(codes)
    assert signed.dtype == torch.int8 and torch.equal(signed, _bits.codes_to_signed(codes.to(torch.uint8)))
