"""The undo record itself (``signmask._undo``); the calls it serves test their failures."""

import contextvars

import pytest
import torch
from torch import nn

import signmask
from signmask import _undo
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
            _undo.keep_product(t, torch.tensor([1, -1, 0, -1], dtype=torch.int8))
            t.mul_(torch.tensor([1, -1, 0, -1], dtype=torch.int8))
        inner.restore()
    outer.restore()
    assert bits_equal(t, torch.tensor([1.5, -2.0, 3.0, -0.0]))
