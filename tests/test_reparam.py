"""The pruned model keeps working: deepcopy, pickle, state_dict, dtypes, torch.compile, sign
locks, stacking with stock ``torch.nn.utils.prune``, equality with stock prune, memory.

Oracles are stock ``torch.nn.utils.prune`` and tensors computed here by hand (numpy's
``unpackbits`` for sign bits), never signmask itself.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.nn.utils import prune as torch_prune
from torch.utils.checkpoint import checkpoint

import signmask
from signmask import _bits, _methods, _reparam
from _util import bits_equal, tiny

LAYERS = (nn.Conv2d, nn.Linear)


def small_net(seed: int = 0, c1: int = 4, c2: int = 6, k: int = 3, out: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, c1, k, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, k, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4, out),
    )


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LAYERS)]


def inputs(seed: int = 1, n: int = 4) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 8, 8)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def train_steps(model: nn.Module, steps: int, lr: float, seed: int = 2) -> None:
    """Plain SGD on an MSE loss; big ``lr`` makes weights cross zero."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    for _ in range(steps):
        y = torch.randn(8, layers(model)[-1].out_features, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def unpack_sign_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Independent decoder of the documented layout: 1 bit per weight, LSB first, 1 = negative."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), bitorder="little")[:n]
    return torch.from_numpy(bits.astype(bool)).view(tuple(shape))


def effective(module: nn.Module) -> torch.Tensor:
    """The weight a pruned module must use, computed here from its raw state."""
    w = module.weight_orig.detach() * module.weight_mask
    if "weight_sign" in module._buffers:
        neg = unpack_sign_bits(module.weight_sign, module.weight_orig.shape)
        w = torch.where(neg, -w.abs(), w.abs())
    return w


def dense_copy(model: nn.Module, seed: int = 99) -> nn.Module:
    """An unpruned model whose conv/linear weights are the pruned model's effective weights."""
    oracle = small_net(seed, *arch(model)).to(next(model.parameters()).dtype)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("_mask", "_sign")):
            continue
        if k.endswith("weight_orig"):
            module = model.get_submodule(k[: -len(".weight_orig")])
            state[k[: -len("_orig")]] = effective(module)
        else:
            state[k] = v
    oracle.load_state_dict(state)
    return oracle


def arch(model: nn.Sequential) -> tuple[int, int, int, int]:
    return model[0].out_channels, model[3].out_channels, model[0].kernel_size[0], model[7].out_features


def has_signmask_hooks(module: nn.Module) -> bool:
    pre = any(isinstance(h, torch_prune.BasePruningMethod) for h in module._forward_pre_hooks.values())
    post = any(isinstance(h, _reparam.DetachWeight) for h in module._forward_hooks.values())
    return pre or post


# ----------------------------------------------------------------------------------------------
# deepcopy and pickle after training (pytorch#37322)


def test_stock_prune_cannot_deepcopy_after_backward():
    model = small_net()
    for m in layers(model):
        torch_prune.l1_unstructured(m, "weight", 0.5)
    model.train()
    model(inputs()).sum().backward()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_after_backward(signs, clone):
    stock = small_net()
    for m in layers(stock):
        torch_prune.l1_unstructured(m, "weight", 0.5)
    model = small_net()
    signmask.prune(model, 0.5, scope="layer", signs=signs)
    x = inputs()
    stock.train(), model.train()
    stock(x).sum().backward()
    model(x).sum().backward()
    # Same gradients as stock prune: detaching the weight attribute does not cut autograd.
    for a, b in zip(layers(stock), layers(model)):
        assert torch.equal(a.weight_mask.bool(), b.weight_mask)
        assert torch.equal(a.weight_orig.grad, b.weight_orig.grad)
    train_steps(model, 2, lr=0.5)  # grad-enabled forward + backward + step, then copy

    twin = copy.deepcopy(model) if clone == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert torch.equal(eval_out(twin, x), eval_out(model, x))
    for a, b in zip(layers(model), layers(twin)):
        assert b.weight_orig is not a.weight_orig
        assert b.weight_mask.data_ptr() != a.weight_mask.data_ptr()
        assert torch.equal(a.weight_mask, b.weight_mask) and b.weight_mask.dtype == torch.bool
        assert torch.equal(a.weight_orig, b.weight_orig)
        assert (signs == "locked") == ("weight_sign" in b._buffers)
        if signs == "locked":
            assert torch.equal(a.weight_sign, b.weight_sign)
        assert torch_prune.is_pruned(b)
    # The copy is independent and its hooks act on the copy: train and prune it further.
    reference = eval_out(model, x)
    train_steps(twin, 1, lr=0.5)
    signmask.prune(twin, 0.5)
    assert torch.equal(eval_out(model, x), reference)
    assert not torch.equal(eval_out(twin, x), reference)
    assert torch.equal(eval_out(twin, x), eval_out(dense_copy(twin), x))
    # And the copy can be copied again after its own training.
    assert torch.equal(eval_out(copy.deepcopy(twin), x), eval_out(twin, x))


def test_a_penalty_on_weight_orig_times_the_mask_trains_as_stock_prunes_on_its_weight():
    # module.weight is detached after the forward (copies must work), so the README sends
    # penalties to weight_orig * weight_mask: the same gradient as stock prune's module.weight.
    torch.manual_seed(0)
    stock, ours = nn.Linear(6, 5).double(), nn.Linear(6, 5).double()
    ours.load_state_dict(stock.state_dict())
    torch_prune.l1_unstructured(stock, "weight", 0.5)
    signmask.prune(ours, 0.5)
    x = torch.randn(3, 6, dtype=torch.float64)
    stock(x), ours(x)
    assert not ours.weight.requires_grad and stock.weight.requires_grad
    (stock.weight ** 2).sum().backward()
    (_reparam.masked_weight(ours.weight_orig, ours.weight_mask) ** 2).sum().backward()
    assert torch.equal(stock.weight_orig.grad, ours.weight_orig.grad)


