"""signmask.load_state_dict: masks, signs and values of a pruned model into a fresh one, exactly;
wrapper prefixes, shared modules, errors that leave the model untouched."""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import signmask
from _util import AttnNet, assert_each_fault_leaves_it_untouched, assert_same, outside, snapshot, tiny, two_linears_trained


def test_load_state_dict_restores_masks_and_signs_into_fresh_model():
    model = signmask.prune(tiny(0), 0.6, signs="locked")
    fresh = signmask.load_state_dict(tiny(1), model.state_dict())
    for name in ("conv1", "conv2", "fc"):
        a, b = getattr(model, name), getattr(fresh, name)
        assert torch.equal(a.weight_mask, b.weight_mask) and torch.equal(a.weight_sign, b.weight_sign)
        assert torch.equal(a.weight, b.weight)


def test_load_state_dict_errors_leave_model_untouched():
    sd = signmask.prune(tiny(0), 0.6).state_dict()
    target = tiny(1, width=4)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"'conv1.weight_mask' has shape \(6, 3, 3, 3\)"):
        signmask.load_state_dict(target, sd)
    assert_same(before, snapshot(target))
    bad = dict(sd)
    bad["extra.weight"] = torch.zeros(1)
    target = tiny(1)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="extra.weight"):
        signmask.load_state_dict(target, bad)
    assert_same(before, snapshot(target))


@pytest.mark.parametrize("value", [np.zeros((6, 3, 3, 3), dtype=np.float32), torch.empty(6, 3, 3, 3, device="meta")])
def test_load_state_dict_refuses_values_without_data_before_copying(value):
    sd = dict(signmask.prune(tiny(0), 0.6).state_dict())
    sd["conv1.weight_orig"] = value  # listed after nothing: other keys would be copied first
    target = tiny(1)
    before = snapshot(target)
    found = "a meta tensor" if isinstance(value, torch.Tensor) else "ndarray"
    with pytest.raises(RuntimeError, match=f"conv1.weight_orig: expected a tensor with data in the state_dict, found {found}"):
        signmask.load_state_dict(target, sd)
    assert_same(before, snapshot(target))
    sd["conv1.weight_mask"] = value
    with pytest.raises(RuntimeError, match=f"conv1.weight_mask: expected a tensor with data in the state_dict, found {found}"):
        signmask.load_state_dict(target, sd)
    assert_same(before, snapshot(target))


@pytest.mark.parametrize(
    "make, found",
    [
        (lambda t: t.to_sparse(), "a sparse_coo tensor"),
        (lambda t: t.to_sparse_csr(), "a sparse_csr tensor"),
        (lambda t: t.to_mkldnn(), "a _mkldnn tensor"),
        (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.quint8), "a quantized tensor"),
        (lambda t: torch.nested.nested_tensor(list(t)), "a nested tensor"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR and nested tensors are in beta
def test_load_state_dict_refuses_tensors_torch_cannot_copy_before_copying(make, found):
    # torch's copy_ refuses these after it copied the keys before them; the mask too.
    sd = dict(signmask.prune(tiny(0), 0.6).state_dict())
    target = tiny(1)
    before = snapshot(target)
    for key in ("fc.weight_orig", "fc.weight_mask"):  # fc is the last module: listed last
        bad = dict(sd, **{key: make(sd[key].float())})
        with pytest.raises(RuntimeError, match=f"{key}: expected a tensor with data in the state_dict, found {found}"):
            signmask.load_state_dict(target, bad)
        assert_same(before, snapshot(target))


class FailingExtra(nn.Linear):
    """A module whose own loading code raises, after torch copied the modules before it."""

    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        raise ValueError(f"cannot read extra state {state}")


@pytest.mark.parametrize("pruned", [["0"], ["0", "2"]])  # "2": its mask is installed, then raises
def test_a_module_whose_own_loading_code_raises_leaves_the_model_untouched(pruned):
    torch.manual_seed(0)
    source = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), FailingExtra(4, 4)), 0.5, include=pruned)
    source[1].running_mean.fill_(3.0)
    target = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), FailingExtra(4, 4))
    signmask.prune(target, 0.25, include="0")  # a mask torch overwrites in place too
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"cannot read extra state \{'version': 2\}"):
        signmask.load_state_dict(target, source.state_dict())
    assert_same(before, snapshot(target))
    assert torch.equal(target[0].weight, target[0].weight_orig * target[0].weight_mask)


