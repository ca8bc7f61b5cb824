"""Ticket files: ``.safetensors`` with 1.6 bits per weight and a JSON manifest.

Each tensor is stored as uint8 bytes holding five ternary codes (0 pruned, 1 = +1, 2 = -1; see
:func:`signmask._bits.pack_ternary`): 1.6 bits per weight of payload; with the header, a file
stays under 2 bits per weight once it holds more than a few thousand weights. A ticket's norm
tensors (``extract(norms=True)``) are stored as they are, in their own float dtype. The string
metadata holds the ticket's own metadata plus reserved keys: ``format``, ``format_version``,
``sparsity``, ``manifest`` (per tensor: role, shape, kept and negative counts, sha256 of the
bytes), ``manifest_sha256`` (of the manifest's content, as sorted JSON) and ``metadata_sha256``
(of every other metadata entry, as sorted JSON with the manifest by its content). ``load``
checks them all, so truncated or edited files fail loudly: an edit of any metadata entry, the
ticket's own (``architecture``...) included.

``save`` writes format version 3. ``load`` also reads version 2 (the same codes, no
``metadata_sha256``; its first files had no ``manifest_sha256`` either) and version 1, which
held four 2-bit codes per byte (same manifest).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import _bits
from ._files import check_file_path, check_path, make_folder, write_atomic
from ._ticket import RESERVED_KEYS, Ticket

FORMAT = "signmask.ticket"
FORMAT_VERSION = "3"


class _Codec(NamedTuple):
    """How one format version stores codes: ``pack(codes) -> bytes``, ``unpack(bytes, n)``;
    ``sealed``: its files carry a ``metadata_sha256`` (a file without one was edited)."""

    per_byte: int
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]
    sealed: bool = False


_TERNARY = (_bits.TERNARY_PER_BYTE, _bits.pack_ternary, _bits.unpack_ternary)
# Every version load() reads; save() writes FORMAT_VERSION (tests write the others).
_CODECS = {
    "1": _Codec(4, lambda codes: _bits.pack(codes, 2), lambda raw, n: _bits.unpack(raw, n, 2)),
    "2": _Codec(*_TERNARY),
    "3": _Codec(*_TERNARY, sealed=True),
}


def _entry(role: str, signed: torch.Tensor, version: str = FORMAT_VERSION) -> tuple[torch.Tensor, dict]:
    packed = _CODECS[version].pack(_bits.signed_to_codes(signed))
    info = {
        "role": role,
        "shape": list(signed.shape),
        **_counts(signed),
        "sha256": _sha256(packed.numpy().tobytes()),
    }
    return packed, info


def _counts(signed: torch.Tensor) -> dict[str, int]:
    """The manifest's kept and negative counts of a signed mask (``load`` checks them)."""
    # count_nonzero: sum() would copy the int8 tensor to int64.
    return {"kept": int(signed.count_nonzero()), "negative": int((signed < 0).count_nonzero())}


def _norm_entry(values: torch.Tensor) -> tuple[torch.Tensor, dict]:
    info = {
        "role": "norm",
        "shape": list(values.shape),
        "dtype": str(values.dtype).removeprefix("torch."),
        "sha256": _sha256(_bytes(values)),
    }
    return values, info


def _bytes(t: torch.Tensor) -> bytes:
    # Through uint8: numpy has no bfloat16.
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _canonical(content: dict) -> bytes:
    """A manifest or metadata as hashed: its content, whatever whitespace or key order a tool wrote."""
    return json.dumps(content, sort_keys=True).encode()