@pytest.mark.parametrize("after", ["forward only", "grad of the input", "backward to one layer"])
def test_deepcopy_and_pickle_whatever_reached_the_weights(after):
    # Copies must work whether or not a backward reached the weights (validation without
    # no_grad, a model copied by an EMA right after a forward).
    model = signmask.prune(small_net(0), 0.5, signs="locked")
    x = inputs().requires_grad_()
    out = model(x)
    if after == "grad of the input":
        torch.autograd.grad(out.sum(), x)
    elif after == "backward to one layer":
        out.sum().backward(inputs=[layers(model)[-1].weight_orig])
    assert not any(m.weight.requires_grad for m in layers(model))  # detached: copyable
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(eval_out(twin, x.detach()), eval_out(model, x.detach()))
        assert all(type(m.weight) is torch.Tensor for m in layers(twin))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(eval_out(torch.load(buffer, weights_only=False), x.detach()), eval_out(model, x.detach()))


def test_deepcopy_and_pickle_after_torch_func_transforms():
    # A forward under grad / vmap / functional_call left a functorch wrapper as module.weight,
    # dead once the transform returned: deepcopy and torch.save failed until the next forward.
    from torch.func import functional_call, grad, vmap

    model = signmask.prune(small_net(0), 0.5, signs="locked")
    x = inputs()
    model(x).sum().backward()
    before = {m: m.weight for m in layers(model)}
    model.eval()  # BatchNorm's running statistics cannot be updated inside a grad transform
    params = dict(model.named_parameters())
    grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    vmap(lambda xi: model(xi.unsqueeze(0)))(x)
    for m in layers(model):
        assert m.weight is before[m]  # the alias of the last ordinary forward
    twin = copy.deepcopy(model)
    assert torch.equal(eval_out(twin, x), eval_out(model, x))
    torch.save(model, io.BytesIO())


# ----------------------------------------------------------------------------------------------
# state_dict round trip


@pytest.mark.parametrize("signs", [None, "locked"])
def test_state_dict_round_trip_into_fresh_model(signs):
    model = small_net(0)
    signmask.prune(model, 0.4, signs=signs)
    train_steps(model, 3, lr=2.0)
    signmask.prune(model, 0.3)  # a second round on the trained weights
    if signs == "locked":
        # The saved sign bits matter: some kept weights now disagree with weight_orig's sign.
        disagree = sum(
            int(((unpack_sign_bits(m.weight_sign, m.weight_orig.shape) != torch.signbit(m.weight_orig))
                 & m.weight_mask).sum())
            for m in layers(model)
        )
        assert disagree > 0
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    plain = small_net(5)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*weight.*Unexpected key.*weight_orig"):
        plain.load_state_dict(state)

    fresh = signmask.load_state_dict(small_net(5), state)
    x = inputs()
    assert torch.equal(eval_out(fresh, x), eval_out(model, x))
    assert torch.equal(eval_out(fresh, x), eval_out(dense_copy(model), x))
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for a, b in zip(layers(model), layers(fresh)):
        assert b.weight_mask.dtype == torch.bool
        assert torch.equal(a.weight_mask, b.weight_mask)
        assert torch.equal(a.weight_orig, b.weight_orig)
        assert ("weight_sign" in b._buffers) == (signs == "locked")
        if signs == "locked":
            assert torch.equal(a.weight_sign, b.weight_sign)
    # Both keep training identically: the masks and locks are live in the loaded model.
    train_steps(model, 2, lr=2.0, seed=7)
    train_steps(fresh, 2, lr=2.0, seed=7)
    assert torch.equal(eval_out(fresh, x), eval_out(model, x))
    for a, b in zip(layers(model), layers(fresh)):
        assert torch.equal(a.weight_orig, b.weight_orig)


# ----------------------------------------------------------------------------------------------
# dtype conversion


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_to_low_precision_keeps_bool_masks(dtype, signs):
    model = small_net(0)
    signmask.prune(model, 0.6, signs=signs)
    train_steps(model, 2, lr=2.0)  # weight_orig signs drift from the locked ones
    oracle = dense_copy(model).to(dtype)
    model.to(dtype)
    for m in layers(model):
        assert m.weight_orig.dtype == dtype
        assert m.weight_mask.dtype == torch.bool and m.weight_mask.element_size() == 1
        if signs == "locked":
            assert m.weight_sign.dtype == torch.uint8
    x = inputs().to(dtype)
    y = eval_out(model, x)
    assert y.dtype == dtype
    assert torch.equal(y, eval_out(oracle, x))
    for m, o in zip(layers(model), layers(oracle)):
        assert torch.equal(m.weight, o.weight)


def _pruned_small_net(signs, backend: str):
    """small_net(0) 60% pruned, and an SGD (lr 2: steps large enough to cross zero) on ``backend``."""
    model = signmask.prune(small_net(0), 0.6, signs=signs)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    if backend == "projection":
        signmask.set_backend(model, "projection", optimizer=opt)
    return model, opt


@pytest.mark.parametrize("convert", ["double", "channels_last"])
@pytest.mark.parametrize("backend", ["torch", "projection"])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_double_and_channels_last_keep_masks_locks_and_masked_gradients(convert, backend, signs):
    model, opt = _pruned_small_net(signs, backend)
    x = inputs()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), torch.randn(4, 5)).backward()
    opt.step()
    masks = [m.weight_mask.clone() for m in layers(model)]
    if convert == "double":
        model.double()
        x = x.double()
    else:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def oracle_out():  # in the model's memory format: the same conv kernels, bitwise outputs
        oracle = dense_copy(model)
        return eval_out(oracle.to(memory_format=torch.channels_last) if convert == "channels_last" else oracle, x)

    assert torch.equal(eval_out(model, x), oracle_out())
    for m, keep in zip(layers(model), masks):
        assert m.weight_mask.dtype == torch.bool and torch.equal(m.weight_mask, keep)
        assert signs is None or m.weight_sign.dtype == torch.uint8
    model.train()
    opt.zero_grad()
    model(x).square().sum().backward()
    for m in layers(model):
        assert m.weight_orig.grad.dtype == m.weight_orig.dtype
        assert not m.weight_orig.grad[~m.weight_mask].any()
    opt.step()
    assert torch.equal(eval_out(model, x), oracle_out())


