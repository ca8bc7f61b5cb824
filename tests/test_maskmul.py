"""Chunked CPU multiplies by masks and int8 factors: bitwise equal to the plain torch op."""

import collections
import threading

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import signmask
from signmask import _bits, _maskmul
from _util import bits_equal, in_threads


def _chunks(monkeypatch, size: int) -> None:
    # Tensors above `size` elements take the chunked path, `size` elements per chunk.
    monkeypatch.setattr(_maskmul, "SMALL", size)
    monkeypatch.setattr(_maskmul, "CHUNK", size)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Chunks of 7 elements: every test tensor spans several chunks and a ragged last one.
    _chunks(monkeypatch, 7)
    monkeypatch.setattr(_maskmul, "_buffers", {})  # no buffer of another test's


def _case(data, dtype):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    t = torch.randn(shape, generator=gen).to(dtype)
    kind = data.draw(st.sampled_from(["bool", "uint8", "int8"]))
    if kind == "int8":
        factor = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    else:
        factor = torch.rand(shape, generator=gen) < 0.5
        factor = factor if kind == "bool" else factor.to(torch.uint8)
    if len(shape) == 4 and data.draw(st.booleans()):
        t = t.contiguous(memory_format=torch.channels_last)
        factor = factor.contiguous(memory_format=torch.channels_last)
    return t, factor


def _plain(factor):
    return factor.to(torch.uint8) if factor.dtype == torch.bool else factor


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_mul_and_mul_inplace_equal_the_plain_product_bitwise(data, dtype):
    t, factor = _case(data, dtype)
    expected = t * _plain(factor)
    got = _maskmul.mul(t, factor)
    assert got.stride() == expected.stride() or t.dim() < 2
    assert bits_equal(got, expected)
    inplace = t.clone(memory_format=torch.preserve_format)
    assert _maskmul.mul_(inplace, factor) is inplace
    assert bits_equal(inplace, expected)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_multiply_gradient_equals_autograd_of_the_plain_product(data):
    t, factor = _case(data, torch.float32)
    a = t.detach().clone().requires_grad_()
    b = t.detach().clone().requires_grad_()
    upstream = torch.randn_like(t)  # t's layout: channels_last cases chunk their backward too
    (_maskmul.multiply(a, factor) * upstream).sum().backward()
    (b * _plain(factor) * upstream).sum().backward()
    assert bits_equal(a.grad, b.grad)


def test_the_chunked_path_runs_and_plain_ops_serve_the_rest():
    big = torch.randn(5, 6)
    mask = torch.rand(5, 6) < 0.5
    assert _maskmul._chunked(big, mask.view(torch.uint8)) is not None
    assert _maskmul._chunked(big[:, ::2], mask[:, ::2].view(torch.uint8)) is None  # no flat view
    assert _maskmul._chunked(big.t(), mask.view(torch.uint8)) is None  # strides differ
    assert _maskmul._plain(torch.randn(3)) and not _maskmul._plain(big)  # small: plain op
    assert _maskmul._chunked(big, torch.rand(5, 6)) is None  # only exact integer factors
    strided = big[:, ::2]
    assert torch.equal(_maskmul.mul(strided, mask[:, ::2]), strided * mask[:, ::2].to(torch.uint8))


def test_multiply_takes_the_custom_function_only_when_chunking():
    x = torch.randn(4, 4, requires_grad=True)
    mask = torch.rand(4, 4) < 0.5
    assert type(_maskmul.multiply(x, mask).grad_fn).__name__ == "MulFactorBackward"
    assert type(_maskmul.multiply(x[:1, :1], mask[:1, :1]).grad_fn).__name__ == "MulBackward0"
    # no flat view: the plain op, not the custom function around it
    assert type(_maskmul.multiply(x[:, ::2], mask[:, ::2]).grad_fn).__name__ == "MulBackward0"


def _train(backend: str, signs, chunk: int, monkeypatch) -> list[torch.Tensor]:
    """Four SGD steps of a small pruned net; the effective weights after each."""
    _chunks(monkeypatch, chunk)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    signmask.prune(net, 0.6, signs=signs)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    signmask.set_backend(net, backend, optimizer=opt)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x, y = torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            out += [net[0](x).detach(), net[2].weight_orig.detach().clone()]
    return out


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_backends_train_bitwise_alike_with_and_without_chunks(backend, signs, monkeypatch):
    plain = _train(backend, signs, 1 << 30, monkeypatch)
    chunked = _train(backend, signs, 7, monkeypatch)
    for a, b in zip(plain, chunked):
        assert bits_equal(a, b)


