"""The Ticket type: checked on construction (values, dtypes, names, metadata, norms), equality and sparsity."""

import pytest
import torch

import signmask
from _util import norm_ticket, small_ticket


@pytest.mark.parametrize(
    "masks, signs, meta, message",
    [
        ({"a": torch.tensor([2, 0])}, {}, {}, r"mask 'a' holds values outside \{-1, 0, \+1\}: found \[2\]"),
        ({"a": torch.tensor([-2, 1])}, {}, {}, r"mask 'a' holds values outside \{-1, 0, \+1\}: found \[-2\]"),
        ({"a": torch.tensor([255, 1], dtype=torch.uint8)}, {}, {}, r"outside \{-1, 0, \+1\}: found \[255\]"),
        ({"a": torch.tensor([0.5])}, {}, {}, "must be an integer tensor"),
        ({"a": torch.tensor([1])}, {"a": torch.tensor([1])}, {}, "both as masks and as dense signs"),
        ({}, {}, {}, "at least one masked tensor, got an empty masks mapping"),
        ({"a": torch.tensor([1])}, {}, {"format": "x"}, "reserved"),
        ({"a": torch.tensor([1])}, {}, {"metadata_sha256": "x"}, r"keys \['metadata_sha256'\] are reserved"),
        ({"a": torch.tensor([1])}, {}, {"n": 3}, "must map str to str"),
        (None, {}, {}, "masks must be a mapping of tensor names to tensors, got NoneType"),
        ({"a": torch.tensor([1])}, None, {}, "signs must be a mapping"),
        ({"a": torch.tensor([1])}, {}, None, "metadata must be a mapping of str to str, got NoneType"),
        ({"a": torch.tensor([1], device="meta")}, {}, {}, "mask 'a' must be a dense tensor with values, got a meta"),
        ({"a": torch.tensor([[0, 1]]).to_sparse()}, {}, {}, "got layout torch.sparse_coo"),
        ({1: torch.tensor([1])}, {}, {}, r"masks keys must be tensor names \(str\), got 1 \(int\)"),
        ({"a": torch.tensor([1])}, {("b",): torch.tensor([1])}, {}, r"signs keys .* got \('b',\) \(tuple\)"),
        ({"module.a": torch.tensor([1]), "a": torch.tensor([0])}, {}, {}, "keys 'module.a' and 'a' name the same tensor 'a'"),
    ],
)
def test_ticket_validates_on_construction(masks, signs, meta, message):
    with pytest.raises((TypeError, ValueError), match=message):
        signmask.Ticket(masks, signs, meta)


def test_ticket_accepts_wide_unsigned_masks():
    for dtype in (torch.uint16, torch.uint32):
        assert signmask.Ticket({"w": torch.tensor([0, 1, 1], dtype=dtype)}).masks["w"].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"found \[2\]"):
        signmask.Ticket({"w": torch.tensor([0, 2], dtype=torch.uint16)})


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_tickets_with_different_tensor_names_differ():
    one = signmask.Ticket({"a": torch.tensor([1, 0])})
    two = signmask.Ticket({"a": torch.tensor([1, 0]), "b": torch.tensor([-1])})
    assert one != two and two != one


def test_tickets_with_different_metadata_differ():
    one = signmask.Ticket({"a": torch.tensor([1, 0])}, metadata={"rounds": "3"})
    assert one == signmask.Ticket({"a": torch.tensor([1, 0])}, metadata={"rounds": "3"})
    assert one != signmask.Ticket({"a": torch.tensor([1, 0])}, metadata={"rounds": "4"})


def test_a_ticket_of_empty_masks_has_sparsity_zero():
    # Documented: 0.0 when the masks hold no weights (not 1.0, nor a ZeroDivisionError).
    t = signmask.Ticket({"a.weight": torch.zeros(0, 3, dtype=torch.int8)})
    assert t.sparsity == 0.0 and t.layer_sparsity() == {"a.weight": 0.0} and t.kept == t.numel == 0


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_bool_and_complex_masks_are_refused_by_name(dtype):
    # A bool mask holds no signs; a complex one has none to hold.
    with pytest.raises(TypeError, match=rf"mask 'a' must be an integer tensor in \{{-1, 0, \+1\}}, got {dtype}"):
        signmask.Ticket({"a": torch.tensor([1, 0]).to(dtype)})


@pytest.mark.parametrize("field", ["masks", "signs"])
def test_masks_and_signs_given_as_a_list_are_refused_by_name(field):
    tensors = [torch.tensor([1, 0])]
    kwargs = {"masks": tensors} if field == "masks" else {"masks": {"a": torch.tensor([1])}, "signs": tensors}
    with pytest.raises(TypeError, match=f"{field} must be a mapping of tensor names to tensors, got list"):
        signmask.Ticket(**kwargs)


def test_a_non_str_metadata_key_is_refused():
    with pytest.raises(TypeError, match=r"ticket metadata must map str to str, got 3: 'x'"):
        signmask.Ticket({"a": torch.tensor([1])}, metadata={3: "x"})


