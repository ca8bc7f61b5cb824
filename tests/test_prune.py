"""signmask.prune / remove: exact counts, selection options, errors."""

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune as tprune

import signmask
from signmask import _methods
from _util import assert_each_fault_leaves_it_untouched, assert_same, kept, outside, outside_alive, snapshot, tiny, two_linears_trained


def _numel(model, names=("conv1", "conv2", "fc")):
    return sum(getattr(model, n).weight.numel() for n in names)


@settings(max_examples=40, deadline=None)
@given(amounts=st.lists(st.floats(0, 1), min_size=1, max_size=4), scope=st.sampled_from(["global", "layer"]))
def test_each_round_prunes_round_amount_of_remaining(amounts, scope):
    model = tiny()
    alive = {n: getattr(model, n).weight.numel() for n in ("conv1", "conv2", "fc")}
    for amount in amounts:
        signmask.prune(model, amount, scope=scope)
        if scope == "global":
            total = sum(alive.values())
            assert kept(model) == total - round(amount * total)
            alive = {n: int(getattr(model, n).weight_mask.sum()) for n in alive}
        else:
            for n, a in alive.items():
                assert int(getattr(model, n).weight_mask.sum()) == a - round(amount * a)
                alive[n] = a - round(amount * a)


def test_rounding_is_half_to_even_like_torch_prune():
    # 10 weights * 0.25 = 2.5 -> round() gives 2 (half to even), as torch.nn.utils.prune does.
    model = nn.Linear(5, 2, bias=False)
    oracle = nn.Linear(5, 2, bias=False)
    signmask.prune(model, 0.25)
    tprune.l1_unstructured(oracle, "weight", 0.25)
    assert int(model.weight_mask.sum()) == 8 == int(oracle.weight_mask.sum())


def test_global_pruning_removes_the_smallest_magnitudes_across_layers():
    model = tiny()
    weights = torch.cat([getattr(model, n).weight.detach().abs().flatten() for n in ("conv1", "conv2", "fc")])
    signmask.prune(model, 0.6)
    k = round(0.6 * weights.numel())
    threshold = weights.sort().values[k - 1]
    for n in ("conv1", "conv2", "fc"):
        m = getattr(model, n)
        assert torch.equal(m.weight_mask, m.weight_orig.detach().abs() > threshold)


def test_ties_are_broken_by_position():
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    signmask.prune(model, 0.5)
    assert model.weight_mask.flatten().tolist() == [False] * 4 + [True] * 4


def test_random_pruning_is_seeded_exact_and_differs_between_layers():
    a, b, c = tiny(), tiny(), tiny()
    for m in (a, b):
        signmask.prune(m, 0.5, method="random", scope="layer", seed=3)
    signmask.prune(c, 0.5, method="random", scope="layer", seed=4)
    assert torch.equal(a.conv2.weight_mask, b.conv2.weight_mask)
    assert not torch.equal(a.conv2.weight_mask, c.conv2.weight_mask)
    n = a.conv2.weight.numel()
    assert int(a.conv2.weight_mask.sum()) == n - round(0.5 * n)
    # Same-shaped layers must not share one random stream.
    twins = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    signmask.prune(twins, 0.5, method="random", scope="layer", seed=0)
    assert not torch.equal(twins[0].weight_mask, twins[1].weight_mask)


