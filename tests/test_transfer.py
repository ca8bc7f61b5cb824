"""transfer(): the signed mask onto a new random init, exactly; bad tickets change nothing."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune as tprune

import signmask
from signmask import _interpolate, _reparam
from signmask._compat import import_timm
from _util import (TINY_NORMS, AttnNet, assert_each_fault_leaves_it_untouched, assert_same, bits_equal, outside,
                   since_timm, snapshot, tiny, train_tiny, trained_ticket)

timm = import_timm()

NAMES = ("conv1", "conv2", "fc")


@settings(max_examples=30, deadline=None)
@given(amount=st.floats(0, 1), seed=st.integers(0, 2**16), locked=st.booleans())
def test_kept_weights_become_abs_new_init_times_sign(amount, seed, locked):
    source = signmask.prune(tiny(seed), amount)
    ticket = signmask.extract(source)
    fresh = tiny(seed + 1)
    init = {n: getattr(fresh, n).weight.detach().clone() for n in NAMES}
    norms = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("bn")}
    signmask.transfer(ticket, fresh, signs="locked" if locked else "init")
    for n in NAMES:
        s = ticket.masks[f"{n}.weight"].float()
        module = getattr(fresh, n)
        assert torch.equal(module.weight, init[n].abs() * s)
        assert torch.equal(module.weight_mask, s != 0)
        assert ("weight_sign" in module._buffers) == locked
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in norms.items())
    assert signmask.extract(fresh).masks.keys() == ticket.masks.keys()
    assert all(torch.equal(signmask.extract(fresh).masks[k], ticket.masks[k]) for k in ticket.masks)


@settings(max_examples=20, deadline=None)
@given(amount=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_keep_installs_only_the_binary_mask(amount, seed):
    ticket = signmask.extract(signmask.prune(tiny(seed), amount), biases=True, dense=True)
    fresh = tiny(seed + 1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    signmask.transfer(ticket, fresh, signs="keep")
    sd = fresh.state_dict()
    for n in NAMES:
        key = f"{n}.weight"
        assert torch.equal(sd[key + "_orig"], before[key])  # the new init's own values and signs
        assert torch.equal(sd[key + "_mask"], ticket.masks[key] != 0)
        assert torch.equal(getattr(fresh, n).weight, before[key] * (ticket.masks[key] != 0))
    assert all(torch.equal(sd[k], v) for k, v in before.items() if k in sd)  # biases untouched too


def test_transfer_from_path_and_compiled_or_ddp_names(tmp_path):
    ticket = signmask.extract(signmask.prune(tiny(0), 0.7))
    path = signmask.save(ticket, tmp_path / "t.safetensors")
    target = nn.DataParallel(tiny(1))  # names start with "module."
    signmask.transfer(path, target)
    assert torch.equal(signmask.extract(target).masks["conv2.weight"], ticket.masks["conv2.weight"])


def test_biases_and_dense_classifier_signs():
    """As the AWS reference code: masked layers' biases and the dense classifier, bias included."""
    source = signmask.prune(tiny(0), 0.5, classifier=False)
    ticket = signmask.extract(source, biases=True, dense=True)
    assert set(ticket.signs) == {"conv2.bias", "fc.weight", "fc.bias"}  # conv1 has no bias
    assert torch.equal(ticket.signs["fc.bias"], torch.sign(source.fc.bias.detach()).to(torch.int8))
    assert set(signmask.extract(source, biases=True).signs) == {"conv2.bias"}
    assert set(signmask.extract(source, dense=True).signs) == {"fc.weight"}

    def new_init():
        model = tiny(1)
        with torch.no_grad():  # every head bias sign opposite to the ticket's, so the test can fail
            model.fc.bias.copy_(-model.fc.bias.abs() * ticket.signs["fc.bias"])
        return model

    fresh = new_init()
    b0, fc0, fcb0 = (t.detach().clone() for t in (fresh.conv2.bias, fresh.fc.weight, fresh.fc.bias))
    signmask.transfer(ticket, fresh)
    assert torch.equal(fresh.conv2.bias, b0.abs() * ticket.signs["conv2.bias"])
    assert torch.equal(fresh.fc.weight, fc0.abs() * ticket.signs["fc.weight"])
    assert torch.equal(fresh.fc.bias, fcb0.abs() * ticket.signs["fc.bias"])
    assert not hasattr(fresh.fc, "weight_mask")
    skipped = new_init()
    signmask.transfer(ticket, skipped, biases=False, dense=False)
    assert torch.equal(skipped.conv2.bias, b0) and torch.equal(skipped.fc.weight, fc0)
    assert torch.equal(skipped.fc.bias, fcb0)
    masked_only = new_init()  # biases of the pruned layers only: the dense head stays the new init's
    signmask.transfer(ticket, masked_only, dense=False)
    assert torch.equal(masked_only.conv2.bias, b0.abs() * ticket.signs["conv2.bias"])
    assert torch.equal(masked_only.fc.weight, fc0) and torch.equal(masked_only.fc.bias, fcb0)