@pytest.mark.parametrize("pruned", [False, True])
def test_a_failure_at_any_torch_call_leaves_the_model_untouched(pruned):
    # An out-of-memory error while refreshing the loaded weights, after torch had loaded them,
    # left them loaded, and the parents' hooks linked (the MultiheadAttention's).
    torch.manual_seed(0)
    source = signmask.prune(AttnNet(), 0.5, signs="locked").state_dict()
    template = signmask.prune(AttnNet(), 0.3, signs="locked") if pruned else AttnNet()
    assert_each_fault_leaves_it_untouched(
        lambda: (copy.deepcopy(template),), lambda m: signmask.load_state_dict(m, source)
    )


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_failure_under_the_projection_backend_leaves_gradients_and_optimizer_state(signs):
    # The projection backend masks the gradients and momentum for the loaded weights at once
    # (and reflects a locked tensor's momentum, replacing its state tensor); a failure at the
    # next layer left them so, though the model's own values went back.
    torch.manual_seed(1)
    source = signmask.prune(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), 0.6, signs=signs).state_dict()

    def make():
        return two_linears_trained("projection", signs, 0.3)

    assert_each_fault_leaves_it_untouched(make, lambda m, opt: signmask.load_state_dict(m, source), rest=outside)


@pytest.mark.parametrize("pruned", [False, True])
def test_a_lazy_layer_the_state_dict_loads_into_is_refused_by_name_untouched(pruned):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    if pruned:
        signmask.prune(source, 0.5)
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))
    head = {k: v.clone() for k, v in model[1].state_dict().items()}
    with pytest.raises(ValueError, match=r"^0.weight is an uninitialized lazy parameter \(LazyLinear\); run one "
                                         "forward pass to give it a shape before loading a state dict into it$"):
        signmask.load_state_dict(model, source.state_dict())
    assert nn.parameter.is_lazy(model[0].weight) and not signmask._targets.pruned(model)
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in head.items())
    model(torch.randn(1, 3))  # the forward pass gives it its shape
    signmask.load_state_dict(model, source.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_lazy_layer_the_state_dict_does_not_name_stays_lazy():
    torch.manual_seed(0)
    source = signmask.prune(nn.Sequential(nn.Linear(3, 4)), 0.5)
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    with pytest.warns(UserWarning, match=r"left 2 tensors .* \['1.weight', '1.bias'\]"):
        signmask.load_state_dict(model, source.state_dict(), strict=False)
    assert torch.equal(model[0].weight, source[0].weight) and nn.parameter.is_lazy(model[1].weight)


def test_a_failure_while_installing_the_masks_uninstalls_them_all(monkeypatch):
    # Here the second install raises after it reparametrized its tensor.
    install, calls = signmask._reparam.install, []

    def failing(module, name, *args, **kwargs):
        install(module, name, *args, **kwargs)
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("install failed")

    source = signmask.prune(tiny(0), 0.6)
    target = tiny(1)
    before = snapshot(target)
    monkeypatch.setattr(signmask._reparam, "install", failing)
    with pytest.raises(RuntimeError, match="install failed"):
        signmask.load_state_dict(target, source.state_dict())
    assert len(calls) == 2
    assert_same(before, snapshot(target))
    assert not signmask._targets.pruned(target) and all(m.weight is m._parameters["weight"] for m in (target.conv1, target.conv2))


def test_load_state_dict_refuses_a_state_dict_that_is_not_a_mapping():
    target = tiny(1)
    with pytest.raises(TypeError, match="state_dict must be a mapping of names to tensors, got NoneType"):
        signmask.load_state_dict(target, None)


def _bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_load_state_dict_matches_wrapper_prefixes(wrap, strict):
    src = signmask.prune(_bn_net(), 0.5, signs="locked")
    src[1].running_mean.add_(1.0)
    state = {wrap + k: v for k, v in src.state_dict().items()}
    fresh = signmask.load_state_dict(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), state, strict=strict)
    want = src.state_dict()
    assert fresh.state_dict().keys() == want.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    # and the other way: a bare checkpoint into a compiled model
    compiled = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    signmask.load_state_dict(compiled, want, strict=strict)
    assert all(torch.equal(compiled.state_dict()["_orig_mod." + k], v) for k, v in want.items())


class _ChildNamedModule(nn.Module):
    """A real child called ``module`` (a wrapper class, timm's ModelEma...): not a DDP prefix.
    ``root`` names its own Parameter; ``"bias"`` is named like one of the child's."""

    def __init__(self, root: str = "scale"):
        super().__init__()
        self.module = nn.Linear(8, 4)
        self.root = root
        self.register_parameter(root, nn.Parameter(torch.randn(4)))

    def forward(self, x):
        return self.module(x) * getattr(self, self.root)


