"""Tied weights: one Parameter in two modules, or two Parameters (or a buffer) on one memory."""

import copy
import re

import pytest
import torch
from torch import nn

import signmask
from _util import assert_same, snapshot

ON_MEMORY = "are different tensors on the same memory"


class TiedAE(nn.Module):
    """An autoencoder whose decoder is the encoder's transpose: a different Parameter, one storage."""

    def __init__(self):
        super().__init__()
        self.enc, self.mix, self.dec = (nn.Linear(6, 4, bias=False), nn.Linear(4, 4),
                                        nn.Linear(4, 6, bias=False))
        self.dec.weight = nn.Parameter(self.enc.weight.detach().t())

    def forward(self, x):
        return self.dec(self.mix(self.enc(x)))


def ae() -> TiedAE:
    torch.manual_seed(0)
    return TiedAE()


def test_weights_tied_through_a_transposed_view_are_refused_untouched_and_the_advice_works():
    model = ae()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"enc.weight and dec.weight \\(a Parameter\\) {ON_MEMORY}") as error:
        signmask.prune(model, 0.5)
    assert_same(before, snapshot(model))
    advice = re.search(r"pass exclude=(\[.*?\])", str(error.value)).group(1)
    assert advice == "['enc', 'dec']"
    signmask.prune(model, 0.5, exclude=["enc", "dec"])
    assert set(signmask._targets.pruned(model)) == {"mix.weight"}
    assert model.dec.weight.data_ptr() == model.enc.weight.data_ptr()  # still tied


def test_pruning_one_end_of_weights_tied_through_data_is_refused_untouched():
    # b.weight = nn.Parameter(a.weight.data): the mask on a would leave b reading a dense.
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = nn.Parameter(net[0].weight.data)
    before = snapshot(net)
    with pytest.raises(ValueError, match=f"0.weight and 1.weight \\(a Parameter\\) {ON_MEMORY}.*exclude=\\['0'\\]"):
        signmask.prune(net, 0.5, include="0")
    assert_same(before, snapshot(net))


def test_a_pruned_weight_sharing_memory_with_a_buffer_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net[1].register_buffer("row", net[0].weight.data[2])  # one row of it
    before = snapshot(net)
    with pytest.raises(ValueError, match=f"0.weight and 1.row \\(a buffer\\) {ON_MEMORY}"):
        signmask.prune(net, 0.5)
    assert_same(before, snapshot(net))


def _on_one_storage(columns) -> tuple[nn.Sequential, nn.Sequential]:
    """Two linears whose weights are the column slices ``columns`` of one (4, 8) tensor, and an
    untied copy of them (contiguous clones): the oracle."""
    torch.manual_seed(0)
    base = torch.randn(4, 8)
    net = nn.Sequential(*(nn.Linear(base[:, c].shape[1], 4, bias=False) for c in columns))
    for layer, c in zip(net, columns):
        layer.weight = nn.Parameter(base[:, c])
    untied = copy.deepcopy(net)
    for layer in untied:
        layer.weight = nn.Parameter(layer.weight.detach().clone())
    return net, untied


@pytest.mark.parametrize("columns", [
    (slice(0, 4), slice(4, 8)),        # side by side: ranges that interleave row by row
    (slice(0, 8, 2), slice(1, 8, 2)),  # every other column: the same range, no shared entry
], ids=["blocks", "interleaved"])
def test_views_of_one_storage_that_share_no_entry_are_pruned_as_untied_weights(columns):
    net, untied = _on_one_storage(columns)
    signmask.prune(net, 0.5)
    signmask.prune(untied, 0.5)
    for a, b in zip(net, untied):
        assert torch.equal(a.weight_mask, b.weight_mask)
        assert torch.equal(a.weight, b.weight)


def test_an_expanded_buffer_around_a_weight_is_no_tie():
    # It reads the entries just before and after the weight, nine times each: as many
    # elements as its range holds, yet a range with a gap.
    torch.manual_seed(0)
    flat = torch.randn(18)
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    oracle = signmask.prune(copy.deepcopy(net), 0.5)
    net[0].weight = nn.Parameter(flat[1:17].view(4, 4))
    with torch.no_grad():
        net[0].weight.copy_(oracle[0].weight_orig)
    net[0].register_buffer("ends", flat.as_strided((9, 2), (0, 17)))
    signmask.prune(net, 0.5)
    assert torch.equal(net[0].weight_mask, oracle[0].weight_mask)


def test_views_with_gaps_that_share_some_entries_are_refused():
    net, _ = _on_one_storage((slice(0, 8, 2), slice(2, 8, 2)))  # columns 2, 4, 6 in both
    with pytest.raises(ValueError, match=f"0.weight and 1.weight \\(a Parameter\\) {ON_MEMORY}"):
        signmask.prune(net, 0.5)


class _NoStorage(torch.Tensor):
    """A wrapper subclass with no storage: reading its storage raises."""

    @staticmethod
    def __new__(cls, shape):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_meta_and_storage_less_tensors_beside_the_pruned_weights_are_not_ties():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    oracle = signmask.prune(copy.deepcopy(net), 0.5)
    net.append(nn.Embedding(3, 4, device="meta"))
    net.append(nn.Embedding(3, 4, device="meta"))  # both at address 0
    net[0].register_buffer("opaque", _NoStorage((4, 4)))
    net[1].register_buffer("sparse", torch.eye(4, 4).to_sparse())
    signmask.prune(net, 0.5, include=["0", "1"])
    assert all(torch.equal(net[i].weight_mask, oracle[i].weight_mask) for i in (0, 1))


@pytest.mark.parametrize("tie", ["memory", "object"])
def test_set_backend_projection_refuses_a_weight_tied_after_pruning_untouched(tie):
    # Projection zeroes the pruned entries of weight_orig in place: the other would change.
    net = signmask.prune(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.5, include="0")
    orig = net[0].weight_orig
    net[1].weight = nn.Parameter(orig.detach()) if tie == "memory" else orig
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = snapshot(net)
    other = "1.weight (a Parameter) " + ON_MEMORY if tie == "memory" else "1.weight share one Parameter"
    with pytest.raises(ValueError, match=re.escape(f"0.weight and {other}") + ".*untie them before set_backend"):
        signmask.set_backend(net, "projection", optimizer=opt)
    assert_same(before, snapshot(net))
    signmask.set_backend(net, "torch")  # writes nothing: allowed


def test_transfer_onto_weights_tied_through_memory_is_refused_untouched():
    source = ae()
    source.dec.weight = nn.Parameter(source.dec.weight.detach().clone())  # untied
    ticket = signmask.extract(signmask.prune(source, 0.5))
    model = ae()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"enc.weight and dec.weight \\(a Parameter\\) {ON_MEMORY}.*untie them before the transfer$"):
        signmask.transfer(ticket, model, dense=False)
    assert_same(before, snapshot(model))


def test_a_search_on_weights_tied_through_memory_is_refused_untouched():
    model = ae()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=ON_MEMORY):
        signmask.apply(model, "lrr", 0.5, optimizer=opt)
    assert_same(before, snapshot(model))
