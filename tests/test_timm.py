"""signmask on real timm models: selection, exact pruning counts, ticket round trips, refusals.

Every family runs with ``pretrained=False`` and a tiny configuration on 32x32 inputs. The
expectations are computed in this file from ``named_modules()`` / ``named_parameters()`` and
from hand-written facts about each family (its stem, its classifier head(s)), never from
signmask itself.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import signmask
from signmask import _reparam, _targets
from signmask._compat import import_timm

from _util import since_timm

timm = import_timm()

# The layer types whose ``.weight`` signmask must select, spelled out independently.
CONV_LINEAR = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# Parameters that are never conv/linear weights in these models.
NEVER_SELECTED = (
    "bias",
    "cls_token",
    "dist_token",
    "pos_embed",
    "relative_position_bias_table",
    "attention_biases",
    "gain",
    "gamma",
)


@dataclass(frozen=True)
class Family:
    name: str
    kwargs: dict
    stem: str  # the first conv / patch embedding, which must be selected
    heads: tuple[str, ...]  # classifier modules, removed by classifier=False
    depthwise: bool = False  # has depthwise convolutions (groups == in_channels)
    grouped: bool = False  # has other grouped convolutions
    norms: bool = True  # has normalization layers
    extra_params: tuple[str, ...] = field(default=())  # non-weight params it must own
    since: str = "1.0.8"  # the timm release that added the model (pyproject's floor: 1.0.8)


FAMILIES = [
    # Standard resnet18 (projection shortcuts included) at a quarter of the width.
    Family("resnet18", dict(channels=(16, 32, 64, 128)), "conv1", ("fc",)),
    Family(
        "convnext_atto",
        dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
        "stem.0",
        ("head.fc",),
        depthwise=True,
        extra_params=("gamma",),
    ),
    Family(
        "mobilenetv3_small_050", {}, "conv_stem", ("classifier",), depthwise=True
    ),
    Family(
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
        "patch_embed.proj",
        ("head",),
        extra_params=("pos_embed", "cls_token"),
    ),
    Family(
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
        "patch_embed.proj",
        ("head", "head_dist"),
        extra_params=("pos_embed", "cls_token", "dist_token"),
    ),
    # timm fixes mixer_s16's width and depth; img_size=32 leaves 4 tokens.
    Family("mixer_s16_224", dict(img_size=32), "stem.proj", ("head",)),
    Family("regnetx_002", {}, "stem.conv", ("head.fc",), grouped=True),
    Family(
        "swin_tiny_patch4_window7_224",
        dict(
            img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)
        ),
        "patch_embed.proj",
        ("head.fc",),
        extra_params=("relative_position_bias_table",),
    ),
    # MaxViT: MBConv with depthwise convs, window + grid attention with relative position bias.
    Family(
        "test_maxvit",
        dict(img_size=32),
        "stem.conv1",
        ("head.fc",),
        depthwise=True,
        extra_params=("relative_position_bias_table",),
        since="1.0.31",
    ),
    # NFNet: weight-standardized ScaledStdConv2d (an nn.Conv2d subclass with a `gain`), no norms.
    Family(
        "test_nfnet", {}, "stem.conv1", ("head.fc",), grouped=True, norms=False,
        extra_params=("gain",), since="1.0.10",
    ),
    # LeViT: conv/linear + BatchNorm wrappers, attention biases, two heads like distilled DeiT.
    Family(
        "levit_128s",
        dict(img_size=32, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 2, 2), key_dim=8),
        "stem.conv1.linear",
        ("head.linear", "head_dist.linear"),
        extra_params=("attention_biases",),
    ),
]
# Each family, skipped on a timm older than its model.
PARAMS = [pytest.param(f, id=f.name, marks=since_timm(f.since, f.name)) for f in FAMILIES]
NUM_CLASSES = 7


def create(family: Family, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        family.name, pretrained=False, num_classes=NUM_CLASSES, **family.kwargs
    )
    return model.eval()


def expected_selection(model: nn.Module) -> set[str]:
    """Every conv/linear ``.weight``, computed from named_modules()."""
    return {
        f"{fqn}.weight"
        for fqn, module in model.named_modules()
        if isinstance(module, CONV_LINEAR) and isinstance(module.weight, nn.Parameter)
    }


def weights_of(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """The trainable tensor behind each selected ``<module>.weight`` (``weight_orig`` if pruned)."""
    out = {}
    for key in names:
        module = model.get_submodule(key[: -len(".weight")])
        out[key] = module.weight_orig if hasattr(module, "weight_orig") else module.weight
    return out


def masks_of(model: nn.Module, names) -> dict[str, torch.Tensor]:
    return {k: model.get_submodule(k[: -len(".weight")]).weight_mask for k in names}


def forward_ok(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, NUM_CLASSES)
    assert torch.isfinite(y).all()
    return y


def pruning_hooks(model: nn.Module) -> list[str]:
    found = []
    for fqn, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                found.append(fqn)
        for hook in module._forward_hooks.values():
            if isinstance(hook, _reparam.DetachWeight):
                found.append(fqn)
    return found


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k


# ----------------------------------------------------------------------------------------------
# selection


@pytest.mark.parametrize("family", PARAMS)
def test_default_selection_is_every_conv_and_linear_weight(family):
    model = create(family, 0)
    expected = expected_selection(model)
    selected = _targets.select(model)
    assert set(selected) == expected
    # Each entry points at the right module and tensor.
    for key, (module, tensor) in selected.items():
        assert tensor == "weight"
        assert module is model.get_submodule(key[: -len(".weight")])

    # Family facts written by hand: the stem / patch embedding is selected, heads too.
    assert f"{family.stem}.weight" in selected
    assert {f"{h}.weight" for h in family.heads} <= set(selected)
    grouped = [k for k, (m, _) in selected.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    depthwise = [
        k for k, (m, _) in selected.items()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    # Grouped and depthwise convs are ordinary conv weights: selected like the others.
    assert bool(depthwise) == family.depthwise
    assert bool(set(grouped) - set(depthwise)) == family.grouped

    # Nothing else is ever selected: biases, norm params, embeddings, tokens, position tables.
    params = dict(model.named_parameters())
    for name in family.extra_params:
        assert any(p.rpartition(".")[2] == name for p in params), name
    norm_params = {
        f"{fqn}.{p}"
        for fqn, m in model.named_modules()
        if isinstance(m, NORM_TYPES)
        for p, _ in m.named_parameters(recurse=False)
    }
    if family.norms:
        assert norm_params
    assert not norm_params & set(selected)
    for key in selected:
        assert key.rpartition(".")[2] == "weight"
        assert params[key].dim() >= 2
    for p in params:
        if p.rpartition(".")[2] in NEVER_SELECTED:
            assert p not in selected
    assert len(selected) < len(params)


@pytest.mark.parametrize("family", PARAMS)
def test_classifier_false_drops_exactly_the_heads(family):
    model = create(family, 0)
    heads = {f"{h}.weight" for h in family.heads}
    # timm declares the same head(s) in its pretrained config.
    declared = model.pretrained_cfg["classifier"]
    declared = {declared} if isinstance(declared, str) else set(declared)
    assert {f"{d}.weight" for d in declared} == heads
    without = set(_targets.select(model, classifier=False))
    assert without == expected_selection(model) - heads
    assert len(heads) == len(family.heads)

    # prune(classifier=False) leaves the heads dense and prunes everything else.
    signmask.prune(model, 0.5, classifier=False)
    assert set(_targets.pruned(model)) == without
    for h in family.heads:
        module = model.get_submodule(h)
        assert isinstance(module.weight, nn.Parameter)
        assert not hasattr(module, "weight_mask")
    forward_ok(model)


# ----------------------------------------------------------------------------------------------
# pruning counts


def check_magnitude_order(weights, masks) -> None:
    """Global magnitude: every kept |w| >= every pruned |w| (an independent check of ranking)."""
    kept_min = min(w.detach().abs()[m].min() for w, m in zip(weights, masks) if m.any())
    pruned = [w.detach().abs()[~m] for w, m in zip(weights, masks) if (~m).any()]
    pruned_max = max(p.max() for p in pruned)
    assert pruned_max <= kept_min


@pytest.mark.parametrize("family", PARAMS)
def test_prune_twice_leaves_exact_counts(family):
    model = create(family, 0)
    names = sorted(expected_selection(model))
    before = {k: w.detach().clone() for k, w in weights_of(model, names).items()}
    n_total = sum(w.numel() for w in before.values())

    assert signmask.prune(model, 0.8) is model
    assert set(_targets.pruned(model)) == set(names)
    masks = masks_of(model, names)
    for k, m in masks.items():
        assert m.dtype == torch.bool and m.shape == before[k].shape
    rem = sum(int(m.sum()) for m in masks.values())
    assert rem == n_total - round(0.8 * n_total)
    # Weights themselves are untouched (the Parameter now lives in weight_orig).
    for k, w in weights_of(model, names).items():
        assert torch.equal(w, before[k])
    check_magnitude_order([before[k] for k in names], [masks[k] for k in names])
    forward_ok(model)

    first = {k: m.clone() for k, m in masks.items()}
    signmask.prune(model, 0.5)
    masks = masks_of(model, names)
    rem2 = sum(int(m.sum()) for m in masks.values())
    assert rem2 == rem - round(0.5 * rem)
    for k in names:  # the second round only removes weights
        assert not (masks[k] & ~first[k]).any()
    check_magnitude_order([before[k] for k in names], [masks[k] for k in names])
    # The effective weights (recomputed by the forward) are exactly the masked originals.
    forward_ok(model)
    for k in names:
        module = model.get_submodule(k[: -len(".weight")])
        assert torch.equal(module.weight, before[k] * masks[k])
    # Non-selected parameters are still plain parameters.
    for name, _ in model.named_parameters():
        assert not name.endswith("_orig") or name[: -len("_orig")] in names


# ----------------------------------------------------------------------------------------------
# ticket round trip onto a new init


def perturb_everything_but(model: nn.Module, keep: set[str], seed: int) -> None:
    """Give every float tensor outside ``keep`` new random values (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in keep or name.endswith(("_orig", "_mask", "_sign")) or not t.is_floating_point():
                continue
            # Positive values keep running variances valid; biases get random signs below.
            t.copy_(torch.rand(t.shape, generator=gen) + 0.25)
            if name.endswith("bias"):
                t.mul_(torch.where(torch.rand(t.shape, generator=gen) < 0.5, -1.0, 1.0))


@pytest.mark.parametrize("family", PARAMS)
def test_ticket_round_trip_onto_new_init(family, tmp_path):
    source = create(family, 0)
    heads = {f"{h}.weight" for h in family.heads}
    pruned_names = sorted(expected_selection(source) - heads)
    signmask.prune(source, 0.8, classifier=False)
    signmask.prune(source, 0.5, classifier=False)
    perturb_everything_but(source, set(), seed=1)  # norms, biases, tokens... all "trained"
    source_state = snapshot(source)

    ticket = signmask.extract(source, biases=True, dense=True)
    assert sorted(ticket.masks) == pruned_names
    path = signmask.save(ticket, tmp_path / f"{family.name}.safetensors")
    loaded = signmask.load(path)
    assert loaded == ticket
    assert loaded.metadata["architecture"] == family.name
    # Signed masks are sign(theta * M) of the source, computed here from its tensors.
    src = source.state_dict()
    for k in pruned_names:
        stem = k[: -len("weight")]
        expected = torch.sign(src[stem + "weight_orig"]) * src[stem + "weight_mask"]
        assert torch.equal(loaded.masks[k], expected.to(torch.int8)), k
    dense_names = {k for k in loaded.signs if not k.endswith(".bias")}
    assert dense_names == heads
    bias_names = {k for k in loaded.signs if k.endswith(".bias")}
    assert bias_names == {  # of every layer the ticket holds, the dense head's too (AWS code)
        k[: -len("weight")] + "bias"
        for k in pruned_names + sorted(heads)
        if source.get_submodule(k[: -len(".weight")]).bias is not None
    }

    fresh = create(family, 1)
    fresh_state = snapshot(fresh)
    # A different seed really gives other weights (else the checks below prove little).
    assert not torch.equal(fresh_state[pruned_names[0]], src[pruned_names[0][:-6] + "weight_orig"])

    assert signmask.transfer(path, fresh) is fresh
    new = fresh.state_dict()
    assert set(_targets.pruned(fresh)) == set(pruned_names)
    for k in pruned_names:
        stem = k[: -len("weight")]
        module = fresh.get_submodule(k[: -len(".weight")])
        s = loaded.masks[k].to(torch.float32)
        target = fresh_state[k].abs() * s
        assert torch.equal(new[stem + "weight_orig"], target), k
        assert torch.equal(new[stem + "weight_mask"], loaded.masks[k] != 0), k
        assert new[stem + "weight_mask"].dtype == torch.bool
        assert stem + "weight_sign" not in new  # signs="init": not locked
        kept = s != 0
        assert torch.equal(module.weight[~kept], torch.zeros(int((~kept).sum())))
        assert torch.equal(module.weight[kept], fresh_state[k][kept].abs() * s[kept])
    for k in heads:  # dense classifier: |fresh| * sign(source), not pruned
        assert torch.equal(new[k], fresh_state[k].abs() * loaded.signs[k].to(torch.float32))
    for k in bias_names:
        assert torch.equal(new[k], fresh_state[k].abs() * loaded.signs[k].to(torch.float32))

    # Norm layers are bit-identical to the fresh init (and differ from the "trained" source).
    norm_keys = [
        f"{fqn}.{t}"
        for fqn, m in fresh.named_modules()
        if isinstance(m, NORM_TYPES)
        for t, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    ]
    if family.norms:
        assert norm_keys
    for k in norm_keys:
        assert new[k].dtype == fresh_state[k].dtype
        assert torch.equal(new[k], fresh_state[k]), k
        if new[k].is_floating_point():
            assert not torch.equal(new[k], source_state[k]), k
    # So is everything else the ticket does not name: tokens, position tables, other biases.
    named = set(pruned_names) | set(loaded.signs)
    for k, v in fresh_state.items():
        if k not in named:
            assert torch.equal(new[k], v), k

    again = signmask.extract(fresh)
    assert again.masks.keys() == ticket.masks.keys()
    for k in ticket.masks:
        assert torch.equal(again.masks[k], ticket.masks[k]), k
    forward_ok(fresh)


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.name in ("resnet18", "swin_tiny_patch4_window7_224")],
    ids=lambda f: f.name,
)
def test_transfer_locked_signs_survive_training(family):
    source = create(family, 0)
    signmask.prune(source, 0.7)
    ticket = signmask.extract(source)
    fresh = create(family, 2)
    signmask.transfer(ticket, fresh, signs="locked")
    for k in ticket.masks:
        module = fresh.get_submodule(k[: -len(".weight")])
        n = module.weight_mask.numel()
        assert module.weight_sign.dtype == torch.uint8 and module.weight_sign.numel() == math.ceil(n / 8)
    fresh.train()
    opt = torch.optim.SGD(fresh.parameters(), lr=5.0)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        fresh(x).square().mean().backward()
        opt.step()
    fresh.eval()
    forward_ok(fresh)
    for k, signed in ticket.masks.items():
        module = fresh.get_submodule(k[: -len(".weight")])
        kept = signed != 0
        # The forward weight: negative exactly where the ticket says -1.
        assert torch.equal(torch.signbit(module.weight[kept]), signed[kept] < 0), k
        assert torch.equal(module.weight[~kept], torch.zeros(int((~kept).sum()))), k
    assert signmask.extract(fresh).masks.keys() == ticket.masks.keys()
    for k in ticket.masks:
        assert torch.equal(signmask.extract(fresh).masks[k], ticket.masks[k])


