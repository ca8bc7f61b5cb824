"""AWS norm interpolation: every torch and timm norm layer against a float64 oracle, detach
restoring the exact state, deepcopy/pickle/state_dict, real timm models, torch.compile.

Oracles are plain, never-hooked copies of the modules whose affine parameters are overwritten
with ``a * init + (1 - a) * trained`` computed here in float64; expected norm counts come from
the class list below, never from signmask.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune

from signmask import _interpolate as interp
from signmask._compat import import_timm

from _util import Wrapper, assert_same, since_timm, snapshot, timm_at_least

timm = import_timm()
L = timm.layers
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
from timm.layers.norm import LayerNormExp2d  # noqa: E402
from timm.models.metaformer import (  # noqa: E402
    GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias,
)
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

A = 0.37
C = 8
NCHW, NLC = (4, C, 5, 5), (4, 5, C)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    since: str = "1.0.8"  # the timm release that added the layer (pyproject's floor: 1.0.8)


TORCH_CASES = [
    Case("BatchNorm1d", lambda: nn.BatchNorm1d(C), (6, C)),
    Case("BatchNorm1d-3d", lambda: nn.BatchNorm1d(C), (4, C, 7)),
    Case("BatchNorm2d", lambda: nn.BatchNorm2d(C), NCHW),
    Case("BatchNorm2d-cma", lambda: nn.BatchNorm2d(C, momentum=None), NCHW),
    Case("BatchNorm2d-nostats", lambda: nn.BatchNorm2d(C, track_running_stats=False), NCHW),
    Case("BatchNorm3d", lambda: nn.BatchNorm3d(C), (2, C, 3, 3, 3)),
    Case("SyncBatchNorm", lambda: nn.SyncBatchNorm(C), NCHW),
    Case("LazyBatchNorm1d", lambda: nn.LazyBatchNorm1d(), (6, C)),
    Case("LazyBatchNorm2d", lambda: nn.LazyBatchNorm2d(), NCHW),
    Case("LazyBatchNorm3d", lambda: nn.LazyBatchNorm3d(), (2, C, 3, 3, 3)),
    Case("InstanceNorm1d", lambda: nn.InstanceNorm1d(C, affine=True), (4, C, 7)),
    Case("InstanceNorm2d", lambda: nn.InstanceNorm2d(C, affine=True), NCHW),
    Case(
        "InstanceNorm2d-stats",
        lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True),
        NCHW,
    ),
    Case("InstanceNorm3d", lambda: nn.InstanceNorm3d(C, affine=True), (2, C, 3, 3, 3)),
    Case("LazyInstanceNorm1d", lambda: nn.LazyInstanceNorm1d(affine=True), (4, C, 7)),
    Case("LazyInstanceNorm2d", lambda: nn.LazyInstanceNorm2d(affine=True), NCHW),
    Case("LazyInstanceNorm3d", lambda: nn.LazyInstanceNorm3d(affine=True), (2, C, 3, 3, 3)),
    Case("LayerNorm", lambda: nn.LayerNorm(C), NLC),
    Case("LayerNorm-2dims-nobias", lambda: nn.LayerNorm([5, C], bias=False), NLC),
    Case("GroupNorm", lambda: nn.GroupNorm(2, C), NCHW),
    Case("RMSNorm", lambda: nn.RMSNorm(C), NLC),
]

TIMM_CASES = [
    # timm/layers/norm.py
    Case("timm.GroupNorm", lambda: L.GroupNorm(C, num_groups=2), NCHW),
    Case("timm.GroupNorm1", lambda: L.GroupNorm1(C), NCHW),
    Case("timm.LayerNorm", lambda: L.LayerNorm(C), NLC),
    Case("timm.LayerNormFp32", lambda: L.LayerNormFp32(C), NLC, "1.0.17"),
    Case("timm.LayerNorm2d", lambda: L.LayerNorm2d(C), NCHW),
    Case("timm.LayerNorm2dFp32", lambda: L.LayerNorm2dFp32(C), NCHW, "1.0.17"),
    Case("timm.LayerNormExp2d", lambda: LayerNormExp2d(C), NCHW),
    Case("timm.RmsNorm", lambda: L.RmsNorm(C), NLC),
    Case("timm.RmsNormFp32", lambda: L.RmsNormFp32(C), NLC, "1.0.17"),
    Case("timm.RmsNorm2d", lambda: L.RmsNorm2d(C), NCHW, "1.0.10"),
    Case("timm.RmsNorm2dFp32", lambda: L.RmsNorm2dFp32(C), NCHW, "1.0.17"),
    Case("timm.SimpleNorm", lambda: L.SimpleNorm(C), NLC, "1.0.13"),
    Case("timm.SimpleNormFp32", lambda: L.SimpleNormFp32(C), NLC, "1.0.17"),
    Case("timm.SimpleNorm2d", lambda: L.SimpleNorm2d(C), NCHW, "1.0.13"),
    Case("timm.SimpleNorm2dFp32", lambda: L.SimpleNorm2dFp32(C), NCHW, "1.0.17"),
    # timm/layers/norm_act.py
    Case("timm.BatchNormAct2d", lambda: L.BatchNormAct2d(C), NCHW),
    Case("timm.SyncBatchNormAct", lambda: L.SyncBatchNormAct(C), NCHW),
    Case("timm.GroupNormAct", lambda: L.GroupNormAct(C, num_groups=2), NCHW),
    Case("timm.GroupNorm1Act", lambda: L.GroupNorm1Act(C), NCHW),
    Case("timm.LayerNormAct", lambda: L.LayerNormAct(C), NLC),
    Case("timm.LayerNormActFp32", lambda: L.LayerNormActFp32(C), NLC, "1.0.17"),
    Case("timm.LayerNormAct2d", lambda: L.LayerNormAct2d(C), NCHW),
    Case("timm.LayerNormAct2dFp32", lambda: L.LayerNormAct2dFp32(C), NCHW, "1.0.17"),
    Case("timm.RmsNormAct", lambda: L.RmsNormAct(C), NLC, "1.0.17"),
    Case("timm.RmsNormActFp32", lambda: L.RmsNormActFp32(C), NLC, "1.0.17"),
    Case("timm.RmsNormAct2d", lambda: L.RmsNormAct2d(C), NCHW, "1.0.17"),
    Case("timm.RmsNormAct2dFp32", lambda: L.RmsNormAct2dFp32(C), NCHW, "1.0.17"),
    # timm/layers/evo_norm.py (B0/S0 also own `v`, which is not interpolated)
    Case("timm.EvoNorm2dB0", lambda: L.EvoNorm2dB0(C), NCHW),
    Case("timm.EvoNorm2dB1", lambda: L.EvoNorm2dB1(C), NCHW),
    Case("timm.EvoNorm2dB2", lambda: L.EvoNorm2dB2(C), NCHW),
    Case("timm.EvoNorm2dS0", lambda: L.EvoNorm2dS0(C, groups=2), NCHW),
    Case("timm.EvoNorm2dS0a", lambda: L.EvoNorm2dS0a(C, groups=2), NCHW),
    Case("timm.EvoNorm2dS1", lambda: L.EvoNorm2dS1(C, groups=2), NCHW),
    Case("timm.EvoNorm2dS1a", lambda: L.EvoNorm2dS1a(C, groups=2), NCHW),
    Case("timm.EvoNorm2dS2", lambda: L.EvoNorm2dS2(C, groups=2), NCHW),
    Case("timm.EvoNorm2dS2a", lambda: L.EvoNorm2dS2a(C, groups=2), NCHW),
    # timm/layers/filter_response_norm.py (Tlu2d also owns `tau`), grn.py, split_batchnorm.py
    Case("timm.FilterResponseNormTlu2d", lambda: L.FilterResponseNormTlu2d(C), NCHW),
    Case("timm.FilterResponseNormAct2d", lambda: L.FilterResponseNormAct2d(C), NCHW),
    Case("timm.GlobalResponseNorm", lambda: GlobalResponseNorm(C), (4, 5, 5, C)),
    Case("timm.SplitBatchNorm2d", lambda: L.SplitBatchNorm2d(C, num_splits=2), NCHW),
    # timm/models/metaformer.py
    Case("timm.GroupNorm1NoBias", lambda: GroupNorm1NoBias(C), NCHW),
    Case("timm.LayerNorm2dNoBias", lambda: LayerNorm2dNoBias(C), NCHW),
    Case("timm.LayerNormNoBias", lambda: LayerNormNoBias(C), NLC),
]
CASES = TORCH_CASES + TIMM_CASES
# Each case, skipped on a timm older than its layer.
CASE_PARAMS = [pytest.param(c, id=c.id, marks=since_timm(c.since, c.id)) for c in CASES]

# Every class above that this timm has, and timm's InplaceAbn (its forward needs the inplace_abn
# extension).
NORM_CLASSES = tuple(
    {type(c.make()) for c in CASES if timm_at_least(c.since)} | {L.InplaceAbn}
) + (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d,  # what the lazy layers become
)


def is_expected_norm(module: nn.Module) -> bool:
    p = module._parameters
    owns = p.get("weight") is not None or p.get("bias") is not None
    return type(module) in NORM_CLASSES and owns


def affine(module: nn.Module) -> list[str]:
    return [t for t in ("weight", "bias") if module._parameters.get(t) is not None]


def build(case: Case, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The case's module, materialized, with random non-default parameters and statistics."""
    torch.manual_seed(seed)
    module = case.make()
    x = torch.randn(case.shape)
    with torch.no_grad():
        module(x)  # materializes lazy layers
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return module, torch.randn(case.shape)


