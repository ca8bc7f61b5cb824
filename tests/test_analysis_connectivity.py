"""signmask.analysis: interpolate, reestimate_bn, evaluate, barrier, instability."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import signmask
from signmask import analysis
from signmask._compat import import_timm
from signmask.analysis._bn_stats import bn_modules

from _util import Wrapper, assert_same, bits_equal, since_timm, snapshot, tiny

timm = import_timm()


def images(seed, batches=3, n=8, size=4, classes=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(batches)]


def pruned_pair(signs="keep"):
    """Two TinyNets under one mask (a: pruned and perturbed, b: another init with its mask)."""
    a = signmask.prune(tiny(0), 0.5, signs="locked" if signs == "locked" else None)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1)
        a.bn1.running_mean.add_(0.3)
    b = signmask.transfer(signmask.extract(a), tiny(1), signs=signs)
    b.bn1.running_var.mul_(2.0)
    return a, b


def effective(module):
    """The weight the next forward computes (module.weight is only refreshed by a forward)."""
    with torch.no_grad():
        return signmask._reparam.find_hook(module, "weight")[1].apply_mask(module)


# --------------------------------------------------------------------------- interpolate
@pytest.mark.parametrize("pruned", [False, True])
def test_interpolate_endpoints_are_exact(pruned):
    a, b = pruned_pair() if pruned else (tiny(0), tiny(1))
    b.bn2.num_batches_tracked.fill_(7)
    before_a, before_b = snapshot(a), snapshot(b)
    at0, at1 = analysis.interpolate(a, b, 0), analysis.interpolate(a, b, 1.0)
    sd_a, sd_b, sd0, sd1 = a.state_dict(), b.state_dict(), at0.state_dict(), at1.state_dict()
    assert sd0.keys() == sd_a.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd_a[k]) for k in sd_a)
    for k in sd_b:  # integer buffers (num_batches_tracked) are model_a's
        assert torch.equal(sd1[k], sd_b[k] if sd_b[k].is_floating_point() or k.endswith("_mask") else sd_a[k])
    if pruned:  # the effective weight is refreshed, not stale from model_a
        assert torch.equal(at1.conv1.weight, b.conv1.weight_orig * b.conv1.weight_mask)
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))


def test_interpolate_midpoint_is_the_float64_average_rounded():
    a, b = pruned_pair()
    mid = analysis.interpolate(a, b, 0.5)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    for key, value in mid.state_dict().items():
        if value.is_floating_point():
            expected = ((sd_a[key].double() + sd_b[key].double()) / 2).to(value.dtype)
            assert torch.equal(value, expected), key
        else:
            assert torch.equal(value, sd_a[key]), key


def test_interpolate_sign_locked_blends_the_effective_weights():
    a, b = pruned_pair(signs="locked")
    assert signmask._reparam.is_sign_locked(a.conv1, "weight")
    mid = analysis.interpolate(a, b, 0.3)
    for name in ("conv1", "conv2", "fc"):
        wa, wb = effective(getattr(a, name)), effective(getattr(b, name))
        expected = (0.7 * wa.double() + 0.3 * wb.double()).float()
        assert torch.equal(getattr(mid, name).weight, expected)
        assert torch.equal(getattr(mid, name).weight_sign, getattr(a, name).weight_sign)


def test_interpolate_refuses_different_masks_and_leaves_models_alone():
    a = signmask.prune(tiny(0), 0.5)
    b = signmask.prune(tiny(1), 0.5)
    before_a, before_b = snapshot(a), snapshot(b)
    with pytest.raises(ValueError, match=r"'conv1\.weight_mask' differs"):
        analysis.interpolate(a, b, 0.5)
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))


def test_interpolate_refuses_other_layouts_and_bad_alpha():
    a = tiny(0)
    pruned = ("tensor 'conv1.weight' is pruned in model_b and not in model_a (2 more tensors are "
              "pruned in one model only); interpolation needs both networks under the same masks "
              "(or, to compare two dense networks, signmask.remove on the pruned one first)")
    with pytest.raises(ValueError, match=f"^{re.escape(pruned)}$"):
        analysis.interpolate(a, signmask.prune(tiny(1), 0.5), 0.5)
    # names that pruning does not explain: the architectures differ, and both lists say how
    extra = tiny(0)
    extra.register_buffer("extra", torch.zeros(1))
    differ = ("model_a and model_b differ: only in model_a: ['conv1.weight', 'conv2.weight', "
              "'extra', 'fc.weight'], only in model_b: ['conv1.weight_mask', 'conv1.weight_orig', "
              "'conv2.weight_mask', 'conv2.weight_orig', 'fc.weight_mask']")
    with pytest.raises(ValueError, match=f"^{re.escape(differ)}$"):
        analysis.interpolate(extra, signmask.prune(tiny(1), 0.5), 0.5)
    with pytest.raises(ValueError, match=r"conv1\.weight.*\(8, 3, 3, 3\)"):
        analysis.interpolate(a, tiny(1, width=8), 0.5)
    with pytest.raises(TypeError, match="alpha"):
        analysis.interpolate(a, tiny(1), "0.5")
    for bad in (math.nan, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\]"):
            analysis.interpolate(a, tiny(1), bad)
    with pytest.raises(TypeError, match="model_b"):
        analysis.interpolate(a, {}, 0.5)


def test_models_pruned_by_stock_prune_work_after_a_backward():
    a, b = tiny(0), tiny(1)
    mask = torch.rand(6, 3, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    for m in (a, b):
        torch.nn.utils.prune.custom_from_mask(m.conv1, "weight", mask)
    a(torch.randn(2, 3, 4, 4)).sum().backward()  # a.conv1.weight is a non-leaf: deepcopy refuses it
    before = snapshot(a)
    mid = analysis.interpolate(a, b, 1.0)
    assert torch.equal(mid.conv1.weight, b.conv1.weight_orig * b.conv1.weight_mask)
    assert analysis.barrier(a, a, images(1), train_loader=images(2), points=2).barrier == 0.0
    assert_same(before, snapshot(a))
    assert a.conv1.weight.grad_fn is not None  # the attribute is put back


# --------------------------------------------------------------------------- reestimate_bn
def manual_bn_stats(model, loader):
    """Per-batch channel mean and unbiased variance of every BatchNorm input, averaged (float64)."""
    work = copy.deepcopy(model).train()  # train mode: batch statistics, so the running ones do not matter
    inputs = {name: [] for name, m in work.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0].double()))
             for name, m in work.named_modules() if name in inputs]
    with torch.no_grad():
        for x, _ in loader:
            work(x)
    for h in hooks:
        h.remove()
    return {
        name: (torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0),
               torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0))
        for name, xs in inputs.items()
    }


def test_reestimate_bn_equals_the_average_of_batch_statistics_and_restores_state():
    model, loader = tiny(0), images(0)
    model.bn2.momentum = 0.3
    model.train()
    model.bn2.eval()  # mixed modes come back as they were
    expected = manual_bn_stats(model, loader)
    assert analysis.reestimate_bn(model, loader) is model
    for name, (mean, var) in expected.items():
        bn = getattr(model, name)
        torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, atol=1e-6, rtol=1e-5)
        assert int(bn.num_batches_tracked) == len(loader)
    assert (model.bn1.momentum, model.bn2.momentum) == (0.1, 0.3)
    assert model.training and model.bn1.training and not model.bn2.training


def test_reestimate_bn_with_dropout_draws_as_in_training_and_leaves_the_callers_rng():
    # Dropout runs in the pass, drawing from the global generator; its state comes back, so a
    # barrier or re-estimation inside a training loop does not shift the loop's later draws.
    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))

    batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    oracle = net().train()
    torch.manual_seed(7)
    with torch.no_grad():  # the statistics dropout's draws give, from the caller's state
        hidden = [oracle[1](oracle[0](x)) for x in batches]
    mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    model = net()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    analysis.reestimate_bn(model, batches)
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(model[2].running_mean, mean, atol=1e-6, rtol=1e-5)


def test_reestimate_bn_of_an_eager_model_leaves_the_process_wide_compile_stance_alone():
    # force_eager is process-wide: set for an eager model, it would run compiled models trained
    # in other threads eagerly during the pass, for nothing.
    model, loader = tiny(0), images(0, batches=2)
    seen = []
    model.bn1.register_forward_hook(lambda *_: seen.append(torch._dynamo.eval_frame._stance.stance))
    analysis.reestimate_bn(model, loader)
    assert seen == ["default", "default"]


def test_reestimate_bn_of_a_compiled_model_compiles_nothing_and_spends_no_recompiles():
    # The pass sets each layer's momentum to 1/k before its k-th call: a compiled model would
    # recompile at every batch, hit dynamo's recompile limit (8), and leave the limit spent for
    # every other compiled model with hooks in the process (a pruned one then runs eagerly).
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        model, loader = tiny(0), images(0, batches=12)
        compiled = torch.compile(model, backend=backend)
        analysis.reestimate_bn(compiled, loader)
        assert graphs == []
        expected = manual_bn_stats(tiny(0), loader)
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(getattr(model, name).running_mean.double(), mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(getattr(model, name).running_var.double(), var, atol=1e-6, rtol=1e-5)
        other = torch.compile(signmask.prune(tiny(1), 0.5), backend=backend)
        other(loader[0][0])  # compiled as usual after the pass: its stance is back
        assert len(graphs) == 1
    finally:
        torch._dynamo.reset()


def test_reestimate_bn_batches_limits_the_pass():
    model, loader = tiny(0), images(0)
    analysis.reestimate_bn(model, loader, batches=2)
    expected = manual_bn_stats(tiny(0), loader[:2])
    torch.testing.assert_close(model.bn1.running_mean.double(), expected["bn1"][0], atol=1e-6, rtol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 2


def test_reestimate_bn_timm_batchnormact():
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5).eval()
    bn = model.bn1
    assert type(bn).__name__ == "BatchNormAct2d"
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].double()))
    loader = images(1, batches=2, n=4, size=32)
    analysis.reestimate_bn(model, loader)
    hook.remove()
    torch.testing.assert_close(bn.running_mean.double(), torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), torch.stack([x.var(dim=(0, 2, 3)) for x in seen]).mean(0),
                               atol=1e-6, rtol=1e-5)
    assert not model.training and bn.momentum == 0.1


def _batch_average(loader, per_batch):
    return torch.stack([per_batch(x.double()) for x, _ in loader]).mean(0)


def test_reestimate_bn_averages_instance_norm_statistics():
    # InstanceNorm has no cumulative mode of its own (momentum=None means 0 for it).
    net = nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True))
    loader = images(2)
    analysis.reestimate_bn(net, loader)
    norm = net[0]
    torch.testing.assert_close(norm.running_mean.double(), _batch_average(loader, lambda x: x.mean(dim=(2, 3)).mean(0)),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm.running_var.double(), _batch_average(loader, lambda x: x.var(dim=(2, 3)).mean(0)),
                               atol=1e-6, rtol=1e-5)
    assert norm.momentum == 0.1


def test_reestimate_bn_averages_timm_evonorm_running_variance():
    net = nn.Sequential(timm.layers.EvoNorm2dB0(3))
    with torch.no_grad():
        net[0].running_var.fill_(7.0)  # stale statistics that must not survive
    loader = images(3)
    analysis.reestimate_bn(net, loader)
    torch.testing.assert_close(net[0].running_var.double(), _batch_average(loader, lambda x: x.var(dim=(0, 2, 3))),
                               atol=1e-6, rtol=1e-5)
    assert net[0].momentum == 0.1


class FrozenNormNet(nn.Module):
    """Keeps its norm in eval mode in train(): a common fine-tuning pattern."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.bn(x)