# ----------------------------------------------------------------------------------------------
# refusals leave the target untouched


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], params_before) -> None:
    assert_same_state(before, model)
    assert pruning_hooks(model) == []
    assert dict(model.named_parameters()).keys() == params_before.keys()
    for k, p in model.named_parameters():
        assert p is params_before[k]
    assert not any(k.endswith(("_orig", "_mask", "_sign")) for k in model.state_dict())


def test_resnet_ticket_onto_vit_is_refused(tmp_path):
    resnet = create(family("resnet18"), 0)
    signmask.prune(resnet, 0.5)
    ticket = signmask.extract(resnet)
    path = signmask.save(ticket, tmp_path / "resnet.safetensors")

    vit = create(family("vit_tiny_patch16_224"), 1)
    before, params = snapshot(vit), dict(vit.named_parameters())
    y0 = forward_ok(vit)
    for t in (ticket, path):
        with pytest.raises(ValueError, match="architecture") as info:
            signmask.transfer(t, vit)
        assert "resnet18" in str(info.value) and "vit_tiny_patch16_224" in str(info.value)
        assert_untouched(vit, before, params)
    # Without the architecture check the tensor names still do not match.
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        signmask.transfer(ticket, vit, check_architecture=False)
    assert_untouched(vit, before, params)
    assert torch.equal(forward_ok(vit), y0)