def set_affine(module: nn.Module, values: dict[str, torch.Tensor], suffix: str = "") -> None:
    with torch.no_grad():
        for key, v in values.items():
            fqn, _, t = key.rpartition(".")
            module.get_submodule(fqn)._parameters[t + suffix].copy_(v)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_norm_layer_against_float64_oracle(case):
    module, x = build(case)
    norms = {n: m for n, m in module.named_modules() if is_expected_norm(m)}
    assert norms and all(interp.is_norm(m) for m in norms.values())
    keys0 = list(module.state_dict())
    params0 = [(n, id(p)) for n, p in module.named_parameters()]
    init = {
        f"{n}.{t}": m._parameters[t].detach().clone() for n, m in norms.items() for t in affine(m)
    }
    trained = {k: torch.randn_like(v) for k, v in init.items()}
    never = copy.deepcopy(module)  # at init, never hooked
    ref = copy.deepcopy(module)  # never hooked, trained parameters
    set_affine(ref, trained)

    alpha = torch.tensor(A)
    assert set(interp.attach(module, alpha)) == set(norms)
    assert set(interp.interpolated(module)) == set(norms)
    set_affine(module, trained, "_orig")
    for key, v in init.items():
        fqn, _, t = key.rpartition(".")
        assert torch.equal(module.get_submodule(fqn)._buffers[t + "_init"], v)

    # Eval: the trained parameters, bit for bit.
    module.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(module(x), ref(x))

    # Training: the interpolated parameters, against float64 by hand.
    oracle = copy.deepcopy(ref).double()
    set_affine(oracle, {k: A * init[k].double() + (1 - A) * trained[k].double() for k in init})
    module.train(), ref.train(), oracle.train()
    out = module(x)
    out64 = oracle(x.double())
    with torch.no_grad():
        ref(x)  # keeps ref's statistics in step with the module's
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out64 * g.double()).sum().backward()
    for key in init:
        fqn, _, t = key.rpartition(".")
        got = module.get_submodule(fqn)._parameters[t + "_orig"].grad
        want = (1 - A) * oracle.get_submodule(fqn)._parameters[t].grad
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    oracle_buffers = dict(oracle.named_buffers())
    for name, b in module.named_buffers():
        if not name.endswith("_init"):
            want = oracle_buffers[name].double()
            torch.testing.assert_close(b.double(), want, rtol=1e-5, atol=1e-6)

    # Detach: the state of a never-interpolated module, the same Parameter objects.
    assert sorted(interp.detach(module)) == sorted(norms)
    assert interp.interpolated(module) == {}
    assert list(module.state_dict()) == list(never.state_dict()) == keys0
    assert [(n, id(p)) for n, p in module.named_parameters()] == params0
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in module.state_dict().items())
    for m in module.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not {"weight", "bias"} & set(vars(m))
    for mode in (False, True):
        module.train(mode), ref.train(mode)
        with torch.no_grad():
            assert torch.equal(module(x), ref(x))