def test_double_backward_through_the_chunked_path_equals_the_plain_one():
    # Gradient penalties differentiate the backward itself (create_graph=True).
    torch.manual_seed(0)
    x, mask = torch.randn(4, 4), torch.rand(4, 4) < 0.5
    grads = []
    for fn in (_maskmul.multiply, lambda t, m: t * m.to(torch.uint8)):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(leaf, mask) ** 3).sum(), leaf, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), leaf)
        grads.append((g.detach(), gg))
    assert all(bits_equal(a, b) for a, b in zip(*grads))


def test_functorch_transforms_and_forward_ad_see_the_plain_product():
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(0)
    x, mask = torch.randn(4, 4), torch.rand(4, 4) < 0.5
    expected = 2 * x * mask.to(torch.uint8)
    assert bits_equal(torch.func.grad(lambda t: (_maskmul.multiply(t, mask) ** 2).sum())(x), expected)
    batch = torch.randn(3, 4, 4)
    assert bits_equal(torch.func.vmap(lambda t: _maskmul.multiply(t, mask))(batch), batch * mask.to(torch.uint8))
    tangent = torch.randn(4, 4)
    with fwad.dual_level():
        out = _maskmul.multiply(fwad.make_dual(x, tangent), mask)
        assert bits_equal(fwad.unpack_dual(out).tangent, tangent * mask.to(torch.uint8))