def test_random_pruning_with_a_seed_leaves_the_global_rng_alone_and_without_draws_from_it():
    # A hidden draw would shift the user's data order with every call.
    model = tiny()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    signmask.prune(model, 0.3, method="random", seed=3)
    signmask.prune(model, 0.3, method="random", scope="layer", seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    # Without a seed, torch.manual_seed fixes the mask.
    masks = []
    for _ in range(2):
        model = tiny()
        torch.manual_seed(5)
        signmask.prune(model, 0.5, method="random")
        masks.append(model.conv2.weight_mask.clone())
        assert not torch.equal(torch.get_rng_state(), before)  # the seed was drawn from it
    assert torch.equal(*masks)


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_random_scores_are_the_cpu_stream_on_every_device(device):
    # One seed names one mask wherever the model lives (a CUDA generator draws other numbers).
    from signmask._methods import RandomPruning

    t = torch.empty(5, 7, device=device)
    scores = RandomPruning(0.5, seed=11).scores(t, index=2)
    assert scores.device.type == device
    if device != "meta":
        expected = torch.rand(5, 7, generator=torch.Generator().manual_seed(11 + 7919 * 2))
        assert torch.equal(scores.cpu(), expected)


def test_random_scores_do_not_follow_the_default_dtype():
    # Under torch.set_default_dtype(torch.float64) torch.rand draws other numbers; one seed
    # must still name one mask.
    from signmask._methods import RandomPruning

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scores = RandomPruning(0.5, seed=11).scores(torch.empty(5, 7), index=2)
    finally:
        torch.set_default_dtype(before)
    expected = torch.rand(5, 7, generator=torch.Generator().manual_seed(11 + 7919 * 2))
    assert torch.equal(scores, expected)


@pytest.mark.parametrize("seed, error, message", [
    (1.5, TypeError, "seed must be an int, got float 1.5"),
    ("3", TypeError, "seed must be an int, got str '3'"),
    (True, TypeError, "seed must be an int, got bool True"),
    (-1, ValueError, "seed must be an int >= 0, got -1"),
    (2**64, ValueError, r"seed must be an int below 2\*\*64"),
])
def test_random_pruning_refuses_a_bad_seed_by_name(seed, error, message):
    # 1.5, "3" and True were taken as 1, 3 and 1; a large seed overflowed inside torch.
    model = tiny()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        signmask.prune(model, 0.5, method="random", seed=seed)
    assert_same(before, snapshot(model))


def test_per_tensor_seeds_wrap_within_the_generators_range():
    # The last tensors of seed 2**64 - 1 get seeds past 2**64 - 1 unless they wrap around.
    top = 2**64 - 1
    scores = _methods.RandomPruning(0.5, seed=top).scores(torch.empty(3), index=2)
    expected = torch.rand(3, generator=torch.Generator().manual_seed((top + 7919 * 2) % 2**64))
    assert torch.equal(scores, expected)
    signmask.prune(tiny(), 0.5, method="random", seed=top)


def test_random_global_keeps_magnitudes_out_of_it():
    model = tiny()
    signmask.prune(model, 0.5, method="random", seed=0)
    pruned_mags = torch.cat([m.weight_orig.detach().abs()[~m.weight_mask] for m in (model.conv1, model.conv2, model.fc)])
    kept_mags = torch.cat([m.weight_orig.detach().abs()[m.weight_mask] for m in (model.conv1, model.conv2, model.fc)])
    assert pruned_mags.max() > kept_mags.min()  # not a magnitude threshold
    assert kept(model) == _numel(model) - round(0.5 * _numel(model))


def test_classifier_include_exclude_and_filter():
    assert not hasattr(signmask.prune(tiny(), 0.5, classifier=False).fc, "weight_mask")
    m = signmask.prune(tiny(), 0.5, include="conv*")
    assert hasattr(m.conv1, "weight_mask") and hasattr(m.conv2, "weight_mask") and not hasattr(m.fc, "weight_mask")
    m = signmask.prune(tiny(), 0.5, exclude=["conv1"])
    assert not hasattr(m.conv1, "weight_mask") and hasattr(m.conv2, "weight_mask")
    m = signmask.prune(tiny(), 0.5, filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
    assert {n for n, _ in m.named_buffers() if n.endswith("_mask")} == {"fc.weight_mask"}


def test_never_prunes_biases_or_norms():
    m = signmask.prune(tiny(), 0.9)
    masked = {n for n, _ in m.named_buffers() if n.endswith("_mask")}
    assert masked == {"conv1.weight_mask", "conv2.weight_mask", "fc.weight_mask"}


def test_compiled_and_wrapped_models_use_canonical_names():
    model = tiny()
    wrapped = nn.DataParallel(model)
    signmask.prune(wrapped, 0.5, include="conv1")
    assert list(signmask.extract(wrapped).masks) == ["conv1.weight"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(amount=1.5), "amount, a fraction, must be in [0, 1], got 1.5"),
        (dict(amount=-0.1), "amount, a fraction, must be in [0, 1]"),
        (dict(amount=-1), "amount, a number of weights, must be >= 0, got -1"),
        (dict(amount=10**6), "amount=1000000 weights to prune, but the selected tensors have only"),
        (dict(amount=31, scope="layer"), "amount=31 weights to prune, but 'fc.weight' have only 30 left unpruned"),
        (dict(amount="0.5"), "amount must be a float in [0, 1] or an int count, got str"),
        (dict(amount=True), "amount must be a float in [0, 1] or an int count, got bool"),
        (dict(amount=0.5, method="lamp"),
         "method='lamp' is not a known pruning method; valid: ['magnitude', 'random']"),
        (dict(amount=0.5, scope="block"), "valid: ['global', 'layer']"),
        (dict(amount=0.5, signs="init"),
         "signs='init' is not a known sign mode; valid: ['free', 'locked']"),
        (dict(amount=0.5, scope=None), "scope must be a str, one of ['global', 'layer'], got NoneType None"),
        (dict(amount=0.5, include="layer9.*"),
         "include pattern 'layer9.*' matches no conv/linear module; module names look like ['conv1', 'conv2', 'fc']"),
        (dict(amount=0.5, exclude="*", classifier=True), "nothing to prune in TinyNet"),
        (dict(amount=0.5, seed=1), "seed= is not an option of method='magnitude'"),
        (dict(amount=0.5, classifier="no"), "classifier must be a bool, got str 'no'"),
        (dict(amount=0.5, filter_fn=3), "filter_fn must be callable"),
    ],
)
def test_bad_input_errors_and_leaves_model_untouched(kwargs, message):
    model = tiny()
    signmask.prune(model, 0.2, include="conv2")
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError)) as err:
        signmask.prune(model, **kwargs)
    assert message in str(err.value)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("count", [0, 1, 7, 29])