def test_locked_transfer_keeps_signs_through_training():
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5))
    flips = {}
    for mode in ("init", "locked"):
        model = signmask.transfer(ticket, tiny(1), signs=mode)
        train_tiny(model)
        flips[mode] = 0
        for n in NAMES:
            w, s = getattr(model, n).weight, ticket.masks[f"{n}.weight"]
            assert torch.isfinite(w).all()
            kept = s != 0
            assert torch.equal(w[~kept], torch.zeros_like(w[~kept]))
            flips[mode] += int((torch.signbit(w[kept]) != (s[kept] < 0)).sum())
    assert flips["init"] > 0  # training does flip free signs at this learning rate
    assert flips["locked"] == 0


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda: Other(), {}, "ticket was made for architecture 'TinyNet', the model is 'Other'"),
        (lambda: Other(), dict(check_architecture=False), "are not in Other"),
        (lambda: tiny(1, width=4), {}, r"'conv1.weight' has shape \(6, 3, 3, 3\), the model's has \(4, 3, 3, 3\)"),
        (lambda: signmask.prune(tiny(1), 0.1, include="fc"), {}, "fc.weight is already pruned"),
        (lambda: tiny(1), dict(signs="free"),
         r"signs='free' is not a known sign mode; valid: \['init', 'keep', 'locked'\]"),
    ],
)
def test_bad_transfers_leave_the_model_untouched(make, kwargs, message):
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5))
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        signmask.transfer(ticket, model, **kwargs)
    assert_same(before, snapshot(model))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight


def test_ticket_masking_both_ends_of_tied_weights_is_refused():
    ticket = signmask.Ticket({"enc.weight": torch.tensor([[1, 0, -1, 0]] * 4), "dec.weight": torch.tensor([[0, 1, 0, -1]] * 4)})
    model = Tied()
    before = snapshot(model)
    with pytest.raises(ValueError, match="enc.weight and dec.weight share one Parameter .* untie them before the transfer$"):
        signmask.transfer(ticket, model)
    assert_same(before, snapshot(model))


def test_extra_ticket_tensor_is_refused_before_any_change():
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5))
    masks = dict(ticket.masks)
    masks["head.weight"] = torch.ones(2, 2, dtype=torch.int8)
    model = tiny(1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ticket tensors \['head.weight'\]"):
        signmask.transfer(signmask.Ticket(masks, metadata=ticket.metadata), model)
    assert_same(before, snapshot(model))


def test_bad_ticket_argument_type():
    with pytest.raises(TypeError, match=r"transfer\(\) takes a Ticket or a path as ticket, got int"):
        signmask.transfer(3, tiny())


@pytest.mark.parametrize("arg", ["biases", "dense", "norms", "check_architecture"])
def test_transfer_flags_must_be_bools(arg):
    # A string such as "false" read as true: norms="false" copied the norms.
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5), norms=True)
    model = tiny(1)
    before = snapshot(model)
    with pytest.raises(TypeError, match=f"{arg} must be a bool, got str 'false'"):
        signmask.transfer(ticket, model, **{arg: "false"})
    assert_same(before, snapshot(model))