def test_partly_matching_ticket_is_refused_atomically():
    """A deeper ViT's ticket matches the shallower ViT's first blocks, then misses one: refused
    by the missing tensors; the shallower one's ticket on the deeper ViT, by the recorded depth."""
    deep = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
        img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3,
    )
    signmask.prune(deep, 0.5)
    ticket = signmask.extract(deep)
    assert ticket.metadata["architecture"] == "vit_tiny_patch16_224"
    shallow = create(family("vit_tiny_patch16_224"), 1)  # depth=2
    before, params = snapshot(shallow), dict(shallow.named_parameters())
    with pytest.raises(ValueError, match=r"blocks\.2\."):
        signmask.transfer(ticket, shallow)
    assert_untouched(shallow, before, params)
    # The other way round every ticket tensor exists and fits: it works.
    shallow_ticket = signmask.extract(signmask.prune(copy.deepcopy(shallow), 0.5))
    deep_before = snapshot(deep)
    with pytest.raises(ValueError, match="already pruned"):
        signmask.transfer(shallow_ticket, deep, check_architecture=False)  # pruned: refused
    assert_same_state(deep_before, deep)
    fresh_deep = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
        img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3,
    )
    with pytest.raises(ValueError, match="with 10 conv/linear layers, the model has 13 outside"):
        signmask.transfer(shallow_ticket, fresh_deep)  # the depth recorded beside the name
    signmask.transfer(shallow_ticket, fresh_deep, check_architecture=False)
    assert set(_targets.pruned(fresh_deep)) == set(shallow_ticket.masks)
    assert not any(k.startswith("blocks.2.") for k in _targets.pruned(fresh_deep))


@pytest.mark.parametrize("family", PARAMS)
def test_a_removed_model_ships_as_a_plain_timm_checkpoint(family, tmp_path):
    # The deployment path: remove, then load the state dict (or a safetensors file of the model)
    # into the plain timm model, which must compute the pruned model's outputs bitwise.
    import safetensors.torch

    model = signmask.prune(create(family, 0), 0.7, signs="locked")
    expected = forward_ok(model)
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    signmask.remove(model)
    plain = create(family, 1)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    assert torch.equal(forward_ok(plain), expected)
    state = plain.state_dict()
    for key, mask in masks.items():
        assert not state[key[: -len("_mask")]][~mask].any(), key
    safetensors.torch.save_model(model, str(tmp_path / "model.safetensors"))
    loaded = create(family, 2)
    safetensors.torch.load_model(loaded, str(tmp_path / "model.safetensors"))
    assert torch.equal(forward_ok(loaded), expected)
