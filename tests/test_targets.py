"""Which tensors signmask works on, and their names: meta tensors and name collisions refused."""

import collections
import warnings

import pytest
import torch
from torch import nn

import signmask
from signmask import _targets
from _util import Wrapper, assert_same, since_timm, snapshot, tiny


def _meta_net() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _layout(model):
    """What a failed call must leave as it was on a meta model (whose values cannot be compared)."""
    return (list(model.state_dict()), [(n, id(p)) for n, p in model.named_parameters()],
            [list(m._forward_pre_hooks.values()) for m in model.modules()])


def _ticket():
    torch.manual_seed(0)
    source = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), 0.5)
    return signmask.extract(source, norms=True), source.state_dict()


META = "on the meta device .* materialize the model first"


@pytest.mark.parametrize("verb", ["prune", "transfer", "transfer norms", "load_state_dict", "apply"])
def test_meta_models_are_refused_untouched(verb):
    ticket, state = _ticket()
    model = _meta_net()
    before = _layout(model)
    with pytest.raises(ValueError, match=META):
        if verb == "prune":
            signmask.prune(model, 0.5)
        elif verb == "transfer":
            signmask.transfer(ticket, model)
        elif verb == "transfer norms":  # the norms alone are on the meta device
            real = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).to("meta"), nn.Linear(4, 2))
            before = _layout(real)
            model = real
            signmask.transfer(ticket, real, norms=True)
        elif verb == "load_state_dict":
            signmask.load_state_dict(model, state)
        else:
            signmask.apply(model, "imp", 0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert _layout(model) == before


def test_a_meta_model_pruned_by_stock_prune_is_refused_by_extract():
    model = _meta_net()
    torch.nn.utils.prune.identity(model[0], "weight")
    with pytest.raises(ValueError, match=r"\['0.weight'\] is " + META):
        signmask.extract(model)


COLLISION = r"module.fc.weight and fc.weight are different tensors with the same name .* \('fc.weight'\)"


@pytest.mark.parametrize("verb", ["prune", "extract", "transfer"])
def test_two_tensors_with_one_canonical_name_are_refused_untouched(verb):
    model = Wrapper()
    if verb == "extract":  # stock prune has no canonical names: both get pruned
        for layer in (model.module.fc, model.fc):
            torch.nn.utils.prune.l1_unstructured(layer, "weight", 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=COLLISION):
        if verb == "prune":
            signmask.prune(model, 0.5)
        elif verb == "extract":
            signmask.extract(model)
        else:
            signmask.transfer(signmask.extract(signmask.prune(tiny(), 0.5)), model, check_architecture=False)
    assert_same(before, snapshot(model))


def test_two_norms_with_one_canonical_name_are_refused_too():
    # Tickets name norm tensors the same way (extract(norms=True)), so any such pair is refused.
    model = Wrapper()
    del model.fc, model.module.fc
    model.lin = nn.Linear(4, 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module.bn.weight and bn.weight are different tensors"):
        signmask.prune(model, 0.5)
    assert_same(before, snapshot(model))


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_nested_wrappers_are_unwrapped_and_their_prefixes_stripped():
    # torch.compile(DataParallel(model)) names every tensor "_orig_mod.module.<name>".
    model = tiny()
    wrapped = torch.compile(nn.DataParallel(model))
    assert _targets.unwrap(wrapped) is model
    keys = list(wrapped.state_dict())
    assert all(k.startswith("_orig_mod.module.") for k in keys)
    assert [_targets.canonical(k) for k in keys] == list(model.state_dict())


def _linears(*names):
    torch.manual_seed(0)
    return nn.Sequential(collections.OrderedDict((n, nn.Linear(4, 4)) for n in names))


def test_without_timm_metadata_the_last_linear_is_the_classifier():
    model = _linears("stem", "body", "head")
    assert list(_targets.select(model, classifier=False)) == ["stem.weight", "body.weight"]


def test_a_pretrained_cfg_classifier_name_marks_the_head_even_when_not_last():
    model = _linears("stem", "head", "proj")
    model.pretrained_cfg = {"classifier": "head"}  # one name, not a list of characters
    assert list(_targets.select(model, classifier=False)) == ["stem.weight", "proj.weight"]


class _SequentialHead(nn.Module):
    """get_classifier() returns a container: every conv/linear inside it is the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


def test_every_layer_inside_a_container_classifier_stays_dense():
    assert list(_targets.select(_SequentialHead(), classifier=False)) == ["body.weight"]


def test_excluding_a_computed_weight_is_accepted_and_silences_its_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(_targets.select(model, exclude="1")) == ["0.weight", "2.weight"]


def test_an_eps_that_rounds_to_zero_in_the_weights_dtype_is_warned_about():
    import warnings

    def half_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).half()

    model = half_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # eps=1e-8: 0 in fp16
    with pytest.warns(UserWarning, match=r"AdamW\(eps=1e-08\) trains 0.weight in torch.float16") as got:
        signmask.apply(model, "lrr", 0.5, optimizer=opt, progress=False)
    assert {w.filename for w in got} == {__file__}  # the caller of apply(), not signmask's code
    # What it warns of: one step of the masked model turns its outputs NaN.
    model = signmask.prune(half_model(), 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8).half()
    model(x).float().sum().backward()
    opt.step()
    assert model(x).isnan().all()

    pruned = signmask.prune(half_model(), 0.5)
    with pytest.warns(UserWarning, match="rounds to 0") as got:
        signmask.set_backend(pruned, "projection",
                             optimizer=torch.optim.Adam(pruned.parameters()))
    assert {w.filename for w in got} == {__file__}
    for model, opt in (
        (half_model(), lambda p: torch.optim.AdamW(p, eps=1e-6)),  # representable in fp16
        (half_model().bfloat16(), lambda p: torch.optim.AdamW(p)),  # 1e-8 is a bf16 number
        (half_model(), lambda p: torch.optim.SGD(p, lr=0.1)),  # no eps
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            signmask.apply(model, "lrr", 0.5, optimizer=opt(model.parameters()), progress=False)


def test_classifier_false_on_a_model_without_linear_layers_keeps_its_last_conv_dense():
    # SqueezeNet's head is a 1x1 conv: no timm get_classifier(), no nn.Linear to fall back on.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1))
    with pytest.warns(UserWarning, match="its last conv, '2', is taken as the classifier head"):
        signmask.prune(model, 0.5, classifier=False)
    assert set(_targets.pruned(model)) == {"0.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guessed head is out of scope anyway: no warning
        conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1))
        signmask.prune(conv, 0.5, classifier=False, exclude="2")


def test_multihead_attention_in_scope_warns_that_its_qkv_projection_stays_dense():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("attn", nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning, match=r"1 nn.MultiheadAttention .*'attn' \(in_proj_weight\)$"):
        signmask.prune(model, 0.5)
    assert set(_targets.pruned(model)) == {"0.weight", "attn.out_proj.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # out of scope: nothing to warn of
        signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)), 0.5,
                       exclude="1*")
        wrapped = nn.DataParallel(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)))
        signmask.prune(wrapped, 0.5, exclude="1*")  # patterns match canonical names


@pytest.mark.parametrize("name, kwargs", [
    pytest.param("test_resnet", dict(features_only=True),  # FeatureListNet: timm drops the head's cfg entry
                 marks=since_timm("1.0.10", "test_resnet")),
    ("test_vit", dict(features_only=True)),  # FeatureGetterNet: its last nn.Linear is an MLP's
    ("efficientvit_m0", dict(num_classes=0)),  # get_classifier() raises; the cfg's head is gone
])
def test_a_timm_model_without_its_head_has_every_layer_pruned_with_classifier_false(name, kwargs):
    from signmask._compat import import_timm

    torch.manual_seed(0)
    model = import_timm().create_model(name, pretrained=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no body layer guessed as the head
        assert list(_targets.select(model, classifier=False)) == list(_targets.select(model))


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("verb", ["prune", "set_backend", "extract"])
def test_a_pruned_weight_assigned_a_new_parameter_is_refused_untouched(verb, signs):
    # fuse_conv_bn_eval and module surgery assign one: prune and set_backend failed half-way
    # with torch's TypeError (masks changed), extract recorded the hidden weight_orig.
    torch.manual_seed(0)
    model = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 0.5, signs=signs)
    model[0].weight = nn.Parameter(torch.randn(4, 4))
    before = snapshot(model)
    call = {
        "prune": lambda: signmask.prune(model, 0.5),
        "set_backend": lambda: signmask.set_backend(model, "projection",
                                                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
        "extract": lambda: signmask.extract(model),
    }[verb]
    with pytest.raises(ValueError, match=r"^\['0.weight'\] was assigned a new Parameter after pruning .* "
                                         r"hides the pruned weight_orig"):
        call()
    assert_same(before, snapshot(model))
    signmask.prune(model, 0.5, exclude="0")  # out of scope: not in the way


def test_a_torchscript_submodule_is_left_out_like_any_other_module():
    # An eager model may hold a scripted part (its _parameters no dict): prune, extract, transfer
    # and apply crashed on it in AttributeError 'OrderedDictWrapper' object has no attribute 'get'.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), torch.jit.script(nn.ReLU()), nn.Linear(8, 2)
            self.scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))

        def forward(self, x):
            return self.scripted(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    model = signmask.prune(Net(), 0.5)
    assert list(_targets.pruned(model)) == ["fc1.weight", "fc2.weight"]
    ticket = signmask.extract(model)
    assert sorted(ticket.masks) == ["fc1.weight", "fc2.weight"]
    fresh = signmask.transfer(ticket, Net())
    assert all(torch.equal(getattr(fresh, n).weight_mask, getattr(model, n).weight_mask) for n in ("fc1", "fc2"))
    net = Net()
    signmask.apply(net, "imp", optimizer=torch.optim.SGD(net.parameters(), lr=0.1), progress=False)
    assert list(_targets.pruned(net)) == ["fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("name, size, dense", [
    pytest.param("test_convnext", 64, ["head.2.weight", "head.4.weight"],  # config: head.fc
                 marks=since_timm("1.0.10", "test_convnext")),
    ("efficientvit_m0", 224, ["head.2.weight", "head.4.weight"]),  # config: head.linear
])
def test_a_timm_head_replaced_by_ones_own_stays_the_head(name, size, dense):
    # The module timm's config names is gone once a fine-tuning head of one's own replaces
    # `head` (get_classifier() then raises): that head, not nothing, is the classifier.
    from signmask._compat import import_timm

    torch.manual_seed(0)
    model = import_timm().create_model(name, pretrained=False, num_classes=10)
    pool = nn.AdaptiveAvgPool2d(1) if name == "test_convnext" else nn.Identity()  # efficientvit pools first
    model.head = nn.Sequential(pool, nn.Flatten(), nn.Linear(model.num_features, 16), nn.ReLU(), nn.Linear(16, 5))
    assert model(torch.randn(1, 3, size, size)).shape == (1, 5)
    everything = list(_targets.select(model))
    assert [k for k in everything if k not in _targets.select(model, classifier=False)] == dense


def test_a_filter_fn_taking_other_arguments_is_named_with_its_signature_untouched():
    model = tiny()
    before = snapshot(model)

    def by_module(module):
        return True

    with pytest.raises(TypeError, match=r"filter_fn must be callable as filter_fn\(module, name\), got "
                                        r".*by_module\(module\)"):
        signmask.prune(model, 0.5, filter_fn=by_module)
    assert_same(before, snapshot(model))


def test_a_filter_fn_read_through_its_wrapper_or_a_partial_is_accepted():
    import functools

    def by_kind(kind, module, name):
        return isinstance(module, kind)

    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            return fn(*args)
        return wrapper

    # The check reads the signature of what is called: a partial's, a decorator's (*args) wrapper's.
    for filter_fn in (functools.partial(by_kind, nn.Linear), logged(lambda module: True)):
        _targets._check_filter_fn(filter_fn)
    kept = signmask.prune(tiny(), 0.5, filter_fn=functools.partial(by_kind, nn.Conv2d))
    assert not any(isinstance(m, nn.Linear) and hasattr(m, "weight_mask") for m in kept.modules())


def test_a_filter_fn_whose_signature_cannot_be_read_is_called_as_it_is():
    # Python 3.14 evaluates annotations to build a signature: a filter_fn annotated with a name
    # imported under TYPE_CHECKING only raises NameError there, and was refused with it.
    class Lazy:
        @property
        def __signature__(self):
            raise NameError("name 'Module' is not defined")

        def __call__(self, module, name):
            return isinstance(module, nn.Conv2d)

    model = signmask.prune(tiny(), 0.5, filter_fn=Lazy())
    assert list(_targets.pruned(model)) == [k for k in _targets.select(tiny()) if "conv" in k]


@pytest.mark.parametrize("verb", ["remove", "extract", "set_backend"])
def test_a_pruning_hook_moved_onto_another_module_is_refused_untouched(verb):
    # torch.ao.quantization's fuse_modules moves a pruned Linear's pre-hook onto the LinearReLU
    # it builds, which holds no mask: remove, extract and set_backend failed in KeyError('weight').
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = signmask.prune(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), 0.5)
    fused = tq.fuse_modules(model.eval(), [["0", "1"]])
    before = snapshot(fused)
    call = {
        "remove": lambda: signmask.remove(fused),
        "extract": lambda: signmask.extract(fused),
        "set_backend": lambda: signmask.set_backend(fused, "torch"),
    }[verb]
    with pytest.raises(ValueError, match=r"^\['0.weight'\] has a pruning hook but its module \(LinearReLU\) "
                                         r"holds no weight_mask: .*fuse_modules.*signmask.remove\(model\) before"):
        call()
    assert_same(before, snapshot(fused))
    signmask.remove(model)  # the fix the message names, on the model fuse_modules copied
    fused = tq.fuse_modules(model, [["0", "1"]])
    x = torch.randn(3, 8)
    assert torch.equal(fused(x), model(x))


class _Aliased(nn.Module):
    """``shared`` registered a second time as ``decoder.fc``: one module, two names."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("fc", nn.Linear(4, 4))
        self.shared = nn.Linear(4, 4)
        self.decoder = nn.Sequential()
        self.decoder.add_module("fc", self.shared)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x)))