def test_negative_signs_count_as_kept():
    masks = {"a": torch.tensor([[1, -1, 0], [-1, -1, 0]]), "b": torch.tensor([0, -1])}
    t = signmask.Ticket(masks)
    kept = {k: int((m != 0).sum()) for k, m in masks.items()}  # the oracle: non-zero entries
    assert t.kept == sum(kept.values()) and t.numel == 8
    assert t.sparsity == 1.0 - sum(kept.values()) / 8
    assert t.layer_sparsity() == {k: 1.0 - kept[k] / masks[k].numel() for k in masks}


def test_tickets_differing_only_in_dense_signs_differ():
    masks = {"a.weight": torch.tensor([1, 0])}
    one = signmask.Ticket(masks, {"a.bias": torch.tensor([1, -1])})
    assert one == signmask.Ticket(masks, {"a.bias": torch.tensor([1, -1])})
    assert one != signmask.Ticket(masks, {"a.bias": torch.tensor([1, 0])})


def test_ticket_holds_a_copy_of_its_metadata():
    meta = {"method": "imp"}
    ticket = signmask.Ticket({"a": torch.tensor([1])}, metadata=meta)
    meta["method"] = "lrr"
    assert ticket.metadata == {"method": "imp"}


def test_ticket_tensors_are_contiguous_whatever_the_layout_given():
    # A transposed mask or norm is stored row-major: ``.view(-1)`` and raw-byte reads work on it.
    mask = torch.tensor([[1, 0, -1], [0, -1, 1]], dtype=torch.int8).t()
    norm = torch.arange(6.0).view(2, 3).t()
    ticket = signmask.Ticket({"a": mask}, norms={"bn.weight": norm})
    for got, given in ((ticket.masks["a"], mask), (ticket.norms["bn.weight"], norm)):
        assert got.is_contiguous() and torch.equal(got, given)


# ---------------------------------------------------------------- norm tensors (extract(norms=True))


@pytest.mark.parametrize(
    "norms, message",
    [
        ({"bn.weight": torch.tensor([1, 2])}, "norm tensor 'bn.weight' must be a floating-point tensor, got torch.int64"),
        ({"bn.weight": torch.tensor([1.0, float("nan")])}, "norm tensor 'bn.weight' holds NaN or infinite values"),
        ({"bn.weight": torch.tensor([float("-inf")])}, "NaN or infinite"),
        ({"bn.weight": [1.0]}, "norm tensor 'bn.weight' must be a tensor, got list"),
        ({"a.weight": torch.tensor([1.0])}, r"tensors \['a.weight'\] appear both as masks and as norms"),
        ({"bn.weight": torch.ones(2, device="meta")}, "norm tensor 'bn.weight' must be a dense tensor with values"),
        ({"bn.weight": torch.tensor([1.0, 448.0]).to(torch.float8_e4m3fn).clone().view(torch.uint8).fill_(0x7F)
          .view(torch.float8_e4m3fn)}, "holds NaN or infinite values"),  # e4m3fn has no isfinite kernel
        (None, "norms must be a mapping"),
    ],
)
def test_ticket_validates_norms_on_construction(norms, message):
    with pytest.raises((TypeError, ValueError), match=message):
        signmask.Ticket(small_ticket().masks, norms=norms)


def test_ticket_holds_a_copy_of_the_norms_it_was_given():
    bn = torch.nn.BatchNorm1d(3)
    ticket = signmask.Ticket(small_ticket().masks, norms={"bn.weight": bn.weight})
    with torch.no_grad():
        bn.weight.add_(1.0)  # training goes on after the ticket was made
    assert torch.equal(ticket.norms["bn.weight"], torch.ones(3)) and not ticket.norms["bn.weight"].requires_grad


def test_ticket_norm_named_like_a_dense_sign_is_refused():
    with pytest.raises(ValueError, match=r"\['b.bias'\] appear both as dense signs and as norms"):
        signmask.Ticket({"a": torch.tensor([1])}, {"b.bias": torch.tensor([1])}, norms={"b.bias": torch.tensor([0.1])})


def test_tickets_differing_in_norm_values_or_dtype_differ():
    base = norm_ticket()
    assert base == norm_ticket()
    assert base != norm_ticket(torch.float64)  # another dtype (and 1e-3 rounds differently)
    exact = {"bn.weight": torch.tensor([0.5, -0.0, 2.0])}  # the same numbers in every float dtype
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        other = {"bn.weight": exact["bn.weight"].to(dtype)}
        assert torch.equal(exact["bn.weight"], other["bn.weight"])  # torch.equal promotes
        assert signmask.Ticket(base.masks, norms=exact) != signmask.Ticket(base.masks, norms=other)
    assert base != signmask.Ticket(base.masks)
    edited = dict(base.norms, **{"bn.bias": torch.tensor([1e-3, -7.0, 0.5])})
    assert base != signmask.Ticket(base.masks, norms=edited)
    assert "2 norm tensors" in repr(base) and "norm" not in repr(signmask.Ticket(base.masks))