def _metadata_sha256(meta: dict[str, str], manifest: dict) -> str:
    """The checksum of every metadata entry but ``metadata_sha256`` itself, the manifest by its
    content (as ``manifest_sha256`` hashes it)."""
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    rest["manifest"] = manifest
    return _sha256(_canonical(rest))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(ticket: Ticket, path: str | os.PathLike) -> Path:
    """Write ``ticket`` to ``path`` as ``.safetensors``, atomically (temp file + rename).

    Args:
        ticket: the :class:`Ticket` to write (validated again: its dicts stay editable).
        path: the file to write (a ``str`` or ``os.PathLike``); an existing file is replaced
            (a symlink's target), and missing folders above it are created. A device or a pipe
            (``/dev/null``, a FIFO) is written into, as ``torch.save`` does.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError: ``ticket`` is not a :class:`Ticket`, ``path`` not a path.
        ValueError: the ticket's tensors were edited into invalid values after construction, or
            one is named ``__metadata__``; ``path`` names a folder (it ends in a separator).
        NotADirectoryError: a folder above ``path`` is a file (missing folders are created,
            those of a symlink's target too).
        IsADirectoryError: ``path`` is an existing folder.
        OSError: the write failed (``PermissionError`` in a read-only folder or onto a
            read-only file...); the message names ``path``, and no file is left behind.

    Example:
        >>> import os, tempfile, torch, signmask
        >>> t = signmask.Ticket({"fc.weight": torch.tensor([[1, 0, -1, 1]])})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = signmask.save(t, os.path.join(d, "t.safetensors"))
        ...     signmask.load(p) == t
        True
    """
    from safetensors.torch import save as st_save

    if not isinstance(ticket, Ticket):
        raise TypeError(f"save() takes a signmask.Ticket as ticket, got {type(ticket).__name__}")
    ticket = ticket._checked()
    path = check_file_path(path)
    if "__metadata__" in {**ticket.masks, **ticket.signs, **ticket.norms}:
        raise ValueError("a tensor named '__metadata__' cannot be saved: safetensors reserves the name")
    tensors, manifest = {}, {}
    for role, group in (("mask", ticket.masks), ("sign", ticket.signs)):
        for name, signed in group.items():
            tensors[name], manifest[name] = _entry(role, signed)
    for name, values in ticket.norms.items():
        tensors[name], manifest[name] = _norm_entry(values)
    text = _canonical(manifest)  # written as hashed
    meta = dict(ticket.metadata)
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        sparsity=repr(ticket.sparsity),
        manifest=text.decode(),
        manifest_sha256=_sha256(text),
    )
    meta["metadata_sha256"] = _metadata_sha256(meta, manifest)
    make_folder(path)
    return write_atomic(path, _sorted_metadata(st_save(tensors, metadata=meta)))


def _sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its metadata in sorted key order.

    safetensors writes the metadata from a Rust HashMap, in an order that changes with every
    call: the same ticket would give files that hash differently. Only the header changes; the
    tensor offsets count from its end, and it stays padded to 8 bytes with spaces, as written.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_raw(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and raw tensors of a safetensors file, with errors that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ticket file {str(path)!r} does not exist")
    if not path.is_file():
        found = "a folder" if path.is_dir() else "a device, pipe or socket"
        raise ValueError(f"{path}: not a file (a ticket file expected, found {found})")
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(data)} bytes, truncated or empty)")
    n = int.from_bytes(data[:8], "little")
    try:
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes but only {len(data) - 8} follow")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
        tensors = st_load(data)
    # KeyError: a dtype torch lacks; RecursionError: a deeply nested header.
    except (SafetensorError, ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e!r}") from None
    meta = header.get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else {}, tensors


def _check_shape(path: Path, name: str, shape) -> list[int]:
    """``shape`` of a manifest entry, if torch can make a tensor of it: non-negative ints (not
    bools) whose non-zero product, the largest stride, fits in int64 with room to spare."""
    span = 1
    ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    for d in shape if ok else ():
        span *= max(d, 1)
    if not ok or span >= 2**62:
        raise ValueError(
            f"{path}: manifest entry of {name!r} has a bad shape {shape!r} (expected a list of "
            "ints >= 0, the product of the non-zero ones below 2**62)"
        )
    return shape