def test_int_amount_is_a_count_as_in_stock_prune(count):
    model, oracle = tiny(0), tiny(0)
    targets = [(oracle.conv1, "weight"), (oracle.conv2, "weight"), (oracle.fc, "weight")]
    signmask.prune(model, count)
    tprune.global_unstructured(targets, tprune.L1Unstructured, amount=count)
    assert kept(model) == sum(m.weight.numel() for m, _ in targets) - count
    for (m, _), name in zip(targets, ("conv1", "conv2", "fc")):
        assert torch.equal(getattr(model, name).weight_mask, m.weight_mask.bool())
    layer = tiny(0).fc
    signmask._methods.L1Magnitude.apply(layer, "weight", amount=count)  # the stock way
    stock = tprune.l1_unstructured(tiny(0).fc, "weight", amount=count)
    assert torch.equal(layer.weight_mask.bool(), stock.weight_mask.bool())


def test_model_without_conv_or_linear_has_nothing_to_prune():
    with pytest.raises(ValueError, match="nothing to prune in Sequential"):
        signmask.prune(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), 0.5)


def test_tied_weights_are_refused():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    before = snapshot(model)
    with pytest.raises(ValueError, match="share one Parameter"):
        signmask.prune(model, 0.5)
    assert_same(before, snapshot(model))


def test_conflicting_sign_mode_is_refused():
    model = signmask.prune(tiny(), 0.3, signs="locked")
    before = snapshot(model)
    with pytest.raises(ValueError, match="conv1.weight is sign-locked"):
        signmask.prune(model, 0.3, signs="free")
    assert_same(before, snapshot(model))
    signmask.prune(model, 0.3)  # None keeps the lock
    assert "weight_sign" in model.conv1._buffers


def test_non_binary_stock_mask_is_refused():
    model = tiny()
    tprune.custom_from_mask(model.conv1, "weight", torch.full_like(model.conv1.weight, 0.5))
    with pytest.raises(ValueError, match=r"conv1.weight: its existing prune mask is not binary "
                                         r"\(0/1 expected, found values \[0.5\]\)"):
        signmask.prune(model, 0.3)


def test_stock_pruned_tensor_is_adopted_and_pruned_further():
    model, oracle = tiny(), tiny()
    tprune.l1_unstructured(model.fc, "weight", 0.4)
    tprune.l1_unstructured(oracle.fc, "weight", 0.4)
    signmask.prune(model, 0.5, scope="layer", include="fc")
    tprune.l1_unstructured(oracle.fc, "weight", 0.5)
    assert model.fc.weight_mask.dtype == torch.bool
    assert torch.equal(model.fc.weight_mask, oracle.fc.weight_mask.bool())
    assert len(model.fc._forward_pre_hooks) == 1


def test_remove_makes_pruning_permanent_and_needs_pruning():
    model = tiny()
    with pytest.raises(ValueError, match="nothing in TinyNet is pruned"):
        signmask.remove(model)
    signmask.prune(model, 0.5, signs="locked")
    param = model.conv2.weight_orig
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    y = model(x)
    signmask.remove(model)
    assert model.conv2.weight is param and not tprune.is_pruned(model)
    assert not any(n.endswith(("_mask", "_sign")) for n, _ in model.named_buffers())
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("fn", [signmask.remove, signmask.extract, lambda m: signmask.load_state_dict(m, {})])
def test_model_functions_refuse_non_modules(fn):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        fn("model")