def test_reestimate_bn_re_estimates_norms_a_model_keeps_frozen():
    net = FrozenNormNet()
    loader = images(4)
    analysis.reestimate_bn(net, loader)
    torch.testing.assert_close(net.bn.running_mean.double(), _batch_average(loader, lambda x: x.mean(dim=(0, 2, 3))),
                               atol=1e-6, rtol=1e-5)
    assert int(net.bn.num_batches_tracked) == len(loader)


class SharedNorm(nn.Module):
    """One BatchNorm applied twice per forward (siamese branches)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + self.bn(3 * x + 10)


def test_reestimate_bn_averages_every_call_of_a_norm_used_twice_per_forward():
    net, loader = SharedNorm(), images(5)
    analysis.reestimate_bn(net, loader)
    calls = [y for x, _ in loader for y in (x.double(), 3 * x.double() + 10)]
    torch.testing.assert_close(net.bn.running_mean.double(), torch.stack([y.mean(dim=(0, 2, 3)) for y in calls]).mean(0),
                               atol=1e-6, rtol=1e-5)
    assert int(net.bn.num_batches_tracked) == 2 * len(loader)


def test_bn_modules_needs_a_momentum():
    class Frozen(nn.Module):  # as torchvision's FrozenBatchNorm2d: statistics, no momentum
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(2))
            self.register_buffer("running_var", torch.ones(2))

    boolean = nn.BatchNorm1d(2)
    boolean.momentum = True  # not a number
    net = nn.Sequential(Frozen(), nn.BatchNorm1d(2), boolean, nn.BatchNorm1d(2, momentum=None))
    assert bn_modules(net) == [net[1], net[3]]


class Exploding:
    """A loader whose second batch is not a tensor."""

    def __iter__(self):
        yield torch.randn(4, 3, 4, 4)
        yield "not a batch"


def test_reestimate_bn_failure_restores_everything():
    model = tiny(0)
    model.eval()
    before = snapshot(model)
    with pytest.raises(TypeError, match="loader must yield"):
        analysis.reestimate_bn(model, Exploding())
    assert_same(before, snapshot(model))
    assert not model.training and model.bn1.momentum == 0.1
    with pytest.raises(ValueError, match="no batch"):
        analysis.reestimate_bn(model, [])
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="batches"):
        analysis.reestimate_bn(model, images(0), batches=0)


def test_reestimate_bn_without_batchnorm_is_a_noop():
    class Untouchable:
        def __iter__(self):
            raise AssertionError("the loader must not be read")

    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    before = snapshot(net)
    assert analysis.reestimate_bn(net, Untouchable()) is net
    assert_same(before, snapshot(net))


# ------------------------------------------------------------------------------- evaluate
def test_evaluate_weights_batches_by_size_and_restores_mode():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]
    loss, error = analysis.evaluate(net, loader)
    with torch.no_grad():
        logits = net(x)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert error == int((logits.argmax(1) != y).sum()) / 10
    assert net.training
    with pytest.raises(ValueError, match="do not match"):
        analysis.evaluate(net, [(x, y[:5])])
    with pytest.raises(TypeError, match="pairs"):
        analysis.evaluate(net, [x])
    with pytest.raises(ValueError, match="no batch"):
        analysis.evaluate(net, [])


def test_evaluation_accuracy_is_the_fraction_of_targets_right():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    result = analysis.evaluate(net, [(x, y)])
    with torch.no_grad():
        right = int((net(x).argmax(1) == y).sum())
    assert result.accuracy == 1.0 - result.error == pytest.approx(right / 10)
    assert len(result) == 2  # a property, not a field: `loss, error = evaluate(...)` still unpacks


# -------------------------------------------------------------------------------- barrier
def test_barrier_of_a_network_with_itself_is_exactly_zero():
    model = tiny(0)
    b = analysis.barrier(model, model, images(1), train_loader=images(2), points=4)
    assert b.barrier == 0.0 and b.loss_barrier == 0.0 and b.stable
    assert len(set(b.errors)) == 1 and len(set(b.losses)) == 1
    assert b.alphas == (0.0, 1 / 3, 2 / 3, 1.0)


def test_barrier_endpoints_are_evaluated_after_reestimation():
    a, b = pruned_pair()
    before_a, before_b = snapshot(a), snapshot(b)
    test, train = images(1), images(2)
    result = analysis.barrier(a, b, test, train_loader=train, points=3)
    for model, i in ((a, 0), (b, -1)):
        ref = analysis.reestimate_bn(copy.deepcopy(model), train)
        loss, error = analysis.evaluate(ref, test)
        assert (result.losses[i], result.errors[i]) == (loss, error)
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))


def test_barrier_of_a_hand_built_symmetric_pair():
    # logits = W2 (w1 x): a = (1, [1, -1]) and b = (-1, [-1, 1]) compute the same function; halfway
    # the weights are 0, all logits tie, argmax says class 0 and the class-1 half is wrong.
    def net(w1, w2):
        m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
        with torch.no_grad():
            m[0].weight.fill_(w1)
            m[1].weight.copy_(torch.tensor([[w2], [-w2]]))
        return m

    data = [(torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), torch.tensor([0, 1, 0, 1]))]
    result = analysis.barrier(net(1.0, 1.0), net(-1.0, -1.0), data, points=5)
    assert result.errors == (0.0, 0.0, 0.5, 0.0, 0.0)
    assert result.barrier == 0.5 and not result.stable
    assert result.loss_barrier == pytest.approx(math.log(2) - math.log1p(math.exp(-2)), rel=1e-6)


def test_barrier_validates_before_evaluating():
    a, b = signmask.prune(tiny(0), 0.5), signmask.prune(tiny(1), 0.5)
    with pytest.raises(ValueError, match="weight_mask"):
        analysis.barrier(a, b, images(1), train_loader=images(2))
    with pytest.raises(ValueError, match="BatchNorm.*train_loader"):
        analysis.barrier(tiny(0), tiny(1), images(1))
    with pytest.raises(ValueError, match="points"):
        analysis.barrier(tiny(0), tiny(1), images(1), train_loader=images(2), points=1)
    with pytest.raises(TypeError, match="points"):
        analysis.barrier(tiny(0), tiny(1), images(1), train_loader=images(2), points=2.0)


@pytest.mark.parametrize("pruned_first", [True, False])
def test_barrier_of_a_pruned_and_a_dense_model_names_the_tensor_and_the_pruned_model(pruned_first):
    dense, pruned = tiny(0), signmask.prune(tiny(0), 0.5, include="fc")
    a, b = (pruned, dense) if pruned_first else (dense, pruned)
    names = ("model_a", "model_b") if pruned_first else ("model_b", "model_a")
    before_a, before_b = snapshot(a), snapshot(b)
    message = (f"tensor 'fc.weight' is pruned in {names[0]} and not in {names[1]}; interpolation "
               "needs both networks under the same masks (or, to compare two dense networks, "
               "signmask.remove on the pruned one first)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        analysis.barrier(a, b, images(1), train_loader=images(2), points=3)
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))
    # the advice works: the path is the one from the dense network holding the pruned weights
    removed = signmask.remove(copy.deepcopy(pruned))
    oracle = tiny(0)
    with torch.no_grad():
        oracle.fc.weight.mul_(pruned.fc.weight_mask)
    result = analysis.barrier(removed, dense, images(1), train_loader=images(2), points=3)
    assert result == analysis.barrier(oracle, dense, images(1), train_loader=images(2), points=3)


def test_barrier_dataclass_validates():
    with pytest.raises(ValueError, match="0.0 to 1.0"):
        analysis.Barrier((0.0, 0.5), (1.0, 1.0), (0.1, 0.1))
    with pytest.raises(ValueError, match="same length"):
        analysis.Barrier((0.0, 1.0), (1.0,), (0.1, 0.1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analysis.Barrier((0.0, 1.0), (1.0, 1.0), (0.1, 1.5))
    with pytest.raises(ValueError, match="NaN"):
        analysis.Barrier((0.0, 1.0), (math.nan, 1.0), (0.1, 0.1))
    edge = analysis.Barrier((0.0, 0.5, 1.0), (0.0, 0.0, 0.0), (0.0, 0.02, 0.0))
    assert edge.barrier == 0.02 and not edge.stable  # stable means strictly below 2%
    # 20 more errors than the endpoints' 100 or 110 in 1000 images: 2.0 points either way, though
    # the fractions round to 0.01999999999999999 and 0.020000000000000004.
    for low in (100, 110):
        b = analysis.Barrier((0.0, 0.5, 1.0), (1.0, 1.0, 1.0), (low / 1000, (low + 20) / 1000, low / 1000))
        assert not b.stable, b.barrier
    assert analysis.Barrier((0.0, 0.5, 1.0), (1.0, 1.0, 1.0), (0.1, 0.119, 0.1)).stable


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_barrier_dataclass_refuses_losses_that_are_not_finite(bad):
    # an infinite loss made loss_barrier NaN (inf - inf), or infinite, against its ">= 0"
    with pytest.raises(ValueError, match=r"losses must be finite \(no NaN or inf\), got \((-?inf|nan), 1\.0\)"):
        analysis.Barrier((0.0, 1.0), (bad, 1.0), (0.0, 0.0))


@pytest.mark.parametrize(
    "name", [pytest.param("test_resnet", marks=since_timm("1.0.10", "test_resnet")), "test_vit"]
)
def test_barrier_on_timm_models(name):
    kwargs = {"img_size": 32} if "vit" in name else {}
    a = signmask.prune(timm.create_model(name, pretrained=False, num_classes=5, **kwargs), 0.5)
    b = signmask.transfer(signmask.extract(a), timm.create_model(name, pretrained=False, num_classes=5, **kwargs),
                          signs="init")
    data = images(3, batches=1, n=4, size=32)
    has_bn = bool(analysis._bn_stats.bn_modules(a))
    assert has_bn == (name == "test_resnet")
    result = analysis.barrier(a, b, data, train_loader=data if has_bn else None, points=2)
    same = analysis.barrier(a, a, data, train_loader=data if has_bn else None, points=2)
    assert len(result.errors) == 2 and same.barrier == 0.0


# ---------------------------------------------------------------------------- instability
def sgd_train(steps=3):
    def train(model, seed):
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        calls.append(seed)

    calls = []
    return train, calls


def test_instability_trains_two_copies_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = snapshot(model)
    train, calls = sgd_train()
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    result = analysis.instability(model, train, data, seeds=(3, 4), points=3)
    assert calls == [3, 4] and result.alphas == (0.0, 0.5, 1.0)
    assert_same(before, snapshot(model))

    def same_every_time(net, seed):  # ignores the seed: both copies end identical
        with torch.no_grad():
            net[0].weight.mul_(0.5)

    assert analysis.instability(model, same_every_time, data, points=3).barrier == 0.0


def test_instability_validates_before_training():
    train, calls = sgd_train()
    with pytest.raises(ValueError, match="train_loader"):
        analysis.instability(tiny(0), train, images(1))
    with pytest.raises(ValueError, match="differ"):
        analysis.instability(nn.Linear(4, 3), train, [], seeds=(1, 1))
    with pytest.raises(TypeError, match="callable"):
        analysis.instability(nn.Linear(4, 3), None, [])
    assert calls == []
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(TypeError, match="return None or an nn.Module"):
        analysis.instability(nn.Linear(4, 3), lambda m, s: 1.0, data)


class Unread:
    """A loader that must not be read (validation happens before any pass)."""

    def __iter__(self):
        raise AssertionError("the loader must not be read")

    def __len__(self):
        return 0


@pytest.mark.parametrize("model_fn, kwargs, error, message", [
    (lambda: nn.Linear(4, 3), dict(loss_fn="cross_entropy"), TypeError, "loss_fn must be callable"),
    (lambda: nn.Linear(4, 3), dict(eval_batches=0), ValueError, "eval_batches must be an int >= 1"),
    (lambda: nn.Linear(4, 3), dict(eval_batches=1.0), TypeError, "eval_batches must be an int"),
    (lambda: nn.Linear(4, 3), dict(eval_batches=True), TypeError, "eval_batches must be an int"),
    (lambda: tiny(0), dict(train_loader=images(2), bn_batches=0), ValueError, "bn_batches must be an int >= 1"),
    (lambda: tiny(0), dict(train_loader=images(2), bn_batches="2"), TypeError, "bn_batches must be an int"),
    (lambda: nn.Linear(4, 3), dict(bn_batches=-1), ValueError, "bn_batches must be an int >= 1"),  # no BN: still a bug
    (lambda: tiny(0), dict(train_loader=[]), ValueError, "train_loader must yield at least one batch"),
    (lambda: tiny(0), dict(train_loader=Unread()), ValueError, "train_loader must yield at least one batch"),
    (lambda: tiny(0), dict(train_loader=3), TypeError, "train_loader must be an iterable"),
    (lambda: nn.Linear(4, 3), dict(eval_loader=[]), ValueError, "eval_loader must yield at least one batch"),
    (lambda: nn.Linear(4, 3), dict(eval_loader=None), TypeError, "eval_loader must be an iterable"),
    (lambda: nn.Linear(4, 3), dict(points=1), ValueError, "points must be an int >= 2"),
    (lambda: nn.Linear(4, 3), dict(seeds=3), TypeError, "seeds must be a pair of ints, got int"),
    (lambda: nn.Linear(4, 3), dict(seeds="ab"), TypeError, "seeds must be a pair of ints, got str"),
    (lambda: nn.Linear(4, 3), dict(seeds=(0, 1, 2)), ValueError, "seeds must be a pair of ints, got 3"),
    (lambda: nn.Linear(4, 3), dict(seeds=(0, 1.5)), TypeError, r"seeds\[1\] must be an int"),
    (lambda: nn.Linear(4, 3), dict(model="net"), TypeError, "model must be a torch.nn.Module"),
])
def test_instability_checks_every_argument_before_training(model_fn, kwargs, error, message):
    train, calls = sgd_train()
    kwargs = dict(kwargs)
    model = kwargs.pop("model", None) or model_fn()
    before = snapshot(model) if isinstance(model, nn.Module) else None
    eval_loader = kwargs.pop("eval_loader", [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    with pytest.raises(error, match=message):
        analysis.instability(model, train, eval_loader, **kwargs)
    assert calls == []  # refused before the first (costly) training
    if before is not None:
        assert_same(before, snapshot(model))


def test_instability_refuses_a_train_that_cannot_take_model_and_seed():
    """``train(model)``, a common slip, is named with its signature before anything trains; any
    callable that binds ``(model, seed)`` (defaults, a callable object) is taken."""
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    calls = []

    def one(model):
        calls.append(model)

    with pytest.raises(TypeError, match=re.escape("train must be callable as train(model, seed), got one(model)")):
        analysis.instability(nn.Linear(4, 3), one, data)
    assert calls == []
    sgd, seen = sgd_train()

    class Trainer:
        def __call__(self, model, seed, epochs=1):
            sgd(model, seed)

    def with_defaults(model, seed, *, steps=2):
        sgd(model, seed)

    for train in (Trainer(), with_defaults):
        analysis.instability(nn.Linear(4, 3), train, data, points=2)
    assert seen == [0, 1, 0, 1]


class Watched(list):
    """A list of batches that records every pass over it."""

    def __init__(self, batches):
        super().__init__(batches)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(loss_fn=None), TypeError, "loss_fn must be callable"),
    (dict(eval_batches=0), ValueError, "eval_batches must be an int >= 1"),
    (dict(bn_batches=0), ValueError, "bn_batches must be an int >= 1"),
    (dict(train_loader=[]), ValueError, "train_loader must yield at least one batch"),
    (dict(eval_loader=[]), ValueError, "eval_loader must yield at least one batch"),
    (dict(eval_loader=5), TypeError, "eval_loader must be an iterable"),
    (dict(eval_loader=(b for b in images(1))), TypeError,
     "eval_loader is read once per point, but a generator can be read only once"),
    (dict(train_loader=iter(images(2))), TypeError,
     "train_loader is read once per point, but a list_iterator can be read only once"),
])
def test_barrier_names_the_bad_argument_before_evaluating(kwargs, error, message):
    a, b = tiny(0), tiny(1)
    args = {"eval_loader": Watched(images(1)), "train_loader": Watched(images(2)), **kwargs}
    loaders = [x for x in args.values() if isinstance(x, Watched)]
    before_a, before_b = snapshot(a), snapshot(b)
    with pytest.raises(error, match=message):
        analysis.barrier(a, b, args.pop("eval_loader"), **args)
    assert [x.passes for x in loaders] == [0] * len(loaders)  # nothing re-estimated or evaluated
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))


class NoLength:
    """An iterable of batches without a length (an IterableDataset's DataLoader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("bad, batches, error, message", [
    ("train_loader", [{"x": torch.zeros(8, 4)}], TypeError, "must yield an inputs tensor or .* got dict"),
    ("eval_loader", [{"x": torch.zeros(8, 4)}], TypeError, r"must yield \(inputs, targets, ...\) .* got dict"),
    ("eval_loader", [torch.zeros(8, 4)], TypeError, r"must yield \(inputs, targets\) pairs"),
    ("train_loader", NoLength([]), ValueError, "yielded no batch"),
])
def test_barrier_names_the_loader_whose_batches_it_cannot_use(bad, batches, error, message):
    # found only once the loader is read; the error must say which of the two it was
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    good = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    loaders = {"eval_loader": good, "train_loader": good, bad: batches}
    before = snapshot(model)
    with pytest.raises(error, match=f"^{bad} {message}"):
        analysis.barrier(model, model, loaders["eval_loader"], train_loader=loaders["train_loader"],
                         points=2)
    assert_same(before, snapshot(model))
    public = analysis.reestimate_bn if bad == "train_loader" else analysis.evaluate
    with pytest.raises(error, match=f"^loader {message}"):
        public(model, batches)


