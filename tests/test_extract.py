"""extract(): the signed mask of a pruned model, its norms and metadata; bad models and options refused by name."""

import json
import sys
import types

import pytest
import safetensors  # noqa: F401  (in sys.modules, as after a save: a versions test takes it out)
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune as tprune

import signmask
from signmask import _interpolate, _reparam
from _util import TINY_NORMS, bits_equal, tiny, trained_ticket


@pytest.mark.parametrize("arg, value, message", [
    ("norms", "no", "norms must be a bool, got str 'no'"),
    ("biases", 1, "biases must be a bool, got int 1"),
    ("dense", None, "dense must be a bool, got NoneType None"),
    ("metadata", "abc", "metadata must be a mapping of str to str, got str 'abc'"),
    ("metadata", 5, "metadata must be a mapping of str to str, got int 5"),
])
def test_extract_refuses_bad_options_by_name(arg, value, message):
    with pytest.raises(TypeError, match=message):
        signmask.extract(signmask.prune(tiny(0), 0.5), **{arg: value})


def test_extract_records_the_sign_bit_of_kept_zeros():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight[0, 0], net.weight[0, 1] = -0.0, 0.0
    signmask.prune(net, 0, method="random", seed=0)  # every weight kept, the zeros too
    signed = signmask.extract(net).masks["weight"]
    expected = torch.where(torch.signbit(net.weight), -1, 1).to(torch.int8)
    assert torch.equal(signed, expected) and signed[0, 0] == -1 and signed[0, 1] == 1
    assert signmask.extract(net).sparsity == 0.0


def test_extract_refuses_nan_kept_or_dense_weights_by_name():
    model = signmask.prune(tiny(0), 0.5, classifier=False)
    with torch.no_grad():
        model.conv1.weight_orig[~model.conv1.weight_mask] = float("nan")  # pruned: no sign recorded
    assert signmask.extract(model).masks.keys() == {"conv1.weight", "conv2.weight"}
    with torch.no_grad():
        model.conv2.weight_orig[model.conv2.weight_mask.nonzero()[0].unbind()] = float("inf")
    with pytest.raises(ValueError, match=r"conv2.weight holds 1 NaN or infinite kept weights"):
        signmask.extract(model)
    with torch.no_grad():
        model.conv2.weight_orig.nan_to_num_(posinf=1.0)
        model.fc.bias[0] = float("nan")  # torch.sign(nan) as int8 is 0: it zeroed a new bias
    signmask.extract(model, dense=True)
    with pytest.raises(ValueError, match=r"fc.bias holds 1 NaN or infinite weights"):
        signmask.extract(model, dense=True, biases=True)


@pytest.mark.parametrize("stock", ["l1", "global", "stacked"])
def test_extract_reads_models_pruned_by_stock_prune(stock):
    model = tiny(0)
    if stock == "global":
        tprune.global_unstructured([(model.conv2, "weight"), (model.fc, "weight")], tprune.L1Unstructured, amount=0.5)
    else:
        tprune.l1_unstructured(model.conv2, "weight", 0.5)
        tprune.l1_unstructured(model.fc, "weight", 0.5)
        if stock == "stacked":
            tprune.l1_unstructured(model.fc, "weight", 0.5)
    ticket = signmask.extract(model)
    assert set(ticket.masks) == {"conv2.weight", "fc.weight"}
    for name in ("conv2", "fc"):
        module = getattr(model, name)
        expected = torch.where(module.weight < 0, -1, 1).to(torch.int8) * (module.weight_mask != 0)
        assert torch.equal(ticket.masks[name + ".weight"], expected)
    assert ticket.metadata["method"] == {"global": "CustomFromMask"}.get(stock, "L1Unstructured")


def test_extract_refuses_stock_pruned_tensors_a_ticket_cannot_hold():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    signmask.prune(model, 0.5)
    tprune.l1_unstructured(model[0], "bias", amount=1)
    with pytest.raises(ValueError, match=r"\['0.bias'\] is pruned \(by torch.nn.utils.prune\).*prune.remove"):
        signmask.extract(model, biases=True)
    tprune.remove(model[0], "bias")
    assert set(signmask.extract(model, biases=True).masks) == {"0.weight", "1.weight"}