def test_global_pruning_of_float64_weights_matches_stock_prune_exactly():
    model = nn.Sequential(nn.Linear(4, 1), nn.Linear(3, 1)).double()
    with torch.no_grad():  # equal, underflowing or overflowing in float32
        model[0].weight.copy_(torch.tensor([[1 + 2e-12, 1.0, 3.0, 1 + 1e-12]], dtype=torch.float64))
        model[1].weight.copy_(torch.tensor([[1e-50, 1e39, 1e-60]], dtype=torch.float64))
    oracle = copy.deepcopy(model)
    signmask.prune(model, 3 / 7)
    tprune.global_unstructured([(m, "weight") for m in oracle], tprune.L1Unstructured, amount=3)
    for m, o in zip(model, oracle):
        assert torch.equal(m.weight_mask, o.weight_mask.bool())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_tensors_have_sparsity_zero():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))
    signmask.prune(model, 0.5)
    ticket = signmask.extract(model)
    assert ticket.layer_sparsity() == {"0.weight": 0.0, "1.weight": 0.5}
    assert ticket.sparsity == 0.5
    empty = signmask.Ticket({"a": torch.zeros(0, 3, dtype=torch.int8)})
    assert empty.sparsity == 0.0 and empty.layer_sparsity() == {"a": 0.0}


def test_locking_reads_the_live_weights_not_the_last_forward():
    model = signmask.prune(tiny(), 0.3)
    with torch.no_grad():
        model.conv2.weight_orig.neg_()  # no forward since: module.weight is stale
    signmask.prune(model, 0.0, signs="locked", include="conv2")
    model(torch.randn(1, 3, 4, 4))
    kept = model.conv2.weight_mask
    assert torch.equal(torch.signbit(model.conv2.weight)[kept], torch.signbit(model.conv2.weight_orig)[kept])


# ------------------------------------------------------------ weights that are no Parameter


def test_layers_with_computed_weights_are_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(6, 6)),
        nn.utils.parametrizations.weight_norm(nn.Linear(6, 6)),
        nn.Linear(6, 2),
    )
    x = torch.randn(3, 6)
    model.eval()
    normed, twin = model[1](x).detach(), copy.deepcopy(model[0])
    with pytest.warns(UserWarning, match=r"skips 2 conv/linear module\(s\) whose weight is computed.*\['0', '1'\]"):
        signmask.prune(model, 0.5)
    assert set(signmask._targets.pruned(model)) == {"2.weight"}
    # spectral_norm's own weight_orig is not taken for a pruned weight: its norm still applies.
    assert torch.equal(model[0](x), twin(x))
    assert torch.equal(model[1](x), normed)
    with pytest.raises(ValueError, match=r"include pattern '0' matches only conv/linear modules whose weight is computed"):
        signmask.prune(model, 0.5, include="0")


def test_excluding_computed_weights_silences_the_warning(recwarn):
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 6)), nn.Linear(6, 2))
    signmask.prune(model, 0.5, exclude="0")
    assert not [w for w in recwarn if "computed" in str(w.message)]


def test_uninitialized_lazy_layers_are_refused_by_name():
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))
    head = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match="0.weight is an uninitialized lazy parameter .*run one forward pass"):
        signmask.prune(model, 0.5)
    assert not signmask._targets.pruned(model) and torch.equal(model[1].weight, head)
    model(torch.randn(1, 3))
    assert kept(signmask.prune(model, 0.5)) == 10


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mix(self.embed(ids)))


def test_a_head_tied_to_an_embedding_is_refused_and_can_be_excluded():
    torch.manual_seed(0)
    model = TiedLM()
    before = snapshot(model)
    with pytest.raises(ValueError, match="head.weight and embed.weight share one Parameter") as error:
        signmask.prune(model, 0.5)
    assert_same(before, snapshot(model))
    # The advice works as given: only the conv/linear holder is named (excluding the embedding
    # too would be refused, as it matches no conv/linear module).
    advice = re.search(r"pass exclude=(\[.*?\])", str(error.value)).group(1)
    assert advice == "['head']"
    signmask.prune(model, 0.5, exclude=ast.literal_eval(advice))
    assert set(signmask._targets.pruned(model)) == {"mix.weight"}