# ----------------------------------------------------------------------------------------------
# is_norm


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_is_norm_for_every_norm_type(case):
    assert interp.is_norm(case.make())


def test_is_norm_false_without_affine_parameters():
    for module in (
        nn.Conv2d(3, 3, 1), nn.Linear(3, 3), nn.Identity(), nn.ReLU(),
        nn.BatchNorm2d(3, affine=False), nn.InstanceNorm2d(3),
        nn.LayerNorm(3, elementwise_affine=False), nn.GroupNorm(1, 3, affine=False),
        nn.RMSNorm(3, elementwise_affine=False), nn.LocalResponseNorm(2),
        FrozenBatchNorm2d(3), L.FrozenBatchNormAct2d(3), L.RmsNorm(3, affine=False),
        nn.Sequential(nn.BatchNorm2d(3)), timm.layers.ConvNormAct(3, 3, 1),
        nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
    ):
        assert not interp.is_norm(module), module


def test_per_channel_parameters_alone_do_not_make_a_norm():
    class Scale(nn.Module):  # a vector weight, no norm base class, no norm-like name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    assert not interp.is_norm(nn.PReLU(4)) and not interp.is_norm(Scale())
    with pytest.raises(ValueError, match="no norm layer with affine parameters"):
        interp.attach(nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)), torch.tensor(0.5))