# ----------------------------------------------------------------------------------------------
# torch.inference_mode


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("how", ["prune", "transfer", "load_state_dict"])
def test_masks_installed_under_inference_mode_stay_writable_outside_it(how, signs):
    # A loader or evaluation function decorated with @torch.inference_mode() may prune, transfer
    # or load: inference-tensor masks would refuse every later in-place write (the next pruning
    # round, load_state_dict, the projection backend's stamps) outside it.
    source = signmask.prune(small_net(1), 0.5, signs=signs)
    ticket, state = signmask.extract(source), source.state_dict()
    twins = []
    for inference in (False, True):
        model = small_net(0)
        with torch.inference_mode(inference):
            if how == "prune":
                signmask.prune(model, 0.5, signs=signs)
            elif how == "transfer":
                signmask.transfer(ticket, model, signs=signs or "init")
            else:
                signmask.load_state_dict(model, state)
        twins.append(model)
    for model in twins:
        assert not any(b.is_inference() for b in model.buffers())
        train_steps(model, 2, lr=2.0)
        signmask.prune(model, 0.3)  # writes the masks in place
        model.load_state_dict(model.state_dict())
        signmask.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    plain, inferred = twins
    x = inputs()
    assert torch.equal(eval_out(inferred, x), eval_out(plain, x))
    assert torch.equal(eval_out(inferred, x), eval_out(dense_copy(inferred), x))


# ----------------------------------------------------------------------------------------------
# torch.jit.trace, torch.export


@pytest.mark.parametrize("signs", [None, "locked"])
def test_jit_trace_and_export_follow_masks_weights_and_signs(signs):
    # The last weight is above _maskmul.CHUNK: its CPU multiply must be traced as a plain op.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 600),
                          nn.ReLU(), nn.Linear(600, 500))
    signmask.prune(model, 0.5, signs=signs)
    x, y = inputs(seed=2), inputs(seed=3)
    traced = torch.jit.trace(model, x)  # with its re-trace check on (the default)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    exported = torch.export.export(model, (x,)).module()
    for other in (traced, loaded, exported):
        assert torch.equal(other(y), model(y))
    with torch.no_grad():  # the trace reads weight_orig, mask and signs as they are now
        model[0].weight_orig.mul_(-1.5)
    signmask.prune(model, 0.3)
    expected = model(y)
    assert torch.equal(traced(y), expected)
    grads = []
    for net in (traced, model):  # the trace shares the model's Parameters
        model.zero_grad(set_to_none=True)
        net(y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and len(grads[0]) == 6
    copy.deepcopy(model)  # the eager forward above left a detached weight, as always


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", ["torch", "projection"])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_export_of_a_trained_model_and_of_its_removal_equals_the_dense_oracle(signs, backend, strict):
    # What is shipped: torch.export of the pruned model (hooks live) and, after remove(), of the
    # plain model, through torch.export.save / load; bitwise the dense network holding the
    # effective weights (sign-locked ones whose stored signs disagree with their locks too).
    model, opt = _pruned_small_net(signs, backend)
    x = inputs()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    if signs == "locked" and backend == "torch":  # projection reflects weights across 0 instead
        with torch.no_grad():
            layers(model)[0].weight_orig.neg_()  # stored signs now disagree with every lock
    model.eval()
    oracle = dense_copy(model).eval()
    expected = eval_out(oracle, x)
    for net in (model, signmask.remove(copy.deepcopy(model))):
        buf = io.BytesIO()
        torch.export.save(torch.export.export(net, (x,), strict=strict), buf)
        buf.seek(0)
        shipped = torch.export.load(buf).module()
        assert torch.equal(shipped(x), expected)
        assert torch.equal(eval_out(net, x), expected)


def _exportable(kind):
    """A model whose hooks set attributes in its forward: pruned (on a backend, sign-locked or
    not), under AWS's norm interpolation, or a MultiheadAttention whose parent hook sets its
    ``out_proj.weight``."""
    if kind == "aws":
        model = tiny(0)
        signmask.apply(model, "aws", 0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
        return model, torch.randn(2, 3, 6, 6)
    if kind == "attention":
        from _util import AttnNet

        torch.manual_seed(0)
        return signmask.prune(AttnNet(), 0.5), torch.randn(2, 3, 8)
    signs, backend = kind.split("-")
    return _pruned_small_net(None if signs == "free" else signs, backend)[0], inputs()


@pytest.mark.parametrize("kind", ["free-torch", "locked-torch", "free-projection", "locked-projection", "aws",
                                  "attention"])
@pytest.mark.filterwarnings("ignore:1 nn.MultiheadAttention layer")
def test_export_warns_of_no_assigned_attribute_and_leaves_the_eager_ones_in_place(kind):
    # torch.export (non-strict, its default) warned "The tensor attributes self.0.weight, ... were
    # assigned during export. Such attributes must be registered as buffers": the weights the
    # hooks set, which export puts back after tracing (stock prune's warn so too).
    import warnings

    model, x = _exportable(kind)
    model(x).sum().backward()  # between forwards: detached aliases
    model.eval()
    before = {(name, key): value for name, m in model.named_modules() for key, value in m.__dict__.items()
              if isinstance(value, torch.Tensor)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = torch.export.export(model, (x,)).module()
    after = {(name, key): value for name, m in model.named_modules() for key, value in m.__dict__.items()
             if isinstance(value, torch.Tensor)}
    assert before.keys() == after.keys() and all(after[k] is v for k, v in before.items())
    assert torch.equal(exported(x), model(x))


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_follows_mask_changes():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    torch.manual_seed(0)
    for m in layers(model):
        nn.init.normal_(m.weight)
    signmask.prune(model, 0.5)
    model.eval()
    x = inputs()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1

    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(x)
        assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6)
        # In-place mask change: another prune round.
        signmask.prune(model, 0.5)
        eager2 = model(x)
        assert not torch.allclose(eager2, eager, rtol=1e-3, atol=1e-3)
        assert torch.allclose(compiled(x), eager2, rtol=1e-5, atol=1e-6)
        # Sign locking adds a buffer; the compiled model uses the locked weights too.
        signmask.prune(model, 0.0, signs="locked")
        with torch.no_grad():
            for m in layers(model):
                m.weight_orig.neg_()  # flip every stored sign: locked weights must not move
        assert torch.allclose(compiled(x), eager2, rtol=1e-5, atol=1e-6)
        assert torch.allclose(model(x), eager2, rtol=1e-5, atol=1e-6)

    # Training through the compiled graph: same gradients as eager, and deepcopy still works.
    model.train()
    compiled(x).square().sum().backward()
    compiled_grads = [m.weight_orig.grad.clone() for m in layers(model)]
    model.zero_grad()
    model(x).square().sum().backward()
    for m, g in zip(layers(model), compiled_grads):
        assert torch.allclose(g, m.weight_orig.grad, rtol=1e-4, atol=1e-6)
        assert not g[~m.weight_mask].any()  # pruned weights get no gradient
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


def _frames_of_models_built_alike(prune_fn, count: int = 3) -> int:
    """Graphs dynamo compiles for ``count`` seeds of one architecture, each model compiled
    anew, its training forward and backward run once."""
    torch._dynamo.reset()
    counter = CompileCounter()
    for seed in range(count):
        torch.manual_seed(seed)
        model = prune_fn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)))
        torch.compile(model, backend=counter)(inputs()).square().sum().backward()
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("signs", [None, "locked"])
def test_models_built_alike_share_their_compiled_forward_as_stock_pruned_ones_do(signs):
    # nn.Module looks each forward hook's key up among its always-called hooks, and dynamo
    # guards that lookup on the key. Torch's keys count handles process-wide, so every new
    # pruned model (a seed sweep, a transferred ticket) recompiled the class's forward, and
    # past dynamo's recompile limit (8) ran it eagerly, with one warning.
    def stock(model):
        for m in layers(model):
            torch_prune.l1_unstructured(m, "weight", 0.5)
        return model

    dense = _frames_of_models_built_alike(lambda model: model)
    assert _frames_of_models_built_alike(stock) == dense
    assert _frames_of_models_built_alike(lambda model: signmask.prune(model, 0.5, signs=signs)) == dense