class _KeepsAMaskAttribute(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.weight_mask = None  # a plain attribute some custom layers keep


class _OwnsAWeightOrig(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.weight_orig = nn.Parameter(torch.full((4, 4), 7.0))


class _OwnsAWeightSign(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.register_buffer("weight_sign", torch.ones(2, dtype=torch.uint8))


class _HasAMaskMethod(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)

    def weight_mask(self):  # a helper of some quantization or sparsity mix-in
        return None


class _HasAnOrigProperty(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)

    @property
    def weight_orig(self):
        raise AssertionError("the check must not run a property")


class _BaseWithASign(nn.Linear):
    weight_sign = None  # a class constant, inherited


class _InheritsASign(_BaseWithASign):
    def __init__(self):
        super().__init__(4, 4)


@pytest.mark.parametrize("layer, taken", [(_KeepsAMaskAttribute, "weight_mask"), (_OwnsAWeightOrig, "weight_orig"),
                                          (_OwnsAWeightSign, "weight_sign"), (_HasAMaskMethod, "weight_mask"),
                                          (_HasAnOrigProperty, "weight_orig"), (_InheritsASign, "weight_sign")])
@pytest.mark.parametrize("verb", ["prune", "transfer", "load_state_dict"])
def test_a_module_already_using_a_name_pruning_adds_is_refused_untouched(layer, taken, verb):
    # prune failed half-way (the layers before pruned, this one without a weight), or a
    # Parameter called weight_orig silently took the weight's place. Class attributes (a
    # method, a property, an inherited constant) too: register_buffer refused them half-way.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), layer())
    source = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"1.weight: {layer.__name__} already has an attribute '{taken}'"):
        if verb == "prune":
            signmask.prune(model, 0.5)
        elif verb == "transfer":
            signmask.transfer(signmask.extract(source), model, check_architecture=False)
        else:
            signmask.load_state_dict(model, source.state_dict(), strict=False)
    assert_same(before, snapshot(model))
    if layer is _KeepsAMaskAttribute:  # a plain attribute: not in the snapshot
        assert model[1].__dict__["weight_mask"] is None


@pytest.mark.parametrize("layer", [_HasAMaskMethod, _HasAnOrigProperty, _InheritsASign])
def test_a_class_attribute_named_like_pruning_is_named_with_its_class(layer):
    model = nn.Sequential(layer())
    owner = "_BaseWithASign" if layer is _InheritsASign else layer.__name__
    with pytest.raises(ValueError, match=rf"^0.weight: {layer.__name__} already has an attribute '\w+' \(of its class "
                                         rf"{owner}\), the name pruning gives"):
        signmask.prune(model, 0.5)
    assert not signmask._targets.pruned(model) and "weight" in model[0]._parameters


# ------------------------------------------------------------ FSDP2 (sharded parameters)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_sharded_models_are_refused_untouched_and_a_gathered_state_dict_loads():
    """Pruned before ``fully_shard`` it trains; after, every verb refuses the DTensors by name and
    changes nothing (they failed deep inside DTensor dispatch, set_backend leaving hooks)."""
    worker = Path(__file__).parent / "_fsdp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("pruned_then_sharded_equal") is True
    assert out.pop("gathered_ticket_equal") is True
    assert set(out) == {"prune", "apply", "transfer", "set_backend", "extract", "remove", "load_state_dict"}
    for verb, result in out.items():
        assert isinstance(result, dict), f"{verb}: {result}"
        assert result["unchanged"] and result["grad_hooks"] == 0, verb
        assert "'0.weight'" in result["error"] and "DTensor" in result["error"], verb
        fix = "gather a full state dict" if verb in ("extract", "remove", "load_state_dict") else "before sharding"
        assert fix in result["error"], verb


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_pruning_a_locked_tensor_again_with_signs_locked_keeps_its_lock():
    torch.manual_seed(0)
    lin = signmask.prune(nn.Linear(4, 4), 0.25, signs="locked")
    sign_before = lin.weight_sign.clone()
    with torch.no_grad():
        lin.weight_orig.neg_()  # training flipped the raw values; the lock still rules
    signmask.prune(lin, 0.25, signs="locked")
    assert torch.equal(lin.weight_sign, sign_before)


def test_unseeded_random_pruning_follows_torch_manual_seed():
    def masks(seed):
        torch.manual_seed(seed)
        net = signmask.prune(nn.Linear(8, 8), 0.5, method="random")
        return net.weight_mask.clone()
    assert torch.equal(masks(0), masks(0))
    assert not torch.equal(masks(0), masks(1))


def test_from_signed_mask_refuses_another_shape():
    method = _methods.FromSignedMask(torch.tensor([1, 0, -1, 1], dtype=torch.int8))
    with pytest.raises(ValueError, match="shape"):
        method.compute_mask(torch.ones(3, 4), torch.ones(3, 4))


def test_classifier_false_spares_the_last_linear_not_the_first():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    signmask.prune(net, 0.5, classifier=False)
    assert hasattr(net[0], "weight_mask") and not hasattr(net[2], "weight_mask")


def test_an_unhashable_method_name_is_refused_by_its_kind():
    # The registry lookup's own TypeError (unhashable key) must become the listing one.
    net = nn.Linear(4, 4)
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"^method must be a str, one of \['magnitude', 'random'\], got list"):
        signmask.prune(net, 0.5, method=["magnitude"])
    assert_same(before, snapshot(net))


def test_a_numpy_integer_amount_is_a_count_as_in_stock_prune():
    # numbers.Integral but not int: it must still be read as a count, not as a fraction.
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    net = nn.Linear(6, 6)
    stock = copy.deepcopy(net)
    signmask.prune(net, np.int64(5))
    tprune.l1_unstructured(stock, "weight", np.int64(5))
    assert int((~net.weight_mask).sum()) == 5
    assert torch.equal(net.weight_mask, stock.weight_mask.bool())


def test_a_tied_weight_already_stock_pruned_through_one_user_is_refused_untouched():
    # The tie is found through weight_orig: module.weight of a pruned tensor is a computed copy.
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight
    tprune.l1_unstructured(net[0], "weight", 0.25)
    before = snapshot(net)
    with pytest.raises(ValueError, match="share one Parameter"):
        signmask.prune(net, 0.5, include="0")
    assert_same(before, snapshot(net))


def test_locking_a_negative_zero_weight_locks_it_negative():
    # The lock reads the sign bit, as extract() does: -0.0 is a kept weight with a negative sign.
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.0, 0.0], [-1.0, 2.0]]))
    signmask.prune(lin, 0, signs="locked")
    with torch.no_grad():
        lin.weight_orig.fill_(1.0)  # training moved every weight off zero; the lock gives the sign
    assert signmask.extract(lin).masks["weight"].tolist() == [[-1, 1], [-1, 1]]