def test_is_norm_for_inplace_abn_and_subclasses():
    assert interp.is_norm(L.InplaceAbn(3))

    class MyNorm(nn.Module):  # a user's norm layer: recognized by name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    class Renamed(L.RmsNorm):  # name without "Norm": recognized through the MRO
        pass

    assert interp.is_norm(MyNorm()) and interp.is_norm(Renamed(3))


def test_is_norm_by_name_needs_per_channel_parameters():
    class NormedLinear(nn.Module):  # a cosine classifier: "Norm" in the name, a weight matrix
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=0)

    class ChannelNorm(nn.Module):  # per-channel parameters kept broadcastable: still a norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, 3, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    assert not interp.is_norm(NormedLinear()) and interp.is_norm(ChannelNorm())
    # apply("aws") interpolated the classifier, and its tickets recorded the matrix as a "norm".
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), NormedLinear())
    assert list(interp.attach(net, torch.tensor(0.5))) == ["1"]


def test_unmaterialized_lazy_norm_is_refused():
    model = nn.Sequential(nn.LazyBatchNorm2d(), nn.LayerNorm(3))
    assert interp.is_norm(model[0])
    params0 = [(n, id(p)) for n, p in model.named_parameters()]  # snapshot() cannot clone these
    with pytest.raises(ValueError, match="0.weight is not materialized"):
        interp.attach(model, torch.tensor(0.5))
    assert [(n, id(p)) for n, p in model.named_parameters()] == params0
    assert interp.interpolated(model) == {} and not model[1]._buffers
    model(torch.randn(2, 3, 2, 3))
    assert list(interp.attach(model, torch.tensor(0.5))) == ["0", "1"]


# ----------------------------------------------------------------------------------------------
# a small net: alpha in place, deepcopy, pickle, state_dict, refusals


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 16, 6), nn.LayerNorm(6), nn.Linear(6, 3),
    )
    with torch.no_grad():
        for m in (net[1], net[5]):
            m.weight.normal_(), m.bias.normal_()
    return net


