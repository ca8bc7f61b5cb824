"""The undo record itself (``signmask._undo``); the calls it serves test their failures."""

import contextvars

import pytest
import torch
from torch import nn

import signmask
from signmask import _undo


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