def test_a_dense_sign_onto_a_pruned_tensor_is_refused_untouched():
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5, classifier=False), dense=True)
    assert "fc.weight" in ticket.signs
    model = tiny(1)
    signmask.prune(model, 0.5, include="fc")  # the head the ticket keeps dense, pruned here
    before = snapshot(model)
    with pytest.raises(ValueError, match="the ticket's dense sign 'fc.weight' is for an unpruned tensor"):
        signmask.transfer(ticket, model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("check_architecture", [True, False])
@pytest.mark.parametrize("model", ["notamodel", None, {"conv1.weight": torch.zeros(6, 3, 3, 3)}])
def test_transfer_to_a_non_module_names_model(model, check_architecture):
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5))
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {type(model).__name__}"):
        signmask.transfer(ticket, model, check_architecture=check_architecture)
    # checked before the ticket file is read: a path that does not exist is never opened
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {type(model).__name__}"):
        signmask.transfer("no/such/ticket.safetensors", model, check_architecture=check_architecture)


def test_keep_ignores_dense_and_bias_signs_of_a_mismatched_head():
    source = signmask.prune(tiny(0), 0.5, classifier=False)
    ticket = signmask.extract(source, biases=True, dense=True)
    assert {"conv2.bias", "fc.weight"} <= set(ticket.signs)  # fc is dense: (5, 6) signs
    other_head = tiny(1, classes=7)  # same architecture name, fc is (7, 6)
    before = {k: v.clone() for k, v in other_head.state_dict().items()}
    signmask.transfer(ticket, other_head, signs="keep")  # "keep" writes no sign: nothing to match
    sd = other_head.state_dict()
    for key in ticket.masks:
        assert torch.equal(sd[key + "_mask"], ticket.masks[key] != 0)
        assert torch.equal(sd[key + "_orig"], before[key])
    assert not hasattr(other_head.fc, "weight_mask")
    assert all(torch.equal(sd[k], v) for k, v in before.items() if k in sd)
    for signs in ("init", "locked"):  # these do write the head's signs, so its shape must match
        model = tiny(1, classes=7)
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"'fc.weight' has shape \(5, 6\), the model's has \(7, 6\)"):
            signmask.transfer(ticket, model, signs=signs)
        assert_same(snap, snapshot(model))


@pytest.mark.parametrize("signs", ["init", "locked"])
def test_all_positive_ticket_equals_stock_prune_exactly(signs):
    source = signmask.prune(tiny(0), 0.6)
    positive = {k: v.abs() for k, v in signmask.extract(source).masks.items()}
    ticket = signmask.Ticket(positive, metadata={"architecture": "TinyNet"})
    ours, oracle = tiny(1), tiny(1)
    signmask.transfer(ticket, ours, signs=signs)
    for n in NAMES:
        module = getattr(oracle, n)
        with torch.no_grad():
            module.weight.abs_()
        tprune.custom_from_mask(module, "weight", positive[f"{n}.weight"] != 0)
        assert torch.equal(getattr(ours, n).weight_mask, module.weight_mask.bool())
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(ours(x), oracle(x))


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_a_ticket_masking_a_bias_is_refused_untouched():
    # transfer installs masks on conv/linear weights only, as extract() records them.
    model = nn.Linear(3, 3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"masks 'bias', which is not a conv/linear weight \(the model's is "
                                         r"the bias of a Linear\)"):
        signmask.transfer(signmask.Ticket({"bias": torch.tensor([1, 0, -1])}), model)
    assert_same(before, snapshot(model))


def test_transfer_links_a_weight_its_parent_reads_itself():
    # MultiheadAttention reads out_proj.weight without calling out_proj: unlinked, that weight
    # stays the tensor of install time and its weight_orig gets no gradient.
    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(AttnNet(), 0.5))
    model = signmask.transfer(ticket, AttnNet())
    twin = copy.deepcopy(model)
    signmask.remove(twin)
    x = torch.randn(2, 3, 8)
    model(x).sum().backward()
    twin(x).sum().backward()
    proj = model.attn.out_proj
    assert proj.weight_orig.grad is not None
    assert torch.equal(proj.weight_orig.grad, twin.attn.out_proj.weight.grad * proj.weight_mask)