def _shared_net():
    shared = nn.Linear(8, 8)
    return nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))


@pytest.mark.parametrize("source, target", [
    (_ChildNamedModule, _ChildNamedModule),
    (_shared_net, _shared_net),  # one module under two names: state_dict lists both
    (lambda: torch.compile(nn.Linear(8, 4)), lambda: torch.compile(nn.Linear(8, 4))),
    (lambda: nn.Linear(8, 4), lambda: torch.compile(nn.Linear(8, 4))),
    (lambda: torch.compile(nn.Linear(8, 4)), lambda: nn.Linear(8, 4)),
])
def test_load_state_dict_round_trips_models_named_like_wrappers(source, target):
    torch.manual_seed(0)
    src = signmask.prune(source(), 0.5, signs="locked")
    fresh = signmask.load_state_dict(target(), src.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), src(x))
    own = {k.removeprefix("_orig_mod."): v for k, v in fresh.state_dict().items()}
    assert own.keys() == {k.removeprefix("_orig_mod."): v for k, v in src.state_dict().items()}.keys()
    assert all(torch.equal(own[k.removeprefix("_orig_mod.")], v) for k, v in src.state_dict().items())


def test_load_state_dict_refuses_a_mask_that_is_not_binary():
    src = nn.Linear(4, 3)
    odd = torch.tensor([[0, 1, 0.5, -1]] * 3)  # stock takes any values
    tprune.custom_from_mask(src, "weight", odd)
    model = nn.Linear(4, 3)
    before = snapshot(model)
    message = r"state_dict 'weight_mask' is not a binary mask \(0/1 expected, found values \[-1.0, 0.5\]\)"
    with pytest.raises(ValueError, match=message):
        signmask.load_state_dict(model, src.state_dict())
    assert_same(before, snapshot(model))


def test_load_state_dict_refuses_two_keys_for_one_tensor():
    state = signmask.prune(_bn_net(), 0.5).state_dict()
    state["module.0.bias"] = state["0.bias"]
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"keys \['0.bias', 'module.0.bias'\] name the same tensor"):
        signmask.load_state_dict(model, state)
    assert_same(before, snapshot(model))


def test_load_state_dict_not_strict_loads_the_rest_and_names_what_it_skipped():
    src = signmask.prune(_bn_net(), 0.5, signs="locked")
    state = src.state_dict()
    del state["2.bias"]
    state["head.weight"] = torch.ones(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    bias = model[2].bias.detach().clone()
    with pytest.warns(UserWarning, match=r"left 1 tensors .*\['2.bias'\].* skipped 1 keys .*\['head.weight'\]"):
        signmask.load_state_dict(model, state, strict=False)
    assert torch.equal(model[2].bias, bias)  # left as it was
    for key, value in state.items():
        if key != "head.weight":
            assert torch.equal(model.state_dict()[key], value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing said
        signmask.load_state_dict(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
                                 src.state_dict(), strict=False)


class WithExtra(nn.Linear):
    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state):
        self.loaded = state


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_hands_extra_state_to_the_module(strict):
    state = signmask.prune(nn.Sequential(WithExtra(4, 4)), 0.5).state_dict()
    fresh = signmask.load_state_dict(nn.Sequential(WithExtra(4, 4)), state, strict=strict)
    assert fresh[0].loaded == {"calls": 3}
    assert torch.equal(fresh[0].weight_mask, state["0.weight_mask"])


def test_a_failed_load_state_dict_leaves_no_stale_weight_attribute():
    sd = signmask.prune(nn.Linear(4, 4), 0.5).state_dict()
    sd["bias"] = torch.zeros(5)  # mis-shaped: refused after the masks were installed
    fresh = nn.Linear(4, 4)
    with pytest.raises(RuntimeError):
        signmask.load_state_dict(fresh, sd)
    assert fresh.weight is fresh._parameters["weight"]


def test_a_checkpoint_taken_during_an_aws_search_loads_its_trained_norms():
    # The search's norms are weight_orig (trained) and weight_init under an interpolation hook.
    torch.manual_seed(0)
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = signmask.apply(model, "aws", 0.5, optimizer=opt, progress=False)
    search.start_round()
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    state = model.state_dict()
    assert "bn1.weight_init" in state and "bn1.weight_orig" in state
    fresh = signmask.load_state_dict(tiny(1), state)
    assert "bn1.weight_init" not in fresh.state_dict()
    assert torch.equal(fresh.bn1.weight, model.bn1.weight_orig) and torch.equal(fresh.bn2.bias, model.bn2.bias_orig)
    model.eval()  # eval mode: the search's norms are the trained values
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def _searching(seed: int) -> nn.Module:
    model = tiny(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    signmask.apply(model, "aws", 0.5, optimizer=opt, progress=False).start_round()
    return model


def test_a_search_checkpoint_resumes_into_a_model_that_is_searching_itself():
    # Interpolated itself, the model has <name>_orig and <name>_init: both load as they are.
    src, model = _searching(0), _searching(1)
    signmask.load_state_dict(model, src.state_dict())
    assert torch.equal(model.bn1.weight_orig, src.bn1.weight_orig)
    want = src.state_dict()
    assert model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_pruned_module_with_its_own_weight_init_buffer_round_trips():
    # weight_init (an L2-SP anchor, say) beside weight_orig and weight_mask is no AWS norm.
    def net():
        conv = nn.Conv2d(3, 4, 3)
        conv.register_buffer("weight_init", conv.weight.detach().clone())
        return conv

    torch.manual_seed(0)
    src = signmask.prune(net(), 0.5, signs="locked")
    fresh = signmask.load_state_dict(net(), src.state_dict())
    want = src.state_dict()
    assert fresh.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())


def test_load_state_dict_not_strict_warns_about_unexpected_keys_alone():
    state = signmask.prune(nn.Linear(4, 4), 0.5).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"left 0 tensors .* skipped 1 keys the model does not have \['extra'\]"):
        signmask.load_state_dict(nn.Linear(4, 4), state, strict=False)