@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf")])
@pytest.mark.parametrize("how", [{"amount": 0}, {"amount": 0.5, "method": "random", "seed": 0}])
def test_locking_the_sign_of_a_nan_or_infinite_kept_weight_is_refused_untouched(bad, how):
    # Neither ranks the weights, so nothing refused the diverged one: the lock kept its NaN's
    # arbitrary sign bit, and outlived it once the weight was reset. extract() refuses the same.
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    keep = signmask.prune(copy.deepcopy(net), **how)[1].weight_mask  # the draw ignores values
    with torch.no_grad():
        net[1].weight[keep.nonzero()[-1].unbind()] = bad
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"1\.weight holds 1 NaN or infinite kept weights"):
        signmask.prune(net, **how, signs="locked")
    assert [k for k, _ in before[0].items()] == list(net.state_dict())
    assert not any(hasattr(m, "weight_mask") for m in net)
    with torch.no_grad():
        net[1].weight.nan_to_num_(posinf=1.0)  # reset: locking works again
    signmask.prune(net, **how, signs="locked")
    assert torch.equal(net[1].weight_mask, keep)


@pytest.mark.parametrize("dtype, signs, message, by_transfer", [
    (torch.complex64, "locked", "1.weight is torch.complex64: a sign lock needs real weights",
     "1.weight is torch.complex64: a complex weight has no sign to transfer"),
    (torch.float8_e4m3fn, None, "1.weight is torch.float8_e4m3fn: torch multiplies no 8-bit float by a mask", None),
])
def test_a_weight_that_cannot_be_masked_is_refused_before_any_change(dtype, signs, message, by_transfer):
    # Found by torch midway: layer 0 was pruned (and locked) before layer 1 failed.
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(torch.randn(3, 4).to(dtype), requires_grad=dtype.is_complex)
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match=re.escape(message)):
        signmask.prune(model, 0.5, signs=signs)
    assert list(model.state_dict()) == keys
    ticket = signmask.extract(signmask.prune(nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3)), 0.5))
    with pytest.raises(TypeError, match=re.escape(by_transfer or message)):
        signmask.transfer(ticket, model, signs=signs or "init")
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("scope, signs, before", [
    ("global", None, None), ("layer", "locked", None), ("global", "locked", "free"), ("layer", None, "locked"),
])
def test_a_failure_at_any_torch_call_leaves_the_model_untouched(scope, signs, before):
    # An out-of-memory error (or Ctrl-C) at the k-th layer left the layers before it pruned,
    # their masks rewritten, locked or stacked in their history.
    template = tiny() if before is None else signmask.prune(tiny(), 0.3, signs=before)
    assert_each_fault_leaves_it_untouched(
        lambda: (copy.deepcopy(template),), lambda m: signmask.prune(m, 0.5, scope=scope, signs=signs)
    )


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_failure_under_the_projection_backend_leaves_weights_gradients_and_state(signs):
    # The projection backend zeroes the newly pruned entries of weight_orig, its gradient and
    # its momentum inside prune (the refresh); a failure at the next layer left them zeroed.
    def make():
        return two_linears_trained("projection", signs, 0.3)

    assert_each_fault_leaves_it_untouched(make, lambda m, opt: signmask.prune(m, 0.5), rest=outside)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_failure_under_the_projection_backend_puts_back_channels_last_weights(dtype):
    # The entries kept for the undo are read and written back in row-major order, flat where
    # the tensor is contiguous: a channels_last weight (and its gradient and momentum) is not.
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1)).to(dtype, memory_format=torch.channels_last)
        signmask.prune(model, 0.3, signs="locked")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        signmask.set_backend(model, "projection", optimizer=opt)
        for step in (True, False):
            opt.zero_grad()
            model(torch.randn(2, 2, 4, 4, dtype=dtype)).square().mean().backward()
            if step:
                opt.step()
        assert not model[0].weight_orig.is_contiguous() and not model[0].weight_orig.grad.is_contiguous()
        return model, opt

    assert_each_fault_leaves_it_untouched(make, lambda m, opt: signmask.prune(m, 0.5), rest=outside)