def norms_only_wrapper(seed):
    """A ``Wrapper`` whose only clash is ``module.bn`` beside ``bn`` (no conv/linear weight)."""
    model = Wrapper(seed)
    del model.fc, model.module.fc
    model.lin = nn.Linear(4, 4)
    return model


COLLISION = "{}, {}.weight and {}.weight are different tensors with the same name once the wrapper prefixes"


@pytest.mark.parametrize("make_a, make_b, message", [
    (Wrapper, tiny, COLLISION.format("in model_a", "module.fc", "fc")),
    (tiny, Wrapper, COLLISION.format("in model_b", "module.fc", "fc")),
    (norms_only_wrapper, norms_only_wrapper, COLLISION.format("in model_a", "module.bn", "bn")),
])
def test_interpolate_and_barrier_refuse_two_tensors_with_one_canonical_name(make_a, make_b, message):
    # A child named "module" beside the model's own fc: both are "fc.weight" once the wrapper
    # prefix is stripped, and one of them used to stay model_a's at every alpha, silently.
    a, b = make_a(0), make_b(1)
    before_a, before_b = snapshot(a), snapshot(b)
    loaders = [Watched([(torch.randn(8, 4), torch.randint(0, 2, (8,)))]) for _ in range(2)]
    with pytest.raises(ValueError, match=message):
        analysis.interpolate(a, b, 1.0)
    with pytest.raises(ValueError, match=message):
        analysis.barrier(a, b, loaders[0], train_loader=loaders[1], points=2)
    assert [x.passes for x in loaders] == [0, 0]
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))