def inputs(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(5, 3, 4, 4)


def perturb(net: nn.Module) -> None:
    """Move the trained parameters away from the recorded init."""
    with torch.no_grad():
        for m in interp.interpolated(net).values():
            m.weight_orig.add_(torch.randn_like(m.weight_orig))
            m.bias_orig.add_(torch.randn_like(m.bias_orig))


def test_alpha_in_place_changes_the_next_forward():
    net, x = small_net(), inputs()
    alpha = torch.tensor(0.0)
    assert list(interp.attach(net, alpha)) == ["1", "5"]
    perturb(net)
    plain = copy.deepcopy(net)
    interp.detach(plain)
    net.train(), plain.train()
    assert torch.equal(net(x), plain(x))  # a = 0: the trained parameters exactly
    alpha.fill_(0.6)
    out = net(x)
    assert torch.equal(net[1].weight, torch.lerp(net[1].weight_orig, net[1].weight_init, alpha))
    assert not torch.allclose(out, plain(x))
    alpha.copy_(torch.tensor(1.0, dtype=torch.float64))  # a = 1: the init exactly
    net(x), plain(x)  # the running statistics stay in step
    assert torch.equal(net[5].bias, net[5].bias_init)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    assert not isinstance(net[1].weight, nn.Parameter)
    assert net[1].weight.data_ptr() == net[1].weight_orig.data_ptr()


def test_eval_mode_alias_passes_gradients_for_frozen_statistics():
    net, x = small_net(), inputs()
    interp.attach(net, torch.tensor(0.5))
    net.eval()
    net(x).sum().backward()
    assert net[1].weight_orig.grad is not None and net[1].weight_orig.grad.abs().sum() > 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_training_forward_gets_the_same_gradients(reentrant, autocast):
    # The recomputing backward runs the hooks again, with the alpha of the forward (the search
    # draws the next one after the step): the same outputs and gradients of the trained norm
    # parameters (and of the rest), bitwise; module.weight left detached, as after a forward.
    from torch.utils.checkpoint import checkpoint

    def run(mode):
        net = small_net()
        alpha = torch.tensor(0.0)
        interp.attach(net, alpha)
        torch.manual_seed(2)
        perturb(net)
        net.train()
        seen = []
        for step, a in enumerate((0.3, 0.8)):
            alpha.fill_(a)
            x = inputs(seed=step).requires_grad_(mode is not None)
            net.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if mode is None:
                    out = net(x)
                else:
                    out = checkpoint(net[4:], checkpoint(net[:4], x, use_reentrant=mode), use_reentrant=mode)
            out.float().square().sum().backward()
            seen += [out.detach(), *(p.grad.clone() for p in net.parameters())]
            assert all(m.weight.grad_fn is None and m.bias.grad_fn is None for m in (net[1], net[5]))
        return seen

    expected, got = run(None), run(reentrant)
    assert len(expected) == len(got) == 2 * 11  # the output and 10 gradients per step
    assert all(torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()) for a, b in zip(expected, got))


def test_alpha_of_other_dtype_and_module_in_float64():
    net, x = small_net(), inputs()
    net.double()
    alpha = torch.tensor(0.25, dtype=torch.float32)
    interp.attach(net, alpha)
    perturb(net)
    net.train()
    net(x.double())
    w = net[1].weight
    assert w.dtype == torch.float64
    assert torch.equal(w, torch.lerp(net[1].weight_orig, net[1].weight_init, alpha.double()))


def test_alpha_on_another_device_is_moved():
    net = small_net()
    interp.attach(net, torch.tensor(0.5, dtype=torch.float64))  # stays on the CPU
    net.to("meta")
    net.train()
    assert net(torch.empty(5, 3, 4, 4, device="meta")).device.type == "meta"
    assert net[1].weight.device.type == "meta" and net[1].weight.dtype == torch.float32


def test_deepcopy_after_grad_forward_and_pickle():
    net, x = small_net(), inputs()
    alpha = torch.tensor(A)
    interp.attach(net, alpha)
    perturb(net)
    net.train()
    net(x).sum().backward()  # leaves non-leaf weights behind without DetachWeight
    twin = copy.deepcopy(net)
    loaded = pickle.loads(pickle.dumps(net))
    for other in (twin, loaded):
        assert list(interp.interpolated(other)) == ["1", "5"]
        hooks = [h for m in other.modules() for h in m._forward_pre_hooks.values()]
        assert hooks[0].alpha is hooks[1].alpha and hooks[0].alpha is not alpha  # one shared copy
        assert torch.equal(hooks[0].alpha, alpha)
        torch.manual_seed(5)
        got = other(x)
        torch.manual_seed(5)
        assert torch.equal(got, net(x))
        interp.detach(other)
        assert list(other.state_dict()) == list(small_net().state_dict())


def test_state_dict_round_trip():
    net = small_net()
    interp.attach(net, torch.tensor(A))
    perturb(net)
    sd = net.state_dict()
    assert list(sd)[:8] == [
        "0.weight", "0.bias", "1.weight_orig", "1.bias_orig", "1.running_mean",
        "1.running_var", "1.num_batches_tracked", "1.weight_init",
    ]
    assert {"5.weight_orig", "5.bias_orig", "5.weight_init", "5.bias_init"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    other = small_net(seed=3)
    interp.attach(other, torch.tensor(0.0))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])