@pytest.mark.parametrize("kwargs, pruned", [
    ({"exclude": "*.fc"}, {"head.weight"}),  # excluded encoder.fc only, pruning its alias silently
    ({"exclude": "decoder.fc"}, {"encoder.fc.weight", "head.weight"}),  # matched "no module"
    ({"include": "decoder.*"}, {"shared.weight"}),
])
def test_globs_match_every_name_of_a_module_registered_twice(kwargs, pruned):
    # A module reachable under two names is one layer (named by its first name, "shared"), and a
    # glob matching either name selects it: its second name is as much the user's as the first.
    model = signmask.prune(_Aliased(), 0.5, **kwargs)
    assert set(_targets.pruned(model)) == pruned


class _Attentions(nn.Module):
    """Self-attention (one in_proj_weight) beside cross-attention built with kdim/vdim (three
    separate q/k/v_proj_weight)."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
        self.fc = nn.Linear(8, 2)


def test_the_multihead_attention_warning_names_the_raw_parameters_each_layer_has():
    model = _Attentions()
    with pytest.warns(UserWarning, match="2 nn.MultiheadAttention layer") as got:
        signmask.prune(model, 0.5)
    message = str(next(w.message for w in got if "MultiheadAttention" in str(w.message)))
    for name in ("self_attn", "cross"):
        # The oracle: the module's own unpruned raw projection Parameters, in its order.
        raw = [n for n, _ in getattr(model, name).named_parameters(recurse=False) if n.endswith("proj_weight")]
        assert f"{name!r} ({', '.join(raw)})" in message
    assert message.count("in_proj_weight") == 1  # the cross-attention layer has none
    assert set(_targets.pruned(model)) == {"self_attn.out_proj.weight", "cross.out_proj.weight", "fc.weight"}