@pytest.mark.parametrize("signs, backend", [(None, "torch"), ("locked", "torch"), (None, "projection"), ("locked", "projection")])
def test_remove_failing_at_any_torch_call_leaves_the_model_untouched(signs, backend):
    # An out-of-memory error (or Ctrl-C) at the k-th tensor left the tensors before it
    # permanent: their pruned values of weight_orig gone, their projection hooks removed.
    def make():  # the first weight against its locks: removing reflects it
        return two_linears_trained(backend, signs, flip=True, grad_left=False)

    assert_each_fault_leaves_it_untouched(make, lambda m, opt: signmask.remove(m), rest=outside_alive,
                                          alive_only=True)


def test_remove_failing_at_any_torch_call_leaves_stock_pruning_untouched():
    template = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():  # stock prune's weight is no leaf otherwise, and deepcopy refuses it
        tprune.l1_unstructured(template[0], "weight", 0.5)
        tprune.random_unstructured(template[1], "weight", 0.5)
    assert_each_fault_leaves_it_untouched(lambda: (copy.deepcopy(template),), signmask.remove, rest=outside_alive,
                                          alive_only=True)


def test_remove_failing_at_any_torch_call_leaves_a_scaling_stock_mask_untouched():
    # Stock prune's custom_from_mask takes any values, and removing writes orig * mask: a
    # failure at the next tensor left the kept entries of the first scaled (0.5 * orig, computed
    # 0.25 * orig), though only pruned entries may change.
    template = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():  # stock prune's weight is no leaf otherwise, and deepcopy refuses it
        tprune.custom_from_mask(template[0], "weight", torch.tensor([0.5, 1.0, 0.0, -2.0]).repeat(3, 1))
        tprune.custom_from_mask(template[1], "weight", torch.tensor([[1.0, 0.0, 0.5], [0.25, 1.0, 1.0]]))
    assert_each_fault_leaves_it_untouched(lambda: (copy.deepcopy(template),), signmask.remove, rest=outside_alive,
                                          alive_only=True)


def test_a_failure_adopting_stock_pruning_leaves_the_stock_hooks():
    template = tiny()
    with torch.no_grad():  # stock prune's weight is no leaf otherwise, and deepcopy refuses it
        tprune.l1_unstructured(template.conv2, "weight", 0.3)
        tprune.random_unstructured(template.fc, "weight", 0.3)
    assert_each_fault_leaves_it_untouched(lambda: (copy.deepcopy(template),), lambda m: signmask.prune(m, 0.2))