def test_attach_twice_or_on_pruned_norm_refuses_and_leaves_model_untouched():
    net = small_net()
    interp.attach(net, torch.tensor(A), filter_fn=lambda m, name: name == "5")
    before = snapshot(net)
    with pytest.raises(ValueError, match="'5'.*already interpolated"):
        interp.attach(net, torch.tensor(A))
    assert_same(before, snapshot(net))
    interp.detach(net)

    torch_prune.l1_unstructured(net[5], "weight", amount=2)
    before = snapshot(net)
    with pytest.raises(ValueError, match="5.weight.*reparametrized"):
        interp.attach(net, torch.tensor(A))
    assert_same(before, snapshot(net))


def test_failure_midway_rolls_back(monkeypatch):
    net = small_net()
    before = snapshot(net)
    calls = []
    real = interp._install

    def flaky(module, names, alpha):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(module, names, alpha)

    monkeypatch.setattr(interp, "_install", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        interp.attach(net, torch.tensor(A))
    assert_same(before, snapshot(net))
    assert interp.interpolated(net) == {}


def test_argument_errors_and_filters():
    net = small_net()
    with pytest.raises(TypeError):
        interp.attach(net, 0.5)
    with pytest.raises(TypeError):
        interp.attach(net, torch.tensor(1))
    with pytest.raises(ValueError, match="0-dim"):
        interp.attach(net, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="no norm layer"):
        interp.attach(nn.Sequential(nn.Linear(2, 2)), torch.tensor(0.5))
    with pytest.raises(ValueError, match="no norm layer"):
        interp.attach(net, torch.tensor(0.5), filter_fn=lambda m, name: False)
    assert interp.detach(net) == []
    only_ln = interp.attach(
        net, torch.tensor(0.5), filter_fn=lambda m, name: isinstance(m, nn.LayerNorm)
    )
    assert list(only_ln) == ["5"] and "weight" in net[1]._parameters


def test_wrapped_models_use_canonical_names():
    net = small_net()
    assert list(interp.attach(nn.DataParallel(net), torch.tensor(A))) == ["1", "5"]
    compiled = torch.compile(net)  # not run: the wrapper's names only
    assert list(interp.interpolated(compiled)) == ["1", "5"]
    assert interp.detach(compiled) == ["1", "5"]


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0, 1, exclude_max=True), double_alpha=st.booleans())
def test_training_weight_is_exactly_lerp(a, double_alpha):
    net, x = small_net(), inputs()
    alpha = torch.tensor(0.0, dtype=torch.float64 if double_alpha else torch.float32)
    interp.attach(net, alpha)
    perturb(net)
    alpha.fill_(a)
    net.train()
    net(x)
    for m in (net[1], net[5]):
        for t in ("weight", "bias"):
            orig, init = getattr(m, t + "_orig"), getattr(m, t + "_init")
            assert torch.equal(getattr(m, t), torch.lerp(orig, init, alpha.float()))


# ----------------------------------------------------------------------------------------------
# real timm models

TIMM_MODELS = [
    ("resnet18", {}, 32),
    ("convnext_atto", {}, 32),
    ("convnextv2_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("regnetx_002", {}, 32),
    ("levit_128s", {"img_size": 64}, 64),
    ("test_efficientnet_evos", {}, 32, "1.0.10"),
    ("test_efficientnet_gn", {}, 32, "1.0.10"),
    ("test_efficientnet_ln", {}, 32, "1.0.10"),
    ("test_vit4", {}, 32, "1.0.13"),
]


@pytest.mark.parametrize("name,kwargs,size", [
    pytest.param(*m[:3], id=m[0], marks=since_timm(m[3], m[0]) if len(m) > 3 else ())
    for m in TIMM_MODELS
])
def test_timm_model(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    expected = {n for n, m in model.named_modules() if is_expected_norm(m)}
    named = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__ and affine(m)}
    assert named <= {c.__name__ for c in NORM_CLASSES}  # the class list above is complete
    never = copy.deepcopy(model)
    params0 = [(n, id(p)) for n, p in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alpha = torch.tensor(A)
    assert set(interp.attach(model, alpha)) == expected and expected
    x = torch.randn(2, 3, size, size)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    for m in interp.interpolated(model).values():
        assert all(p.grad is not None for k, p in m._parameters.items() if k.endswith("_orig"))
    assert sorted(interp.detach(model)) == sorted(expected)
    assert list(model.state_dict()) == list(never.state_dict())
    assert [(n, id(p)) for n, p in model.named_parameters()] == params0
    model.eval(), never.eval()
    never.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), never(x))


