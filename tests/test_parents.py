"""Pruned weights read directly by their parent module (MultiheadAttention, timm BEiT)."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.nn.utils import prune as tprune

import signmask
from signmask import _parents
from signmask._compat import import_timm
from _util import AttnNet

timm = import_timm()


def _encoder(seed=0):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)


def _beit(seed=0):
    torch.manual_seed(seed)
    return timm.models.beit.Beit(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)


def _dense_twin(model):
    """A dense copy whose weights are the pruned model's effective weights."""
    twin = copy.deepcopy(model)
    signmask.remove(twin)
    return twin


def _grads(model):
    return {n.removesuffix("_orig"): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("make, x", [(_encoder, torch.randn(3, 5, 16)), (_beit, torch.randn(2, 3, 16, 16))])
def test_weights_read_by_the_parent_train_like_a_dense_model(make, x):
    model = signmask.prune(make(), 0.5)
    twin = _dense_twin(model)
    model(x).sum().backward()
    twin(x).sum().backward()
    got, want = _grads(model), _grads(twin)
    assert got.keys() == want.keys()
    for name, (module, tensor) in signmask._targets.pruned(model).items():
        mask = module._buffers[tensor + "_mask"]
        torch.testing.assert_close(got[name], want[name] * mask, rtol=0, atol=1e-6, msg=name)
    for name in got.keys() - set(signmask._targets.pruned(model)):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def _links(module):
    return [h for h in list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
            if isinstance(h, _parents.RefreshChildren)]


def test_parent_hooks_follow_prune_and_remove_and_survive_deepcopy():
    model = signmask.prune(_encoder(), 0.5, include=["linear1"])
    assert _links(model.self_attn) == []
    signmask.prune(model, 0.5)
    assert [h.paths for h in _links(model.self_attn)] == [("out_proj.weight",)] * 2
    # The encoder layer reads linear1/2 directly only on its fast path, which hooks switch off.
    assert _links(model) == []
    before = _links(model.self_attn)
    signmask.prune(model, 0.1)  # the same tensors again: the hooks stay (torch.compile guards on them)
    assert all(a is b for a, b in zip(_links(model.self_attn), before)) and len(before) == 2
    model(torch.randn(2, 3, 16)).sum().backward()
    copy.deepcopy(model)  # every weight the parents computed was detached again
    signmask.remove(model)
    assert _links(model.self_attn) == []


def test_reads_are_found_in_the_forward_source():
    assert "out_proj.weight" in _parents._reads(nn.MultiheadAttention)
    assert _parents._reads(nn.TransformerEncoderLayer) == frozenset()  # fast path only
    assert "qkv.weight" in _parents._reads(timm.models.beit.Attention)
    assert _parents._reads(nn.Linear) == frozenset()  # self.weight is its own tensor, not a child's


def test_classes_made_at_run_time_are_freed_after_pruning():
    # The reads are cached per class, weakly: torch.fx gives each traced module a class of its
    # own, and a class made in a function keeps what its methods close over (here a tensor).
    # An lru_cache kept every class ever pruned alive, and all it referenced.
    def make(scale):
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return nn.functional.linear(x, self.fc.weight) * scale

        return Scaled()

    scale = torch.ones(4)
    refs = [weakref.ref(scale)]
    for model in (make(scale), torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))):
        signmask.prune(model, 0.5)
        model(torch.ones(2, 4)).sum().backward()
        refs += [weakref.ref(model), weakref.ref(type(model))]
    assert "fc.weight" in _parents._reads(type(make(scale)))
    del model, scale
    gc.collect()
    assert [r for r in refs if r() is not None] == []


class GrandparentReader(nn.Module):
    """Reads a grandchild's weight through a dotted path, with attribute calls after it."""

    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.block.fc.weight.t().t(), self.block.fc.bias)


def test_dotted_reads_by_a_grandparent_are_refreshed():
    torch.manual_seed(0)
    model = signmask.prune(GrandparentReader(), 0.5)
    assert [h.paths for h in _links(model)] == [("block.fc.weight",)] * 2
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(3, 6)
    model(x).square().sum().backward()
    opt.step()  # the next forward must see the stepped weights
    want = torch.nn.functional.linear(x, model.block.fc.weight_orig * model.block.fc.weight_mask, model.block.fc.bias)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_torch_compile_fullgraph_traces_the_parent_refresh():
    torch.manual_seed(0)
    model = signmask.prune(nn.MultiheadAttention(16, 2, batch_first=True), 0.5)
    x = torch.randn(2, 5, 16)
    forward = lambda m: m(x, x, x, need_weights=False)[0]
    forward(model).sum().backward()
    eager = model.out_proj.weight_orig.grad.clone()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(forward(compiled), forward(model), rtol=0, atol=1e-6)
    forward(compiled).sum().backward()
    torch.testing.assert_close(model.out_proj.weight_orig.grad, eager, rtol=0, atol=1e-6)
    assert (eager * ~model.out_proj.weight_mask == 0).all() and eager.any()