def test_transfer_history_records_the_mask_shape_without_the_mask():
    # The hook's history must not pin the per-weight signed mask, but still names its shape.
    lin = signmask.transfer(signmask.Ticket({"weight": torch.tensor([[1, 0, -1], [0, 1, 1]])}), nn.Linear(3, 2))
    (record,) = _reparam.methods(_reparam.find_hook(lin, "weight")[1])
    assert record.signed_mask is None and record.shape == (2, 3)
    assert repr(record) == "FromSignedMask(shape=(2, 3))"


# ---------------------------------------------- trained norm parameters (the reference's winit_only)


@pytest.mark.parametrize("signs", ["init", "locked", "keep"])
def test_transfer_with_norms_copies_them_exactly_and_nothing_else(tmp_path, signs):
    _, ticket = trained_ticket(biases=True)
    ticket = signmask.load(signmask.save(ticket, tmp_path / "t.safetensors"))
    plain, fresh = tiny(1), tiny(1)
    stats = {k: v.clone() for k, v in fresh.state_dict().items() if "running" in k or "batches" in k}
    signmask.transfer(ticket, plain, signs=signs)
    signmask.transfer(ticket, fresh, signs=signs, norms=True)
    got, want = fresh.state_dict(), plain.state_dict()
    for key in got:
        if key in TINY_NORMS:
            assert bits_equal(got[key], ticket.norms[key])
        else:  # weights, masks, biases and running statistics as without norms
            assert bits_equal(got[key], want[key]), key
    assert all(torch.equal(got[k], v) for k, v in stats.items())
    assert all(torch.equal(want[k], tiny(1).state_dict()[k]) for k in TINY_NORMS)  # default: fresh init


def _with_norms(ticket, norms):
    return signmask.Ticket(ticket.masks, ticket.signs, ticket.metadata, norms)


@pytest.mark.parametrize(
    "norms, message",
    [
        ({}, "norms=True, but the ticket recorded no norm parameters"),
        ({"fc.bias": torch.zeros(5)}, "ticket norm tensor 'fc.bias' is, in the model, a tensor of Linear, not of a norm layer"),
        ({"bn2.weight": torch.ones(4)}, r"ticket tensor 'bn2.weight' has shape \(4,\), the model's has \(6,\)"),
        ({"bn3.weight": torch.ones(6)}, r"ticket tensors \['bn3.weight'\]"),
    ],
)
def test_bad_norm_transfers_leave_the_model_untouched(norms, message):
    _, ticket = trained_ticket()
    model = tiny(1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        signmask.transfer(_with_norms(ticket, norms), model, norms=True)
    assert_same(before, snapshot(model))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_norms_survive_save_load_and_transfer_bit_exactly(tmp_path_factory, seed, dtype):
    model = signmask.prune(tiny(seed), 0.5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in TINY_NORMS:
            model.get_parameter(k).copy_(torch.randn(6, generator=g))
    ticket = signmask.extract(model, norms=True)
    ticket = _with_norms(ticket, {k: v.to(dtype) for k, v in ticket.norms.items()})
    path = signmask.save(ticket, tmp_path_factory.mktemp("t") / "t.safetensors")
    fresh = signmask.transfer(path, tiny(seed + 1).to(dtype), norms=True)
    assert all(bits_equal(fresh.get_parameter(k).detach(), ticket.norms[k]) for k in TINY_NORMS)


@pytest.mark.parametrize("name", [
    "resnet18",
    "convnext_atto",
    pytest.param("test_efficientnet_evos", marks=since_timm("1.0.10", "test_efficientnet_evos")),
    pytest.param("test_vit4", marks=since_timm("1.0.13", "test_vit4")),
])
def test_norms_of_timm_models_are_recorded_and_transferred(name):
    # BatchNorm2d, LayerNorm2d, EvoNorm and LayerNorm: every affine tensor of every norm layer.
    torch.manual_seed(0)
    trained = signmask.prune(timm.create_model(name, pretrained=False, num_classes=5), 0.5)
    norms = {f"{fqn}.{t}" for fqn, m in trained.named_modules() if _interpolate.is_norm(m)
             for t in ("weight", "bias") if isinstance(m._parameters.get(t), nn.Parameter)}
    with torch.no_grad():
        for key in norms:
            trained.get_parameter(key).add_(torch.randn_like(trained.get_parameter(key)))
    ticket = signmask.extract(trained, norms=True)
    assert set(ticket.norms) == norms and norms
    fresh = signmask.transfer(ticket, timm.create_model(name, pretrained=False, num_classes=5), norms=True)
    assert all(torch.equal(fresh.get_parameter(k), trained.get_parameter(k)) for k in norms)


@pytest.mark.parametrize("verb", ["transfer", "load_state_dict"])
def test_the_pruning_history_holds_no_per_weight_tensor(verb):
    # A history record pinning the ticket's signed mask grows every deepcopy and pickle.
    import pickle

    source = signmask.prune(nn.Linear(64, 64), 0.5, signs="locked")
    fresh, dense = nn.Linear(64, 64), nn.Linear(64, 64)
    if verb == "transfer":
        signmask.transfer(signmask.extract(source), fresh)
        signmask.prune(dense, 0.5, signs="locked")  # the same layout, made by prune
    else:
        signmask.load_state_dict(fresh, source.state_dict())
        signmask.prune(dense, 0.5, signs="locked")
    records = signmask._reparam.methods(signmask._reparam.find_hook(fresh, "weight")[1])
    assert records and all(getattr(m, "signed_mask", None) is None for m in records)
    assert len(pickle.dumps(fresh)) <= len(pickle.dumps(dense)) + 512


def test_transfer_onto_a_lazy_layer_is_refused_by_name_untouched():
    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 0.5), biases=True)
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))
    head = {k: v.clone() for k, v in model[1].state_dict().items()}
    with pytest.raises(ValueError, match=r"^0.weight is an uninitialized lazy parameter \(LazyLinear\); run one "
                                         "forward pass to give it a shape before transferring a ticket onto it$"):
        signmask.transfer(ticket, model)
    assert nn.parameter.is_lazy(model[0].weight) and not signmask._targets.pruned(model)
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in head.items())