@since_timm("1.0.10", "test_nfnet")
def test_timm_norm_free_model_has_nothing_to_interpolate():
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=5)
    with pytest.raises(ValueError, match="no norm layer"):
        interp.attach(model, torch.tensor(A))


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_follows_alpha():
    torch._dynamo.reset()
    net, x = small_net(), inputs()
    alpha = torch.tensor(A)
    interp.attach(net, alpha)
    perturb(net)
    eager = copy.deepcopy(net)  # its own alpha, moved in step
    eager_alpha = next(iter(eager[1]._forward_pre_hooks.values())).alpha
    net.train(), eager.train()
    # aot_eager: Dynamo's full-graph capture and AOTAutograd; inductor's codegen takes ~40 s here.
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    eager(x).sum().backward()
    for m, e in ((net[1], eager[1]), (net[5], eager[5])):
        torch.testing.assert_close(m.weight_orig.grad, e.weight_orig.grad, rtol=1e-4, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for a in (0.0, 0.9):
            alpha.fill_(a), eager_alpha.fill_(a)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(compiled(x), out, rtol=1e-3, atol=1e-3)
    net.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    copy.deepcopy(net)


# ---------------------------------- _interpolate: behaviour pinned by mutation testing


def _bn_ln_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        for m in (net[1], net[3]):
            m.weight.normal_(), m.bias.normal_()
    return net


def test_weight_alias_exists_right_after_attach_before_any_forward():
    # I05: attach() must set module.weight at once (docs: it exists between forwards too)
    net = _bn_ln_net()
    trained = net[1].weight.detach().clone()
    interp.attach(net, torch.tensor(0.7))
    w = net[1].weight  # no forward has run yet
    assert not isinstance(w, nn.Parameter)
    assert torch.equal(w, trained)  # lerp(orig, init, a) with init == orig
    assert torch.equal(net[3].bias, net[3].bias_orig)


def test_attach_refuses_a_norm_owning_an_attribute_named_like_its_buffers():
    # I09: the collision check must raise ValueError before anything is changed
    class OddNorm(nn.LayerNorm):
        pass

    net = nn.Sequential(nn.LayerNorm(4), OddNorm(4))
    net[1].weight_init = "user data"
    before = snapshot(net)
    message = ("1: OddNorm already has an attribute 'weight_init', the name interpolation gives "
               "the initial weight; rename that attribute to interpolate this layer")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        interp.attach(net, torch.tensor(0.5))
    assert_same(before, snapshot(net))
    assert net[1].weight_init == "user data" and interp.interpolated(net) == {}


def test_attach_refuses_a_colliding_property_without_running_it():
    # hasattr() ran the property; the class dicts are read instead, as prune's check does
    calls = []

    class PropNorm(nn.LayerNorm):
        @property
        def bias_init(self):
            calls.append(self)
            return None

    net = nn.Sequential(PropNorm(4))
    with pytest.raises(ValueError, match=r"^0: PropNorm already has an attribute 'bias_init' "
                                         r"\(of its class PropNorm\), the name interpolation gives"):
        interp.attach(net, torch.tensor(0.5))
    assert calls == [] and interp.interpolated(net) == {}


def test_failure_inside_install_rolls_back_the_partly_installed_layer(monkeypatch):
    # I10: a layer whose _install fails halfway (weight renamed already) must be rolled back too
    net = _bn_ln_net()
    before = snapshot(net)
    real, calls = interp.rename, []

    def flaky(params, old, new):
        real(params, old, new)
        calls.append(old)
        if len(calls) == 3:  # 2nd layer's weight renamed to weight_orig, then a failure
            raise RuntimeError("boom")

    monkeypatch.setattr(interp, "rename", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        interp.attach(net, torch.tensor(0.5))
    assert_same(before, snapshot(net))
    assert "weight" in net[3]._parameters and "weight_orig" not in net[3]._parameters


def test_is_norm_false_for_convs_linears_and_embeddings_named_norm():
    # I11: conv/linear/embedding subclasses whose class name says "Norm" are never norm layers
    class WeightNormConv2d(nn.Conv2d):
        pass

    class LinearNorm(nn.Linear):
        pass

    class NormEmbedding(nn.Embedding):
        pass

    for m in (WeightNormConv2d(2, 2, 1), LinearNorm(2, 2), NormEmbedding(3, 2)):
        assert not interp.is_norm(m), type(m).__name__
    net = nn.Sequential(LinearNorm(2, 2), nn.LayerNorm(2))
    assert list(interp.attach(net, torch.tensor(0.5))) == ["1"]
    assert "weight" in net[0]._parameters


def test_filter_fn_sees_canonical_names_of_a_wrapped_model():
    # As documented (and as signmask.prune's filter_fn): no "_orig_mod."/"module." prefix.
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    seen = []
    chosen = interp.attach(torch.compile(nn.DataParallel(net)), torch.tensor(0.5),
                           filter_fn=lambda m, name: seen.append(name) or True)
    assert seen == ["1"] and list(chosen) == ["1"]


class _NormedLinear(nn.Linear):
    """A Linear whose class name hints "Norm" and whose weight is a vector (in_features=1)."""


def test_a_linear_named_like_a_norm_is_not_a_norm_even_with_vector_weights():
    # Conv/linear/embedding layers are never norms, whatever their name and shapes.
    assert not interp.is_norm(_NormedLinear(1, 4))


def test_two_norm_layers_of_one_canonical_name_are_refused_not_one_skipped():
    # ``bn`` beside ``module.bn``: the second used to be left out of the interpolation unseen.
    model = Wrapper()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^module.bn and bn are different tensors with the same name"):
        interp.attach(model, torch.tensor(0.5))
    assert_same(before, snapshot(model))
    assert not interp.interpolated(model)


def test_two_interpolated_layers_of_one_canonical_name_are_refused_not_one_left_attached():
    # Each attached on its own, ``bn`` and ``module.bn`` were one entry of interpolated():
    # detach() restored only the first and left the other interpolated, unseen.
    model = Wrapper()
    alpha = torch.tensor(0.5)
    interp.attach(nn.Sequential(model.bn), alpha)  # a container of the wrapper's own bn only
    interp.attach(model.module, alpha)
    for verb in (interp.interpolated, interp.detach):
        with pytest.raises(ValueError, match=r"^module.bn and bn are different tensors with the same name"):
            verb(model)
    assert interp.detach(model.module) == ["bn"] and interp.detach(nn.Sequential(model.bn)) == ["0"]
    assert not any(interp._hook(m)[1] for m in model.modules())


def test_embeddings_and_bilinears_named_norm_are_not_norms_even_with_vector_weights():
    # One row (or one output of one input feature) makes their weights per-channel vectors.
    class NormEmbedding(nn.Embedding):
        pass

    class NormEmbeddingBag(nn.EmbeddingBag):
        pass

    class NormBilinear(nn.Bilinear):
        pass

    for m in (NormEmbedding(1, 4), NormEmbeddingBag(1, 4), NormBilinear(1, 4, 1)):
        assert interp._per_channel(m.weight) and not interp.is_norm(m), type(m).__name__


def test_rms_norm_over_several_dimensions_is_a_norm():
    # Its weight is a matrix: a torch norm class, not its name, makes it a norm.
    for m in (nn.RMSNorm([2, 3]), nn.LayerNorm([2, 3])):
        assert not interp._per_channel(m.weight) and interp.is_norm(m), type(m).__name__


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_trained_tensor_parametrized_after_attach_is_interpolated_as_computed():
    # weight_orig under nn.utils.parametrize is no Parameter of the module any more: the
    # hook reads the computed value, as stock prune does.
    from torch.nn.utils import parametrize

    net, x = small_net(), inputs()
    alpha = torch.tensor(0.25)
    interp.attach(net, alpha)
    perturb(net)
    bn = net[1]
    parametrize.register_parametrization(bn, "weight_orig", _Double())
    assert "weight_orig" not in bn._parameters
    net.train()
    net(x)
    trained = 2 * bn.parametrizations.weight_orig.original
    assert torch.equal(bn.weight, torch.lerp(trained, bn.weight_init, alpha))
    net.eval()
    net(x)
    assert torch.equal(bn.weight, trained)
