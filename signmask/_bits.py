"""Bit packing for sign buffers (1 bit per weight) and ticket files (1.6 bits per weight).

:func:`pack` layout: element ``i`` of the flattened tensor lives in byte ``i // per_byte`` at bit
offset ``(i % per_byte) * width``, least significant bits first. Padding bits are zero. Sign
buffers use width 1; version-1 ticket files used width 2 (four codes per byte).

:func:`pack_ternary` layout (ticket files since version 2): code ``i`` in {0, 1, 2} lives in byte
``i // 5`` with weight ``3 ** (i % 5)``, i.e. ``byte = c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4``. Padding
codes are zero; bytes 243..255 never occur in a valid file.
"""

from __future__ import annotations

import functools
import math
import sys

import torch

from . import _maskmul

# Codes of a signed mask in a ticket file. Code 3 never occurs in a valid file: unpacking yields it
# for bytes that no valid file holds, so one check catches every invalid value.
CODE_PRUNED, CODE_POS, CODE_NEG, CODE_INVALID = 0, 1, 2, 3

# 3**5 = 243 <= 256 and 3**6 > 256: five ternary codes per byte is the densest whole-byte layout.
TERNARY_PER_BYTE = 5


def _shifts(width: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, width, dtype=torch.uint8, device=device)


def _groups(codes: torch.Tensor, per_byte: int, limit: int) -> torch.Tensor:
    """``codes`` flattened to uint8, zero-padded and viewed as rows of ``per_byte`` codes.

    Raises:
        ValueError: a code is negative or not below ``limit`` (it would spill into its
            neighbours' bits and corrupt them silently).
    """
    flat = codes.reshape(-1)
    if flat.dtype != torch.bool and flat.numel() and (flat.min() < 0 or flat.max() >= limit):
        raise ValueError(
            f"codes must lie in [0, {limit}), found values in "
            f"[{flat.min().item()}, {flat.max().item()}]"
        )
    flat = flat.to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, per_byte)


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a tensor of small unsigned codes (< 2**width) into uint8 bytes (see module docs)."""
    groups = _groups(codes, 8 // width, 1 << width) << _shifts(width, codes.device)
    return groups.sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, numel: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    mask = (1 << width) - 1
    codes = (packed.reshape(-1, 1) >> _shifts(width, packed.device)) & mask
    return codes.reshape(-1)[:numel]


def _ternary_weights(device: torch.device) -> torch.Tensor:
    return 3 ** torch.arange(TERNARY_PER_BYTE, dtype=torch.uint8, device=device)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of codes in {0, 1, 2} into uint8 bytes, five codes per byte.

    Args:
        codes: codes in {0, 1, 2}, any shape (flattened in row-major order).

    Returns:
        ``ceil(codes.numel() / 5)`` uint8 bytes, each ``c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4``.

    Raises:
        ValueError: a code outside {0, 1, 2}.
    """
    groups = _groups(codes, TERNARY_PER_BYTE, 3) * _ternary_weights(codes.device)
    return groups.sum(dim=1, dtype=torch.uint8)  # at most 242: no overflow


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: the first ``numel`` codes as a flat uint8 tensor.

    Every code of a byte >= 243 (which :func:`pack_ternary` never writes) comes out as
    ``CODE_INVALID``, so callers detect corrupted bytes by looking for that code.
    """
    dev = packed.device
    table = torch.arange(256, dtype=torch.uint8, device=dev)[:, None] // _ternary_weights(dev) % 3
    table[3**TERNARY_PER_BYTE :] = CODE_INVALID
    # index_select with an int32 index: about 3x faster on CPU than table[packed.long()].
    return table.index_select(0, packed.reshape(-1).int()).reshape(-1)[:numel]


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (True = negative) into 1 bit per element.

    On little-endian hosts, 8 bools (bytes 0 or 1) are one int64 whose byte ``k`` holds bit
    ``k``: three shift-and-or folds gather them into its low byte, about 5x faster on CPU than
    :func:`pack`'s shifts and per-byte sum (the undo records pack every tensor they keep).
    """
    if (negative.dtype != torch.bool or sys.byteorder != "little" or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):  # neither can record dtype views
        return pack(negative, 1)
    flat = negative.reshape(-1).view(torch.uint8)
    whole = flat.numel() - flat.numel() % 8
    body = flat[:whole]
    if body.storage_offset() % 8:  # an int64 view needs 8-byte alignment
        body = body.clone()
    x = body.view(torch.int64)
    x = x | (x >> 7)  # byte k: bits k, k+1
    x |= x >> 14  # bits k..k+3
    x |= x >> 28  # bits k..k+7: the low byte holds bytes 0..7's bits
    packed = x.to(torch.uint8)  # the low byte (a conversion to uint8 wraps)
    if whole == flat.numel():
        return packed
    return torch.cat([packed, pack(flat[whole:], 1)])


def sign_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Unpacked sign bits as an int8 tensor of ``shape`` (1 = negative, 0 = positive).

    On little-endian hosts this is one gather from a 256-entry table whose int64 entries hold a
    byte's 8 bits as 8 bytes: about 3x faster than :func:`unpack`'s shifts on CPU.
    """
    numel = math.prod(shape)
    if sys.byteorder != "little" or torch.jit.is_tracing():
        # shifts, not the table's reinterpreted bytes: jit.trace cannot record view(dtype)
        return unpack(packed, numel, 1).view(shape).to(torch.int8)
    dev = packed.device
    # Built afresh while compiling or under fake tensors: a table made under FakeTensorMode has
    # no data, and cached it would give every later sign-locked forward in the process wrong signs.
    table = _make_table(dev) if torch.compiler.is_compiling() or _maskmul.faking() else _table(dev)
    values = torch.take(table, packed.reshape(-1).long()).view(torch.int8)
    return values[:numel].view(shape)


def _make_table(device: torch.device) -> torch.Tensor:
    """256 int64 entries, each holding a byte's 8 bits as 8 int8 values in little-endian order."""
    table = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return table.to(torch.int8).view(torch.int64).view(-1)


@functools.lru_cache(maxsize=None)
def _table(device: torch.device) -> torch.Tensor:
    # A constant built once per device: rebuilding it cost ~40% of sign_bits on small tensors
    # (5 kernel launches per forward on CUDA). Outside inference mode, so autograd may use it.
    with torch.inference_mode(False), torch.no_grad():
        return _make_table(device)


# The integer dtype of each float size: a view in it reads and writes a float's bits exactly.
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor viewed as integers of its size: its bits, the sign bit the top one."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same dtype, shape and bits: unlike ``torch.equal``, -0.0
    differs from 0.0 and a NaN equals only a NaN of the same bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        a, b = as_bits(a), as_bits(b)
    return torch.equal(a, b)


def signed_to_codes(signed: torch.Tensor) -> torch.Tensor:
    """Map int8 values {0, +1, -1} to ticket codes {0, 1, 2}."""
    signed = signed.to(torch.int8)  # in int8 throughout: int64 would cost 8 bytes per weight
    return torch.where(signed < 0, CODE_NEG, signed).view(torch.uint8)


def codes_to_signed(codes: torch.Tensor) -> torch.Tensor:
    """Map ticket codes {0, 1, 2} back to int8 {0, +1, -1} (``CODE_INVALID`` must be rejected first)."""
    codes = codes.to(torch.uint8)  # codes < 128: the same values viewed as int8
    return torch.where(codes == CODE_NEG, -1, codes.view(torch.int8))
