"""The Triton kernels against the torch path (bitwise) and a float64 oracle (fused linear).

Without CUDA the kernels run through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before ``signmask._triton`` is imported (triton reads it when a kernel is decorated); conftest.py
sets it before any test module loads. Sizes stay small: the interpreter runs numpy per program.
triton and numpy are part of the ``test`` extra, so these tests never skip.
"""

import contextlib
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import signmask
from signmask import _backends, _bits, _reparam, _triton, _triton_linear
from _util import backends_of, bits_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _triton.INTERPRETED:
    raise RuntimeError("signmask._triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":  # not dense: every other column of a wider tensor
        wide = torch.cat([t, t], dim=-1)
        return wide[..., ::2].copy_(t)
    return t


def _case(shape, dtype, layout, locked, mask_layout, seed=0, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen)
    if zeros:  # a third exact zeros, half of them -0.0: the locked gradient's special points
        values[torch.rand(shape, generator=gen) < 1 / 3] = 0.0
        values[(values == 0) & (torch.rand(shape, generator=gen) < 0.5)] = -0.0
    orig = _layout(values.to(dtype), layout).to(DEVICE)
    keep = torch.rand(shape, generator=gen) < 0.6
    mask = (_layout(keep, layout) if mask_layout else keep).to(DEVICE)
    sign = _bits.pack_signs(torch.rand(shape, generator=gen) < 0.5).to(DEVICE) if locked else None
    return orig, mask, sign


def _check_against_torch(orig, mask, sign, out_dtype):
    """Forward and backward of the kernel equal the torch path (then cast), bitwise."""
    ref_o = orig.detach().clone().requires_grad_()
    ref = _reparam.masked_weight(ref_o, mask, sign).to(out_dtype)
    got_o = orig.detach().clone().requires_grad_()
    got = _triton.masked_weight(got_o, mask, sign, out_dtype)
    assert bits_equal(got, ref)
    assert got.stride() == orig.stride() or _triton._dense_order(orig) is None
    grad = torch.randn(ref.shape, dtype=torch.float32).to(out_dtype).to(orig.device)
    ref.backward(grad)
    got.backward(grad)
    assert bits_equal(got_o.grad, ref_o.grad)


SHAPES = [(7,), (5, 3), (4, 3, 3, 3), (3, 2, 2, 1, 5), (2, 1, 3, 1, 2, 3), (1030,)]


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_weight_matches_torch_path(shape, dtype, out_dtype, locked):
    _check_against_torch(*_case(shape, dtype, "contiguous", locked, False), out_dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
])
def test_masked_weight_matches_torch_path_on_signed_zeros(dtype, out_dtype, layout):
    orig, mask, sign = _case((6, 5, 3), dtype, layout, True, False, seed=3, zeros=True)
    assert (orig == 0).sum() > 10 and orig.signbit()[orig == 0].any()
    _check_against_torch(orig, mask, sign, out_dtype)


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
@pytest.mark.parametrize("mask_layout", [False, True])
def test_masked_weight_any_strides(layout, mask_layout, locked):
    for shape in [(6, 4, 3, 2), (5, 7)]:
        args = _case(shape, torch.float32, layout, locked, mask_layout)
        _check_against_torch(*args, torch.float32)
        _check_against_torch(*args, torch.bfloat16)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    locked=st.booleans(),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_weight_random_shapes(shape, locked, bf16, seed):
    args = _case(tuple(shape), torch.float32, "transposed", locked, seed % 2 == 0, seed)
    _check_against_torch(*args, torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_masked_weight_special_values():
    orig = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), -2.5, 3.0, -1e-40])
    mask = torch.tensor([False, True, False, False, True, True, False, True])
    for negative in (None, torch.tensor([True, False, True, False, False, True, True, False])):
        sign = None if negative is None else _bits.pack_signs(negative).to(DEVICE)
        _check_against_torch(orig.to(DEVICE), mask.to(DEVICE), sign, torch.float32)