@pytest.mark.parametrize("values, odd", [((-1.0, 0.0, 1.0), r"\[-1.0\]"), ((0.0, 0.5, 1.0, 2.0), r"\[0.5, 2.0\]")])
def test_extract_refuses_a_stock_mask_that_is_not_binary_by_name(values, odd):
    # custom_from_mask takes any values: a signed mask stored in it (-1 negates), or a soft one
    # (scales). The forward uses every non-zero entry, but a ticket counted only the 1s as kept:
    # its mask and sparsity silently differed from the weights the model computes with.
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    mask = torch.tensor(values)[torch.arange(20).remainder(len(values))].view(5, 4)
    tprune.custom_from_mask(model[0], "weight", mask)
    assert int((model[0].weight != 0).sum()) > int((mask == 1).sum())  # the forward uses them
    with pytest.raises(ValueError, match=rf"^0.weight: its prune mask is not binary \(0/1 expected, found "
                                         rf"values {odd}\); a ticket holds binary masks"):
        signmask.extract(model)


def test_extract_with_a_lazy_layer_to_record_is_refused_by_name():
    model = signmask.prune(nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2)), 0.5, include="0")
    with pytest.raises(ValueError, match=r"^1.weight is an uninitialized lazy parameter \(LazyLinear\); run one "
                                         "forward pass to give it a shape before extracting its signs$"):
        signmask.extract(model, dense=True)
    assert list(signmask.extract(model).masks) == ["0.weight"]  # without dense it reads no lazy layer
    model = signmask.prune(nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d()), 0.5)
    with pytest.raises(ValueError, match=r"^1.weight is an uninitialized lazy parameter \(LazyBatchNorm1d\); run "
                                         "one forward pass to give it a shape before extracting its norms$"):
        signmask.extract(model, norms=True)


@settings(max_examples=40, deadline=None)
@given(vals=st.lists(st.sampled_from([-0.0, 0.0, -1e-45, 1e-45, -2.5, 2.5, -1e30, 7.0]),
                     min_size=6, max_size=6),
       keep=st.lists(st.booleans(), min_size=6, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       locked=st.booleans())
def test_extract_equals_the_int64_sign_formula_on_signed_zeros_and_subnormals(vals, keep, dtype,
                                                                             locked):
    # the signs are made in int8 (1 - 2 * signbit); the previous torch.where(..., -1, 1) was int64
    net = nn.Linear(3, 2, bias=False).to(dtype)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(vals).view(2, 3))
    tprune.custom_from_mask(net, "weight", torch.tensor(keep).view(2, 3))
    signmask.prune(net, 0, signs="locked" if locked else None)
    weight = _reparam.find_hook(net, "weight")[1].apply_mask(net)
    want = torch.where(torch.signbit(weight), -1, 1).to(torch.int8) * (net.weight_mask == 1)
    got = signmask.extract(net).masks["weight"]
    assert got.dtype == torch.int8 and torch.equal(got, want)


def test_versions_name_safetensors_whether_or_not_it_was_imported(monkeypatch, tmp_path):
    # Read from sys.modules, safetensors appeared only once a save or load had imported it:
    # two extracts of one model, before and after a save, were unequal tickets.
    import importlib.metadata

    model = signmask.prune(tiny(), 0.5)
    imported = sys.modules["safetensors"]
    monkeypatch.delitem(sys.modules, "safetensors")
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    first = signmask.extract(model)
    monkeypatch.setitem(sys.modules, "safetensors", imported)
    signmask.save(first, tmp_path / "t.safetensors")
    second = signmask.extract(model)
    assert first == second
    versions = json.loads(first.metadata["versions"])
    assert versions["safetensors"] == importlib.metadata.version("safetensors")
    assert "timm" not in versions and "timm" not in sys.modules  # never imported by signmask


def test_versions_name_timm_only_once_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(__version__="9.9"))
    versions = json.loads(signmask.extract(signmask.prune(tiny(), 0.5)).metadata["versions"])
    assert versions["timm"] == "9.9"


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_a_kept_weight_that_is_exactly_zero_stays_in_the_ticket():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0], [-2.0, 3.0]]))
    signmask.prune(lin, 0.0)
    ticket = signmask.extract(lin)
    assert ticket.sparsity == 0.0
    assert ticket.masks["weight"].tolist() == [[1, 1], [-1, 1]]


def test_extract_metadata_overrides_the_defaults():
    net = signmask.prune(nn.Linear(4, 4), 0.5)
    assert signmask.extract(net, metadata={"method": "imp"}).metadata["method"] == "imp"