# ----------------------------------------------------------------------------------------------
# activation checkpointing


def _checkpointed(model: nn.Sequential, x: torch.Tensor, reentrant: bool | None) -> torch.Tensor:
    """``model(x)`` in two checkpointed segments (``reentrant`` None: not checkpointed)."""
    if reentrant is None:
        return model(x)
    return checkpoint(model[3:], checkpoint(model[:3], x, use_reentrant=reentrant), use_reentrant=reentrant)


def _hooks(model: nn.Module) -> list:
    return [(list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for m in model.modules()]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_activation_checkpointing_recomputes_the_same_weights(signs, reentrant, autocast):
    # The backward runs the pre-hooks again to recompute a checkpointed segment (the reentrant
    # form's first pass runs them without grad): the same outputs, gradients and steps, bitwise,
    # with sign-locked weights crossing zero; module.weight left detached, no hook added.
    def run(mode):
        model = signmask.prune(small_net(), 0.6, signs=signs)
        hooks = _hooks(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        seen = []
        for step in range(3):
            x = inputs(seed=step).requires_grad_(mode is not None)  # reentrant: an input with grad
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = _checkpointed(model, x, mode)
            out.float().square().sum().backward()
            seen += [out.detach(), *(p.grad.clone() for p in model.parameters())]
            opt.step()
        assert _hooks(model) == hooks
        assert all(m.weight.grad_fn is None for m in layers(model))
        copy.deepcopy(model)
        return seen + list(model.parameters())

    expected, got = run(None), run(reentrant)
    assert len(expected) == len(got) and all(bits_equal(a, b) for a, b in zip(expected, got))


def test_torch_compile_of_a_checkpointed_model():
    # The pre-hooks set module.weight, a side effect dynamo refuses inside a checkpointed region
    # (so does stock prune's): without fullgraph it breaks the graph there; with torch's switch to
    # skip replaying forward side effects in the recomputation (harmless here: the weight is
    # recomputed from weight_orig inside the graph) the whole model compiles.
    def run(compiled, fullgraph=False):
        model = signmask.prune(small_net(), 0.6, signs="locked")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch._dynamo.reset()
        forward = torch.compile(_checkpointed, backend="aot_eager", fullgraph=fullgraph) if compiled else _checkpointed
        seen = []
        for step in range(2):  # the second step: the graph's weights follow weight_orig
            opt.zero_grad()
            out = forward(model, inputs(seed=step), False if compiled else None)
            out.square().sum().backward()
            seen += [out.detach(), *(p.grad.clone() for p in model.parameters())]
            opt.step()
        copy.deepcopy(model)
        return seen

    expected = run(False)
    for fullgraph in (False, True):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=fullgraph):
            got = run(True, fullgraph)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(expected, got))


# ----------------------------------------------------------------------------------------------
# sign locks


