"""Ticket files: bit-exact round trips (format versions 1, 2 and 3), size, metadata, and every kind of bad file."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from torch import nn

import signmask
from signmask import _io
from _util import assert_same, bits_equal, norm_ticket, small_ticket, snapshot, tiny
# At the top: imported inside a @given test, test_bits' own @given tests fail hypothesis'
# nested-given health check (when this file runs without test_bits collected first).
from test_bits import _old_codes_to_signed, _old_signed_to_codes


NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@st.composite
def tickets(draw, norms=True):
    n = draw(st.integers(1, 3))
    masks = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
        numel = int(torch.tensor(shape).prod())
        vals = draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=numel, max_size=numel))
        masks[f"layer{i}.weight"] = torch.tensor(vals, dtype=torch.int8).view(shape)
    signs = {}
    if draw(st.booleans()):
        signs["layer0.bias"] = torch.tensor(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=3, max_size=3)), dtype=torch.int8)
    meta = draw(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), st.text(max_size=10), max_size=3))
    recorded = {}
    for i in range(draw(st.integers(0, 2)) if norms else 0):
        dtype = draw(st.sampled_from(NORM_DTYPES))
        values = draw(st.lists(st.floats(-1e3, 1e3, width=16), max_size=6))  # width 16: exact in every dtype
        recorded[f"norm{i}.weight"] = torch.tensor(values, dtype=dtype)
    return signmask.Ticket(masks, signs, meta, recorded)


@settings(max_examples=60, deadline=None)
@given(ticket=tickets())
def test_save_load_round_trip_is_bit_exact(tmp_path_factory, ticket):
    path = tmp_path_factory.mktemp("t") / "ticket.safetensors"
    signmask.save(ticket, path)
    loaded = signmask.load(path)
    assert loaded == ticket
    for group, other in ((ticket.masks, loaded.masks), (ticket.signs, loaded.signs)):
        for k in group:
            assert other[k].dtype == torch.int8 and torch.equal(other[k], group[k])
    assert loaded.norms.keys() == ticket.norms.keys()
    assert all(bits_equal(loaded.norms[k], v) for k, v in ticket.norms.items())  # -0.0 too
    assert loaded.metadata == ticket.metadata


def _save_v1(ticket: signmask.Ticket, path: Path) -> Path:
    """Write ``ticket`` as signmask wrote format version 1: four 2-bit codes per byte."""
    tensors, manifest = {}, {}
    for role, group in (("mask", ticket.masks), ("sign", ticket.signs)):
        for name, signed in group.items():
            tensors[name], manifest[name] = _io._entry(role, signed, version="1")
            assert tensors[name].numel() == -(-signed.numel() // 4)  # four 2-bit codes per byte
    meta = dict(ticket.metadata, format="signmask.ticket", format_version="1", sparsity=repr(ticket.sparsity))
    save_file(tensors, str(path), metadata=dict(meta, manifest=json.dumps(manifest, sort_keys=True)))
    return path


def _save_v2(ticket: signmask.Ticket, path: Path, manifest_sha256: bool = True) -> Path:
    """Write ``ticket`` as signmask wrote format version 2: five ternary codes per byte, a
    ``manifest_sha256`` (absent from the first version 2 files) and no metadata checksum."""
    tensors, manifest = {}, {}
    for role, group in (("mask", ticket.masks), ("sign", ticket.signs)):
        for name, signed in group.items():
            tensors[name], manifest[name] = _io._entry(role, signed, version="2")
    for name, values in ticket.norms.items():
        tensors[name], manifest[name] = _io._norm_entry(values)
    text = json.dumps(manifest, sort_keys=True)
    meta = dict(ticket.metadata, format="signmask.ticket", format_version="2", sparsity=repr(ticket.sparsity), manifest=text)
    if manifest_sha256:
        meta["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    save_file(tensors, str(path), metadata=meta)
    return path


@settings(max_examples=30, deadline=None)
@given(ticket=tickets(norms=False))  # version 1 had no norm tensors
def test_version_1_file_loads_bit_exactly(tmp_path_factory, ticket):
    path = _save_v1(ticket, tmp_path_factory.mktemp("t") / "v1.safetensors")
    loaded = signmask.load(path)
    assert loaded == ticket and loaded.metadata == ticket.metadata
    assert all(m.dtype == torch.int8 for m in list(loaded.masks.values()) + list(loaded.signs.values()))


def test_file_stores_at_most_two_bits_per_weight(tmp_path):
    numel = 256 * 1024
    masks = {"a.weight": torch.randint(-1, 2, (256, 1024), dtype=torch.int8)}
    path = signmask.save(signmask.Ticket(masks), tmp_path / "big.safetensors")
    _, raw = _io.read_raw(path)
    assert raw["a.weight"].numel() == math.ceil(numel / 5)  # five ternary codes per byte
    size = path.stat().st_size
    assert size - raw["a.weight"].numel() < 2048  # header: metadata only
    assert 8 * size <= 2 * numel  # the whole file, header included


def test_metadata_of_an_extracted_ticket(tmp_path):
    model = signmask.prune(tiny(), 0.5)
    ticket = signmask.extract(model, metadata={"rounds": "3"})
    path = signmask.save(ticket, tmp_path / "t.safetensors")
    meta, _ = _io.read_raw(path)
    assert meta["format"] == "signmask.ticket" and meta["format_version"] == "3"
    assert meta["method"] == "magnitude" and meta["architecture"] == "TinyNet" and meta["rounds"] == "3"
    assert float(meta["sparsity"]) == ticket.sparsity
    versions = json.loads(meta["versions"])
    assert versions["torch"] == torch.__version__ and versions["signmask"] == signmask.__version__
    manifest = json.loads(meta["manifest"])
    assert manifest["conv2.weight"]["shape"] == [6, 6, 3, 3]
    assert manifest["conv2.weight"]["kept"] == int(model.conv2.weight_mask.sum())


def test_the_same_ticket_gives_the_same_file_bytes(tmp_path):
    # safetensors writes its metadata from a Rust HashMap, in a new order on every call: files
    # of one ticket must still hash alike (provenance, deduplicating stores).
    ticket = signmask.extract(signmask.prune(tiny(), 0.5), norms=True, metadata={"rounds": "3", "note": "é\n"})
    files = {signmask.save(ticket, tmp_path / f"{i}.safetensors").read_bytes() for i in range(8)}
    assert len(files) == 1
    data = files.pop()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0  # the header stays padded, as safetensors pads it
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)
    assert signmask.load(tmp_path / "0.safetensors") == ticket


def test_save_refuses_non_tickets(tmp_path):
    with pytest.raises(TypeError, match="save\\(\\) takes a signmask.Ticket as ticket, got dict"):
        signmask.save({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture
def saved(tmp_path):
    return signmask.save(small_ticket(), tmp_path / "t.safetensors")


@pytest.fixture(params=["1", "2", "3"])
def saved_any(request, tmp_path):
    """The small ticket written in each format version that load() reads."""
    path = tmp_path / "t.safetensors"
    write = {"1": _save_v1, "2": _save_v2, "3": signmask.save}[request.param]
    return write(small_ticket(), path)


def _reseal(meta: dict) -> None:
    """Recompute the metadata checksum of a file that has one, as a careful forger would:
    sha256 of every other metadata entry as sorted JSON, the manifest by its content."""
    if "metadata_sha256" not in meta:
        return
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    try:
        rest["manifest"] = json.loads(rest["manifest"])
    except (ValueError, RecursionError):
        pass  # unreadable: load() refuses it before it looks at the checksum
    meta["metadata_sha256"] = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _rewrite(path: Path, tensors=None, meta_update=None, drop=(), reseal=True):
    """Rewrite ``path`` with edited tensors or metadata; ``reseal``: with the metadata
    checksum recomputed, so that only the deeper checks can catch the edit."""
    meta, raw = _io.read_raw(path)
    meta.update(meta_update or {})
    if reseal:
        _reseal(meta)
    raw.update(tensors or {})
    for k in drop:
        raw.pop(k)
    save_file(raw, str(path), metadata=meta)


def _edit_manifest(path: Path, edit, tensors=None):
    """Apply ``edit`` to the manifest and update its checksum (if the file has one), as a
    careful forger would: only the deeper checks can catch what was changed."""
    meta, _ = _io.read_raw(path)
    manifest = json.loads(meta["manifest"])
    edit(manifest)
    update = {"manifest": json.dumps(manifest, sort_keys=True)}  # hashed as sorted JSON
    if "manifest_sha256" in meta:
        update["manifest_sha256"] = hashlib.sha256(update["manifest"].encode()).hexdigest()
    _rewrite(path, tensors=tensors, meta_update=update)


def _replace_bytes(path: Path, name: str, data: torch.Tensor):
    """Put ``data`` in place of tensor ``name`` with a matching sha256, so the checksum passes."""
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    _edit_manifest(path, lambda m: m[name].update(sha256=digest), tensors={name: data})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        signmask.load(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_text("hello, this is text and not a ticket at all")
    with pytest.raises(ValueError, match="x.safetensors: not a valid safetensors file"):
        signmask.load(path)


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    with pytest.raises(ValueError, match="t.safetensors: not a (valid )?safetensors file"):
        signmask.load(saved)


def test_flipped_payload_byte_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0b01
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        signmask.load(saved)


def test_safetensors_that_is_not_a_ticket(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="w.safetensors: not a signmask ticket"):
        signmask.load(path)


@pytest.mark.parametrize("shape", [[5, 1], [5]])
def test_edited_manifest_shape_is_detected(saved, shape):
    meta, _ = _io.read_raw(saved)
    manifest = json.loads(meta["manifest"])
    manifest["a.weight"]["shape"] = shape  # same number of weights: the bytes still fit
    _rewrite(saved, meta_update={"manifest": json.dumps(manifest)})
    with pytest.raises(ValueError, match="t.safetensors: ticket manifest does not match its checksum"):
        signmask.load(saved)


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [0, 2**31, 2**31], [True, 2], [2.0, 1]])
def test_forged_shapes_torch_cannot_make_are_refused_by_name(tmp_path, shape):
    # Checksums recomputed: a zero-sized entry needs no bytes, so only the shape check is left.
    path = signmask.save(signmask.Ticket({**small_ticket().masks, "e.weight": torch.zeros(0, 2, dtype=torch.int8)}),
                         tmp_path / "t.safetensors")
    _edit_manifest(path, lambda m: m["e.weight"].update(shape=shape))
    with pytest.raises(ValueError, match=r"t.safetensors: manifest entry of 'e.weight' has a bad shape"):
        signmask.load(path)


def test_forged_norm_shape_of_bools_is_refused(tmp_path):
    path = signmask.save(norm_ticket(), tmp_path / "t.safetensors")
    # The same values (so the same checksum) as a [1, 3] tensor, which compares equal to [True, 3].
    _edit_manifest(path, lambda m: m["bn.weight"].update(shape=[True, 3]),
                   tensors={"bn.weight": torch.tensor([[0.5, -0.0, 2.0]])})
    with pytest.raises(ValueError, match=r"manifest entry of 'bn.weight' has a bad shape \[True, 3\]"):
        signmask.load(path)


@pytest.mark.parametrize("manifest_sha256", [True, False])
def test_version_2_files_without_metadata_checksum_still_load(tmp_path, manifest_sha256):
    ticket = signmask.Ticket(norm_ticket().masks, {"a.bias": torch.tensor([-1])}, {"architecture": "Net"}, norm_ticket().norms)
    path = _save_v2(ticket, tmp_path / "t.safetensors", manifest_sha256=manifest_sha256)
    assert signmask.load(path) == ticket


def _labelled_ticket() -> signmask.Ticket:
    """A ticket with an entry of every kind: a mask, a dense sign, a norm and user metadata."""
    return signmask.Ticket({"a.weight": torch.tensor([[1, 0, -1, 1, 0]])}, {"a.bias": torch.tensor([-1])},
                           {"architecture": "Net"}, {"bn.weight": torch.tensor([0.5])})


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update({"`rchitecture": m.pop("architecture")}),  # one flipped bit of the key
        lambda m: m.update(architecture="Other"),
        lambda m: m.pop("architecture"),
        lambda m: m.update(rounds="3"),
        lambda m: m.update(sparsity="0.25"),
        lambda m: m.update(format_version="2"),  # the same codes as version 3
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["key renamed", "value changed", "entry dropped", "entry added", "sparsity", "version", "manifest_sha256"],
)
def test_every_metadata_entry_is_under_the_checksum(tmp_path, edit):
    path = signmask.save(_labelled_ticket(), tmp_path / "t.safetensors")
    meta, raw = _io.read_raw(path)
    edit(meta)
    save_file(raw, str(path), metadata=meta)
    with pytest.raises(ValueError, match="t.safetensors: ticket metadata does not match its checksum"):
        signmask.load(path)


def test_metadata_checksum_is_sha256_of_the_other_entries_as_sorted_json(tmp_path):
    meta, _ = _io.read_raw(signmask.save(_labelled_ticket(), tmp_path / "t.safetensors"))
    forged = dict(meta, metadata_sha256="0" * 64)
    _reseal(forged)
    assert forged == meta


def test_a_version_3_file_without_its_metadata_checksum_is_refused(saved):
    meta, raw = _io.read_raw(saved)
    del meta["metadata_sha256"]
    save_file(raw, str(saved), metadata=meta)
    with pytest.raises(ValueError, match="t.safetensors: ticket of format version '3' lacks its metadata checksum"):
        signmask.load(saved)


def test_a_flipped_bit_in_a_metadata_key_does_not_switch_off_the_architecture_check(tmp_path):
    class Other(nn.Module):  # another architecture with the ticket's tensors
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Linear(5, 1), nn.BatchNorm1d(1)

    path = signmask.save(_labelled_ticket(), tmp_path / "t.safetensors")
    data = bytearray(path.read_bytes())
    data[data.index(b'"architecture"') + 1] ^= 0x01  # 'a' -> '`'
    path.write_bytes(bytes(data))
    model = Other()
    before = snapshot(model)
    with pytest.raises(ValueError, match="t.safetensors: ticket metadata does not match its checksum"):
        signmask.transfer(path, model)
    assert_same(before, snapshot(model))


def test_every_bit_flip_of_a_ticket_file_is_refused_or_harmless(tmp_path):
    ticket = _labelled_ticket()
    path = signmask.save(ticket, tmp_path / "t.safetensors")
    good = path.read_bytes()
    silent = []
    for i in range(len(good)):
        for bit in range(8):
            data = bytearray(good)
            data[i] ^= 1 << bit
            path.write_bytes(bytes(data))
            try:
                loaded = signmask.load(path)
            except ValueError as e:
                assert str(path) in str(e)
                continue
            if loaded != ticket:  # metadata included
                silent.append((i, bit, good[max(i - 12, 0) : i + 12]))
    assert silent == []


@pytest.mark.parametrize(
    "manifest, message",
    [("[\"a.weight\"]", "found list"), ("5", "found int"), ("null", "found NoneType")],
)
def test_manifest_that_is_not_an_object(saved, manifest, message):
    _rewrite(saved, meta_update={"manifest": manifest, "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()})
    with pytest.raises(ValueError, match=f"t.safetensors: ticket manifest should be a JSON object, {message}"):
        signmask.load(saved)


def test_header_that_is_not_an_object_or_too_deep(tmp_path):
    for i, header in enumerate([b"[1, 2]", b"[" * 100000 + b"]" * 100000]):
        path = tmp_path / f"h{i}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=f"h{i}.safetensors: not a valid safetensors file"):
            signmask.load(path)


def test_directory_is_not_a_ticket(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path.name}: not a file \\(a ticket file expected, found a folder\\)"):
        signmask.load(tmp_path)


def test_file_of_dense_signs_only_names_the_file(saved):
    _edit_manifest(saved, lambda m: [e.update(role="sign") for e in m.values()])
    with pytest.raises(ValueError, match="t.safetensors: a ticket needs at least one masked tensor"):
        signmask.load(saved)


def test_ticket_edited_after_construction_is_refused_by_save_and_transfer(tmp_path):
    ticket = small_ticket()
    ticket.masks["a.weight"] = torch.tensor([[2, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"mask 'a.weight' holds values outside \{-1, 0, \+1\}: found \[2\]"):
        signmask.save(ticket, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    model = torch.nn.Linear(5, 1)
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(ValueError, match=r"mask 'a.weight' holds values outside \{-1, 0, \+1\}: found \[2\]"):
        signmask.transfer(ticket, model)
    assert not hasattr(model, "weight_mask")
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_tensor_named_like_the_safetensors_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'__metadata__' cannot be saved"):
        signmask.save(signmask.Ticket({"__metadata__": torch.tensor([1])}), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_version(saved):
    _rewrite(saved, meta_update={"format_version": "99"})
    with pytest.raises(ValueError, match=r"format version '99' is not supported \(this signmask reads versions 1, "
                       r"2, 3\); a newer signmask wrote it: upgrade signmask to read it$"):
        signmask.load(saved)
    _rewrite(saved, meta_update={"format_version": "2.x"})  # no newer version: no advice
    with pytest.raises(ValueError, match=r"format version '2.x' is not supported \(this signmask reads versions 1, "
                       r"2, 3\)$"):
        signmask.load(saved)


def test_missing_and_extra_tensors(saved):
    _rewrite(saved, drop=["b.weight"])
    with pytest.raises(ValueError, match=r"missing from the file: \['b.weight'\]"):
        signmask.load(saved)
    _rewrite(saved, tensors={"b.weight": torch.tensor([0b1001], dtype=torch.uint8), "c.weight": torch.zeros(1, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"unexpected: \['c.weight'\]"):
        signmask.load(saved)


@pytest.mark.parametrize("name", ["a.weight", "b.weight"])  # b.weight's byte also holds padding
@pytest.mark.parametrize("byte", [243, 250, 255])
def test_version_2_byte_outside_the_ternary_range(saved, name, byte):
    _replace_bytes(saved, name, torch.tensor([byte], dtype=torch.uint8))
    with pytest.raises(ValueError, match=rf"t.safetensors: tensor '{name}' holds values outside \{{-1, 0, \+1\}}"):
        signmask.load(saved)


def test_version_1_code_3_is_refused(tmp_path):
    path = _save_v1(small_ticket(), tmp_path / "t.safetensors")
    _, raw = _io.read_raw(path)
    _replace_bytes(path, "b.weight", raw["b.weight"] | 0b11)  # code 3 in the first slot
    with pytest.raises(ValueError, match=r"t.safetensors: tensor 'b.weight' holds values outside \{-1, 0, \+1\}"):
        signmask.load(path)


def test_non_zero_padding_is_refused(saved_any):
    # b.weight has 2 codes: the slot after them is padding in both versions (bits 4-5 / weight 9).
    meta, raw = _io.read_raw(saved_any)
    _replace_bytes(saved_any, "b.weight", raw["b.weight"] + (1 << 4 if meta["format_version"] == "1" else 9))
    with pytest.raises(ValueError, match="tensor 'b.weight' has non-zero padding"):
        signmask.load(saved_any)


def test_wrong_byte_count_for_shape(saved_any):
    version = _io.read_raw(saved_any)[0]["format_version"]
    expected = {"1": 2, "2": 1, "3": 1}[version]  # ceil(5 / 4), ceil(5 / 5)
    _rewrite(saved_any, tensors={"a.weight": torch.zeros(5, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=rf"'a.weight' should be {expected} uint8 bytes for shape \[1, 5\]"):
        signmask.load(saved_any)


def test_manifest_rewritten_with_other_whitespace_still_loads(saved):
    meta, raw = _io.read_raw(saved)
    meta["manifest"] = json.dumps(json.loads(meta["manifest"]), indent=1)  # same content
    save_file(raw, str(saved), metadata=meta)
    assert signmask.load(saved) == small_ticket()


def test_ticket_names_are_canonical_and_float8_norms_round_trip(tmp_path):
    norms = {"_orig_mod.bn.weight": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}
    ticket = signmask.Ticket({"module.a.weight": torch.tensor([1, 0])}, norms=norms)
    assert list(ticket.masks) == ["a.weight"] and list(ticket.norms) == ["bn.weight"]  # as extract names them
    assert signmask.load(signmask.save(ticket, tmp_path / "t.safetensors")) == ticket


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


@pytest.mark.parametrize(
    "edit, message",
    [
        # kept still right
        ({"negative": 2}, r"'a.weight' does not match its kept/negative counts \(the manifest says kept=3, "
                          r"negative=2; the tensor holds kept=3, negative=1\)"),
        ({"kept": 2}, "'a.weight' does not match its kept/negative counts"),
        ({"shape": [-1, -5]}, r"manifest entry of 'a.weight' has a bad shape \[-1, -5\] \(expected a list of "
                              r"ints >= 0"),  # 5 elements
        ({"role": "bias"}, r"manifest entry of 'a.weight' has unknown role 'bias' \(expected one of "
                           r"\['mask', 'norm', 'sign'\]\)"),
    ],
)
def test_forged_manifest_entries_are_refused(saved, edit, message):
    _edit_manifest(saved, lambda m: m["a.weight"].update(edit))
    with pytest.raises(ValueError, match=message):
        signmask.load(saved)


def test_payload_of_another_dtype_is_refused(saved):
    # The same bytes stored as int8: the payload checksum still matches.
    _, raw = _io.read_raw(saved)
    _rewrite(saved, tensors={"a.weight": raw["a.weight"].view(torch.int8)})
    with pytest.raises(ValueError, match="'a.weight' should be 1 uint8 bytes .* found torch.int8"):
        signmask.load(saved)


def test_payload_of_another_rank_is_refused(saved):
    # The same bytes as a (1, n) tensor: the payload checksum still matches.
    _, raw = _io.read_raw(saved)
    n = raw["a.weight"].numel()
    _rewrite(saved, tensors={"a.weight": raw["a.weight"].view(1, n)})
    with pytest.raises(ValueError, match=rf"'a.weight' should be {n} uint8 bytes .* found torch.uint8 of shape \(1, {n}\)"):
        signmask.load(saved)


def test_a_file_shorter_than_its_header_length_names_both_sizes(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"t.safetensors: not a safetensors file \(5 bytes, truncated or empty\)"):
        signmask.load(saved)
    n = int.from_bytes(data[:8], "little")
    saved.write_bytes(data[: 8 + n - 1])  # the header's last byte cut off
    with pytest.raises(ValueError, match=rf"header of {n} bytes but only {n - 1} follow"):
        signmask.load(saved)


def test_a_device_is_refused_as_not_a_file():  # Linux, as CI and the README's errors section
    with pytest.raises(ValueError, match=r"/dev/null: not a file \(a ticket file expected, found a device, pipe or socket\)"):
        signmask.load("/dev/null")


def test_deeply_nested_manifest_is_unreadable_not_a_crash(saved):
    manifest = "[" * 100000 + "]" * 100000  # RecursionError inside json
    _rewrite(saved, meta_update={"manifest": manifest, "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()})
    with pytest.raises(ValueError, match="ticket manifest is missing or unreadable"):
        signmask.load(saved)


def test_a_norm_named_metadata_is_refused_before_writing(tmp_path):
    # safetensors reserves the name for any tensor: a norm so named gave a file load() refuses.
    ticket = signmask.Ticket({"a.weight": torch.tensor([1, 0, -1])}, norms={"__metadata__": torch.ones(2)})
    with pytest.raises(ValueError, match="'__metadata__' cannot be saved"):
        signmask.save(ticket, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_sparsity_is_the_exact_float(tmp_path):
    # repr() round-trips a float exactly; 1 - 1/3 has 16 significant digits.
    ticket = signmask.Ticket({"a.weight": torch.tensor([1, 0, 0])})
    meta, _ = _io.read_raw(signmask.save(ticket, tmp_path / "t.safetensors"))
    assert float(meta["sparsity"]) == ticket.sparsity == 1 - 1 / 3


# ---------------------------------------------------------------- norm tensors (extract(norms=True))


@pytest.fixture
def saved_norms(tmp_path):
    return signmask.save(norm_ticket(), tmp_path / "t.safetensors")


def test_norm_tensors_are_stored_as_they_are(saved_norms):
    meta, raw = _io.read_raw(saved_norms)
    assert torch.equal(raw["bn.weight"], norm_ticket().norms["bn.weight"]) and raw["bn.weight"].dtype == torch.float32
    entry = json.loads(meta["manifest"])["bn.weight"]
    assert entry["role"] == "norm" and entry["dtype"] == "float32" and entry["shape"] == [3]


def test_flipped_norm_byte_is_detected(saved_norms):
    _, raw = _io.read_raw(saved_norms)
    forged = raw["bn.bias"].clone()
    forged[0] = 2e-3
    _rewrite(saved_norms, tensors={"bn.bias": forged})
    with pytest.raises(ValueError, match="'bn.bias' does not match its checksum"):
        signmask.load(saved_norms)


@pytest.mark.parametrize(
    "replace, message",
    [
        (lambda t: t.double(), r"norm tensor 'bn.weight' should be float32 of shape \[3\], found float64 of shape \[3\]"),
        (lambda t: t[:2].clone(), r"should be float32 of shape \[3\], found float32 of shape \[2\]"),
        (lambda t: t.view(torch.int32), "found int32"),  # the very same bytes
    ],
)
def test_norm_payload_of_another_dtype_or_shape_is_refused(saved_norms, replace, message):
    forged = replace(norm_ticket().norms["bn.weight"])
    digest = hashlib.sha256(_io._bytes(forged)).hexdigest()
    _edit_manifest(saved_norms, lambda m: m["bn.weight"].update(sha256=digest), tensors={"bn.weight": forged})
    with pytest.raises(ValueError, match=message):
        signmask.load(saved_norms)


def test_norm_tensor_holding_nan_in_a_file_names_the_file(saved_norms):
    forged = torch.tensor([0.5, float("nan"), 2.0])
    digest = hashlib.sha256(_io._bytes(forged)).hexdigest()
    _edit_manifest(saved_norms, lambda m: m["bn.weight"].update(sha256=digest), tensors={"bn.weight": forged})
    with pytest.raises(ValueError, match=f"{saved_norms}: norm tensor 'bn.weight' holds NaN"):
        signmask.load(saved_norms)


def _payload(path):
    """Header (as parsed: safetensors orders metadata keys by hash) and the tensor bytes."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@settings(max_examples=30, deadline=None)
@given(ticket=tickets())
def test_files_and_loaded_tickets_equal_the_int64_codecs(tmp_path_factory, ticket):
    # the codes mapping and counts run in int8 / count_nonzero; files stay as they were written
    folder = tmp_path_factory.mktemp("codecs")
    signmask.save(ticket, folder / "new.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_io._bits, "signed_to_codes", _old_signed_to_codes)
        mp.setattr(_io._bits, "codes_to_signed", _old_codes_to_signed)
        signmask.save(ticket, folder / "old.safetensors")
        old = signmask.load(folder / "old.safetensors")
    assert _payload(folder / "new.safetensors") == _payload(folder / "old.safetensors")
    new = signmask.load(folder / "new.safetensors")
    assert new == old == ticket
    assert all(m.dtype == torch.int8 for m in [*new.masks.values(), *new.signs.values()])
