"""The undo record itself (``signmask._undo``); the calls it serves test their failures."""

import contextvars

import pytest
import torch
from torch import nn

import signmask
from signmask import _bits, _maskmul, _undo
from _util import bits_equal


def test_a_call_interrupted_as_its_record_starts_saving_leaves_no_record_active(monkeypatch):
    # A Ctrl-C just after saving() made the record active, before its try: no finally reset
    # it, and every later keep() in the thread (each backward under the projection backend
    # masks the gradients through it) kept entries in the dead record, in host memory, without
    # end.
    real = _undo._ACTIVE

    class InterruptedOnce:  # the context variable, interrupted once just after a set()
        interrupted = False

        def get(self):
            return real.get()

        def reset(self, token):
            real.reset(token)

        def set(self, value):
            token = real.set(value)
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            return token

    model = signmask.prune(nn.Linear(4, 3), 0.5)
    before = model.weight_mask.clone()
    monkeypatch.setattr(_undo, "_ACTIVE", InterruptedOnce())

    def interrupted_prune():  # in a copy of the context: a record left active stays there
        with pytest.raises(KeyboardInterrupt):
            signmask.prune(model, 0.5)
        return real.get()

    assert contextvars.copy_context().run(interrupted_prune) is None
    assert torch.equal(model.weight_mask, before)


def test_values_kept_in_a_block_that_ended_are_still_put_back():
    # A Ctrl-C surfacing as saving() exits, or after it in the caller's try (transfer links the
    # parents there), has the caller restore the record: the values the block wrote must still
    # be in it, not dropped when the block ended.
    t = torch.tensor([1.5, -2.0, 3.0, 0.0])
    undo = _undo.Undo(nn.Module())
    with undo.saving():
        _undo.keep(t, torch.tensor([True, True, False, False]))
        t[:2] = 7.0
    undo.restore()
    assert t.tolist() == [1.5, -2.0, 3.0, 0.0]


def test_a_record_passed_to_the_call_around_it_is_put_back_once_or_twice_alike():
    # The inner record keeps its values and hands them to the outer one: a failure just after
    # the inner block restores both, the same entries twice.
    t = torch.tensor([1.5, -2.0, 3.0, -0.0])
    outer, inner = _undo.Undo(nn.Module()), _undo.Undo(nn.Module())
    with outer.saving():
        with inner.saving():
            _undo.keep_products([(t, torch.tensor([1, -1, 0, -1], dtype=torch.int8))])
            t.mul_(torch.tensor([1, -1, 0, -1], dtype=torch.int8))
        inner.restore()
    outer.restore()
    assert bits_equal(t, torch.tensor([1.5, -2.0, 3.0, -0.0]))


def _specials(dtype):
    """Signed zeros, infinities, NaNs of both sign bits and ordinary values, in ``dtype``."""
    nan = torch.tensor([float("nan")], dtype=dtype)
    negative_nan = _bits.as_bits(nan).bitwise_or(torch.iinfo(_bits.as_bits(nan).dtype).min).view(dtype)
    plain = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.5, -2.0, 3.0, -0.25], dtype=dtype)
    return torch.cat([plain, nan, negative_nan, torch.randn(20, generator=torch.Generator().manual_seed(0)).to(dtype)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("pattern", [(1, -1, 0), (0, 0, 0, 0, 0, -1), (1, -1)])
def test_a_product_by_int8_factors_is_put_back_whatever_part_of_it_ran(dtype, dead, pattern):
    # The sign bits are kept, not the positions negated: setting them back is right whether a
    # failure came before the multiply, inside it (a chunked one stops midway) or after it,
    # where negating the recorded positions would negate unwritten entries. The entries a 0
    # turns to zero are kept as values (dead: they are left, and compared where alive only):
    # some of them, most of them (a whole copy then), or none.
    t = _specials(dtype)
    factor = torch.tensor(pattern * 30, dtype=torch.int8)[: t.numel()]
    alive = factor != 0 if dead else torch.ones_like(factor, dtype=torch.bool)
    for stop in range(t.numel() + 1):  # the multiply ran on the first `stop` entries
        x = t.clone()
        undo = _undo.Undo(nn.Module())
        with undo.saving(dead=dead):
            _undo.keep_products([(x, factor)])
            x[:stop].mul_(factor[:stop])
        undo.restore()
        assert bits_equal(torch.where(alive, x, 0), torch.where(alive, t, 0)), stop


def test_products_sharing_a_factor_are_put_back_whatever_their_layouts():
    # A weight, its gradient (channels_last: read in row-major order, not memory order) and
    # its state share one search of the entries that change; one of them nonzero there is
    # enough for all to keep the entry. A failure after any number of the multiplies.
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 2, 2)
    mask = torch.rand(shape, generator=gen) > 0.4
    factor = torch.where(mask, torch.tensor([1, -1], dtype=torch.int8).repeat(24).view(shape), 0).to(torch.int8)
    weight = torch.randn(shape, generator=gen)
    weight[~mask] = torch.tensor([0.0, -0.0, float("nan")]).repeat(48)[: int((~mask).sum())]
    grad = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    state = torch.randn(shape, generator=gen)
    state[0] = 0.0
    originals = [weight, grad, state]
    for stop in range(4):
        tensors = [t.clone() for t in originals]
        pairs = [(tensors[0], factor), (tensors[1], factor), (tensors[2], mask)]
        undo = _undo.Undo(nn.Module())
        with undo.saving():
            _undo.keep_products(pairs)
            for t, f in pairs[:stop]:
                _maskmul.mul_(t, f)
        undo.restore()
        assert tensors[1].stride() == grad.stride()
        assert all(bits_equal(t, o) for t, o in zip(tensors, originals)), stop