def test_locked_signs_survive_sgd_that_flips_free_signs():
    free, locked = small_net(0), small_net(0)
    signmask.prune(free, 0.5)
    signmask.prune(locked, 0.5, signs="locked")
    start = {id(m): torch.signbit(m.weight_orig.detach()).clone() for m in layers(locked)}
    for a, b in zip(layers(free), layers(locked)):
        assert torch.equal(a.weight_mask, b.weight_mask)
        assert torch.equal(
            unpack_sign_bits(b.weight_sign, b.weight_orig.shape), start[id(b)]
        )
    train_steps(free, 5, lr=2.0)
    train_steps(locked, 5, lr=2.0)
    locked.eval()
    locked(inputs())  # refresh module.weight
    flipped_free = flipped_orig = kept_total = 0
    for a, b in zip(layers(free), layers(locked)):
        keep = b.weight_mask
        kept_total += int(keep.sum())
        flipped_free += int((torch.signbit(a.weight_orig.detach()) != start[id(b)])[keep].sum())
        flipped_orig += int((torch.signbit(b.weight_orig.detach()) != start[id(b)])[keep].sum())
        # Every kept weight of the locked model still has its sign at locking; pruned stay 0.
        assert torch.equal(torch.signbit(b.weight)[keep], start[id(b)][keep])
        assert not b.weight[~keep].any()
        assert torch.equal(b.weight, effective(b))
    assert flipped_free > 0.05 * kept_total  # the lr does flip signs of a free model...
    assert flipped_orig > 0  # ...and of the locked model's raw parameters, but not its weights
    # The ticket of the locked model still carries the signs it was locked with.
    ticket = signmask.extract(locked)
    for name, m in zip(["0.weight", "3.weight", "7.weight"], layers(locked)):
        expected = torch.where(start[id(m)], -1, 1) * m.weight_mask
        assert torch.equal(ticket.masks[name], expected.to(torch.int8))


def test_locking_after_training_freezes_the_current_signs():
    """Locking must read the trained weights, not the alias left by the last forward."""
    model = small_net(0)
    signmask.prune(model, 0.5)
    train_steps(model, 1, lr=5.0)  # the step happens after the forward that set module.weight
    x = inputs()
    before = {id(m): effective(m) for m in layers(model)}
    signmask.prune(model, 0.0, signs="locked")
    for m in layers(model):
        assert torch.equal(effective(m), before[id(m)])
    expected = eval_out(dense_copy(model), x)
    assert torch.equal(eval_out(model, x), expected)


# ----------------------------------------------------------------------------------------------
# stacking stock prune


@pytest.mark.parametrize("mode", ["free", "locked_positive"])
def test_stock_prune_stacks_on_signmask(mode):
    stock, model = small_net(0), small_net(0)
    if mode == "locked_positive":  # all signs +1: a lock that changes nothing
        with torch.no_grad():
            for a, b in zip(layers(stock), layers(model)):
                a.weight.abs_(), b.weight.abs_()
    for m in layers(stock):
        torch_prune.l1_unstructured(m, "weight", 0.5)
    signmask.prune(model, 0.5, scope="layer", signs="locked" if mode != "free" else None)
    if mode == "locked_positive":
        assert all(not m.weight_sign.any() for m in layers(model))  # every locked sign is +1
    for a, b in zip(layers(stock), layers(model)):
        torch_prune.l1_unstructured(a, "weight", 0.3)
        torch_prune.l1_unstructured(b, "weight", 0.3)
        assert b.weight_mask.dtype == torch.bool
        assert torch.equal(a.weight_mask.bool(), b.weight_mask)
        assert torch.equal(a.weight_mask, b.weight_mask.float())
        n = b.weight_mask.numel()
        assert int(b.weight_mask.sum()) == (n - round(0.5 * n)) - round(0.3 * (n - round(0.5 * n)))
        assert torch_prune.is_pruned(b)
        assert ("weight_sign" in b._buffers) == (mode != "free")
    x = inputs()
    assert torch.equal(eval_out(model, x), eval_out(stock, x))
    if mode == "free":  # the stacked hooks keep working after training
        train_steps(stock, 2, lr=0.5)
        train_steps(model, 2, lr=0.5)
        assert torch.equal(eval_out(model, x), eval_out(stock, x))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_stock_remove_after_stacking(signs):
    model = small_net(0)
    signmask.prune(model, 0.5, signs=signs)
    train_steps(model, 2, lr=2.0)
    x = inputs()
    for m in layers(model):
        torch_prune.l1_unstructured(m, "weight", 0.3)
    expected_out = eval_out(model, x)
    for m in layers(model):
        orig = m.weight_orig
        expected = effective(m)
        returned = torch_prune.remove(m, "weight")
        assert returned is m
        assert type(m.weight) is nn.Parameter and m.weight is orig
        assert m._parameters["weight"] is orig
        assert torch.equal(m.weight.detach(), expected)
        assert set(m._buffers) == set()
        assert "weight_orig" not in m._parameters
        assert not has_signmask_hooks(m)
        assert not torch_prune.is_pruned(m)
    assert not torch_prune.is_pruned(model)
    assert torch.equal(eval_out(model, x), expected_out)
    # Plain, ordinary module now: deepcopy and load_state_dict of a fresh net just work.
    fresh = small_net(3)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(eval_out(fresh, x), expected_out)


# ----------------------------------------------------------------------------------------------
# equality with stock prune


def distinct_weights(model: nn.Module, seed: int) -> None:
    """Give all conv/linear weights distinct magnitudes (ties would let topk choose freely)."""
    gen = torch.Generator().manual_seed(seed)
    ws = [m.weight for m in layers(model)]
    total = sum(w.numel() for w in ws)
    mags = (torch.randperm(total, generator=gen).float() + 1) / total
    signs = torch.where(torch.rand(total, generator=gen) < 0.5, -1.0, 1.0)
    values = mags * signs
    with torch.no_grad():
        i = 0
        for w in ws:
            w.copy_(values[i : i + w.numel()].view_as(w))
            i += w.numel()