def test_reestimate_bn_uses_trained_norms_under_aws_interpolation():
    from signmask import _interpolate

    torch.manual_seed(0)
    plain = tiny(3)
    with torch.no_grad():
        for m in (plain.bn1, plain.bn2):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
    hooked = copy.deepcopy(plain)
    alpha = torch.tensor(0.7)
    with torch.no_grad():  # init values unlike the trained ones, so a != 0 would show
        _interpolate.attach(hooked, alpha)
        for m in (hooked.bn1, hooked.bn2):
            m.weight_init.fill_(3.0)
            m.bias_init.fill_(2.0)
    loader = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    analysis.reestimate_bn(plain, loader)
    analysis.reestimate_bn(hooked, loader)
    for name in ("bn1", "bn2"):
        a, b = getattr(plain, name), getattr(hooked, name)
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    assert float(alpha) == pytest.approx(0.7)  # the caller's coefficient is untouched
    hooked.train()
    x = loader[0]
    expect = torch.lerp(hooked.bn1.weight_orig.detach(), hooked.bn1.weight_init, torch.tensor(0.7))
    hooked(x)
    assert torch.equal(hooked.bn1.weight, expect)  # and the hooks use it again afterwards


def test_interpolation_between_signmask_and_stock_pruned_models_with_one_mask():
    from torch.nn.utils import prune as tprune

    a = signmask.prune(tiny(0), 0.5)
    b = tiny(1)
    for name in ("conv1", "conv2", "fc"):  # the same mask, as stock prune's float buffer
        tprune.custom_from_mask(getattr(b, name), "weight", getattr(a, name).weight_mask.float())
    mid = analysis.interpolate(a, b, 0.5)
    for name in ("conv1", "conv2", "fc"):
        ma, mb, mm = getattr(a, name), getattr(b, name), getattr(mid, name)
        expected = ((0.5 * ma.weight_orig.double() + 0.5 * mb.weight_orig.double()).float()) * ma.weight_mask
        assert torch.equal(mm.weight, expected)
    tprune.custom_from_mask(b.fc, "weight", torch.zeros_like(b.fc.weight))  # stacked: fc's mask now differs
    with pytest.raises(ValueError, match="'fc.weight_mask' differs between model_a and model_b"):
        analysis.interpolate(a, b, 0.5)


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_barrier_refuses_a_repeated_alpha():
    with pytest.raises(ValueError, match="strictly"):
        analysis.Barrier((0.0, 0.5, 0.5, 1.0), (0.1, 0.2, 0.2, 0.1), (0.1, 0.2, 0.2, 0.1))