def test_extract_refuses_a_stock_pruned_embedding_weight():
    # Named "weight" but not a conv/linear one: transfer() could not put it back.
    model = signmask.prune(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)), 0.5)
    tprune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"\['0.weight'\] is pruned \(by torch.nn.utils.prune\)"):
        signmask.extract(model)


def test_metadata_names_the_model_class_inside_a_wrapper():
    meta = signmask.extract(torch.nn.DataParallel(signmask.prune(tiny(), 0.5))).metadata
    assert meta["model_class"] == "TinyNet" and meta["architecture"] == "TinyNet"


def test_the_architecture_is_timm_s_name_inside_a_wrapper():
    # timm's pretrained_cfg names the variant (resnet18, not the class ResNet); DDP or
    # DataParallel holds it on the model they wrap.
    model = signmask.prune(tiny(), 0.5)
    model.pretrained_cfg = {"architecture": "tiny_v2"}
    for wrapped in (model, torch.nn.DataParallel(model)):
        meta = signmask.extract(wrapped).metadata
        assert meta["architecture"] == "tiny_v2" and meta["model_class"] == "TinyNet"


def test_dense_and_bias_signs_are_the_sign_of_the_trained_values_zeros_included():
    # sign(theta) in {-1, 0, +1}, as the AWS code transfers dense tensors: an exactly-zero bias or
    # unpruned weight records 0 (unlike a kept pruned weight, whose sign bit counts).
    model = signmask.prune(tiny(0), 0.5, classifier=False)
    with torch.no_grad():
        model.fc.weight[0, :3] = torch.tensor([0.0, -0.0, -2.0])
        model.conv2.bias[:2] = torch.tensor([0.0, -0.0])
    ticket = signmask.extract(model, dense=True, biases=True)
    assert set(ticket.signs) == {"fc.weight", "fc.bias", "conv2.bias"}
    for key, values in (("fc.weight", model.fc.weight), ("fc.bias", model.fc.bias), ("conv2.bias", model.conv2.bias)):
        assert ticket.signs[key].dtype == torch.int8
        assert torch.equal(ticket.signs[key], torch.sign(values.detach()).to(torch.int8)), key
    assert ticket.signs["fc.weight"][0, :3].tolist() == [0, 0, -1]


# ---------------------------------------------- trained norm parameters (the reference's winit_only)


def test_extract_records_copies_of_the_trained_norm_parameters():
    model, ticket = trained_ticket()
    assert sorted(ticket.norms) == sorted(TINY_NORMS)
    sd = model.state_dict()
    assert all(bits_equal(ticket.norms[k], sd[k]) for k in TINY_NORMS)
    assert not torch.equal(ticket.norms["bn1.weight"], torch.ones(6))
    with torch.no_grad():
        model.bn1.weight.add_(1.0)  # a copy: later training does not reach the ticket
    assert not torch.equal(ticket.norms["bn1.weight"], model.bn1.weight)
    assert signmask.extract(model).norms == {}


def test_extract_under_aws_interpolation_records_the_trained_values():
    model = signmask.prune(tiny(0), 0.5)
    _interpolate.attach(model, torch.tensor(0.5))
    with torch.no_grad():
        model.bn1.weight_orig.fill_(3.0)  # trained; init buffer stays 1, lerp would give 2
    model.train()
    model(torch.randn(2, 3, 6, 6))
    assert torch.equal(model.bn1.weight, torch.full((6,), 2.0))
    ticket = signmask.extract(model, norms=True)
    assert torch.equal(ticket.norms["bn1.weight"], torch.full((6,), 3.0))


@pytest.mark.parametrize("where, kwargs", [("0.weight", {}), ("1.weight", {"dense": True}),
                                           ("0.bias", {"biases": True})])
def test_extract_refuses_complex_weights_by_name(where, kwargs):
    # prune and the forward take complex weights, which have no sign: extract failed in torch's
    # own "signbit is not implemented for complex tensors", naming no tensor (a dense sign went
    # through torch.sign, z / |z|, into int8).
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    layer = model[int(where[0])]
    setattr(layer, where[2:], nn.Parameter(getattr(layer, where[2:]).detach().to(torch.cfloat)))
    signmask.prune(model, 0.5, include="0")
    with pytest.raises(TypeError, match=rf"^{where} is torch.complex64: a ticket records signs, and a complex "
                                        "weight has none"):
        signmask.extract(model, **kwargs)