def assert_same_pruning(stock: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    for a, b in zip(layers(stock), layers(model)):
        assert b.weight_mask.dtype == torch.bool
        assert torch.equal(a.weight_mask, b.weight_mask.to(a.weight_mask.dtype))
    assert torch.equal(eval_out(model, x), eval_out(stock, x))


amounts = st.floats(0.0, 1.0, allow_nan=False)
shapes = st.tuples(
    st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2, 3]), st.integers(1, 5)
)


@settings(deadline=None, max_examples=30)
@given(shape=shapes, a1=amounts, a2=amounts, seed=st.integers(0, 2**16), natural=st.booleans())
def test_layerwise_magnitude_equals_l1_unstructured(shape, a1, a2, seed, natural):
    stock, model = small_net(seed, *shape), small_net(seed, *shape)
    if not natural:
        distinct_weights(stock, seed), distinct_weights(model, seed)
    else:  # default init; the check is valid only without ties among magnitudes
        mags = torch.cat([m.weight.detach().abs().flatten() for m in layers(stock)])
        if mags.unique().numel() != mags.numel():
            distinct_weights(stock, seed), distinct_weights(model, seed)
    x = inputs(seed)
    for a in (a1, a2):
        for m in layers(stock):
            torch_prune.l1_unstructured(m, "weight", a)
        signmask.prune(model, a, scope="layer")
        assert_same_pruning(stock, model, x)


@settings(deadline=None, max_examples=30)
@given(shape=shapes, a1=amounts, a2=amounts, seed=st.integers(0, 2**16))
def test_global_magnitude_equals_global_unstructured(shape, a1, a2, seed):
    stock, model = small_net(seed, *shape), small_net(seed, *shape)
    distinct_weights(stock, seed), distinct_weights(model, seed)
    x = inputs(seed)
    n = sum(m.weight.numel() for m in layers(model))
    remaining = n
    for a in (a1, a2):
        torch_prune.global_unstructured(
            [(m, "weight") for m in layers(stock)], torch_prune.L1Unstructured, amount=a
        )
        signmask.prune(model, a)
        assert_same_pruning(stock, model, x)
        remaining -= round(a * remaining)
        assert sum(int(m.weight_mask.sum()) for m in layers(model)) == remaining


def test_oracle_equality_on_default_init_two_rounds():
    """The plain case without hypothesis: seeded default init, 0.6 then 0.25, both scopes."""
    x = inputs()
    for scope in ("layer", "global"):
        stock, model = small_net(0, 8, 16, 3, 10), small_net(0, 8, 16, 3, 10)
        mags = torch.cat([m.weight.detach().abs().flatten() for m in layers(stock)])
        assert mags.unique().numel() == mags.numel()  # no ties: stock's topk is unambiguous
        for a in (0.6, 0.25):
            if scope == "layer":
                for m in layers(stock):
                    torch_prune.l1_unstructured(m, "weight", a)
            else:
                torch_prune.global_unstructured(
                    [(m, "weight") for m in layers(stock)], torch_prune.L1Unstructured, amount=a
                )
            signmask.prune(model, a, scope=scope)
            assert_same_pruning(stock, model, x)


# ----------------------------------------------------------------------------------------------
# memory