def test_instability_uses_the_models_train_returns():
    torch.manual_seed(0)
    data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    returned = []

    def train(net, seed):
        torch.manual_seed(seed + 10)
        new = nn.Linear(4, 3)  # a new model, not the copy it got
        returned.append(new)
        return new

    got = analysis.instability(nn.Linear(4, 3), train, data, points=3)
    want = analysis.barrier(returned[0], returned[1], data, points=3)
    assert got.losses == want.losses


# ---------------------------------- analysis._evaluation and _bn_stats: behaviour pinned by mutation testing


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits


def test_evaluate_refuses_mismatched_spatial_shapes():
    # E03
    model = _Fixed(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="do not match class-index targets"):
        analysis.evaluate(model, [(torch.zeros(2), torch.zeros(2, 4, 5, dtype=torch.long))])


def test_evaluate_and_barrier_refuse_unbatched_samples_with_the_shape_error():
    # DataLoader(batch_size=None) yields single samples: logits (C,) and 0-d targets
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    samples = TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    loader = DataLoader(samples, batch_size=None)
    message = r"logits of shape \(3,\) do not match class-index targets of shape \(\).*unbatched"
    with pytest.raises(ValueError, match=message):
        analysis.evaluate(net, loader)
    with pytest.raises(ValueError, match=message):
        analysis.barrier(net, net, loader, points=2)
    assert net.training


def test_evaluate_takes_the_class_axis_1_for_dense_predictions():
    # E07: per-position error of (N, C, L) logits
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]]])  # N=1, C=3, L=2: classes [0, 1]
    model = _Fixed(logits)
    ev = analysis.evaluate(model, [(torch.zeros(1), torch.tensor([[0, 0]]))])
    assert ev.error == 0.5


def test_evaluate_counts_a_prediction_holding_nan_as_wrong():
    # argmax takes NaN for the largest logit: a diverged (all-NaN) model scored every class-0
    # target right (error 0.5 here), and a NaN logit won its row. Inf logits still rank.
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, nan, nan], [nan, 0.0, 1.0], [0.0, nan, 1.0], [inf, 0.0, 1.0],
                           [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 0, 1, 2])
    ev = analysis.evaluate(_Fixed(logits), [(torch.zeros(6), targets)])
    assert ev.error == 4 / 6  # right: the inf logit of row 3 and row 4; row 5 ties to class 0
    dense = _Fixed(torch.full((2, 3, 2), nan))  # (N, C, L): a NaN at a position counts wrong
    assert analysis.evaluate(dense, [(torch.zeros(2), torch.zeros(2, 2, dtype=torch.long))]).error == 1.0


def test_evaluate_leaves_ignored_targets_out_of_error_and_loss():
    # cross_entropy ignores -100 (unlabeled pixels): they are no error, and each batch's mean
    # loss weighs by the targets it counted. Oracle: one cross_entropy over all batches at once.
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    y[:24] = -100
    ev = analysis.evaluate(net, [(x[:32], y[:32]), (x[32:], y[32:])])
    with torch.no_grad():
        logits = net(x)
    counted = y >= 0
    assert math.isclose(ev.loss, float(F.cross_entropy(logits, y)), rel_tol=1e-6)
    assert ev.error == int((logits.argmax(1) != y)[counted].sum()) / int(counted.sum())
    with pytest.raises(ValueError, match="only negative .ignored. targets"):
        analysis.evaluate(net, [(x[:8], torch.full((8,), -100))])