def test_masked_weight_refuses_bad_input():
    orig, mask = torch.randn(4, 4, device=DEVICE), torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch.float32"):
        _triton.masked_weight(orig, mask.float())
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(4, 4\), got \(16,\)"):
        _triton.masked_weight(orig, mask.view(16))
    with pytest.raises(ValueError, match="sign must hold 2 uint8 bytes .*got 3"):
        _triton.masked_weight(orig, mask, torch.zeros(3, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(TypeError, match="sign must be uint8 .*got torch.int8"):
        _triton.masked_weight(orig, mask, torch.zeros(2, dtype=torch.int8, device=DEVICE))
    with pytest.raises(RuntimeError, match="mask must be on orig's device .*got meta"):
        _triton.masked_weight(orig, mask.to("meta"))
    with pytest.raises(TypeError, match="orig must be a float tensor"):
        _triton.masked_weight(orig.long(), mask)
    with pytest.raises(RuntimeError, match="needs CUDA tensors; orig is on meta"):
        _triton.masked_weight(orig.to("meta"), mask.to("meta"))


def test_masked_weight_compiles_through_the_custom_op():
    orig, mask, sign = _case((6, 5), torch.float32, "contiguous", True, False)

    def f(o):
        return (_triton.masked_weight(o, mask, sign, torch.float32) * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = orig.clone().requires_grad_(), orig.clone().requires_grad_()
    f(a).backward()
    compiled(b).backward()
    assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------ fused masked linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def _linear_grads(fn, x, orig, bias, grad, autocast):
    x, orig = x.clone().requires_grad_(), orig.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, orig, bias)
    y.backward(grad.to(y.dtype))
    return [y, x.grad, orig.grad] + ([] if bias is None else [bias.grad])


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("locked,bias,shape,zeros", [
    (False, True, (5, 7, 3), False),
    (True, False, (17, 20, 9), False),
    (True, True, (33, 12, 35), False),
    (True, False, (9, 10, 11), True),
])
def test_masked_linear_matches_float64_oracle(shape, locked, bias, bf16, zeros):
    m, k, n = shape
    orig, mask, sign = _case((n, k), torch.float32, "contiguous", locked, False, seed=m, zeros=zeros)
    x = torch.randn(k, 2, m, device=DEVICE).permute(2, 1, 0)  # [m, 2, k], not contiguous
    b = torch.randn(n, device=DEVICE) if bias else None
    grad = torch.randn(m, 2, n, device=DEVICE)

    def torch_path(x, o, b):
        return F.linear(x, _reparam.masked_weight(o, mask, sign), b)

    def fused(x, o, b):
        return _triton_linear.masked_linear(x, o, mask, sign, b)

    oracle = _linear_grads(
        torch_path, x.double(), orig.double(), None if b is None else b.double(), grad.double(), False
    )
    ref = _linear_grads(torch_path, x, orig, b, grad, bf16)
    got = _linear_grads(fused, x, orig, b, grad, bf16)
    for g, r, o in zip(got, ref, oracle):
        assert g.dtype == r.dtype and g.shape == r.shape
        # As close to float64 as the torch path is (bf16: ~3e-3; fp32 under 1e-6).
        assert _rel(g, o) <= 2 * _rel(r, o) + (1e-6 if not bf16 else 1e-3)
    masked = ~mask
    assert not got[2][masked].any()  # the weight gradient is masked in the epilogue


def test_masked_linear_refuses_bad_shapes():
    orig, mask = torch.randn(3, 4, device=DEVICE), torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    x = torch.randn(2, 4, device=DEVICE)
    linear = _triton_linear.masked_linear
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal .*orig \(3, 4\) and x \(2, 5"):
        linear(torch.randn(2, 5, device=DEVICE), orig, mask)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in_features\], got a 0-d"):
        linear(torch.tensor(1.0, device=DEVICE), orig, mask)
    with pytest.raises(ValueError, match=r"orig must be 2-D .*got shape \(12,\)"):
        linear(x, orig.view(12), mask.view(12))
    # A bias of the wrong length used to be read out of bounds.
    for shape in [(2,), (4,), (1, 3)]:
        found = re.escape(str(shape))
        with pytest.raises(ValueError, match=rf"bias must have shape \(3,\) .*got {found}"):
            linear(x, orig, mask, bias=torch.randn(shape, device=DEVICE))
    with pytest.raises(ValueError, match=r"mask must be .* shape \(3, 4\), got .*\(4, 3"):
        linear(x, orig, mask.t().contiguous())
    with pytest.raises(ValueError, match=r"sign must hold 2 uint8 bytes .*got 3"):
        linear(x, orig, mask, torch.zeros(3, dtype=torch.uint8, device=DEVICE))


def test_masked_linear_refuses_bad_dtypes_and_devices():
    orig, mask = torch.randn(3, 4, device=DEVICE), torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    x, bias = torch.randn(2, 4, device=DEVICE), torch.randn(3, device=DEVICE)
    linear = _triton_linear.masked_linear
    # F.linear refuses a weight or bias of another dtype than x outside autocast; so does this.
    with pytest.raises(TypeError, match="orig must have x's dtype float32 .*got bfloat16"):
        linear(x, orig.bfloat16(), mask)
    with pytest.raises(TypeError, match="bias must have x's dtype bfloat16 .*got float32"):
        linear(x.bfloat16(), orig.bfloat16(), mask, bias=bias)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got float64"):
        linear(x.double(), orig.double(), mask)
    with pytest.raises(TypeError, match="orig must be float32, bfloat16 or float16, got int64"):
        linear(x, orig.long(), mask)
    with pytest.raises(TypeError, match="bias must be float32, bfloat16 or float16, got float64"):
        linear(x, orig, mask, bias=bias.double())
    with pytest.raises(TypeError, match="mask must be a bool tensor, got torch.float32"):
        linear(x, orig, mask.float())
    with pytest.raises(TypeError, match="sign must be uint8 .*got torch.int64"):
        linear(x, orig, mask, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(RuntimeError, match="mask must be on orig's device .*got meta"):
        linear(x, orig, mask.to("meta"))
    with pytest.raises(RuntimeError, match="sign must be on orig's device .*got meta"):
        linear(x, orig, mask, torch.zeros(2, dtype=torch.uint8, device="meta"))
    with pytest.raises(RuntimeError, match="orig must be on x's device .*got meta"):
        linear(x, orig.to("meta"), mask)
    with pytest.raises(RuntimeError, match="bias must be on x's device .*got meta"):
        linear(x, orig, mask, bias=bias.to("meta"))
    # Under autocast x and bias are cast (as F.linear's are) and orig is cast in the kernel.
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = linear(x, orig.bfloat16(), mask, bias=bias.half())
        ref = F.linear(x, orig.bfloat16(), bias.half())
    assert got.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_masked_linear_reads_strided_bias_and_sign():
    orig, mask, sign = _case((5, 6), torch.float32, "contiguous", True, False, seed=1)
    x = torch.randn(3, 6, device=DEVICE)
    bias = torch.randn(10, device=DEVICE)[::2]  # not contiguous
    wide_sign = torch.stack([sign, torch.zeros_like(sign)], 1)[:, 0]  # not contiguous
    got = _triton_linear.masked_linear(x, orig, mask, wide_sign, bias)
    ref = F.linear(x, _reparam.masked_weight(orig, mask, sign), bias)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the hooks on the Triton backend


def _model(signs):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6)
    ).to(DEVICE)
    return signmask.prune(net, 0.6, signs=signs)


def _steps_side_by_side(nets, forward, *, autocast: bool, lr: float):
    """Train ``nets`` two SGD steps each on the same batches (``forward(net, x)``, under bf16
    autocast if asked); yield, after each step, every net's ``[output, *gradients]``."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in nets]
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(2, 3, 5, 5, generator=gen).to(DEVICE)
        seen = []
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                out = forward(net, x)
            out.float().square().mean().backward()
            seen.append([out, *(p.grad.clone() for p in net.parameters())])
            opt.step()
        yield seen


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("autocast", [False, True])
def test_triton_backend_trains_like_torch_backend(signs, autocast):
    ref, model = (_model(signs).to(memory_format=torch.channels_last) for _ in range(2))
    _backends.set_backend(model, "triton")

    def forward(net, x):
        out = net(x)
        if autocast and net is model:  # weight written in bf16: autocast's cast folded in
            assert net[0].weight.dtype == torch.bfloat16
        return out

    for seen in _steps_side_by_side((ref, model), forward, autocast=autocast, lr=0.1):
        # Same effective weights in the same dtype reach the same ops: bitwise equal.
        assert torch.equal(seen[0][0], seen[1][0])
        for a, b in zip(ref.parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_triton_backend_under_activation_checkpointing_trains_as_without_it(autocast, reentrant, monkeypatch):
    # The recomputing backward calls the kernel's Function again (the reentrant form's first pass
    # without grad, writing the weight in orig's dtype and leaving the cast to autocast): the same
    # outputs, gradients and steps as the torch path without checkpointing, bitwise.
    from torch.utils.checkpoint import checkpoint

    launches = []
    kernel = _triton.masked_weight_forward
    monkeypatch.setattr(_triton, "masked_weight_forward", lambda *a: launches.append(1) or kernel(*a))
    ref, model = _model("locked"), _model("locked")
    _backends.set_backend(model, "triton")
    launches.clear()  # set_backend's own refresh

    def forward(net, x):
        if net is ref:
            return net(x)
        h = checkpoint(net[:2], x.clone().requires_grad_(reentrant), use_reentrant=reentrant)
        return checkpoint(net[2:], h, use_reentrant=reentrant)

    for seen in _steps_side_by_side((ref, model), forward, autocast=autocast, lr=0.5):
        assert all(bits_equal(a, b) for a, b in zip(*seen))
        assert all(bits_equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
        assert all(m.weight.grad_fn is None for m in (model[0], model[3]))
    assert len(launches) == 2 * 2 * 2  # 2 steps, 2 layers, forward and recomputation


def test_triton_backend_remove_keeps_dtype_under_autocast():
    model = _model("locked")
    _backends.set_backend(model, "triton")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        signmask.remove(model)
    assert model[0].weight.dtype == torch.float32


# ------------------------------------------------------------------ transforms and edge cases


@pytest.mark.parametrize("locked", [False, True])
def test_double_backward_equals_the_torch_path(locked):
    # A gradient penalty on weight_orig's gradient: the kernel's backward writes a buffer
    # autograd cannot see, so under create_graph=True the torch path's gradient is recorded.
    orig, mask, sign = _case((6, 5), torch.float32, "", locked, False)
    x = torch.randn(3, 5).to(DEVICE)
    grads = []
    for fn in (_reparam.masked_weight, _triton.masked_weight):
        o = orig.detach().clone().requires_grad_()
        loss = F.linear(x, fn(o, mask, sign)).square().sum()
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        assert g.requires_grad
        (g.square().sum() + loss).backward()
        grads.append((g.detach(), o.grad))
    assert bits_equal(grads[0][0], grads[1][0])
    assert bits_equal(grads[0][1], grads[1][1])
    assert grads[1][1].abs().sum() > 0


@pytest.mark.parametrize("locked", [False, True])
def test_torch_func_and_forward_ad_take_the_torch_path(locked):
    # The Triton Function has no vmap rule and no jvp: the backend falls back, same numbers.
    ref, model = _model("locked" if locked else None), _model("locked" if locked else None)
    _backends.set_backend(model, "triton")
    x = torch.randn(4, 3, 5, 5).to(DEVICE)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(net, p, xb):
        return torch.func.functional_call(net, p, (xb[None],)).square().sum()

    per_sample = [
        torch.func.vmap(torch.func.grad(lambda p, xb: loss(net, p, xb)), in_dims=(None, 0))(params, x)
        for net in (ref, model)
    ]
    for key in params:
        assert per_sample[0][key].shape == (4, *params[key].shape)
        assert torch.equal(per_sample[0][key], per_sample[1][key])
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(model[0].weight_orig)
    outs = []
    for net in (ref, model):
        with fwAD.dual_level():
            out = torch.func.functional_call(
                net, {"0.weight_orig": fwAD.make_dual(net[0].weight_orig.detach(), tangent)}, (x,)
            )
            outs.append(fwAD.unpack_dual(out).tangent)
    assert torch.equal(outs[0], outs[1])


def test_set_backend_triton_refuses_other_dtypes_first():
    model = _model(None)
    model[3].weight_orig.data = model[3].weight_orig.data.to(torch.complex64)
    before, state = backends_of(model), copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"3.weight is torch.complex64 \(use backend='torch'\)"):
        _backends.set_backend(model, "triton")
    assert backends_of(model) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_parent_reading_a_child_weight_gets_it_in_orig_dtype_under_autocast():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            with torch.autocast(DEVICE, enabled=False):  # fp32 logits
                return F.linear(x.float(), self.proj.weight, self.proj.bias)

    torch.manual_seed(0)
    ref = signmask.prune(nn.Sequential(Head()), 0.5)
    model = copy.deepcopy(ref)
    _backends.set_backend(model, "triton")
    x = torch.randn(2, 4).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("k,n", [(0, 3), (4, 0)])
def test_masked_linear_takes_zero_features(k, n):
    x, orig = torch.randn(2, 3, k), torch.randn(n, k)
    mask = torch.rand(n, k) < 0.5
    grads = []
    for fn in (lambda a, o: _triton_linear.masked_linear(a, o, mask), lambda a, o: F.linear(a, o * mask)):
        a, o = x.clone().requires_grad_(), orig.clone().requires_grad_()
        out = fn(a, o)
        out.sum().backward()
        grads.append((out, a.grad, o.grad))
    for got, ref in zip(*grads):
        assert got.shape == ref.shape and torch.equal(got, ref)
    assert grads[0][0].shape == (2, 3, n)


def test_masked_linear_refuses_double_backward():
    x = torch.randn(2, 4, requires_grad=True)
    orig = torch.randn(3, 4, requires_grad=True)
    y = _triton_linear.masked_linear(x, orig, torch.rand(3, 4) < 0.5).square().sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        g.sum().backward()


# ---------------------------------- _triton: behaviour pinned by mutation testing


def test_bf16_output_rounds_ties_to_even():
    # TR03: the interpreter's manual fp32 -> bf16 rounding must be round-half-to-even
    # 0x3F818000 / 0x3F808000: exactly halfway between two bf16 values, odd / even lower neighbour
    bits = torch.tensor([0x3F818000, 0x3F808000, 0x3F838000, 0x40018000], dtype=torch.int64)
    orig = bits.to(torch.int32).view(torch.float32).reshape(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    got = _triton.masked_weight(orig, mask, None, torch.bfloat16)
    assert torch.equal(got, orig.to(torch.bfloat16))


# ---------------------------------- _triton_linear: behaviour pinned by mutation testing


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # row 1: inf * 0, as in torch
def test_masked_linear_keeps_an_inf_in_its_own_row():
    # x[1, 0] sits right after row 0's last feature: a K tile read past K would multiply it by
    # the masked-off weight 0 (inf * 0 = nan) into row 0
    x = torch.tensor([[1.0, 2, 3], [float("inf"), 1, 1]], device=DEVICE)
    orig, mask, _ = _case((4, 3), torch.float32, "contiguous", False, False)
    got = _triton_linear.masked_linear(x, orig, mask)
    ref = F.linear(x, _reparam.masked_weight(orig, mask, None))
    assert torch.isfinite(got[0]).all() and torch.allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)


def test_masked_linear_under_autocast_rounds_the_bias_to_bf16_first_as_f_linear():
    # exact products; bias 1 + 2^-8 + 2^-10 is not a bf16: rounded first (to 1 + 2^-7), then
    # 2^-8 added gives a tie that rounds to 1 + 2^-6; added unrounded it would give 1 + 2^-7
    x = torch.ones(1, 1, device=DEVICE)
    orig = torch.tensor([[2.0**-8], [0.0]], device=DEVICE)
    mask = torch.ones(2, 1, dtype=torch.bool, device=DEVICE)
    bias = torch.full((2,), 1 + 2.0**-8 + 2.0**-10, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _triton_linear.masked_linear(x, orig, mask, bias=bias)
        ref = F.linear(x, orig, bias)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    assert got.float().tolist() == [[1 + 2.0**-6, 1 + 2.0**-7]]


def test_masked_linear_compiles_with_its_bias():
    orig, mask, sign = _case((4, 3), torch.float32, "contiguous", True, False)
    x, bias = torch.randn(2, 3, device=DEVICE), torch.randn(4, device=DEVICE)

    def f(x, o, b):
        return _triton_linear.masked_linear(x, o, mask, sign, b)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ref = F.linear(x, _reparam.masked_weight(orig, mask, sign), bias)
    assert torch.allclose(compiled(x, orig, bias), ref, rtol=1e-6, atol=1e-6)


def test_fp32_products_are_ieee_only_at_the_highest_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _triton_linear._precision(torch.float32) == "ieee"
        assert _triton_linear._precision(torch.bfloat16) == "tf32"  # 16-bit: the MMA units
        torch.set_float32_matmul_precision("high")
        assert _triton_linear._precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_gpu_autotuning_tries_only_the_tiles_made_for_the_precision(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    configs = _triton_linear._GPU_CONFIGS
    assert _triton_linear._by_precision(configs, {}, PRECISION="ieee") == _triton_linear._IEEE_CONFIGS
    assert _triton_linear._by_precision(configs, {}, PRECISION="tf32") == _triton_linear._MMA_CONFIGS


@pytest.mark.parametrize("locked", [False, True])
def test_masked_weight_of_a_non_contiguous_weight_of_more_than_five_dims(locked):
    # Above _MAX_RANK the kernels walk flat contiguous copies into a contiguous result: a
    # transposed 6-d weight must be copied first and its result allocated contiguous.
    orig, mask, sign = _case((2, 3, 1, 2, 3, 2), torch.float32, "transposed", locked, True)
    assert not orig.is_contiguous()
    grad = torch.randn(orig.shape).to(DEVICE)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref_o, got_o = (orig.detach().clone().requires_grad_() for _ in range(2))
        ref = _reparam.masked_weight(ref_o, mask, sign).to(out_dtype)
        got = _triton.masked_weight(got_o, mask, sign, out_dtype)
        assert got.is_contiguous() and bits_equal(got, ref)
        ref.backward(grad.to(out_dtype))
        got.backward(grad.to(out_dtype))
        assert bits_equal(got_o.grad, ref_o.grad)


def test_a_free_mask_lets_orig_be_edited_in_place_before_the_backward():
    # Only locked signs read orig in the backward; saving it under a free mask too would make an
    # in-place edit between forward and backward (as the torch path allows) an autograd error.
    orig, mask, _ = _case((5, 3), torch.float32, "transposed", False, False)
    grad = torch.randn(5, 3).to(DEVICE)
    grads = []
    for fn in (_reparam.masked_weight, _triton.masked_weight):
        o = orig.detach().clone().requires_grad_()
        weight = fn(o, mask, None)
        with torch.no_grad():
            o.mul_(2.0)
        weight.backward(grad)
        grads.append(o.grad)
    assert bits_equal(grads[0], grads[1])


def test_masked_weight_compiles_to_its_out_dtype():
    # The custom op's fake must report the out_dtype it writes (bf16 here, from fp32 orig).
    orig, mask, sign = _case((6, 5), torch.float32, "contiguous", True, False)

    def f(o):
        w = _triton.masked_weight(o, mask, sign, torch.bfloat16)
        return w, w.dtype == torch.bfloat16

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, traced_bf16 = compiled(orig)
    assert traced_bf16 and got.dtype == torch.bfloat16
    assert bits_equal(got, _reparam.masked_weight(orig, mask, sign).to(torch.bfloat16))


def test_the_kernel_gradient_keeps_the_strides_of_a_channels_last_orig():
    # The backward writes into a buffer laid out like orig (empty_strided), not a contiguous one.
    orig, mask, sign = _case((4, 3, 3, 2), torch.float32, "channels_last", True, False)
    o = orig.detach().clone().requires_grad_()
    grad = torch.randn(orig.shape).to(DEVICE)
    (got,) = torch.autograd.grad(_triton.masked_weight(o, mask, sign), o, grad)
    assert got.stride() == orig.stride()
    ref = orig.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_reparam.masked_weight(ref, mask, sign), ref, grad)
    assert bits_equal(got, want)



def _set_new_api(matmul, matmul_value, global_value):
    matmul.fp32_precision = matmul_value  # "none": inherit torch.backends.fp32_precision
    torch.backends.fp32_precision = global_value


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("setting,expected", [
    (lambda: None, "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
    (lambda: _set_new_api(torch.backends.cuda.matmul, "none", "tf32"), "tf32"),  # inherited
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
])
def test_fp32_products_follow_what_cublas_reads(setting, expected):
    # torch >= 2.9's API included: after it, torch.get_float32_matmul_precision() raises.
    new = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    legacy = torch.get_float32_matmul_precision()
    try:
        setting()
        assert _triton_linear._precision(torch.float32) == expected
    finally:  # the legacy setter writes the new API's value too: it goes first
        torch.set_float32_matmul_precision(legacy)
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = new
    assert torch.backends.cuda.matmul.fp32_precision == new[1]


def test_kernels_launch_on_the_device_of_their_tensors(monkeypatch):
    # Triton launches on the *current* CUDA device. Stand-ins: fake tensors on cuda:1 (no GPU
    # needed), a current device that torch.cuda.device switches, kernels that record it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = [0]

    class Device(contextlib.AbstractContextManager):
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)
    launched = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((self.name, current[0]))

    for module, names in ((_triton, ("_masked_weight_fwd_flat", "_masked_weight_bwd_flat",
                                     "_masked_weight_fwd", "_masked_weight_bwd")),
                          (_triton_linear, ("_masked_mm", "_masked_grad_mm"))):
        for name in names:
            monkeypatch.setattr(module, name, Kernel(name))
    with FakeTensorMode(allow_non_fake_inputs=True):
        orig = torch.randn(6, 4, device="cuda:1")
        mask = torch.ones(6, 4, dtype=torch.bool, device="cuda:1")
        sign = torch.zeros(3, dtype=torch.uint8, device="cuda:1")
        for s in (None, sign):  # flat and strided kernels
            w = _triton.masked_weight_forward(orig, mask, s, torch.float32)
            _triton.masked_weight_backward(torch.ones_like(w), orig, mask, s)
        x, gy = torch.randn(8, 4, device="cuda:1"), torch.randn(8, 6, device="cuda:1")
        mask_u8, _ = _triton.prepare(orig, mask, None)
        _triton_linear._mm(x, orig, mask_u8, None, None, transposed=True)
        _triton_linear._mm(gy, orig, mask_u8, None, None, transposed=False)
        _triton_linear._grad_weight(gy, x, orig, mask_u8, None)
    assert len(launched) == 7 and {name for name, _ in launched} >= {"_masked_mm", "_masked_grad_mm"}
    assert all(device == 1 for _, device in launched), launched
    assert current == [0]  # and back to the caller's device


def test_fused_linear_offsets_turn_64_bit_where_int32_would_wrap():
    def wide(shape, strides=None, k_in=None):
        t = torch.empty_strided(shape, strides or _contiguous(shape), device="meta")
        return _triton_linear._wide([t], k_in if k_in is not None else shape[-1])

    def _contiguous(shape):
        return [math.prod(shape[i + 1:]) for i in range(len(shape))]

    limit = 2**31 - 1 - 256 * 8192  # the room left for the lanes past a tile's edge
    assert not wide((limit // 8192, 8192))
    assert wide((limit // 8192 + 1, 8192))  # a [262400, 8192] weight is far over
    assert wide((3, 16), (2**30 + 16, 1))  # few elements, a wide stride
    assert not wide((3, 16), (2**20, 1))
    assert wide((2, 2**30 + 1), k_in=1)  # the sign index runs over numel


@pytest.mark.parametrize("locked", [False, True])
def test_fused_linear_with_64_bit_offsets_equals_the_32_bit_one(locked, monkeypatch):
    orig, mask, sign = _case((20, 12), torch.float32, "transposed", locked, False, seed=3)
    x = torch.randn(12, 9, device=DEVICE).t()
    grad = torch.randn(9, 20, device=DEVICE)

    def run():
        o, xx = orig.clone().requires_grad_(), x.clone().requires_grad_()
        y = _triton_linear.masked_linear(xx, o, mask, sign)
        y.backward(grad)
        return y, xx.grad, o.grad

    narrow = run()
    calls = []
    monkeypatch.setattr(_triton_linear, "_wide", lambda *a: calls.append(a) or True)
    for got, ref in zip(run(), narrow):
        assert bits_equal(got, ref)
    assert len(calls) == 3  # forward, grad-input and grad-weight all asked


def test_fused_linear_autotunes_once_per_token_count_bucket(monkeypatch):
    # On a GPU every new autotune key times every config (~0.1 s each): keys must not follow
    # each token count. Two stand-in configs make the interpreter's autotuner tune.
    import triton

    configs = [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP": g}) for g in (1, 2)]
    timed = []
    for name in ("_masked_mm", "_masked_grad_mm"):
        real = getattr(_triton_linear, name)
        tuner = triton.autotune(configs=configs, key=real.keys)(real.fn)
        tuner._bench = lambda *args, config, name=name, **kw: timed.append(name) or [1.0, 1.0, 1.0]
        monkeypatch.setattr(_triton_linear, name, tuner)
    orig, mask, _ = _case((8, 16), torch.float32, "contiguous", False, False)
    counts = []
    for tokens in (9, 12, 16, 17, 9):  # buckets 16, 16, 16, 32, 16
        x = torch.randn(tokens, 16, device=DEVICE, requires_grad=True)
        o = orig.clone().requires_grad_()
        _triton_linear.masked_linear(x, o, mask).sum().backward()
        counts.append(len(timed))
    # Forward and grad-input share _masked_mm's key (N and K swap): 2 keys x 2 configs; the
    # grad-weight kernel 1 key x 2 configs. Then nothing until the next bucket.
    assert counts == [6, 6, 6, 12, 12], counts
