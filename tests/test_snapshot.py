"""Rewind snapshots: which state_dict entries are weights."""

import torch

import signmask
from signmask import _interpolate, _snapshot
from _util import tiny


class Scaled(torch.nn.Module):
    """A user's own tensors whose names end like signmask's buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny()
        self.scale_init = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("seen_mask", torch.zeros(3))
        self.register_buffer("flip_sign", torch.ones(3))

    def forward(self, x):
        return self.net(x) * self.scale_init.mean()


def test_weight_keys_leave_out_exactly_the_reparametrization_buffers():
    model = Scaled()
    signmask.prune(model, 0.5, signs="locked")
    _interpolate.attach(model, torch.zeros(()))
    keys = set(_snapshot.weight_keys(model))
    sd = model.state_dict()
    ours = {
        "net.bn1.weight_init", "net.bn1.bias_init", "net.bn2.weight_init", "net.bn2.bias_init",
        "net.conv1.weight_mask", "net.conv2.weight_mask", "net.fc.weight_mask",
        "net.conv1.weight_sign", "net.conv2.weight_sign", "net.fc.weight_sign",
    }
    assert ours <= sd.keys() and {"scale_init", "seen_mask", "flip_sign"} <= keys
    assert keys == {signmask._targets.canonical(k) for k in sd if k not in ours}
