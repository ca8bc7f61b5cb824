"""benchmarks/timm_zoo.py: its checks pass on correct models and fail where signmask goes wrong.

The sweep itself takes minutes; here its five checks run on three small timm models, and each
must also catch a planted fault (a parent reading a stale weight, norms interpolated with the
wrong weight, a sign lock ignored, the projection's gradient mask skipped, a transfer that
leaves out the biases' signs or the norms, a search that leaves norms interpolated).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from signmask import _interpolate, _projection, _projection_ops, _reparam
from signmask._compat import import_timm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import timm_zoo  # noqa: E402

timm = import_timm()
SHRUNK = dict(depth=2, embed_dim=64, num_heads=2)
NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
PRUNED = (torch.nn.Conv2d, torch.nn.Linear)  # all these models' conv/linear layers


def _fitted(name: str, kwargs: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    model, _, x, _ = timm_zoo.fit(timm, name, kwargs)
    return model, x


@pytest.mark.parametrize("name, kwargs", [
    ("test_vit", {}),
    ("resnet18", {}),
    ("beit_base_patch16_224", SHRUNK),  # its attention reads qkv.weight itself
])
def test_the_checks_pass_and_every_norm_is_interpolated(name, kwargs):
    model, x = _fitted(name, kwargs)
    # These families use torch's own norm classes (timm subclasses them): count those.
    norms = sum(isinstance(m, NORMS) for m in model.modules())
    row = timm_zoo.check(copy.deepcopy(model), copy.deepcopy(model), x, no_parent_hooks=False)
    aws = timm_zoo.check_aws(copy.deepcopy(model), copy.deepcopy(model), x, no_parent_hooks=False)
    proj = timm_zoo.check_projection(copy.deepcopy(model), x, no_parent_hooks=False)
    ticket = timm_zoo.check_ticket(copy.deepcopy(model))
    search = timm_zoo.check_search(copy.deepcopy(model), x)
    assert row["failures"] == [] and aws["aws_failures"] == [] and proj["proj_failures"] == []
    assert ticket["ticket_failures"] == [] and search["search_failures"] == []
    assert search["search_rounds"] == 1 + timm_zoo.SEARCH_ROUNDS
    # Every pruned weight, every bias of a pruned layer and every norm tensor went across.
    biases = sum(m.bias is not None for m in model.modules() if isinstance(m, PRUNED))
    norm_tensors = sum((m.weight is not None) + (m.bias is not None)
                       for m in model.modules() if isinstance(m, NORMS))
    assert ticket["ticket_tensors"] == row["pruned"] + biases + norm_tensors
    assert aws["norms"] == norms
    assert aws["norm_like_left"] == []
    assert row["nonzero_grads"] == row["pruned"] > 0


def test_the_aws_check_fails_without_the_parent_refresh():
    model, x = _fitted("beit_base_patch16_224", SHRUNK)
    aws = timm_zoo.check_aws(copy.deepcopy(model), copy.deepcopy(model), x, no_parent_hooks=True)
    checks = {f["check"] for f in aws["aws_failures"]}
    assert {"aws forward", "aws grad"} <= checks
    # The parents read the stale qkv weights; everything after them differs too.
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"} <= {
        f["tensor"] for f in aws["aws_failures"] if f["check"] == "aws grad"}


def test_the_aws_check_fails_when_norms_take_another_alpha(monkeypatch):
    model, x = _fitted("test_vit", {})
    value = _interpolate.NormInterpolation.value

    def off(self, module, name):  # the hooks weigh the init by alpha + 0.01
        if not module.training:
            return value(self, module, name)
        orig, init = module._parameters[name + "_orig"], module._buffers[name + "_init"]
        return torch.lerp(orig, init, self.alpha + 0.01)

    monkeypatch.setattr(_interpolate.NormInterpolation, "value", off)
    aws = timm_zoo.check_aws(copy.deepcopy(model), copy.deepcopy(model), x, no_parent_hooks=False)
    assert {"aws forward", "aws grad"} <= {f["check"] for f in aws["aws_failures"]}


def test_the_aws_check_fails_when_a_sign_lock_is_ignored(monkeypatch):
    model, x = _fitted("test_vit", {})
    free = _reparam.masked_weight
    monkeypatch.setattr(_reparam, "masked_weight", lambda orig, mask, sign=None: free(orig, mask))
    aws = timm_zoo.check_aws(copy.deepcopy(model), copy.deepcopy(model), x, no_parent_hooks=False)
    checks = {f["check"] for f in aws["aws_failures"]}
    assert {"aws forward", "aws grad", "aws eval forward"} <= checks


def test_modules_named_like_norms_but_left_out_are_listed():
    class NormedHead(torch.nn.Module):  # a matrix: no norm layer, so never interpolated
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3, 4))

    model = torch.nn.Sequential(torch.nn.LayerNorm(4), NormedHead(), torch.nn.BatchNorm1d(4, affine=False))
    _interpolate.attach(model, torch.tensor(0.5))
    assert timm_zoo.norm_like_left(model) == ["1 (NormedHead)"]


def test_the_projection_check_fails_when_gradients_are_not_masked(monkeypatch):
    model, x = _fitted("test_vit", {})
    monkeypatch.setattr(_projection.MaskGrad, "__call__", lambda self, param: None)
    monkeypatch.setattr(_projection_ops, "mask_grad", lambda grad, factor: None)
    proj = timm_zoo.check_projection(model, x, no_parent_hooks=False)
    assert {"projection forward", "projection weight"} <= {f["check"] for f in proj["proj_failures"]}


@pytest.mark.parametrize("left_out, error", [
    ({"biases": False}, "dense sign differs"),
    ({"norms": False}, "norm differs"),
])
def test_the_ticket_check_fails_when_a_transfer_leaves_something_out(monkeypatch, left_out, error):
    model, _ = _fitted("test_vit", {})
    transfer = timm_zoo.signmask.transfer
    monkeypatch.setattr(timm_zoo.signmask, "transfer",
                        lambda ticket, fresh, **kw: transfer(ticket, fresh, **(kw | left_out)))
    failures = timm_zoo.check_ticket(model)["ticket_failures"]
    assert failures and {f["error"] for f in failures} == {error}


def test_the_search_check_fails_when_norms_stay_interpolated(monkeypatch):
    model, x = _fitted("test_vit", {})
    monkeypatch.setattr(_interpolate, "detach", lambda model: [])
    failures = timm_zoo.check_search(model, x)["search_failures"]
    assert [f["error"] for f in failures] == ["norms still interpolated"]