def test_projection_masks_a_gradient_built_with_create_graph():
    torch.manual_seed(0)
    net = signmask.prune(torch.nn.Linear(6, 6), 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    signmask.set_backend(net, "projection", optimizer=opt)
    net(torch.randn(3, 6)).pow(2).sum().backward(create_graph=True)
    grad = net.weight_orig.grad
    assert grad.requires_grad and grad[net.weight_mask].any()
    assert not grad[~net.weight_mask].any()  # masked, and still part of the graph


class _OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk, passes", [(7, 5), (30, 1), (64, 1)])
def test_one_conversion_and_one_multiply_per_chunk(chunk, passes, monkeypatch):
    # Each op is one parallel region of torch's pool; on a busy machine each region waits for
    # a descheduled thread, so the number of ops per tensor is what this path keeps small.
    _chunks(monkeypatch, chunk)
    monkeypatch.setattr(_maskmul, "SMALL", 7)  # the 30 elements take the chunked path at any chunk
    t, mask = torch.randn(5, 6), torch.rand(5, 6) < 0.5
    expected = t * mask.to(torch.uint8)
    with _OpCounts() as ops:
        _maskmul.mul_(t, mask)
    assert ops.counts["aten.copy_"] == passes and ops.counts["aten.mul"] == passes
    assert bits_equal(t, expected)


def test_the_buffer_is_kept_between_calls_one_per_dtype():
    _maskmul.mul(torch.randn(5), torch.ones(5, dtype=torch.bool))  # small: the plain op
    assert not _maskmul._buffers
    _maskmul.mul(torch.randn(10), torch.ones(10, dtype=torch.bool))
    first = _maskmul._buffers[torch.float32]
    assert first.numel() == 7  # one chunk
    _maskmul.mul_(torch.randn(20), torch.ones(20, dtype=torch.bool))
    _maskmul.mul(torch.randn(10, dtype=torch.float64), torch.ones(10, dtype=torch.bool))
    assert _maskmul._buffers[torch.float32] is first
    assert _maskmul._buffers[torch.float64].dtype == torch.float64


def test_threads_multiplying_at_once_get_their_own_products():
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(2000, generator=gen), torch.rand(2000, generator=gen) < 0.5) for _ in range(8)]
    results = [None] * len(cases)

    def run(i):
        for _ in range(20):  # the GIL is released inside each op: the threads interleave
            results[i] = _maskmul.mul(*cases[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (t, mask), got in zip(cases, results):
        assert bits_equal(got, t * mask.to(torch.uint8))


def test_inference_mode_then_training_reuses_the_buffer():
    # A buffer made under inference_mode must still be writable outside it (and vice versa).
    t, mask = torch.randn(30), torch.rand(30) < 0.5
    expected = t * mask.to(torch.uint8)
    with torch.inference_mode():
        assert bits_equal(_maskmul.mul(t, mask), expected)
    assert bits_equal(_maskmul.mul(t, mask), expected)
    with torch.inference_mode():
        assert bits_equal(_maskmul.mul(t, mask), expected)


def test_fake_tensors_and_device_contexts_leave_the_buffer_real():
    # torch.export and shape propagation run the forward on FakeTensors; a later real multiply
    # must find a real CPU buffer, and a fake one must not meet a real buffer.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    t, mask = torch.randn(30), torch.rand(30) < 0.5
    expected = t * mask.to(torch.uint8)
    _maskmul.mul(t, mask)  # a real buffer exists
    with FakeTensorMode() as mode:
        fake = _maskmul.mul(mode.from_tensor(t), mode.from_tensor(mask))
    assert isinstance(fake, FakeTensor) and fake.shape == t.shape
    _maskmul._buffers.clear()
    with FakeTensorMode() as mode:
        _maskmul.mul(mode.from_tensor(t), mode.from_tensor(mask))
    with torch.device("meta"):
        assert bits_equal(_maskmul.mul(t, mask), expected)
    assert bits_equal(_maskmul.mul(t, mask), expected)
    assert all(type(b) is torch.Tensor and b.device.type == "cpu" for b in _maskmul._buffers.values())


def test_a_multiply_reentered_from_a_subclass_keeps_its_own_buffer():
    inner_t, inner_mask = torch.randn(30), torch.rand(30) < 0.5
    inner = []

    class Reentrant(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.mul and not inner:  # between the outer copy_ and its multiply
                inner.append(_maskmul.mul(inner_t, inner_mask))
            return super().__torch_function__(func, types, args, kwargs)

    t, mask = torch.randn(30), torch.rand(30) < 0.5
    _maskmul.mul(t, mask)  # the thread's buffer exists: the outer call takes it
    got = _maskmul.mul(t.as_subclass(Reentrant), mask)
    assert inner and bits_equal(inner[0], inner_t * inner_mask.to(torch.uint8))
    assert bits_equal(got.as_subclass(torch.Tensor), t * mask.to(torch.uint8))


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_large_sign_locked_channels_last_conv_has_the_locked_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 64, 6)  # 294912 weights: above the chunked path's threshold
    signmask.prune(conv, 0.5, signs="locked")
    conv.to(memory_format=torch.channels_last)  # orig and mask channels_last, sign factors not
    conv(torch.randn(1, 128, 6, 6))
    neg = _bits.sign_bits(conv.weight_sign, conv.weight_orig.shape).bool()
    want = torch.where(neg, -conv.weight_orig.abs(), conv.weight_orig.abs()) * conv.weight_mask
    assert torch.equal(conv.weight, want)


def test_int8_sign_factors_take_the_chunked_path_like_bool_masks():
    # The sign-locked forward multiplies by int8 factors in {-1, 0, +1}: they chunk too.
    torch.manual_seed(0)
    x = torch.randn(4, 4, requires_grad=True)
    factor = torch.randint(-1, 2, (4, 4), dtype=torch.int8)
    out = _maskmul.multiply(x, factor)
    assert type(out.grad_fn).__name__ == "MulFactorBackward"
    assert bits_equal(out, x * factor)


def test_an_integer_tensor_gets_the_plain_products_promoted_dtype():
    # Only float tensors chunk: uint8 * int8 promotes to int16, where -1 must not wrap to 255.
    torch.manual_seed(0)
    t = torch.arange(1, 13, dtype=torch.uint8).view(3, 4)
    factor = torch.randint(-1, 2, (3, 4), dtype=torch.int8)
    got = _maskmul.mul(t, factor)
    assert got.dtype == torch.int16 and torch.equal(got, t * factor)


def test_a_factor_that_broadcasts_gets_the_plain_product():
    # A (1, 3) mask has the strides of a contiguous (4, 3) tensor, but not its shape: its flat
    # view must not be paired element by element with t's.
    torch.manual_seed(0)
    t = torch.randn(4, 3)
    mask = torch.tensor([[True, False, True]])
    assert t.stride() == mask.stride()
    expected = t * mask.to(torch.uint8)
    assert bits_equal(_maskmul.mul(t, mask), expected)
    assert bits_equal(_maskmul.mul_(t.clone(), mask), expected)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.int32, torch.float16,
                                   torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_products_keep_the_dtype_of_t_as_the_plain_op_does(dtype):
    # A bool mask seen as uint8 promoted an int8 weight to int16 (and a bool one to uint8):
    # a pruned int8 Parameter became int16 after signmask.remove.
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(5, 7, generator=g) * 4).to(dtype)
    mask = torch.rand(5, 7, generator=g) > 0.5
    expected = t * mask
    for got in (_maskmul.mul(t, mask), _maskmul.multiply(t, mask), _maskmul.mul_(t.clone(), mask)):
        assert got.dtype == dtype and torch.equal(got, expected)


def test_a_factor_of_another_layout_gets_the_plain_product():
    # The same shape and elements, but a channels_last t beside a contiguous factor: their flat
    # views in memory order hold different elements at each position.
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    for factor in (torch.rand(2, 3, 4, 5, generator=g) < 0.5, torch.randint(-1, 2, (2, 3, 4, 5), generator=g, dtype=torch.int8)):
        expected = t * _plain(factor)
        assert bits_equal(_maskmul.mul(t, factor), expected)
        assert bits_equal(_maskmul.mul_(t.clone(memory_format=torch.preserve_format), factor), expected)


def test_permuted_dense_layouts_take_the_chunked_path():
    # A channels_last or transposed tensor is dense: its elements in memory order are one flat view.
    t, mask = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5) < 0.5
    last = (t.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last))
    for a, m in (last, (t[0, 0].t(), mask[0, 0].t())):
        assert _maskmul._chunked(a, m.view(torch.uint8)) is not None
        assert bits_equal(_maskmul.mul(a, m), a * m.to(torch.uint8))