def _decode(path: Path, name: str, raw: torch.Tensor, info: dict, version: str) -> torch.Tensor:
    shape = _check_shape(path, name, info.get("shape"))
    numel = math.prod(shape)
    per_byte, unpack = _CODECS[version].per_byte, _CODECS[version].unpack
    expected = -(-numel // per_byte)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected:
        raise ValueError(
            f"{path}: tensor {name!r} should be {expected} uint8 bytes for shape {shape}, "
            f"found {raw.dtype} of shape {tuple(raw.shape)}"
        )
    if _sha256(raw.numpy().tobytes()) != info.get("sha256"):
        raise ValueError(f"{path}: tensor {name!r} does not match its checksum (corrupted file)")
    codes = unpack(raw, expected * per_byte)
    if (codes[:numel] == _bits.CODE_INVALID).any():
        raise ValueError(f"{path}: tensor {name!r} holds values outside {{-1, 0, +1}} (corrupted file)")
    if codes[numel:].any():
        raise ValueError(f"{path}: tensor {name!r} has non-zero padding (corrupted file)")
    signed = _bits.codes_to_signed(codes[:numel]).view(shape)
    counts = _counts(signed)
    if counts["kept"] != info.get("kept") or counts["negative"] != info.get("negative"):
        raise ValueError(
            f"{path}: tensor {name!r} does not match its kept/negative counts (the manifest "
            f"says kept={info.get('kept')!r}, negative={info.get('negative')!r}; the tensor holds "
            f"kept={counts['kept']}, negative={counts['negative']})"
        )
    return signed


def _decode_norm(path: Path, name: str, raw: torch.Tensor, info: dict) -> torch.Tensor:
    _check_shape(path, name, info.get("shape"))  # [True, 3] would compare equal to [1, 3]
    found = (list(raw.shape), str(raw.dtype).removeprefix("torch."))
    if not raw.is_floating_point() or found != (info.get("shape"), info.get("dtype")):
        raise ValueError(
            f"{path}: norm tensor {name!r} should be {info.get('dtype')} of shape {info.get('shape')}, "
            f"found {found[1]} of shape {found[0]}"
        )
    if _sha256(_bytes(raw)) != info.get("sha256"):
        raise ValueError(f"{path}: tensor {name!r} does not match its checksum (corrupted file)")
    return raw


def _check_checksums(path: Path, meta: dict[str, str], manifest: dict, version: str) -> None:
    """Refuse edited metadata or manifest. Files of versions 1 and 2 may lack the checksums
    (older signmask versions wrote none); one that has them is checked whatever its version, as
    the version itself may be what was edited."""
    digest = meta.get("metadata_sha256")
    if digest is None and _CODECS[version].sealed:
        raise ValueError(
            f"{path}: ticket of format version {version!r} lacks its metadata checksum "
            "'metadata_sha256' (edited or corrupted file)"
        )
    if digest is not None and digest != _metadata_sha256(meta, manifest):
        raise ValueError(f"{path}: ticket metadata does not match its checksum (edited or corrupted file)")
    digest = meta.get("manifest_sha256")
    if digest is not None and digest != _sha256(_canonical(manifest)):
        raise ValueError(f"{path}: ticket manifest does not match its checksum (edited or corrupted file)")


def load(path: str | os.PathLike) -> Ticket:
    """Read a ticket written by :func:`save` (format version 3) or an older signmask (1 and 2).

    Args:
        path: the ``.safetensors`` file (a ``str`` or ``os.PathLike``).

    Returns:
        The :class:`Ticket`, its checksums verified; its metadata holds the ticket's own
        entries, without the file format's reserved keys.

    Raises:
        TypeError: ``path`` is not a path.
        FileNotFoundError: no such file.
        ValueError: a folder, not a safetensors file, truncated or corrupted, not a signmask ticket, an
            unsupported format version, edited metadata (any entry), missing or extra tensors,
            or values outside {-1, 0, +1}; the message names the file and the tensor.

    Example:
        >>> import os, tempfile, torch, signmask
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "t.safetensors")
        ...     _ = signmask.save(signmask.Ticket({"fc.weight": torch.tensor([[1, 0, -1]])}), path)
        ...     signmask.load(path).masks["fc.weight"].tolist()
        [[1, 0, -1]]
    """
    path = Path(check_path(path))
    meta, raw = read_raw(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a signmask ticket (metadata 'format' is {meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in _CODECS:
        newer = isinstance(version, str) and version.isascii() and version.isdigit()
        newer = newer and int(version) > int(FORMAT_VERSION)
        raise ValueError(
            f"{path}: ticket format version {version!r} is not supported "
            f"(this signmask reads versions {', '.join(_CODECS)})"
            + ("; a newer signmask wrote it: upgrade signmask to read it" if newer else "")
        )
    try:
        manifest = json.loads(meta["manifest"])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: ticket manifest is missing or unreadable: {e!r}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: ticket manifest should be a JSON object, found {type(manifest).__name__}")
    _check_checksums(path, meta, manifest, version)
    missing, extra = sorted(set(manifest) - set(raw)), sorted(set(raw) - set(manifest))
    if missing or extra:
        raise ValueError(f"{path}: tensors missing from the file: {missing}; unexpected: {extra}")
    groups: dict[str, dict[str, torch.Tensor]] = {"mask": {}, "sign": {}, "norm": {}}
    for name, info in manifest.items():
        role = info.get("role") if isinstance(info, dict) else None
        if role not in groups:
            raise ValueError(
                f"{path}: manifest entry of {name!r} has unknown role {role!r} "
                f"(expected one of {sorted(groups)})"
            )
        if role == "norm":
            groups[role][name] = _decode_norm(path, name, raw[name], info)
        else:
            groups[role][name] = _decode(path, name, raw[name], info, version)
    user_meta = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    try:
        return Ticket(groups["mask"], groups["sign"], user_meta, groups["norm"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
