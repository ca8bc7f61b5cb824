"""signmask.analysis reads stock prune masks through one check: a non-binary one is refused alike."""

import re

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import signmask
from signmask import analysis
from _util import assert_same, snapshot

# custom_from_mask takes any values: the forward uses 0.5 (scaled) and -1 (negated) entries,
# which a mask read as `mask == 1` took for pruned.
ODD = torch.tensor([[1.0, 0.5, 0.0], [-1.0, 1.0, 0.0]])


def net(mask=None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    torch_prune.custom_from_mask(model[0], "weight", torch.ones(2, 3) if mask is None else mask)
    return model


def refused(owner=None):
    where = f" of {owner}" if owner else ""
    return re.escape(f"0.weight{where}: its prune mask is not binary (0/1 expected, found values [-1.0, 0.5]); "
                     "signmask.analysis reads a mask's 1s as kept and all else as pruned")


def test_count_params_refuses_a_non_binary_stock_mask():
    model = net(ODD)
    assert int((model[0].weight != 0).sum()) == 4  # what the forward uses; `== 1` counted 2
    with pytest.raises(ValueError, match=refused()):
        analysis.count_params(model)
    assert analysis.count_params(net(ODD != 0)) == 4 + 2  # the binary mask of the same support


@pytest.mark.parametrize("kind", ["permute_layer", "noise", "init"])
def test_perturb_refuses_a_non_binary_stock_mask_untouched(kind):
    model = net(ODD)
    before = snapshot(model)
    with pytest.raises(ValueError, match=refused()):
        analysis.perturb(model, kind, init=net(), seed=0, sigma_n=1.0)
    assert_same(before, snapshot(model))


def test_telemetry_refuses_a_non_binary_stock_mask_at_each_read():
    with pytest.raises(ValueError, match=refused()):
        analysis.Telemetry(net(ODD))
    model = net()
    rec = analysis.Telemetry(model)
    with torch.no_grad():
        model[0].weight_mask.copy_(ODD)  # given since
    with pytest.raises(ValueError, match=refused()):
        rec.record(1)
    assert rec.records == ()
    rec = analysis.Telemetry(net())
    rec.record(0)
    with pytest.raises(ValueError, match=refused("final")):
        rec.finish(net(ODD))


@pytest.mark.parametrize("odd", ["model_a", "model_b"])
def test_interpolation_refuses_a_non_binary_stock_mask_untouched(odd):
    # The same support as a binary mask: compared as keeps, the masks passed as equal, and
    # the path kept model_a's mask, so alpha=1 was not model_b's network.
    binary = (ODD != 0).float()
    a, b = (net(binary), net(ODD)) if odd == "model_b" else (net(ODD), net(binary))
    before = snapshot(a), snapshot(b)
    with pytest.raises(ValueError, match=refused(odd)):
        analysis.interpolate(a, b, 1.0)
    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match=refused(odd)):
        analysis.barrier(a, b, loader, points=3)
    assert_same(before[0], snapshot(a))
    assert_same(before[1], snapshot(b))


def test_instability_refuses_a_non_binary_stock_mask_before_training():
    trained = []
    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match=refused("model")):
        analysis.instability(net(ODD), lambda m, seed: trained.append(seed), loader, points=3)
    assert trained == []


def test_the_refusal_is_extracts():
    # One check, one message: the analysis names the same values and remedies extract() does.
    model = net(ODD)
    with pytest.raises(ValueError) as from_extract:
        signmask.extract(model)
    with pytest.raises(ValueError) as from_analysis:
        analysis.count_params(model)
    tail = "so its kept weights would differ from those the forward uses: make that pruning permanent first"
    assert tail in str(from_extract.value) and tail in str(from_analysis.value)