class _Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def _with_bias_not_a_parameter(kind: str, seed: int) -> nn.Sequential:
    """Two Linear layers; the first one's bias is a buffer or computed by a parametrization."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if kind == "buffer":  # a frozen bias
        bias = model[0].bias.detach().clone()
        del model[0]._parameters["bias"]
        model[0].register_buffer("bias", bias)
    else:
        torch.nn.utils.parametrize.register_parametrization(model[0], "bias", _Abs())
    return model


@pytest.mark.parametrize("kind", ["buffer", "parametrize"])
def test_a_ticket_with_biases_transfers_onto_its_own_architecture_when_a_bias_is_no_parameter(kind):
    ticket = signmask.extract(signmask.prune(_with_bias_not_a_parameter(kind, 0), 0.5), biases=True)
    assert list(ticket.signs) == ["1.bias"]  # transfer writes Parameters only, as prune prunes them
    fresh = _with_bias_not_a_parameter(kind, 1)
    bias0, bias1 = fresh[0].bias.detach().clone(), fresh[1].bias.detach().clone()
    signmask.transfer(ticket, fresh)
    masks = signmask.extract(fresh).masks
    assert masks.keys() == ticket.masks.keys() and all(torch.equal(masks[k], m) for k, m in ticket.masks.items())
    assert torch.equal(fresh[1].bias, bias1.abs() * ticket.signs["1.bias"])
    assert torch.equal(fresh[0].bias, bias0)  # not the ticket's: it records no sign for it


def test_a_ticket_of_another_depth_is_refused_where_the_class_name_is_all_there_is():
    # Outside timm the architecture is the class name: torchvision's resnet18 and resnet34 are
    # both "ResNet". The ticket also records how many conv/linear layers its model had.
    class Net(nn.Module):
        def __init__(self, depth, classes=2):
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(6, 6) for _ in range(depth)])
            self.head = nn.Linear(6, classes)

    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(Net(2), 0.5, classifier=False))
    assert ticket.metadata["architecture"] == "Net" and ticket.metadata["layers"] == "3"
    signmask.transfer(ticket, Net(2, classes=7))  # another head: another task fits
    deeper = Net(4)  # one layer deeper passes as a deeper head might: two do not
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match="a Net with 3 conv/linear layers, the model has 4 out"):
        signmask.transfer(ticket, deeper)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())
    signmask.transfer(ticket, deeper, check_architecture=False)  # on request: every tensor fits
    older = signmask.Ticket(ticket.masks, ticket.signs,
                            {k: v for k, v in ticket.metadata.items() if k != "layers"})
    signmask.transfer(older, Net(3))  # tickets saved before the count: the class name only
    headless = Net(2)
    headless.head = nn.Identity()
    signmask.transfer(ticket, headless)  # fewer layers: the same backbone, without its head


@pytest.mark.parametrize("layers", ["²", "x", " 3", "-1", ""])
def test_a_layers_entry_that_is_no_count_is_free_text_and_skips_the_depth_check(layers):
    # metadata is free-form: "²" passed str.isdigit() and raised int()'s own ValueError
    model = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 0.5, classifier=True)
    ticket = signmask.extract(model, metadata={"layers": layers})
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert signmask.transfer(ticket, fresh) is fresh
    assert torch.equal(signmask.extract(fresh).masks["0.weight"], ticket.masks["0.weight"])


def test_the_depth_check_accepts_a_backbone_with_another_head_or_none():
    # A feature extractor's ticket (head replaced by Identity) onto the model with its head,
    # and a ticket onto a model whose head became an MLP: neither is a deeper network.
    class Net(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
            self.head = head

    torch.manual_seed(0)
    headless = signmask.extract(signmask.prune(Net(nn.Identity()), 0.5, classifier=True))
    signmask.transfer(headless, Net(nn.Linear(6, 2)))
    ticket = signmask.extract(signmask.prune(Net(nn.Linear(6, 2)), 0.5, classifier=False))
    signmask.transfer(ticket, Net(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))))


def test_extract_and_transfer_survive_a_get_classifier_that_raises():
    # timm's efficientvit with num_classes=0 raises from get_classifier(): the head is then
    # found as for any model.
    class Net(nn.Sequential):
        def get_classifier(self):
            raise AttributeError("'Identity' object has no attribute 'linear'")

    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(Net(nn.Linear(4, 4), nn.Linear(4, 2)), 0.5))
    signmask.transfer(ticket, Net(nn.Linear(4, 4), nn.Linear(4, 2)))


@pytest.mark.parametrize("signs", ["init", "locked"])
def test_a_ticket_without_its_head_goes_onto_a_new_head_and_a_dense_head_sign_names_the_remedy(signs):
    # Fine-tuning: the new init has another number of classes. A ticket whose head was kept dense
    # (classifier=False) carries its dense sign; the default refuses it by name, saying how to
    # leave it out, and changes nothing; with dense=False the backbone's ticket transfers exactly.
    ticket = signmask.extract(signmask.prune(tiny(0), 0.5, classifier=False), biases=True, dense=True)
    model = tiny(1, classes=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(5, 6\), the model's has \(3, 6\) "
                                         r"\(a new head\? pass dense=False"):
        signmask.transfer(ticket, model, signs=signs)
    assert_same(before, snapshot(model))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    signmask.transfer(ticket, model, signs=signs, dense=False)
    for key, s in ticket.masks.items():
        assert torch.equal(getattr(model, key.split(".")[0]).weight, init[key].abs() * s)
    assert torch.equal(model.conv2.bias, init["conv2.bias"].abs() * ticket.signs["conv2.bias"])
    assert torch.equal(model.fc.weight, init["fc.weight"]) and torch.equal(model.fc.bias, init["fc.bias"])


_LAYERS = {
    "conv1d": lambda b: nn.Conv1d(2, 3, 2, bias=b),
    "conv2d_grouped": lambda b: nn.Conv2d(4, 8, 3, groups=2, bias=b),
    "conv3d": lambda b: nn.Conv3d(2, 3, 1, bias=b),
    "conv_transpose": lambda b: nn.ConvTranspose2d(3, 2, 2, bias=b),
    "linear": lambda b: nn.Linear(7, 5, bias=b),
}


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(_LAYERS)), min_size=1, max_size=4),
       bias=st.booleans(), seed=st.integers(0, 2**16), amount=st.floats(0.05, 0.95),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       signs=st.sampled_from(["init", "locked", "keep"]))
def test_saved_tickets_of_random_architectures_transfer_exactly_in_every_dtype(tmp_path_factory, kinds, bias,
                                                                              seed, amount, dtype, signs):
    # Oracles: the sign bit of the pruned model's effective weights, the new init's own values.
    def build(s):
        torch.manual_seed(s)
        model = nn.ModuleList(_LAYERS[k](bias) for k in kinds).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()  # drawn in the dtype itself: fp64 values that fp32 cannot hold
        return model

    source = signmask.prune(build(seed), amount, classifier=True)
    ticket = signmask.extract(source, biases=True)
    for i, layer in enumerate(source):
        sign = 1 - 2 * torch.signbit(layer.weight).to(torch.int8)
        assert torch.equal(ticket.masks[f"{i}.weight"], sign * layer.weight_mask.to(torch.int8))
    loaded = signmask.load(signmask.save(ticket, tmp_path_factory.mktemp("t") / "t.safetensors"))
    assert loaded == ticket and loaded.metadata == ticket.metadata
    fresh = build(seed + 1)
    init = {k: v.detach().clone() for k, v in fresh.named_parameters()}
    signmask.transfer(loaded, fresh, signs=signs)
    for key, s in ticket.masks.items():
        layer = fresh[int(key.split(".")[0])]
        assert layer.weight.dtype == dtype and torch.equal(layer.weight_mask, s != 0)
        want = init[key] * (s != 0) if signs == "keep" else init[key].abs() * s.to(dtype)
        assert bits_equal(layer.weight, want)
        if signs != "keep":
            assert torch.equal(signmask.extract(fresh).masks[key], s)
    for key, s in ticket.signs.items():
        want = init[key] if signs == "keep" else init[key].abs() * s.to(dtype)
        assert bits_equal(getattr(fresh[int(key.split(".")[0])], "bias"), want)


@pytest.mark.parametrize("signs", ["init", "locked", "keep"])
def test_a_failure_at_any_torch_call_leaves_the_model_untouched(signs):
    # An out-of-memory error at the k-th tensor left the tensors before it rewritten to
    # |theta| * s (norms copied) and masked. Trained norms, which the copy changes; signed
    # zeros, whose sign bits |theta| * s may change at kept and pruned entries alike.
    _, ticket = trained_ticket(biases=True, dense=True)
    template = tiny(seed=1)
    with torch.no_grad():
        template.conv1.weight.view(-1)[:24] = torch.tensor([0.0, -0.0]).repeat(12)
        template.fc.bias[0] = -0.0
    assert_each_fault_leaves_it_untouched(
        lambda: (copy.deepcopy(template),), lambda m: signmask.transfer(ticket, m, signs=signs, norms=True),
        rest=outside,
    )


@pytest.mark.parametrize("signs", ["init", "locked"])
def test_a_sign_transfer_onto_complex_weights_is_refused_by_name_untouched(signs):
    ticket = signmask.extract(signmask.prune(nn.Linear(6, 6), 0.5))
    model = nn.Linear(6, 6).to(torch.complex64)
    init = model.weight.detach().clone()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"^weight is torch.complex64: .*signs='keep'"):
        signmask.transfer(ticket, model, signs=signs)
    assert_same(before, snapshot(model))
    signmask.transfer(ticket, model, signs="keep")  # no sign written: the mask alone is fine
    assert torch.equal(model.weight, init * (ticket.masks["weight"] != 0))


@pytest.mark.parametrize("signs", ["init", "locked"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_an_inf_or_nan_of_the_init_at_a_pruned_entry_becomes_zero(signs, bad):
    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(nn.Linear(6, 6), 0.5))
    pruned = ticket.masks["weight"] == 0
    model = nn.Linear(6, 6)
    with torch.no_grad():
        model.weight[pruned] = bad
    init = model.weight.detach().clone()
    signmask.transfer(ticket, model, signs=signs)
    s = ticket.masks["weight"].float()
    assert torch.equal(model.weight_orig, torch.where(pruned, 0.0, init.abs() * s))
    assert torch.isfinite(model(torch.randn(3, 6))).all()
