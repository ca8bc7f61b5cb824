"""Backend registry and ``set_backend``, against the torch path (the projection backend: test_projection.py).

Oracle: the default ``"torch"`` reparametrization. ``"auto"`` on CPU must be the torch path.
"""

import copy
import re

import pytest
import torch
from torch import nn

import signmask
from signmask import _backends, _reparam
from _util import assert_each_fault_leaves_it_untouched, backends_of, bits_equal, conv_net, conv_net_batches, effective_weights, orig_grads, outside_alive, projection_hooks, pruned_conv_net, two_linears_trained


# ------------------------------------------------------------------ registry and set_backend


def test_registry_lists_valid_keys():
    expected = r"backend='cuda' is not a known backend.*'auto'.*'projection'.*'torch'"
    with pytest.raises(ValueError, match=expected):
        _backends.get_backend("cuda")
    with pytest.raises(ValueError, match=r"; valid: \['auto', "):
        _backends.set_backend(pruned_conv_net(), "fast")
    for wrong in (None, 3):  # the README's rule: a value of the wrong kind is a TypeError
        with pytest.raises(TypeError, match=rf"^backend must be a str, one of \['auto', .*\], got {type(wrong).__name__}"):
            _backends.set_backend(pruned_conv_net(), wrong)
    assert {"auto", "torch", "triton", "projection"} <= set(_backends.BACKENDS)


def test_default_backend_is_torch_and_reported():
    model = pruned_conv_net()
    assert set(backends_of(model).values()) == {"torch"}
    assert _reparam.SignMaskHook.backend == "torch"
    _backends.set_backend(model, "auto")
    assert set(backends_of(model).values()) == {"auto"}