@pytest.mark.parametrize("model, loss_fn, message", [
    (lambda: _Fixed((torch.zeros(2, 3), torch.zeros(2))), F.cross_entropy, "model must return a logits tensor .* returned tuple"),
    (lambda: nn.Linear(4, 3), lambda a, b: F.cross_entropy(a, b, reduction="none"),
     r"loss_fn must return a scalar batch mean, returned \(2,\)"),
])
def test_evaluate_names_a_model_or_loss_of_the_wrong_kind(model, loss_fn, message):
    with pytest.raises(TypeError, match=message):
        analysis.evaluate(model(), [(torch.randn(2, 4), torch.tensor([0, 1]))], loss_fn=loss_fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_targets_the_default_loss_refuses_are_named_by_their_loader(dtype):
    # cross_entropy's own RuntimeError ("expected target dtype to be Long or Byte") named no loader.
    data = [(torch.randn(2, 4), torch.tensor([0, 1]).to(dtype))]
    with pytest.raises(TypeError, match=rf"loader must yield class-index targets of dtype int64 \(or uint8\) "
                                        rf"for the default loss_fn, F.cross_entropy; got {dtype}"):
        analysis.evaluate(nn.Linear(4, 3), data)
    with pytest.raises(TypeError, match="eval_loader must yield class-index targets"):
        analysis.barrier(nn.Linear(4, 3), nn.Linear(4, 3), data, points=2)
    # another loss_fn may take them; uint8 targets pass cross_entropy
    mse = lambda logits, y: F.mse_loss(logits[:, 0], y.float())  # noqa: E731
    assert analysis.evaluate(nn.Linear(4, 3), data, loss_fn=mse).loss >= 0.0
    assert analysis.evaluate(nn.Linear(4, 3), [(torch.randn(2, 4), torch.tensor([0, 1], dtype=torch.uint8))]).loss > 0


def test_interpolate_endpoints_are_exact_beside_infinite_weights_and_barrier_refuses_them_first():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        b.weight[0, 0] = float("inf")  # 0 * inf made the alpha = 0 endpoint NaN
    assert torch.equal(analysis.interpolate(a, b, 0.0).weight, a.weight)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    calls = []
    loss = lambda logits, y: calls.append(1) or F.cross_entropy(logits, y)  # noqa: E731
    with pytest.raises(ValueError, match="model_b's weight holds NaN or infinite values"):
        analysis.barrier(a, b, data, points=3, loss_fn=loss)
    assert calls == []  # refused before evaluating any point


def test_barrier_bn_batches_re_estimates_on_the_first_batches_only():
    a, b = pruned_pair()
    test, train = images(1), images(2)
    got = analysis.barrier(a, b, test, train_loader=train, points=3, bn_batches=1)
    first = analysis.barrier(a, b, test, train_loader=train[:1], points=3)
    every = analysis.barrier(a, b, test, train_loader=train, points=3)
    assert got.losses == first.losses
    assert got.losses != every.losses  # the data tells the two apart


def test_barrier_eval_batches_evaluates_on_the_first_batches_only():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    got = analysis.barrier(a, b, data, points=3, eval_batches=1)
    assert got.losses == analysis.barrier(a, b, data[:1], points=3).losses
    assert got.losses != analysis.barrier(a, b, data, points=3).losses


def test_barrier_refuses_alphas_that_do_not_start_at_zero():
    with pytest.raises(ValueError, match=r"alphas must increase strictly from 0\.0 to 1\.0, got \(0\.5, 1\.0\)"):
        analysis.Barrier((0.5, 1.0), (1.0, 1.0), (0.1, 0.1))


def test_interpolate_refuses_different_sign_locks_on_kept_weights():
    a, b = pruned_pair(signs="locked")
    conv = b.conv1
    keep = conv.weight_mask.bool()
    bits = signmask._bits.sign_bits(conv.weight_sign, conv.weight_orig.shape).bool()
    conv.weight_sign.copy_(signmask._bits.pack_signs(bits ^ keep))  # flip the lock of every kept weight
    n = int(keep.sum())
    with pytest.raises(ValueError, match=rf"'conv1\.weight_sign' differs between model_a and model_b \({n} entries\)"):
        analysis.interpolate(a, b, 0.5)


def test_interpolate_at_one_is_exactly_model_b_beside_infinite_weights_in_model_a():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        a.weight[0, 0] = float("inf")  # 0 * inf would make the alpha = 1 endpoint NaN
    assert torch.equal(analysis.interpolate(a, b, 1.0).weight, b.weight)


def test_interpolate_refuses_models_of_different_dtypes():
    with pytest.raises(ValueError, match=r"tensor 'weight' differs: model_a has \(2, 3\) torch\.float32, "
                                         r"model_b has \(2, 3\) torch\.float64"):
        analysis.interpolate(nn.Linear(3, 2), nn.Linear(3, 2).double(), 0.5)


def test_interpolate_stores_the_locked_signs_in_weight_orig():
    # the forward reads only |weight_orig|, but remove() or a later unlock keeps weight_orig as is
    a, b = pruned_pair(signs="locked")
    mid = analysis.interpolate(a, b, 0.3)
    for name in ("conv1", "conv2", "fc"):
        m = getattr(mid, name)
        keep = m.weight_mask.bool()
        lock = signmask._bits.sign_bits(m.weight_sign, m.weight_orig.shape).bool()
        assert torch.equal(torch.signbit(m.weight_orig)[keep], lock[keep]), name


def test_evaluate_uses_running_statistics_of_a_model_left_in_train_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():  # running statistics far from any batch's, so batch statistics would show
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(4.0)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    before = snapshot(net)
    want = analysis.evaluate(copy.deepcopy(net).eval(), data)
    assert analysis.evaluate(net, data) == want
    assert_same(before, snapshot(net))  # running_mean and num_batches_tracked unchanged
    assert net.training and net[1].training


def test_reestimate_bn_restarts_num_batches_tracked():
    model, loader = tiny(0), images(0)
    model.bn1.num_batches_tracked.fill_(100)
    analysis.reestimate_bn(model, loader)
    assert int(model.bn1.num_batches_tracked) == len(loader) == 3


def test_barrier_dataclass_refuses_bool_values():
    # True is a numbers.Real; an alpha or error given as a bool is a caller's mistake
    with pytest.raises(TypeError, match="alphas must be real numbers, got bool"):
        analysis.Barrier((0.0, True), (0.1, 0.2), (0.1, 0.2))
    with pytest.raises(TypeError, match="errors must be real numbers, got bool"):
        analysis.Barrier((0.0, 1.0), (0.1, 0.2), (False, 0.2))


def test_instability_passes_bn_batches_and_eval_batches_to_barrier():
    # the limits must reach the barrier of the two trained copies, not only be validated
    def train(net, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    model, test, data = tiny(0), images(1), images(2)
    copies = [copy.deepcopy(model) for _ in range(2)]
    for net, seed in zip(copies, (0, 1)):
        train(net, seed)
    kwargs = dict(train_loader=data, points=3, bn_batches=1, eval_batches=1)
    got = analysis.instability(model, train, test, **kwargs)
    want = analysis.barrier(*copies, test, **kwargs)
    assert got.losses == want.losses and got.errors == want.errors
    for limit in ("bn_batches", "eval_batches"):  # the data tells each limit apart
        assert analysis.barrier(*copies, test, **{**kwargs, limit: None}).losses != want.losses


def test_barrier_refuses_nan_running_statistics_before_evaluating():
    # a diverged run shows in its buffers too, not only in its parameters
    a, b = pruned_pair()
    a.bn1.running_mean[0] = math.nan
    with pytest.raises(ValueError, match="model_a's bn1.running_mean holds NaN"):
        analysis.barrier(a, b, images(1), train_loader=images(2), points=2)


def test_instability_names_the_seed_whose_training_diverged_before_training_the_other():
    # It named "model_b", an argument of barrier's the caller never passed, after training both.
    calls = []

    def train(net, seed):
        calls.append(seed)
        with torch.no_grad():
            net[0].weight_orig[0, 0] = math.nan if seed == 7 else 1.0  # a pruned model's own tensor

    model = signmask.prune(nn.Sequential(nn.Linear(4, 3)), 0.5)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match=r"train\(model, 7\) left 0\.weight_orig holding NaN or infinite"):
        analysis.instability(model, train, data, seeds=(7, 8), points=2)
    assert calls == [7]
    with pytest.raises(ValueError, match=r"train\(model, 7\) left"):
        analysis.instability(model, train, data, seeds=(8, 7), points=2)


def test_instability_accepts_negative_seeds():
    # seeds are ints in [-2**63, ...): a negative seed is passed to train as given
    torch.manual_seed(0)
    train, calls = sgd_train()
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    analysis.instability(nn.Linear(4, 3), train, data, seeds=(-1, 2), points=2)
    assert calls == [-1, 2]


def test_interpolate_refuses_a_model_b_with_an_extra_tensor():
    # the layout check runs both ways: a tensor only model_b has is a different architecture
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    b.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match=r"only in model_a: \[\], only in model_b: \['extra'\]"):
        analysis.interpolate(a, b, 0.5)


def test_interpolate_float64_models_are_blended_without_float32_rounding():
    # the float64 blend is rounded once, to the model's own dtype
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    mid = analysis.interpolate(a, b, 0.3)
    assert torch.equal(mid.weight, 0.7 * a.weight.detach() + 0.3 * b.weight.detach())
    assert torch.equal(mid.bias, 0.7 * a.bias.detach() + 0.3 * b.bias.detach())