def _stable_sort_masks(weights, masks, amount):
    """Oracle: prune round(amount * alive) alive entries of smallest |w|, ties by tensor order
    then row-major index (a stable sort of the concatenated magnitudes, the dead ones last)."""
    keys = torch.cat([torch.where(m, w.detach().double().abs(), torch.inf).reshape(-1)
                      for w, m in zip(weights, masks)])
    alive = int(sum(m.count_nonzero() for m in masks))
    keep = torch.cat([m.reshape(-1) for m in masks])
    keep[torch.argsort(keys, stable=True)[: round(amount * alive)]] = False
    return [k.view(w.shape) for k, w in zip(keep.split([w.numel() for w in weights]), weights)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounds_on_tied_and_channels_last_weights_match_a_stable_sort(dtype):
    # Bool masks enter the selection as they are (no copy), strided ones included; ties (few
    # distinct magnitudes) are cut by position over several rounds.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 5)).to(dtype)
    model[0].to(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.copy_(torch.randint(-3, 4, m.weight.shape) * 0.25)
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    for amount in (0.3, 0.5, 0.25):
        signmask.prune(model, amount)
        masks = _stable_sort_masks(weights, masks, amount)
        for m, want in zip((model[0], model[2]), masks):
            assert torch.equal(m.weight_mask, want)


def test_strided_bool_default_masks_rank_in_row_major_order_and_stay_unchanged():
    w = (torch.randint(0, 3, (6, 5)) * 0.5).t()  # few magnitudes: ties, in a transposed tensor
    mask = (torch.rand(6, 5) < 0.8).t()
    before = mask.clone()
    got = _methods.L1Magnitude(0.5).compute_masks([w], [mask])[0]
    want = _stable_sort_masks([w.contiguous()], [mask.contiguous()], 0.5)[0]
    assert torch.equal(got, want) and torch.equal(mask, before)


@pytest.mark.parametrize("signs", [None, "locked"])
def test_remove_keeps_a_parameter_assigned_over_a_pruned_weight(signs):
    # What the error of prune/extract/the forward tells the user to do (fuse_conv_bn_eval).
    net = signmask.prune(nn.Linear(4, 3), 0.5, signs=signs)
    new = nn.Parameter(torch.randn(3, 4))
    net.weight = new
    signmask.remove(net)
    assert net.weight is new and dict(net.named_parameters()).keys() == {"weight", "bias"}
    assert not hasattr(net, "weight_mask") and not hasattr(net, "weight_sign")
    assert not torch.nn.utils.prune.is_pruned(net)


def test_a_pruning_frees_each_replaced_effective_weight_at_once(monkeypatch):
    # What a failure midway must put back is recorded without holding the effective weights
    # the call replaces: held, a pruning would keep every layer's old one (4 bytes per weight,
    # on the device) until it returns, and could itself run out of memory.
    import weakref

    from signmask import _reparam

    model = signmask.prune(tiny(0), 0.3)
    layers = [m for m in model.modules() if hasattr(m, "weight_mask")]
    old = [weakref.ref(m.weight) for m in layers]
    alive_at_install = []
    install = _reparam.install

    def spy(module, name, *args, **kwargs):
        alive_at_install.append([ref() is not None for ref in old])
        return install(module, name, *args, **kwargs)

    monkeypatch.setattr(_reparam, "install", spy)
    signmask.prune(model, 0.3)
    # Installing layer i, the old weights of layers 0..i-1 are gone, those after still held.
    assert alive_at_install == [[j >= i for j in range(len(layers))] for i in range(len(layers))]


@pytest.mark.parametrize("stock", [False, True])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_remove_under_inference_mode_leaves_weights_that_train(stock, signs):
    # Inside a function decorated with @torch.inference_mode() (an export or evaluation step),
    # remove wrote inference tensors into the Parameters: the next backward through two layers
    # raised "Inference tensors cannot be saved for backward", and the weights could never
    # train again. Oracle: the same model made permanent outside inference mode.
    def pruned():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        signmask.prune(net, 0.5, signs=signs)
        if stock:
            tprune.l1_unstructured(net[2], "weight", 0.3)  # stacked: a stock method in the hook
            tprune.l1_unstructured(net[0], "bias", 0.4)  # a stock hook of its own
        return net

    inside, outside_ = pruned(), pruned()
    with torch.inference_mode():
        signmask.remove(inside)
    signmask.remove(outside_)
    assert not any(p.is_inference() for p in inside.parameters())
    x = torch.randn(2, 4)
    for net in (inside, outside_):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x).square().sum().backward()
        opt.step()
    for a, b in zip(inside.parameters(), outside_.parameters()):
        assert torch.equal(a, b)
