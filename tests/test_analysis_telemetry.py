"""signmask.analysis: Telemetry and perturb (Frankle et al. 2020, the early phase)."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import signmask
from signmask import analysis
from signmask._compat import import_timm

from _util import Wrapper, assert_each_fault_leaves_it_untouched, assert_same, since_timm, snapshot, tiny

timm = import_timm()
KEYS = ("conv1.weight", "conv2.weight", "fc.weight")


# ------------------------------------------------------------------------------- Telemetry
def test_step_zero_is_exactly_unmoved():
    model = tiny(0)
    rec = analysis.Telemetry(model)
    assert rec.record(0)
    first = rec.records[0]
    for stats in [first.total, *first.layers.values()]:
        assert (stats.sign_changed, stats.dist_init, stats.cos_init) == (0.0, 0.0, 1.0)
    assert list(first.layers) == list(KEYS)


def test_flipping_k_signs_by_hand_gives_k_over_n():
    model = tiny(0)
    rec = analysis.Telemetry(model)
    flips = {"conv1": 7, "conv2": 0, "fc": 30}
    with torch.no_grad():
        for name, k in flips.items():
            getattr(model, name).weight.view(-1)[:k].neg_()
    rec.record(5)
    last = rec.records[-1]
    sizes = {"conv1": 162, "conv2": 324, "fc": 30}
    for name, k in flips.items():
        assert last.layers[f"{name}.weight"].sign_changed == k / sizes[name]
    assert last.total.sign_changed == 37 / 516
    w0 = tiny(0).conv1.weight.detach().double().view(-1)[:7]
    assert last.layers["conv1.weight"].dist_init == pytest.approx(float(2 * w0.norm()), rel=1e-12)
    assert last.layers["fc.weight"].cos_init == -1.0


def test_a_diverged_model_is_recorded_with_nan_not_refused():
    model = tiny(0)
    rec = analysis.Telemetry(model)
    with torch.no_grad():
        model.conv1.weight.view(-1)[0] = float("nan")
    assert rec.record(1)
    stats = rec.records[-1].layers["conv1.weight"]
    assert math.isnan(stats.dist_init) and math.isnan(stats.cos_init)
    assert math.isnan(rec.records[-1].total.dist_init)
    assert rec.records[-1].layers["fc.weight"].dist_init == 0.0


def test_pruned_models_count_kept_weights_only():
    model = signmask.prune(tiny(0), 0.5, scope="layer")
    rec = analysis.Telemetry(model)
    kept = model.conv2.weight_mask.view(-1).nonzero().view(-1)
    pruned = (~model.conv2.weight_mask).view(-1).nonzero().view(-1)
    with torch.no_grad():
        model.conv2.weight_orig.view(-1)[kept[:5]] *= -1
        model.conv2.weight_orig.view(-1)[pruned] *= -3  # invisible: pruned
    rec.record(1)
    assert rec.records[0].layers["conv2.weight"].sign_changed == 5 / len(kept)
    assert rec.records[0].layers["conv1.weight"].sign_changed == 0.0


def test_sums_merge_equals_adding_every_tensor_to_one_total():
    from signmask.analysis._telemetry import _Sums

    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.rand(5, 7, generator=g) > 0.4),
             (torch.randn(13, generator=g), torch.randn(13, generator=g), None)]
    fed, merged = _Sums(), _Sums()
    for x, y, keep in pairs:
        fed.add(x, y, keep)
        assert merged.merge(_Sums().add(x, y, keep)) is merged
    assert vars(merged) == vars(fed)  # every field, bit for bit
    assert merged.count == 13 + int(pairs[0][2].sum()) and merged.changed > 0


def test_total_is_the_merge_of_the_layers():
    model = signmask.prune(tiny(0), 0.5)
    rec = analysis.Telemetry(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rec.record(1)
    total = rec.records[-1].total
    kept = {k: int(getattr(model, k.split(".")[0]).weight_mask.sum()) for k in KEYS}
    changed = sum(rec.records[-1].layers[k].sign_changed * kept[k] for k in KEYS)
    assert total.sign_changed == pytest.approx(changed / sum(kept.values()), rel=1e-12)
    dist = math.sqrt(sum(rec.records[-1].layers[k].dist_init ** 2 for k in KEYS))
    assert total.dist_init == pytest.approx(dist, rel=1e-12)


def test_every_k_steps_and_increasing_steps():
    rec = analysis.Telemetry(tiny(0), every=2)
    assert [rec.record(s) for s in range(5)] == [True, False, True, False, True]
    assert rec.steps == (0, 2, 4)
    with pytest.raises(ValueError, match="increase"):
        rec.record(4)
    with pytest.raises(ValueError, match="step"):
        rec.record(-1)
    with pytest.raises(ValueError, match="every"):
        analysis.Telemetry(tiny(0), every=0)


def test_finish_compares_every_record_with_the_final_weights():
    model = tiny(0)
    rec = analysis.Telemetry(model)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        rec.record(step)
    with pytest.raises(ValueError, match="finish"):
        rec.series("dist_final")
    records = rec.finish()
    assert records[-1].total.dist_final == 0.0 and records[-1].total.cos_final == 1.0
    assert rec.series("dist_final") == [r.total.dist_final for r in records]
    assert rec.series("dist_init", "fc.weight") == [r.layers["fc.weight"].dist_init for r in records]
    # comparing with a copy holding the step-0 weights: distances are symmetric
    first = analysis.Telemetry(tiny(0))
    first.record(0)
    final = first.finish(model)[0]
    assert final.total.dist_final == pytest.approx(records[-1].total.dist_init, rel=1e-12)
    with pytest.raises(ValueError, match="metric"):
        rec.series("loss")
    with pytest.raises(ValueError, match="layer"):
        rec.series("dist_init", "bn1.weight")
    lean = analysis.Telemetry(model, keep_snapshots=False)
    lean.record(0)
    with pytest.raises(ValueError, match="keep_snapshots"):
        lean.finish()


def test_telemetry_refuses_two_weights_with_one_canonical_name_naming_the_model():
    clash = "in {}, module.fc.weight and fc.weight are different tensors with the same name"
    with pytest.raises(ValueError, match=clash.format("model")):
        analysis.Telemetry(Wrapper())
    rec = analysis.Telemetry(tiny(0), names=["fc.weight"])
    rec.record(0)
    with pytest.raises(ValueError, match=clash.format("final")):
        rec.finish(Wrapper())


def test_records_after_finish_have_final_distances_once_finish_runs_again():
    # training may go on after finish(): later records wait for the next finish(), and series()
    # names them instead of claiming that finish() never ran
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    rec = analysis.Telemetry(model)
    rec.record(0)
    rec.finish()
    with torch.no_grad():
        model.weight.fill_(2.0)  # 9 weights moved by 1: distance 3
    rec.record(1)
    assert rec.records[1].total.dist_final is None and rec.records[1].total.cos_final is None
    for metric in ("dist_final", "cos_final"):
        with pytest.raises(ValueError, match=rf"{metric} is unknown at steps \[1\], recorded after the "
                                             r"last finish\(\): call finish\(\) again"):
            rec.series(metric, "weight")
    assert rec.series("dist_init") == [0.0, 3.0]
    rec.finish()
    assert rec.series("dist_final") == [3.0, 0.0] and rec.series("cos_final") == [1.0, 1.0]


@since_timm("1.0.10", "test_convnext")
def test_telemetry_on_a_timm_model_with_layernorm():
    model = timm.create_model("test_convnext", pretrained=False, num_classes=5)
    rec = analysis.Telemetry(model)
    rec.record(0)
    assert rec.records[0].total.cos_init == 1.0 and len(rec.records[0].layers) > 5


# --------------------------------------------------------------------------------- perturb
def rewind_point(pruned=True):
    """(model at step k, its init): tiny(0) is the init; the model moved from it."""
    init = tiny(0)
    model = tiny(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    if pruned:
        signmask.prune(model, 0.5, scope="layer")
    return model, init


def raw(model, key):
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return signmask._reparam.original(module, "weight").detach().clone()


def kept_of(model, key):
    module = model.get_submodule(key.rsplit(".", 1)[0])
    mask = signmask._reparam.current_mask(module, "weight")
    return torch.ones_like(raw(model, key), dtype=torch.bool) if mask is None else mask.clone()


@pytest.mark.parametrize("kind", ["permute_layer", "permute_filter", "shuffle_same_sign", "shuffle_same_sign_filter"])
def test_permutations_keep_the_multiset_of_kept_values_and_the_mask(kind):
    model, _ = rewind_point()
    before = {k: (raw(model, k), kept_of(model, k)) for k in KEYS}
    analysis.perturb(model, kind, seed=3)
    moved = False
    for key, (w0, keep) in before.items():
        w1 = raw(model, key)
        assert torch.equal(kept_of(model, key), keep)
        assert torch.equal(w1[~keep], w0[~keep])  # pruned entries untouched
        per_filter = kind.endswith("filter")
        rows = (lambda t: t.reshape(t.shape[0], -1)) if per_filter else (lambda t: t.reshape(1, -1))
        for r0, r1, k in zip(rows(w0), rows(w1), rows(keep)):
            assert torch.equal(r0[k].sort().values, r1[k].sort().values)
        if kind.startswith("shuffle_same_sign"):
            assert torch.equal(torch.sign(w1), torch.sign(w0))
        moved |= not torch.equal(w1, w0)
        module = model.get_submodule(key.rsplit(".", 1)[0])
        assert torch.equal(module.weight, w1 * keep)  # refreshed, pruned weights 0
    assert moved


@pytest.mark.parametrize("groups, in_channels", [(1, 3), (2, 4), (4, 4)])  # ungrouped, grouped, depthwise
@pytest.mark.parametrize("kind", ["permute_filter", "shuffle_same_sign_filter"])
def test_filter_kinds_keep_each_output_channel_of_conv_transpose(kind, groups, in_channels):
    # The weight is (in, out / groups, k, k): output channel g * out / groups + j reads
    # weight[g * in / groups : (g + 1) * in / groups, j] (a grouped one's dim 1 spans groups).
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(in_channels, 4, 3, groups=groups))
    w0 = net[0].weight.detach().clone()
    analysis.perturb(net, kind, seed=0)
    w1 = net[0].weight.detach()
    per_in, per_out = in_channels // groups, 4 // groups

    def channel(w, o):
        g, j = divmod(o, per_out)
        return w[g * per_in:(g + 1) * per_in, j].flatten().sort().values

    for o in range(4):
        assert torch.equal(channel(w0, o), channel(w1, o))
    assert not torch.equal(w0, w1)


def test_same_sign_filter_shuffle_moves_values_only_within_a_filter():
    # Magnitudes r + 1 .. r + 1.5 in row r, both signs in every row: a value that left its row
    # or its sign would show up in the per-row, per-sign multisets.
    lin = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        magnitudes = torch.arange(1, 5.0)[:, None] + torch.linspace(0, 0.5, 6)
        lin.weight.copy_(magnitudes * torch.tensor([1.0, -1, 1, 1, -1, 1]))
    w0 = lin.weight.detach().clone()
    analysis.perturb(lin, "shuffle_same_sign_filter", seed=1)
    w1 = lin.weight.detach().clone()
    for r0, r1 in zip(w0, w1):
        for side in (r0 > 0, r0 < 0):
            assert torch.equal(r0[side].sort().values, r1[side].sort().values)
    assert torch.equal(torch.sign(w1), torch.sign(w0)) and not torch.equal(w0, w1)
    with torch.no_grad():
        lin.weight.copy_(w0)
    analysis.perturb(lin, "shuffle_same_sign", seed=1)  # the layer-wise kind, for contrast
    layerwise = lin.weight.detach()
    assert any(not torch.equal(r0.sort().values, r2.sort().values) for r0, r2 in zip(w0, layerwise))
    assert not torch.equal(w1, layerwise)


def test_signs_and_magnitudes_from_init_or_rewind():
    for kind in ("init_signs", "init_magnitudes", "init", "rewind"):
        model, init = rewind_point()
        before = {k: raw(model, k) for k in KEYS}
        analysis.perturb(model, kind, init=init)
        for key in KEYS:
            w0, w1, wi, keep = before[key], raw(model, key), raw(init, key), kept_of(model, key)
            assert torch.equal(w1[~keep], w0[~keep])
            w0, w1, wi = w0[keep], w1[keep], wi[keep]
            sign_from, magnitude_from = {"init_signs": (wi, w0), "init_magnitudes": (w0, wi),
                                         "init": (wi, wi), "rewind": (w0, w0)}[kind]
            assert torch.equal(torch.signbit(w1), torch.signbit(sign_from))
            assert torch.equal(w1.abs(), magnitude_from.abs())


def test_init_as_a_mapping_and_pruned_init():
    model, init = rewind_point()
    mapping = {k: raw(init, k) for k in KEYS}
    a = analysis.perturb(model, "init_signs", init=mapping)
    b = analysis.perturb(rewind_point()[0], "init_signs", init=signmask.prune(tiny(0), 0.9))
    assert all(torch.equal(raw(a, k), raw(b, k)) for k in KEYS)


def test_noise_is_reproducible_and_scaled_by_the_init_std():
    torch.manual_seed(0)
    init = nn.Linear(100, 100)
    start = nn.Linear(100, 100)
    runs = []
    for seed in (0, 0, 1):
        model = nn.Linear(100, 100)
        model.load_state_dict(start.state_dict())
        analysis.perturb(model, "noise", init=init, seed=seed, sigma_n=2.0)
        runs.append(model.weight.detach() - start.weight.detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    scale = 2.0 * float(init.weight.detach().double().std())
    assert float(runs[0].double().std()) / scale == pytest.approx(1.0, abs=0.05)
    assert abs(float(runs[0].double().mean())) < 4 * scale / 100
    model = nn.Linear(100, 100)
    model.load_state_dict(start.state_dict())
    analysis.perturb(model, "noise", init=init, seed=0, sigma_n=0.0)
    assert torch.equal(model.weight, start.weight)


def test_noise_leaves_pruned_weights_at_zero():
    model, init = rewind_point()
    keep = kept_of(model, "conv2.weight")
    pruned_before = raw(model, "conv2.weight")[~keep]
    analysis.perturb(model, "noise", init=init, seed=0, sigma_n=1.0)
    assert torch.equal(raw(model, "conv2.weight")[~keep], pruned_before)
    assert (model.conv2.weight[~keep] == 0).all()


def test_perturb_validates_and_leaves_the_model_alone():
    model, init = rewind_point()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"valid: \['init', 'init_magnitudes'"):
        analysis.perturb(model, "flip")
    with pytest.raises(ValueError, match="seed="):
        analysis.perturb(model, "permute_layer")
    with pytest.raises(ValueError, match="init="):
        analysis.perturb(model, "init_signs")
    with pytest.raises(ValueError, match="sigma_n"):
        analysis.perturb(model, "noise", init=init, seed=0)
    with pytest.raises(ValueError, match="sigma_n"):
        analysis.perturb(model, "noise", init=init, seed=0, sigma_n=-1.0)
    with pytest.raises(ValueError, match=r"init has no tensor \['conv1\.weight'"):
        analysis.perturb(model, "init", init={})
    with pytest.raises(ValueError, match=r"init 'conv1\.weight' is \(2,\)"):
        analysis.perturb(model, "init", init={k: torch.zeros(2) for k in KEYS})
    with pytest.raises(TypeError, match=r"init 'conv1\.weight' must be a tensor of shape \(6, 3, 3, 3\), got ndarray"):
        analysis.perturb(model, "init", init={k: torch.zeros(2).numpy() for k in KEYS})
    with pytest.raises(ValueError, match="not conv/linear weights"):
        analysis.perturb(model, "init", init=init, names=["bn1.weight"])
    assert_same(before, snapshot(model))
    # arguments a kind does not use are ignored: one call pattern fits a loop over all kinds
    analysis.perturb(model, "init_signs", init=init, seed=None, sigma_n=-5.0)
    analysis.perturb(model, "permute_layer", init="unused", seed=0, sigma_n=-5.0)
    locked = signmask.prune(tiny(0), 0.5, signs="locked")
    with pytest.raises(ValueError, match="sign-locked"):
        analysis.perturb(locked, "permute_layer", seed=0)


@pytest.mark.parametrize("kind", ["init_signs", "permute_filter", "negate_in_place"])
@pytest.mark.parametrize("pruned", [True, False])
def test_perturb_failing_at_any_torch_call_leaves_the_model_untouched(kind, pruned):
    # An out-of-memory error at the k-th tensor left the tensors before it perturbed.
    # "negate_in_place" writes the copy it is given: the restore must not read that copy.
    @analysis.register_perturbation("negate_in_place")
    def _negate(layer):
        return layer.weight.neg_()

    init = tiny(5)
    try:
        assert_each_fault_leaves_it_untouched(
            lambda: (rewind_point(pruned)[0],), lambda m: analysis.perturb(m, kind, init=init, seed=0))
    finally:
        del analysis.PERTURBATIONS["negate_in_place"]


def test_perturb_refuses_two_weights_with_one_canonical_name_naming_the_model():
    clash = "in {}, module.fc.weight and fc.weight are different tensors with the same name"
    model, init = Wrapper(0), Wrapper(1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=clash.format("model")):
        analysis.perturb(model, "permute_layer", seed=0)
    target = tiny(0)
    before_target = snapshot(target)
    with pytest.raises(ValueError, match=clash.format("init")):
        analysis.perturb(target, "init", init=init, names=["fc.weight"])
    assert_same(before, snapshot(model))
    assert_same(before_target, snapshot(target))


def test_names_restrict_and_custom_kinds_register():
    model, _ = rewind_point(pruned=False)
    before = {k: raw(model, k) for k in KEYS}

    @analysis.register_perturbation("negate_test")
    def negate(layer):
        return -layer.weight

    try:
        analysis.perturb(model, "negate_test", names=["fc.weight"])
    finally:
        del analysis.PERTURBATIONS["negate_test"]
    assert torch.equal(raw(model, "fc.weight"), -before["fc.weight"])
    assert torch.equal(raw(model, "conv1.weight"), before["conv1.weight"])
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randn(2, 3, 4, 4)).sum()))


# ---------------------------------- analysis._perturb: behaviour pinned by mutation testing


def test_noise_of_tensor_i_is_drawn_from_seed_plus_7919_i_and_scaled_by_unbiased_std():
    # P02 (one seed for every tensor), P04 (biased std)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    init = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    before = [net[0].weight.detach().clone(), net[1].weight.detach().clone()]
    analysis.perturb(net, "noise", init=init, seed=5, sigma_n=0.5)
    for i, (w0, m) in enumerate(zip(before, (init[0], init[1]))):
        g = torch.Generator().manual_seed(5 + 7919 * i)
        draw = torch.randn(w0.shape, generator=g, dtype=torch.float64)
        sigma = m.weight.detach().double().std(unbiased=True)
        want = w0 + (0.5 * sigma * draw).float()
        torch.testing.assert_close(net[i].weight.detach(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("names", [["conv2.weight"], ["fc.weight", "conv2.weight"],
                                   ["conv2.weight", "conv1.weight"]])
def test_a_tensors_draw_does_not_depend_on_which_names_are_listed(names):
    # tensor i in model order draws from seed + 7919 * i, whichever subset and order names gives
    model, _ = rewind_point()
    full = analysis.perturb(copy.deepcopy(model), "permute_layer", seed=3)
    part = analysis.perturb(copy.deepcopy(model), "permute_layer", seed=3, names=names)
    for key in KEYS:
        assert torch.equal(raw(part, key), raw(full if key in names else model, key)), key


def test_noise_of_a_listed_tensor_is_drawn_from_its_seed_in_model_order():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    init = copy.deepcopy(net)
    before = [net[0].weight.detach().clone(), net[1].weight.detach().clone()]
    analysis.perturb(net, "noise", init=init, seed=5, sigma_n=0.5, names=["1.weight"])
    draw = torch.randn((3, 3), generator=torch.Generator().manual_seed(5 + 7919 * 1), dtype=torch.float64)
    sigma = float(init[1].weight.detach().double().std())
    assert torch.equal(net[1].weight.detach(), before[1] + (0.5 * sigma * draw).float())
    assert torch.equal(net[0].weight.detach(), before[0])


def test_shuffle_same_sign_keeps_kept_zeros_in_place():
    # P07: exact zeros are neither positive nor negative: they stay where they are
    for seed in range(5):
        lin = nn.Linear(6, 2)
        values = torch.tensor([[0.0, -1, -2, -3, -4, 0], [1, 2, -5, 0, -6, -7]])
        with torch.no_grad():
            lin.weight.copy_(values)
        analysis.perturb(lin, "shuffle_same_sign", seed=seed)
        w = lin.weight.detach()
        assert torch.equal(w == 0, values == 0) and torch.equal(w > 0, values > 0)
        assert sorted(w.flatten().tolist()) == sorted(values.flatten().tolist())


@pytest.fixture
def _custom_kind():
    yield "custom_kind"
    analysis.PERTURBATIONS.pop("custom_kind", None)


def test_registering_no_callable_is_refused_and_keeps_the_kind_it_would_replace():
    builtin = analysis.PERTURBATIONS["noise"]
    try:
        with pytest.raises(TypeError, match=r"register_perturbation\('noise'\) must decorate a callable fn\(layer\) -> Tensor, got NoneType"):
            analysis.register_perturbation("noise", needs_init=True, random=True, needs_sigma=True)(None)
        assert analysis.PERTURBATIONS["noise"] is builtin
    finally:  # a failure here must not break the other tests' noise
        analysis.PERTURBATIONS["noise"] = builtin


def test_a_custom_kind_returning_a_broadcastable_wrong_shape_is_refused(_custom_kind):
    # P09
    analysis.register_perturbation(_custom_kind)(lambda layer: torch.zeros(1))
    lin = nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"returned Tensor \(1,\) for weight, expected \(2, 3\)"):
        analysis.perturb(lin, _custom_kind)
    assert torch.equal(lin.weight, before)


def test_a_custom_kind_modifying_its_input_in_place_leaves_the_model_alone_on_error(_custom_kind):
    # P10: layer.weight is a copy, so a failure found after fn ran leaves the model untouched
    def fn(layer):
        out = layer.weight.mul_(2)
        return out if layer.name == "0.weight" else out[:1]  # the second tensor: a bad shape

    analysis.register_perturbation(_custom_kind)(fn)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    before = snapshot(net)
    with pytest.raises(ValueError, match="returned Tensor"):
        analysis.perturb(net, _custom_kind)
    assert_same(before, snapshot(net))


def test_a_custom_kind_may_modify_its_input_in_place(_custom_kind):
    # found while checking P10 (fails on the original code): pruned entries of weight_orig
    # must stay as they were even when fn modifies layer.weight ("a copy, free to modify")
    analysis.register_perturbation(_custom_kind)(lambda layer: layer.weight.mul_(2))
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    keep = torch.rand(3, 4) > 0.5
    torch_prune.custom_from_mask(lin, "weight", keep)
    orig = lin.weight_orig.detach().clone()
    analysis.perturb(lin, _custom_kind)
    assert torch.equal(lin.weight_orig.detach(), torch.where(keep, 2 * orig, orig))


# ---------------------------------- analysis._telemetry: behaviour pinned by mutation testing


def test_finish_counts_only_entries_the_final_mask_keeps():
    # T02: a dense record compared with a pruned final model: pruned entries do not count
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    rec = analysis.Telemetry(lin)
    with torch.no_grad():
        lin.weight.add_(0.3)
    rec.record(1)
    w1 = lin.weight.detach().double().clone()
    final = copy.deepcopy(lin)
    keep = torch.rand(3, 4) > 0.5
    torch_prune.custom_from_mask(final, "weight", keep)
    with torch.no_grad():
        final.weight_orig.add_(0.2)
    (r,) = rec.finish(final)
    fw = (final.weight_orig.detach() * keep).double()
    assert r.total.dist_final == pytest.approx(float((w1 - fw)[keep].norm()), rel=1e-12)
    cos = float((w1[keep] @ fw[keep]) / (w1[keep].norm() * fw[keep].norm()))
    assert r.total.cos_final == pytest.approx(cos, rel=1e-12)


def test_a_fully_pruned_layer_has_no_sign_change_fraction():
    # T04: no counted weight -> NaN, not 0.0
    lin = nn.Linear(3, 2)
    torch_prune.custom_from_mask(lin, "weight", torch.zeros(2, 3, dtype=torch.bool))
    rec = analysis.Telemetry(lin)
    rec.record(0)
    assert np.isnan(rec.records[0].total.sign_changed)


def test_stats_validates_the_sign_change_fraction():
    # T07
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="sign_changed must be in"):
            analysis.Stats(bad, 0.0, 1.0)


def test_noise_is_scaled_by_the_init_std_not_the_current_weights():
    # weights at k ten times init: a sigma taken from them would be ten times too large
    torch.manual_seed(0)
    init = nn.Linear(6, 5)
    model = nn.Linear(6, 5)
    with torch.no_grad():
        model.weight.copy_(10 * init.weight)
    start = model.weight.detach().clone()
    analysis.perturb(model, "noise", init=init, seed=3, sigma_n=1.0)
    draw = torch.randn(start.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = float(init.weight.detach().double().std(unbiased=True))
    torch.testing.assert_close(model.weight.detach() - start, (sigma * draw).float(), rtol=0, atol=1e-6)


def test_cosine_to_init_is_nan_once_a_tensor_is_all_zero():
    lin = nn.Linear(3, 2, bias=False)
    rec = analysis.Telemetry(lin)
    norm = float(lin.weight.detach().double().norm())
    with torch.no_grad():
        lin.weight.zero_()
    rec.record(1)
    stats = rec.records[0].total
    assert math.isnan(stats.cos_init) and stats.sign_changed == 1.0
    assert stats.dist_init == pytest.approx(norm, rel=1e-12)


def test_cosine_of_a_scaled_copy_is_clamped_to_1():
    # seed 17: 3 * w gives x.y / sqrt(x.x * y.y) = 1.0000000000000002 in float64
    lin = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, 5, generator=torch.Generator().manual_seed(17)))
    rec = analysis.Telemetry(lin)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    rec.record(1)
    assert rec.records[0].total.cos_init == 1.0


def test_finish_counts_only_entries_both_masks_keep():
    torch.manual_seed(0)
    keep, fkeep = torch.rand(3, 4) > 0.4, torch.rand(3, 4) > 0.4
    lin = nn.Linear(4, 3)
    torch_prune.custom_from_mask(lin, "weight", keep)
    rec = analysis.Telemetry(lin)
    with torch.no_grad():
        lin.weight_orig.add_(0.3)
    rec.record(1)
    w1 = (lin.weight_orig.detach() * keep).double()
    final = nn.Linear(4, 3)
    torch_prune.custom_from_mask(final, "weight", fkeep)
    fw = (final.weight_orig.detach() * fkeep).double()
    both = keep & fkeep
    assert 0 < int(both.sum()) < min(int(keep.sum()), int(fkeep.sum()))
    (r,) = rec.finish(final)
    assert r.total.dist_final == pytest.approx(float((w1 - fw)[both].norm()), rel=1e-12)


def test_finish_refuses_a_final_model_of_other_shapes():
    rec = analysis.Telemetry(nn.Linear(4, 3))
    rec.record(0)
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 5\) in final, \(3, 4\) when tracked"):
        rec.finish(nn.Linear(5, 3))


def test_finish_with_another_architecture_says_final_lacks_the_tracked_tensors():
    # No names= was given: the error is about final's tensors, not about the user's names.
    rec = analysis.Telemetry(tiny(0))
    rec.record(0)
    before = rec.records
    final = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Linear(6, 6), nn.Linear(6, 2))
    lacks = ("final (Sequential) lacks 3 of the 3 conv/linear weights this Telemetry tracks, "
             f"{list(KEYS)}; final has ['0.weight', '1.weight', '2.weight'] ...: "
             "finish() compares with a model of the tracked one's architecture")
    with pytest.raises(ValueError, match=f"^{re.escape(lacks)}$"):
        rec.finish(final)
    assert rec.records == before
    assert rec.finish(tiny(1))[0].total.dist_final > 0  # the tracked architecture still finishes


@pytest.mark.parametrize("field, value", [("cos_init", 1.5), ("cos_init", -1.5), ("cos_final", 1.5), ("dist_final", -0.1)])
def test_stats_validates_every_cosine_and_distance(field, value):
    kwargs = {"sign_changed": 0.0, "dist_init": 0.0, "cos_init": 1.0, "dist_final": 0.0, "cos_final": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        analysis.Stats(**kwargs)


def test_keep_snapshots_false_keeps_no_copy_of_the_weights():
    rec = analysis.Telemetry(tiny(0), keep_snapshots=False)
    for step in range(3):
        rec.record(step)
    assert len(rec.records) == 3 and rec._snapshots == []  # the memory keep_snapshots=False saves


def test_records_are_a_snapshot_not_a_live_view():
    rec = analysis.Telemetry(tiny(0))
    rec.record(0)
    records = rec.records
    rec.record(1)
    assert len(records) == 1 and rec.steps == (0, 1)


def test_telemetry_tracks_names_in_the_order_given():
    rec = analysis.Telemetry(tiny(0), names=["fc.weight", "conv1.weight"])
    rec.record(0)
    assert list(rec.records[0].layers) == ["fc.weight", "conv1.weight"]


@pytest.mark.parametrize("empty", [[], (), iter(())], ids=["list", "tuple", "iterator"])
def test_telemetry_refuses_an_empty_list_of_names(empty):
    # tracking nothing would record NaN totals without a word
    with pytest.raises(ValueError, match="names must name at least one tensor, got none$"):
        analysis.Telemetry(tiny(0), names=empty)


def test_noise_on_a_one_element_tensor_adds_nothing():
    # one init value has no unbiased std: its sigma is 0, not NaN
    torch.manual_seed(0)
    model, init = nn.Linear(1, 1), nn.Linear(1, 1)
    before = model.weight.detach().clone()
    analysis.perturb(model, "noise", init=init, seed=0, sigma_n=1.0)
    assert torch.equal(model.weight.detach(), before)


def test_noise_reads_a_pruned_inits_orig_values():
    # the init std is over the raw init values, not over the masked weight's zeros
    init = signmask.prune(tiny(0), 0.5)
    mapping = {k: raw(init, k) for k in KEYS}
    a = analysis.perturb(rewind_point()[0], "noise", init=init, seed=0, sigma_n=1.0)
    b = analysis.perturb(rewind_point()[0], "noise", init=mapping, seed=0, sigma_n=1.0)
    assert all(torch.equal(raw(a, k), raw(b, k)) for k in KEYS)


def test_shuffle_same_sign_moves_negative_weights_among_negative_positions():
    # both signs are shuffled, each among its own positions
    torch.manual_seed(0)
    model = nn.Linear(20, 10)
    before = model.weight.detach().clone()
    analysis.perturb(model, "shuffle_same_sign", seed=0)
    after = model.weight.detach()
    for side in (before > 0, before < 0):
        assert torch.equal(after[side].sort().values, before[side].sort().values)
        assert not torch.equal(after[side], before[side])  # 100 values: never the identity


def test_noise_on_a_transferred_ticket_is_scaled_by_its_kept_init_values():
    # transfer() writes 0 into the pruned entries of the new init: their std shrank sigma by
    # ~sqrt(density) (3.1x at 90% sparsity). A rewound IMP init, dense-valued, keeps all of them.
    torch.manual_seed(0)
    ticket = signmask.extract(signmask.prune(nn.Linear(40, 30), 0.9))
    init = signmask.transfer(ticket, nn.Linear(40, 30))
    net = copy.deepcopy(init)
    before = net.weight_orig.detach().clone()
    analysis.perturb(net, "noise", init=init, seed=2, sigma_n=1.0)
    kept = init.weight_mask
    draw = torch.randn(30, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = init.weight_orig.detach()[kept].double().std()
    want = before + (sigma * draw).float()
    torch.testing.assert_close(net.weight_orig.detach()[kept], want[kept], rtol=0, atol=1e-7)
    dense_valued = copy.deepcopy(init)
    with torch.no_grad():  # an IMP rewind point: every entry holds an init value
        dense_valued.weight_orig[~kept] = torch.randn(int((~kept).sum()))
    again = copy.deepcopy(init)
    analysis.perturb(again, "noise", init=dense_valued, seed=2, sigma_n=1.0)
    sigma_all = dense_valued.weight_orig.detach().double().std()
    torch.testing.assert_close(again.weight_orig.detach()[kept], (before + (sigma_all * draw).float())[kept],
                               rtol=0, atol=1e-7)


def test_a_custom_kind_writing_to_its_keep_mask_leaves_the_models_mask_alone(_custom_kind):
    # current_mask hands out a bool mask buffer itself (no copy); perturb passes a copy on
    def fn(layer):
        layer.keep.fill_(False)
        return layer.weight

    analysis.register_perturbation(_custom_kind)(fn)
    torch.manual_seed(0)
    net = signmask.prune(nn.Linear(4, 3), 0.5)
    mask = net.weight_mask.clone()
    analysis.perturb(net, _custom_kind)
    assert torch.equal(net.weight_mask, mask)