def test_reestimate_bn_runs_dropout_in_train_mode_and_restores_eval():
    # statistics are those of training's forward (dropout active), whatever mode the model was in
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4)).eval()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    torch.manual_seed(3)
    analysis.reestimate_bn(model, [x])
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True).double()
    torch.testing.assert_close(model[1].running_mean, dropped.mean(0).float())
    torch.testing.assert_close(model[1].running_var, dropped.var(0, unbiased=True).float())
    assert not model.training and not model[0].training and not model[1].training


def test_evaluate_skips_a_batch_whose_targets_are_all_ignored():
    # cross_entropy's mean over no target is NaN; such a batch adds nothing to the loss
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    first = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    ignored = (torch.randn(8, 4), torch.full((8,), -100))
    assert analysis.evaluate(net, [first, ignored]) == analysis.evaluate(net, [first])


def test_barrier_refuses_a_path_with_an_infinite_loss():
    # logit -inf for the target class: cross_entropy is inf at every point
    model = _Fixed(torch.tensor([[0.0, -math.inf]]))
    with pytest.raises(ValueError, match=r"losses must be finite .* got \(inf, inf\)"):
        analysis.barrier(model, model, [(torch.zeros(1), torch.tensor([1]))], points=2)


def _reference_blend(a, b, alpha):
    """The whole-tensor float64 blend interpolate computed before it went slice by slice."""
    if alpha in (0.0, 1.0):
        return (a if alpha == 0.0 else b).detach().to(a.device, a.dtype, copy=True)
    return ((1.0 - alpha) * a.detach().double() + alpha * b.detach().double()).to(a.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("signs", ["free", "locked"])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_interpolate_in_slices_equals_the_whole_tensor_float64_blend(dtype, signs, chunk,
                                                                    monkeypatch):
    from signmask import _bits
    from signmask.analysis import _interpolation

    monkeypatch.setattr(_interpolation, "_CHUNK", chunk)

    def net(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
        m = m.to(dtype)
        m[0].to(memory_format=torch.channels_last)  # strided: sliced by rows, not flat
        return m

    a = signmask.prune(net(0), 0.4, signs=signs)
    b = copy.deepcopy(a)  # same masks and locks, other values
    with torch.no_grad():
        for p, q in zip(b.parameters(), net(1).parameters()):
            p.copy_(q)
        a[3].bias[0] = math.inf  # infinities (and the NaN of inf - inf) blend entry by entry
        b[3].bias[:2] = -math.inf
        b[1].running_var.mul_(3.0)
    plan = _interpolation.plan_blend(a, b)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    for alpha in (0.0, 0.3, 0.5, 1.0):
        out = analysis.interpolate(a, b, alpha).state_dict()
        for key, how in plan.items():
            if how == "blend":
                want = _reference_blend(sd_a[key], sd_b[key], alpha)
            elif how == "magnitude":
                sign = sd_a[key[: -len("_orig")] + "_sign"]
                bits = _bits.sign_bits(sign, sd_a[key].shape).bool()
                magnitude = _reference_blend(sd_a[key].abs(), sd_b[key].abs(), alpha)
                want = torch.where(bits, -magnitude, magnitude)
            else:
                want = sd_a[key]
            assert bits_equal(out[key], want), (key, alpha)
    assert plan["0.weight_orig"] == ("magnitude" if signs == "locked" else "blend")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reestimate_bn_of_16_bit_statistics_averages_in_float64(dtype):
    # torch's in-place 16-bit update by (batch - running) / k stalls once that is under half an
    # ulp; the documented value is the mean of the per-batch means and unbiased variances.
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(dtype)
    batches = [(torch.randn(4, 3, 2, 2) * 2 + 5).to(dtype) for _ in range(200)]
    analysis.reestimate_bn(bn, batches)
    xs = torch.stack([b.double() for b in batches])  # [k, n, c, h, w]
    mean = xs.mean((1, 3, 4)).mean(0)
    var = xs.var((1, 3, 4), correction=1).mean(0)
    # Each batch's statistics are torch's own, rounded to 16 bits, then averaged: within an ulp.
    ulp = torch.finfo(dtype).eps  # one ulp at 1, relative
    for got, want in ((bn.running_mean, mean), (bn.running_var, var)):
        assert ((got.double() - want).abs() / want.abs()).max() <= ulp
    assert bn.running_mean.dtype == dtype and int(bn.num_batches_tracked) == 200
    assert bn.momentum == 0.1  # restored



def test_reestimate_bn_16_bit_reads_the_statistics_the_layer_computes():
    # A BatchNorm subclass that normalizes a transposed input, called with a keyword: the
    # statistics are the ones torch computed, not recomputed from the module's input.
    class LastDim(nn.BatchNorm1d):
        def forward(self, input):
            return super().forward(input.transpose(1, 2)).transpose(1, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = LastDim(4)

        def forward(self, x):
            return self.bn(input=x)

    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    batches = [(torch.randn(2, 3, 4) + torch.arange(4.0) * 10).bfloat16() for _ in range(20)]
    analysis.reestimate_bn(net, batches)
    want = torch.stack([b.double() for b in batches]).mean((0, 1, 2))
    assert ((net.bn.running_mean.double() - want).abs() <= 0.1).all(), net.bn.running_mean


def test_reestimate_bn_16_bit_survives_an_overflowing_batch_and_cancelling_means():
    # fp16: one batch's variance (1.8e5) is past fp16's range; it must not poison the others.
    bn = nn.BatchNorm1d(1).half()
    big = torch.tensor([[-300.0], [300.0], [0.0]]).half()  # unbiased variance 90000
    small = torch.tensor([[-1.0], [1.0], [0.0]]).half()  # 1
    analysis.reestimate_bn(bn, [big] + [small] * 9)
    assert torch.isfinite(bn.running_var).all() and abs(float(bn.running_var) - 9000.9) < 10
    # bf16: means that cancel; the average is far smaller than each batch's mean.
    bn = nn.BatchNorm1d(1).bfloat16()
    a = torch.tensor([[1.0], [1.0234375]]).bfloat16()  # bf16 numbers; their mean is not one
    analysis.reestimate_bn(bn, [a, -torch.ones(2, 1).bfloat16()])
    want = (1.01171875 - 1) / 2  # each batch's mean rounded to bf16 first gave 0.0078125
    assert abs(float(bn.running_mean) - want) <= want * torch.finfo(torch.bfloat16).eps



def test_reestimate_bn_16_bit_leaves_an_interpolated_norm_weight_in_its_dtype():
    from signmask import _interpolate

    bn = nn.BatchNorm1d(3).bfloat16()
    _interpolate.attach(bn, torch.tensor(0.5))
    before = bn.weight.clone()
    analysis.reestimate_bn(bn, [torch.randn(4, 3).bfloat16()])
    assert bn.weight.dtype == torch.bfloat16 and torch.equal(bn.weight, before)
    assert bn.weight_orig.dtype == bn.running_mean.dtype == torch.bfloat16



def test_reestimate_bn_16_bit_keeps_the_parameter_objects_under_overwrite_on_conversion():
    bn = nn.BatchNorm1d(3).bfloat16()
    params = list(bn.parameters())
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        analysis.reestimate_bn(bn, [torch.randn(4, 3).bfloat16()])
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert all(a is b for a, b in zip(bn.parameters(), params))
    assert all(p.dtype == torch.bfloat16 for p in bn.parameters())


@pytest.mark.parametrize("case", ["parametrized", "tied", "stock_pruned"])
def test_reestimate_bn_16_bit_leaves_entangled_layers_in_their_dtype(case):
    # Converting one of these alone to float32 would mix dtypes: it keeps torch's own pass.
    from torch.nn.utils import parametrize, prune as stock

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    b1, b2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    if case == "parametrized":
        parametrize.register_parametrization(b1, "weight", Double())
    elif case == "tied":
        b2.weight = b1.weight
    else:
        stock.l1_unstructured(b1, "weight", amount=1)
    net = nn.Sequential(b1, b2).bfloat16()
    analysis.reestimate_bn(net, [torch.randn(4, 3).bfloat16()])
    assert all(t.dtype == torch.bfloat16 for t in (*net.parameters(), *net.buffers())
               if t.is_floating_point())
    assert b1.weight.dtype == torch.bfloat16


def test_evaluate_refuses_a_single_logit_that_names_no_top1_class():
    # argmax over one column is class 0 for every sample: the error would be the fraction of 1s
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    bce = lambda z, t: F.binary_cross_entropy_with_logits(z.squeeze(1), t.float())  # noqa: E731
    with pytest.raises(ValueError, match=r"logits of shape \(10, 1\) hold one class"):
        analysis.evaluate(net, [(x, y)], loss_fn=bce)
    assert net.training
    two = nn.Sequential(net, Lambda(lambda z: torch.cat([torch.zeros_like(z), z], 1)))
    ev = analysis.evaluate(two, [(x, y)])  # the advised form: CE of (0, z) is z's BCE
    with torch.no_grad():
        z = net(x).squeeze(1)
    assert math.isclose(ev.loss, float(bce(z[:, None], y)), rel_tol=1e-6)
    assert ev.error == float(((z > 0).long() != y).double().mean())


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("ignored", [255, 3])
def test_evaluate_refuses_targets_past_the_last_class(ignored):
    # a loss_fn ignoring 255 (VOC's unlabeled pixels) left them counted as wrong and as weight
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    y[:4] = ignored
    loss_fn = lambda z, t: F.cross_entropy(z, t, ignore_index=ignored)  # noqa: E731
    with pytest.raises(ValueError, match=f"targets hold class {ignored}, but logits of shape "
                                         r"\(10, 3\) have 3 classes"):
        analysis.evaluate(net, [(x, y)], loss_fn=loss_fn)
    y[:4] = -100
    ev = analysis.evaluate(net, [(x, y)])  # the documented form
    with torch.no_grad():
        logits = net(x[4:])
    assert ev.error == float((logits.argmax(1) != y[4:]).double().mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_evaluate_computes_the_loss_of_16_bit_logits_in_float32(dtype):
    # cross_entropy of bf16 logits rounds its batch mean to 8 bits (2.453 for 2.4506)
    torch.manual_seed(0)
    net = nn.Linear(64, 10).to(dtype)
    x, y = torch.randn(1000, 64).to(dtype), torch.randint(0, 10, (1000,))
    ev = analysis.evaluate(net, [(x[:600], y[:600]), (x[600:], y[600:])])
    with torch.no_grad():
        logits = net(x)
    assert math.isclose(ev.loss, float(F.cross_entropy(logits.double(), y)), rel_tol=1e-6)
    assert ev.error == float((logits.argmax(1) != y).double().mean())


@pytest.mark.parametrize("batch, found", [
    (((torch.zeros(2, 4), torch.zeros(2, 4)), torch.tensor([0, 1])), r"got tuple \(tuple, Tensor\)"),
    ((torch.zeros(2, 4), [0, 1]), r"got tuple \(Tensor, list\)"),
    ((torch.zeros(2, 4),), r"got tuple \(Tensor\)"),
    ({"image": torch.zeros(2, 4), "label": torch.tensor([0, 1])}, r"got dict with keys \['image', 'label'\]"),
])
def test_evaluate_names_what_a_batch_it_cannot_use_holds(batch, found):
    # "got tuple" alone does not say which element is wrong, nor which keys a dict batch has
    with pytest.raises(TypeError, match=r"loader must yield \(inputs, targets, ...\) tuples or lists of tensors, "
                                        + found):
        analysis.evaluate(nn.Linear(4, 3), [batch])


_DICT_REFUSED = (r"; dict batches are not read \(which key holds the inputs is the dataset's convention\): "
                 r"make the loader yield \(inputs, targets\) tuples, e.g. with a DataLoader collate_fn$")


@pytest.mark.parametrize("bad", ["train_loader", "eval_loader"])
def test_dict_batches_are_refused_naming_the_loader_and_the_forms_it_takes(bad):
    # The messages offered "a tensor" to eval_loader (which needs targets) and did not say that
    # dicts are never read; the docstrings said nothing of dicts.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loaders = {"eval_loader": [(x, y)], "train_loader": [(x, y)], bad: [{"image": x, "label": y}]}
    forms = {"train_loader": r"an inputs tensor or \(inputs, ...\) tuples or lists of tensors",
             "eval_loader": r"\(inputs, targets, ...\) tuples or lists of tensors"}[bad]
    found = r", got dict with keys \['image', 'label'\]"
    before = snapshot(model)
    for run in (lambda: analysis.barrier(model, model, loaders["eval_loader"], points=2,
                                         train_loader=loaders["train_loader"]),
                lambda: analysis.instability(model, lambda net, seed: None, loaders["eval_loader"], points=2,
                                             train_loader=loaders["train_loader"])):
        with pytest.raises(TypeError, match=f"^{bad} must yield {forms}{found}{_DICT_REFUSED}"):
            run()
    public = analysis.reestimate_bn if bad == "train_loader" else analysis.evaluate
    with pytest.raises(TypeError, match=f"^loader must yield {forms}{found}{_DICT_REFUSED}"):
        public(model, loaders[bad])
    assert_same(before, snapshot(model))
    # What the message offers is read: the same batches as lists, (inputs,) for the BatchNorm pass.
    as_lists = analysis.barrier(model, model, [[x, y]], train_loader=[[x]], points=2)
    assert as_lists == analysis.barrier(model, model, [(x, y)], train_loader=[x], points=2)


@pytest.mark.parametrize("function", ["barrier", "instability", "evaluate", "reestimate_bn"])
def test_the_docstrings_state_the_batch_forms_and_that_dicts_are_refused(function):
    doc = " ".join(getattr(analysis, function).__doc__.split())
    if function == "instability":
        assert "eval_loader: as :func:`barrier`" in doc and "train_loader, points" in doc
        return
    assert "tuples or lists" in doc and "dict" in doc


class EvalOnlyBranch(nn.Module):
    """``bn_eval`` runs in eval mode only (train-mode forwards skip it), ``unused`` never."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.bn_eval = nn.BatchNorm1d(4)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn(x)
        return x if self.training else self.bn_eval(x)


def test_reestimate_bn_keeps_the_statistics_of_layers_the_pass_never_calls():
    # reset and never updated, they held mean 0 and variance 1: eval outputs silently changed
    model = EvalOnlyBranch().eval()
    with torch.no_grad():
        for m in (model.bn_eval, model.unused):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(5.0)
            m.num_batches_tracked.fill_(9)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("bn.")}
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    analysis.reestimate_bn(model, [x])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model.bn.running_mean, x.mean(0))  # the called layer re-estimated
    assert not model.training


def test_a_scripted_batchnorm_is_refused_by_name_before_anything_changes():
    # Its buffers are no dict to reset and restore: reestimate_bn and barrier crashed with an
    # AttributeError ('OrderedDictWrapper' object has no attribute 'get').
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), torch.jit.script(nn.BatchNorm2d(4)), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    message = r"^\['1'\] is a TorchScript module holding BatchNorm statistics .* re-estimate the eager model"
    with pytest.raises(TypeError, match=message):
        analysis.reestimate_bn(net, [(x, y)])
    with pytest.raises(TypeError, match=message):
        analysis.barrier(net, copy.deepcopy(net), [(x, y)], train_loader=[(x, y)], points=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