def test_set_backend_refuses_bad_input():
    with pytest.raises(ValueError, match="nothing in Sequential is pruned"):
        _backends.set_backend(conv_net(), "torch")
    stock = conv_net()
    torch.nn.utils.prune.l1_unstructured(stock[0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"stock torch.nn.utils.prune hook.*signmask.prune"):
        _backends.set_backend(stock, "torch")
    with pytest.raises(ValueError, match="needs optimizer="):
        _backends.set_backend(pruned_conv_net(), "projection")
    model = pruned_conv_net()
    with pytest.raises(ValueError, match="not exact with LBFGS"):
        _backends.set_backend(model, "projection", optimizer=torch.optim.LBFGS(model.parameters()))
    # Nothing changed on refusal.
    assert set(backends_of(model).values()) == {"torch"}


@pytest.mark.filterwarnings("ignore:1 nn.MultiheadAttention")
@pytest.mark.parametrize("layer, name", [("attn", "in_proj_weight"), ("fc", "bias")])
def test_a_stock_pruned_tensor_signmask_cannot_adopt_is_named_with_a_remedy_that_works(layer, name):
    # The remedy offered was signmask.prune(model, 0.0, include=layer), which adopts conv/linear
    # weights only: it refused an nn.MultiheadAttention ("matches no conv/linear module") and
    # left a stock-pruned bias as it was, so set_backend refused again.
    from _util import AttnNet

    model = signmask.prune(AttnNet(), 0.5)
    torch.nn.utils.prune.l1_unstructured(getattr(model, layer), name, 0.5)
    with pytest.raises(ValueError, match=rf"^{layer}.{name} is pruned by a stock torch.nn.utils.prune hook, "
                                         rf"and signmask computes conv/linear weights only: make that "
                                         rf"pruning permanent first: torch.nn.utils.prune.remove\(module, "
                                         rf"'{name}'\)$"):
        _backends.set_backend(model, "torch")
    torch.nn.utils.prune.remove(getattr(model, layer), name)  # the remedy given
    _backends.set_backend(model, "torch")


@pytest.mark.parametrize("signs", [None, "locked"])
def test_auto_on_cpu_is_the_torch_path(signs):
    ref, model = pruned_conv_net(signs), pruned_conv_net(signs)
    _backends.set_backend(model, "auto")
    assert _backends.AutoBackend.resolve(torch.zeros(1)) == "torch"
    (x, y), = conv_net_batches(1)
    for m in (ref, model):
        nn.functional.cross_entropy(m(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(effective_weights(ref), effective_weights(model)))
    assert all(torch.equal(a, b) for a, b in zip(orig_grads(ref), orig_grads(model)))


def test_torch_and_auto_backends_compile_fullgraph():
    model = pruned_conv_net("locked")
    (x, _), = conv_net_batches(1)
    expected = model(x)
    for backend in ("torch", "auto"):
        _backends.set_backend(model, backend)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------- imports and autocast dtypes


def test_backends_module_imports_no_triton():
    import subprocess
    import sys

    code = (
        "import sys, signmask, signmask._backends, signmask._projection\n"
        "print(sorted(m for m in ('triton', 'timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_autocast_folding_only_for_stock_forwards():
    class Standardized(nn.Conv2d):  # uses its weight before the conv: must keep fp32
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return nn.functional.conv2d(x, w)

    orig = torch.zeros(2, 2, 1, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backends.consumer_dtype(nn.Conv2d(2, 2, 1), orig) == torch.bfloat16
        assert _backends.consumer_dtype(Standardized(2, 2, 1), orig) == torch.float32
        with torch.no_grad():  # remove() / install() call the hook under no_grad
            assert _backends.consumer_dtype(nn.Conv2d(2, 2, 1), orig) == torch.float32
    assert _backends.consumer_dtype(nn.Conv2d(2, 2, 1), orig) == torch.float32


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_autocast_never_lowers_a_float64_weight():
    # Autocast leaves fp64 tensors alone, so the kernel must write the weight in fp64.
    lin = nn.Linear(2, 2).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backends.consumer_dtype(lin, lin.weight.detach()) == torch.float64
        assert _backends.consumer_dtype(nn.Linear(2, 2), nn.Linear(2, 2).weight.detach()) == torch.bfloat16


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_triton_falls_back_to_the_torch_path_for_a_dtype_cast_after_set_backend():
    # complex64 is no kernel dtype; set_backend checked float32, the cast came later.
    torch.manual_seed(0)
    ref = signmask.prune(nn.Linear(4, 4), 0.5)
    model = copy.deepcopy(ref)
    _backends.set_backend(model, "triton")
    ref.to(torch.complex64)
    model.to(torch.complex64)
    x = torch.randn(2, 4, dtype=torch.complex64)
    assert torch.equal(model(x), ref(x))


def test_set_backend_refuses_an_optimizer_that_is_not_one_before_any_change():
    model = pruned_conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got str"):
        _backends.set_backend(model, "torch", optimizer="adam")
    assert set(backends_of(model).values()) == {"projection"}
    assert len(projection_hooks(opt)) == 3


def test_set_backend_projection_aliases_the_weight_before_any_forward():
    model = signmask.prune(nn.Linear(4, 4), 0.5)
    _backends.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert model.weight.data_ptr() == model.weight_orig.data_ptr()


def test_set_backend_unhooks_the_optimizer_it_is_given():
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    for module, name in signmask._targets.pruned(model).values():
        # A hook that no longer remembers its optimizer: only the one given can be unhooked.
        _reparam.find_hook(module, name)[1].__dict__.pop("_optimizer")
    _backends.set_backend(model, "torch", optimizer=opt)
    assert projection_hooks(opt) == []


@pytest.mark.parametrize("backend", ["torch", "projection", "auto"])
@pytest.mark.parametrize("edit, found", [
    (lambda m: setattr(m[1], "weight_mask", m[1].weight_mask.float()), "torch.float32 of shape (2, 3) on cpu"),
    (lambda m: setattr(m[1], "weight_mask", m[1].weight_mask.to("meta")), "torch.bool of shape (2, 3) on meta"),
    (lambda m: setattr(m[1], "weight_mask", m[1].weight_mask.t()), "torch.bool of shape (3, 2) on cpu"),
])
def test_set_backend_refuses_a_mask_edited_out_of_its_layout_before_any_change(backend, edit, found):
    # Found midway, a float mask failed in the Triton kernel and a meta one in the projection
    # after the tensors before it were switched (and, under projection, rewritten).
    model = signmask.prune(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), 0.5, signs="locked")
    with torch.no_grad():
        model[0].weight_orig.neg_()  # disagrees with its locks: projection would reflect it
    edit(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]  # (a meta mask has no values)
    with pytest.raises(ValueError, match=re.escape(f"1.weight_mask must be torch.bool of shape (2, 3) on cpu, beside its weight (as signmask.prune makes it), found {found}")):
        _backends.set_backend(model, backend, optimizer=opt)
    assert all(bits_equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(backends_of(model).values()) == {"torch"}
    assert not projection_hooks(opt) and not model[0].weight_orig._post_accumulate_grad_hooks


def test_set_backend_refuses_a_sign_buffer_of_another_dtype_by_name():
    model = signmask.prune(nn.Linear(4, 3), 0.5, signs="locked")
    model.weight_sign = model.weight_sign.to(torch.int32)
    with pytest.raises(ValueError, match=re.escape("weight_sign must be torch.uint8 of shape (2,) on cpu")):
        _backends.set_backend(model, "torch")


def _trained_on(backend, signs):
    """Two pruned Linears trained one step on ``backend`` (momentum at pruned entries on the
    torch path), the first against its locks (projection reflects it), a gradient left."""
    return two_linears_trained(backend, signs, flip=True)


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("start, backend, new_optimizer", [
    ("torch", "projection", False), ("projection", "torch", False), ("projection", "projection", True),
])
def test_a_failure_at_any_torch_call_leaves_model_and_optimizer_untouched(signs, start, backend, new_optimizer):
    # An out-of-memory error (or Ctrl-C) at the k-th layer left the layers before it switched,
    # their hooks on the optimizers and Parameters changed, and under projection their pruned
    # weights and momentum zeroed (locked ones reflected).
    def make():
        model, opt = _trained_on(start, signs)
        new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if new_optimizer else opt
        return model, new, opt

    assert_each_fault_leaves_it_untouched(
        make, lambda m, new, old: _backends.set_backend(m, backend, optimizer=new), rest=outside_alive,
        alive_only=True,
    )