def test_a_mis_shaped_unpruned_tensor_is_refused_before_anything_is_copied():
    # nn.Module.load_state_dict copies the matching keys before it reports a size mismatch.
    sd = dict(signmask.prune(tiny(0), 0.6).state_dict())
    sd["fc.bias"] = torch.zeros(3)  # listed last: every other key would be copied first
    target = tiny(1)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"fc.bias: shape \(3,\) in the state_dict, \(5,\) in the model"):
        signmask.load_state_dict(target, sd)
    assert_same(before, snapshot(target))


def test_a_key_naming_an_entry_of_the_model_is_never_read_as_a_wrapper_prefix():
    # "module.bias" is the child's bias, not a DDP-prefixed root "bias": both must load as named.
    torch.manual_seed(0)
    src = signmask.prune(_ChildNamedModule("bias"), 0.5)
    fresh = signmask.load_state_dict(_ChildNamedModule("bias"), src.state_dict())
    assert fresh.state_dict().keys() == src.state_dict().keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in src.state_dict().items())


def test_a_weight_read_by_its_parent_trains_after_load_state_dict():
    # MultiheadAttention reads out_proj.weight itself: loading must link the parent's refresh,
    # or that weight is a stale tensor that no gradient reaches.
    torch.manual_seed(0)
    src = signmask.prune(AttnNet(), 0.5)
    fresh = signmask.load_state_dict(AttnNet(), src.state_dict())
    x = torch.randn(2, 3, 8)
    for model in (src, fresh):
        model(x).sum().backward()
    assert torch.equal(fresh.attn.out_proj.weight_orig.grad, src.attn.out_proj.weight_orig.grad)


def test_a_state_dict_with_non_str_keys_is_a_type_error_naming_the_key():
    model = signmask.prune(nn.Linear(4, 4), 0.5)
    before = snapshot(model)
    with pytest.raises(TypeError, match="state_dict keys must be str names, got int 1"):
        signmask.load_state_dict(model, {**model.state_dict(), 1: torch.zeros(1)})
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("include", [None, "0"])  # both ends masked in the state dict, or one
@pytest.mark.parametrize("tie", ["object", "memory"])
def test_load_state_dict_refuses_tied_weights_untouched_and_the_advice_works(tie, include):
    # A mask on one end would leave the other reading it dense, as prune refuses it.
    torch.manual_seed(0)
    src = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.5, include=include)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight if tie == "object" else nn.Parameter(model[0].weight.detach())
    before = snapshot(model)
    other = "1.weight share one Parameter" if tie == "object" else "1.weight (a Parameter) are different tensors on the same memory"
    with pytest.raises(ValueError, match=f"^0.weight and {re.escape(other)}.*untie them before load_state_dict"):
        signmask.load_state_dict(model, src.state_dict())
    assert_same(before, snapshot(model))
    model[1].weight = nn.Parameter(model[1].weight.detach().clone())  # untied
    signmask.load_state_dict(model, src.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(model(x), src(x))
    assert set(signmask._targets.pruned(model)) == set(signmask._targets.pruned(src))