def test_compiled_attentions_built_alike_share_one_graph():
    # The parent's detaching hook runs even when the forward raises, and dynamo guards such a
    # hook by its key: a process-wide counter would make every new model recompile.
    def frames(prune_fn):
        torch._dynamo.reset()
        counter = CompileCounter()
        for seed in range(3):
            torch.manual_seed(seed)
            model = prune_fn(nn.MultiheadAttention(16, 2, batch_first=True))
            x = torch.randn(2, 5, 16)
            torch.compile(model, backend=counter)(x, x, x, need_weights=False)[0].sum().backward()
        torch._dynamo.reset()
        return counter.frame_count

    def pruned(model):
        signmask.prune(model, 0.5)
        assert len(_links(model)) == 2  # the parent reads out_proj.weight: its hooks are in play
        return model

    assert frames(pruned) == frames(lambda m: m)


class TwoAttentions(nn.Module):
    """Two MultiheadAttention layers sharing one out_proj."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)
        self.b.out_proj = self.a.out_proj

    def forward(self, x):
        return self.b(self.a(x, x, x)[0], x, x)[0]


def test_a_child_shared_by_two_parents_is_refreshed_from_both():
    torch.manual_seed(0)
    model = signmask.prune(TwoAttentions(), 0.5, include=["a.out_proj"])
    assert [h.paths for h in _links(model.a)] == [h.paths for h in _links(model.b)] == [("out_proj.weight",)] * 2
    model(torch.randn(3, 2, 8)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    x = torch.randn(3, 2, 8)
    twin = _dense_twin(model)
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)


class MetadataReader(nn.Module):
    """Reads its child's weight only for its shape, then calls the child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x[..., : self.proj.weight.shape[1]])


class DtypeReader(MetadataReader):
    """Casts its input to its child's weight dtype first (timm's XCiT positional encoding)."""

    def forward(self, x):
        return self.proj(x.to(self.proj.weight.dtype))


def test_metadata_reads_do_not_link():
    assert _parents._reads(MetadataReader) == frozenset()
    model = signmask.prune(MetadataReader(), 0.5)
    assert _links(model) == []


def test_a_dtype_read_links_so_that_it_follows_to():
    # .to() converts weight_orig, not the weight the last forward left: the first forward
    # after .to(float64) cast the input to float32 and failed on the float64 bias.
    assert _parents._reads(DtypeReader) == frozenset({"proj.weight"})
    torch.manual_seed(0)
    model = signmask.prune(DtypeReader(), 0.5)
    model(torch.randn(2, 4))
    model.to(torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    dense = nn.Linear(4, 4).double()
    dense.load_state_dict({"weight": model.proj.weight_orig * model.proj.weight_mask, "bias": model.proj.bias})
    assert torch.equal(model(x), dense(x))


class HelperReader(nn.Module):
    """Reads its child's weight in a helper method that forward calls."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self._project(x)

    def _project(self, x):
        return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias)


def test_reads_in_methods_that_forward_calls_are_found():
    assert "proj.weight" in _parents._reads(HelperReader)
    torch.manual_seed(0)
    model = signmask.prune(HelperReader(), 0.5)
    twin = _dense_twin(model)
    x = torch.randn(2, 4)
    model(x).sum().backward()
    twin(x).sum().backward()
    torch.testing.assert_close(model.proj.weight_orig.grad, twin.proj.weight.grad * model.proj.weight_mask,
                               rtol=0, atol=0)


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_a_stock_pruned_weight_read_by_its_parent_follows_weight_orig():
    torch.manual_seed(0)
    net = AttnNet()
    tprune.l1_unstructured(net.attn.out_proj, "weight", 0.5)
    signmask.prune(net, 0.5, include="fc")  # links the parent
    with torch.no_grad():
        net.attn.out_proj.weight_orig.mul_(2)
    net(torch.randn(1, 3, 8))
    out = net.attn.out_proj
    assert torch.equal(out.weight, out.weight_orig * out.weight_mask)


class SubclassedAttention(nn.MultiheadAttention):
    """An override calling ``super().forward``: the reads are in the base's source."""

    def forward(self, q, k, v, **kwargs):
        return super().forward(q, k, v, **kwargs)


def test_reads_of_a_base_forward_called_through_super_are_found():
    # Only the most derived forward was read: out_proj.weight stayed the tensor of the moment
    # the mask went in (no gradient, 3.4e4 off a dense model after an in-place edit).
    assert "out_proj.weight" in _parents._reads(SubclassedAttention)
    torch.manual_seed(0)
    model = signmask.prune(SubclassedAttention(8, 2), 0.5, include="out_proj")
    with torch.no_grad():
        model.out_proj.weight_orig.mul_(3.0)
    x = torch.randn(5, 1, 8)
    out = model(x, x, x, need_weights=False)[0]
    dense = nn.MultiheadAttention(8, 2)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("out_proj.weight")}
    dense.load_state_dict({**state, "out_proj.weight": model.out_proj.weight_orig * model.out_proj.weight_mask})
    assert torch.allclose(out, dense(x, x, x, need_weights=False)[0], atol=1e-6)
    out.sum().backward()
    assert model.out_proj.weight_orig.grad is not None


class SubclassedEncoderLayer(nn.TransformerEncoderLayer):
    def forward(self, src, *args, **kwargs):
        return super().forward(src, *args, **kwargs)


def test_a_fast_path_base_read_through_super_is_not_linked():
    # Its reads sit on the fast path torch skips while a submodule has hooks: linking them
    # would compute out_proj's weight three times a forward for nothing.
    assert _parents._reads(SubclassedEncoderLayer) == frozenset()