def test_the_kept_buffer_grows_for_a_longer_chunk(monkeypatch):
    monkeypatch.setattr(_maskmul, "CHUNK", 1 << 10)  # the tensors below fit one chunk each
    g = torch.Generator().manual_seed(0)
    for n in (10, 100, 1000):
        t, mask = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.5
        assert bits_equal(_maskmul.mul(t, mask), t * mask.to(torch.uint8))
        assert _maskmul._buffers[torch.float32].numel() == n


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_a_traced_multiply_by_a_bool_mask_follows_each_call_s_mask():
    # jit.trace cannot record the bool mask's uint8 view.
    g = torch.Generator().manual_seed(0)
    (t1, m1), (t2, m2) = ((torch.randn(5, 6, generator=g), torch.rand(5, 6, generator=g) < 0.5) for _ in range(2))
    traced = torch.jit.trace(_maskmul.multiply, (t1, m1))
    assert bits_equal(traced(t2, m2), t2 * m2.to(torch.uint8))


@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_models_trained_in_threads_at_once_match_the_same_runs_one_after_the_other(backend):
    # A sweep with one model per thread: each thread's forwards, gradient masks and projections
    # go through the process's kept buffers (chunks of 7 here), and each model must still train
    # bitwise as it does alone.
    def setup(seed, signs):
        torch.manual_seed(seed)  # in the main thread: the inits draw from the global generator
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
        signmask.prune(model, 0.6, signs=signs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        signmask.set_backend(model, backend, optimizer=opt)
        gen = torch.Generator().manual_seed(seed)
        batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(30)]

        def train():
            for i, (x, y) in enumerate(batches):
                opt.zero_grad()
                (model(x) - y).square().mean().backward()
                opt.step()
                if i == 15:
                    signmask.prune(model, 0.3)  # a new mask mid-run, re-projected under projection
            return {k: v.clone() for k, v in model.state_dict().items()}

        return train

    configs = [(0, None), (1, "locked"), (2, None), (3, "locked")]
    alone = [setup(*c)() for c in configs]
    together = in_threads([setup(*c) for c in configs])
    for one, other in zip(alone, together):
        assert one.keys() == other.keys() and all(bits_equal(one[k], other[k]) for k in one)