@settings(deadline=None, max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    amount=st.floats(0.0, 1.0, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_mask_memory_is_one_byte_and_signs_one_bit(shape, amount, seed):
    torch.manual_seed(seed)
    free, locked = nn.Linear(*shape), nn.Linear(*shape)
    locked.load_state_dict(free.state_dict())
    stock = nn.Linear(*shape)
    stock.load_state_dict(free.state_dict())
    torch_prune.l1_unstructured(stock, "weight", amount)
    signmask.prune(free, amount)
    signmask.prune(locked, amount, signs="locked")
    n = free.weight_orig.numel()

    def buffer_bytes(m: nn.Module) -> int:
        return sum(b.numel() * b.element_size() for b in m.buffers())

    assert stock.weight_mask.element_size() == 4  # what stock prune costs, for comparison
    assert buffer_bytes(stock) == 4 * n
    assert free.weight_mask.dtype == torch.bool
    assert buffer_bytes(free) == n
    assert buffer_bytes(locked) == n + math.ceil(n / 8)
    assert locked.weight_sign.dtype == torch.uint8
    assert locked.weight_sign.numel() == math.ceil(n / 8)
    # Padding bits are zero and the bits are the weights' sign bits.
    assert torch.equal(
        unpack_sign_bits(locked.weight_sign, locked.weight_orig.shape),
        torch.signbit(locked.weight_orig.detach()),
    )
    bits = np.unpackbits(locked.weight_sign.numpy(), bitorder="little")
    assert not bits[n:].any()
    assert torch.equal(free.weight_mask, locked.weight_mask)
    assert int(free.weight_mask.sum()) == n - round(amount * n)
    magnitudes = free.weight_orig.detach().abs()
    if magnitudes.unique().numel() == n:  # without ties stock's choice is unambiguous
        assert torch.equal(free.weight_mask, stock.weight_mask.bool())


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_parameter_assigned_over_a_pruned_weight_raises_instead_of_being_hidden(signs):
    """fuse_conv_bn_eval writes a new ``weight`` Parameter; the pruning hook used to shadow it."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    signmask.prune(seq, 0.5, signs=signs)
    x = torch.randn(4, 3, 8, 8)
    seq(x)  # running statistics
    seq.eval()
    with torch.no_grad():
        unfused = seq(x)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(seq[0], seq[1])
    with pytest.raises(RuntimeError, match=r"Conv2d.weight was assigned a new Parameter .*signmask.remove"):
        fused(x)
    signmask.remove(seq)  # the fix the message names
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(seq[0], seq[1])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unfused, rtol=1e-5, atol=1e-5)
    linear = signmask.prune(nn.Linear(4, 3), 0.5)
    linear.weight = nn.Parameter(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="Linear.weight was assigned"):
        linear(torch.ones(1, 4))


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_adopting_a_stock_hook_keeps_its_pruning_history():
    model = tiny()
    torch_prune.l1_unstructured(model.fc, "weight", 0.4)
    signmask.prune(model, 0.5, scope="layer", include="fc")
    assert signmask.extract(model).metadata["method"] == "L1Unstructured+magnitude"


@pytest.mark.parametrize("stack", ["l1_unstructured", "global_unstructured"])
def test_a_model_deepcopies_right_after_stock_prune_is_stacked_on_top(stack):
    # Stock's apply sets module.weight with grad on: a non-leaf deepcopy refused until a forward.
    model = signmask.prune(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 0.3)
    if stack == "l1_unstructured":
        torch_prune.l1_unstructured(model[0], "weight", 0.3)
    else:
        torch_prune.global_unstructured([(model[0], "weight"), (model[1], "weight")], torch_prune.L1Unstructured, amount=0.3)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3)
    assert torch.equal(twin(x), model(x))
    model(x).sum().backward()  # the next forward's weight is part of the graph again
    assert model[0].weight_orig.grad is not None and model[0].weight_orig.grad.abs().sum() > 0


def test_from_signed_mask_through_stock_prune_keeps_negative_entries():
    # A signed mask's -1 marks a kept weight with a negative sign, not a pruned one.
    signed = torch.tensor([[1, -1, 0], [0, -1, 1]], dtype=torch.int8)
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    stock = copy.deepcopy(lin)
    _methods.FromSignedMask.apply(lin, "weight", signed)
    torch_prune.custom_from_mask(stock, "weight", signed != 0)
    assert torch.equal(lin.weight_mask.bool(), signed != 0)
    assert torch.equal(lin.weight_mask, stock.weight_mask) and torch.equal(lin.weight, stock.weight)


def test_adopting_a_stock_hook_detaches_the_weight_after_a_training_step():
    # The adopted tensor needs the DetachWeight post-hook too, or deepcopy fails after a backward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch_prune.l1_unstructured(model[0], "weight", 0.25)
    signmask.prune(model, 0.5)
    model(torch.randn(2, 3)).sum().backward()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3)
    assert torch.equal(twin(x), model(x))


_SIGNED_ZEROS_AND_MORE = st.sampled_from([0.0, -0.0, 1.5, -2.0]) | st.floats(-4, 4, width=32)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_a_locked_weight_at_zero_still_trains(data, n):
    # The spec, in float64: w = s * |o| * m; the gradient of o is g * m * s * b, b = -1 where
    # o's sign bit is set (-0.0 too): the derivative of |o| on the side of its sign bit, so a
    # kept weight at exactly 0 (an identity or zero init) is never frozen.
    values = data.draw(st.lists(_SIGNED_ZEROS_AND_MORE, min_size=n, max_size=n))
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    negative = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    g = torch.tensor(data.draw(st.lists(st.floats(-3, 3, width=32), min_size=n, max_size=n)))
    o = torch.tensor(values, requires_grad=True)
    w = _reparam.masked_weight(o, keep, _bits.pack_signs(negative))
    w.backward(g)
    s, b = 1 - 2 * negative.double(), 1 - 2 * torch.signbit(o.detach()).double()
    assert torch.equal(w.double(), s * o.detach().double().abs() * keep)
    assert torch.equal(torch.signbit(w)[keep], negative[keep])  # zeros carry the lock's sign
    assert torch.equal(o.grad.double(), g.double() * keep * s * b)
    assert torch.equal(o.grad[keep] != 0, g[keep] != 0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_parametrization_added_on_weight_orig_after_pruning_works_as_with_stock_prune(backend):
    # weight_norm on the trained tensor moves weight_orig into the parametrization: the hook
    # read module._parameters["weight_orig"] and every forward raised a bare KeyError.
    from torch.nn.utils import parametrizations

    stock, ours = nn.Linear(4, 4), nn.Linear(4, 4)
    ours.load_state_dict(stock.state_dict())
    torch_prune.l1_unstructured(stock, "weight", 0.5)
    signmask.prune(ours, 0.5)
    signmask.set_backend(ours, backend)
    assert torch.equal(stock.weight_mask.bool(), ours.weight_mask)
    for m in (stock, ours):
        parametrizations.weight_norm(m, "weight_orig")
    x = torch.randn(3, 4)
    a, b = stock(x), ours(x)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    for name in ("original0", "original1"):
        assert torch.equal(getattr(stock.parametrizations.weight_orig, name).grad,
                           getattr(ours.parametrizations.weight_orig, name).grad)
    for verb in (signmask.extract, signmask.remove, lambda m: signmask.set_backend(m, "torch")):
        # they need the Parameter itself
        with pytest.raises(ValueError, match=r"ParametrizedLinear.weight_orig is computed by a parametrization"):
            verb(ours)
    assert torch.equal(ours(x), b)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_hook_based_norm_on_weight_orig_is_refused_by_name(norm):
    # torch.nn.utils.weight_norm / spectral_norm (the old, hook-based ones) replace weight_orig
    # by a tensor their pre-hook computes after the pruning hook: every forward silently used
    # the previous forward's weight and the second backward failed inside autograd; the verbs
    # raised a bare KeyError: 'weight'.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    signmask.prune(model, 0.5)
    getattr(nn.utils, norm)(model[0], "weight_orig")
    mask = model[0].weight_mask.clone()
    match = r"Linear.weight_orig is no Parameter but a tensor that a forward pre-hook computes.*parametrizations"
    with pytest.raises(RuntimeError, match=match):
        model(torch.randn(3, 4))
    for verb in (signmask.extract, signmask.remove, lambda m: signmask.set_backend(m, "torch")):
        with pytest.raises(ValueError, match=match):
            verb(model)
    assert torch.equal(model[0].weight_mask, mask)
    getattr(nn.utils, "remove_" + norm)(model[0], "weight_orig")  # undone: it trains again
    model(torch.randn(3, 4)).sum().backward()
    assert model[0].weight_orig.grad.any() and not model[0].weight_orig.grad[~mask].any()


@pytest.mark.parametrize("kind", ["layer", "norm", "parent"])
def test_a_forward_that_raises_leaves_the_model_deepcopyable(kind):
    # The pre-hook has set a non-leaf weight when the forward fails (inputs of another dtype);
    # the post-hook that detaches it must run anyway, or deepcopy refuses until the next forward.
    import copy

    from signmask import _interpolate

    if kind == "parent":  # out_proj's weight is read by its parent, not by its own forward
        model = nn.MultiheadAttention(4, 2)
        signmask.prune(model, 0.5)
        x = (torch.randn(3, 1, 4, dtype=torch.float64),) * 3
        child = model.out_proj
    elif kind == "layer":
        model = child = signmask.prune(nn.Linear(4, 4), 0.5)
        x = (torch.randn(2, 4, dtype=torch.float64),)
    else:
        model = child = nn.BatchNorm1d(4)
        _interpolate.attach(model, torch.tensor(0.5))
        x = (torch.randn(2, 5),)  # 5 features: its running statistics hold 4
    with pytest.raises(RuntimeError):
        model(*x)
    assert child.weight.is_leaf and not child.weight.requires_grad
    twin = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize_per.*deprecated")
@pytest.mark.parametrize("fuse", ["linear_relu", "conv_bn_relu", "qat_convert", "quantize_dynamic"])
def test_a_pruning_hook_moved_onto_another_module_raises_naming_the_fix(fuse):
    # torch.ao.quantization's fuse_modules moves a pruned module's pre-hooks onto the fused
    # module, and convert copies them onto the quantized one; neither holds weight_mask, and the
    # forward failed in a bare KeyError('weight_mask').
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    if fuse == "qat_convert":
        model = nn.Sequential(tq.QuantStub(), nn.Linear(8, 4), tq.DeQuantStub())
        model.qconfig = tq.get_default_qat_qconfig("x86")
        model = signmask.prune(tq.prepare_qat(model.train()), 0.5)
        x = torch.randn(3, 8)
        model(x)
        built, owner = tq.convert(model.eval()), "Linear"
    elif fuse == "quantize_dynamic":
        model = signmask.prune(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), 0.5)
        x = torch.randn(3, 8)
        built, owner = tq.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8), "Linear"
    else:
        conv = fuse == "conv_bn_relu"
        layers = (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) if conv else (nn.Linear(8, 4),)
        model = signmask.prune(nn.Sequential(*layers, nn.ReLU()), 0.5)
        x = torch.randn(2, 3, 6, 6) if conv else torch.randn(3, 8)
        model(x)
        names = ["0", "1", "2"] if conv else ["0", "1"]
        built, owner = tq.fuse_modules(model.eval(), [names]), "ConvReLU2d" if conv else "LinearReLU"
    with pytest.raises(RuntimeError, match=rf"^{owner} holds a pruning hook of 'weight' but no weight_mask: .*"
                                           r"fuse_modules.*convert.*signmask.remove\(model\) before"):
        built(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize_per.*deprecated", "ignore:.*reduce_range")
@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_pruned_qat_model_fake_quantizes_and_converts_the_masked_weights(signs):
    # torch.ao's QAT modules subclass Conv2d/Linear: pruned after prepare_qat, their weight
    # observers see the masked weight. Oracle: the same QAT model dense, holding w * mask.
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), tq.DeQuantStub())
    model.qconfig = tq.get_default_qat_qconfig("x86")
    model = tq.prepare_qat(tq.fuse_modules_qat(model.train(), [["1", "2", "3"]]))
    oracle = copy.deepcopy(model)
    signmask.prune(model, 0.6, signs=signs)
    with torch.no_grad():
        for i in (1, 5):
            oracle[i].weight.mul_(model[i].weight_mask)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(x), oracle(x))
    for i in (1, 5):
        ours, theirs = model[i].weight_fake_quant, oracle[i].weight_fake_quant
        assert torch.equal(ours.scale, theirs.scale) and torch.equal(ours.zero_point, theirs.zero_point)
    pruned = {i: ~model[i].weight_mask for i in (1, 5)}
    quantized = tq.convert(signmask.remove(model).eval())
    expected = tq.convert(oracle.eval())
    for i in (1, 5):
        assert torch.equal(quantized[i].weight().int_repr(), expected[i].weight().int_repr())
        assert not quantized[i].weight().dequantize()[pruned[i]].any()
    assert torch.equal(quantized(x), expected(x))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_symbolically_traced_pruned_model_trains_and_extracts_as_the_eager_one(signs):
    # torch.fx keeps conv/linear layers as modules, so their pruning hooks run in the graph.
    model = signmask.prune(small_net(), 0.6, signs=signs)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    for m in (model, traced):
        train_steps(m, 3, lr=0.5)  # weights cross zero: locked signs matter
    x = inputs()
    assert bits_equal(eval_out(traced, x), eval_out(model, x))
    ours, theirs = signmask.extract(traced), signmask.extract(model)
    assert ours.masks.keys() == theirs.masks.keys()
    assert all(torch.equal(ours.masks[k], theirs.masks[k]) for k in ours.masks)
    signmask.prune(traced, 0.5), signmask.prune(model, 0.5)
    signmask.remove(traced), signmask.remove(model)
    assert bits_equal(eval_out(traced, x), eval_out(model, x))
    assert not any(isinstance(h, torch_prune.BasePruningMethod) for m in traced.modules()
                   for h in m._forward_pre_hooks.values())
