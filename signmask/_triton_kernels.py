"""The Triton kernels of the masked (and sign-locked) reparametrization, and their helpers.

One pass each way: the forward reads ``weight_orig``, the bool mask and the packed sign bits and
writes the effective weight; the backward masks (and sign-corrects) the incoming gradient. The
flat kernels walk tensors that share one contiguous layout; the strided ones recover each
element's multi-index (any strides, up to 5 dims). The helpers (:func:`cast`,
:func:`is_negative`, :func:`effective_grad`) are shared with the fused Linear in
``_triton_linear``; ``_triton`` plans and launches these kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _unravel(q, d1, d2, d3, d4):
    i4 = q % d4
    q = q // d4
    i3 = q % d3
    q = q // d3
    i2 = q % d2
    q = q // d2
    return q // d1, q % d1, i2, i3, i4


@triton.jit
def _dot5(i0, i1, i2, i3, i4, s0, s1, s2, s3, s4):
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4


@triton.jit
def cast(x, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand there.
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def is_negative(S, li, inb):
    byte = tl.load(S + (li >> 3), mask=inb, other=0).to(tl.int32)
    return ((byte >> (li & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _locked(o, keep, S, li, inb, CDT: tl.constexpr):
    """The torch path's locked factors (``_reparam.locked_factors``) in ``CDT``: 0 where pruned,
    -1 where a kept ``o``'s sign bit disagrees with its lock, else +1."""
    if CDT == tl.float64:
        negative = o.to(tl.int64, bitcast=True) < 0
    else:
        negative = o.to(tl.int32, bitcast=True) < 0
    flip = (is_negative(S, li, inb) != negative) & (keep != 0)
    return tl.where(flip, -1.0, keep).to(CDT)


@triton.jit
def _effective(w, keep, S, li, inb, HAS_SIGN: tl.constexpr, CDT: tl.constexpr):
    """The effective weight from ``orig`` values ``w`` and their mask ``keep`` (both in the
    compute dtype ``CDT``): ``w * keep``, or under locked signs ``w * f`` with the locked
    factors of logical positions ``li`` (the torch path's bits, pruned zeros' signs included)."""
    if HAS_SIGN:
        return w * _locked(w, keep, S, li, inb, CDT)
    # A product, not a select, so NaN * 0 and -0.0 come out as in ``orig * mask``.
    return w * keep


@triton.jit
def effective_grad(g, keep, O, o_off, S, li, inb, HAS_SIGN: tl.constexpr, CDT: tl.constexpr):
    """The gradient of ``orig`` from the effective weight's gradient ``g``: ``g * keep``, or
    under locked signs ``g * f``, the forward's factors (``orig`` read at ``O + o_off``)."""
    if HAS_SIGN:
        o = tl.load(O + o_off, mask=inb, other=0).to(CDT)
        return g * _locked(o, keep, S, li, inb, CDT)
    return g * keep


@triton.jit
def _fwd_body(O, MK, S, Y, o_off, m_off, y_off, li, inb,
              HAS_SIGN: tl.constexpr, CDT: tl.constexpr, MANUAL_BF16: tl.constexpr):
    w = tl.load(O + o_off, mask=inb, other=0).to(CDT)
    keep = tl.load(MK + m_off, mask=inb, other=0).to(CDT)
    w = _effective(w, keep, S, li, inb, HAS_SIGN, CDT)
    tl.store(Y + y_off, cast(w, Y.dtype.element_ty, MANUAL_BF16), mask=inb)


@triton.jit
def _bwd_body(G, O, MK, S, Y, g_off, o_off, m_off, y_off, li, inb,
              HAS_SIGN: tl.constexpr, CDT: tl.constexpr, MANUAL_BF16: tl.constexpr):
    g = tl.load(G + g_off, mask=inb, other=0).to(CDT)
    keep = tl.load(MK + m_off, mask=inb, other=0).to(CDT)
    g = effective_grad(g, keep, O, o_off, S, li, inb, HAS_SIGN, CDT)
    tl.store(Y + y_off, cast(g, Y.dtype.element_ty, MANUAL_BF16), mask=inb)


@triton.jit
def _flat_range(n, I64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    q = pid * BLOCK + tl.arange(0, BLOCK)
    return q, q < n


@triton.jit
def _masked_weight_fwd_flat(
    O, MK, S, Y, n, HAS_SIGN: tl.constexpr, I64: tl.constexpr, CDT: tl.constexpr,
    MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """All tensors walked in the same memory order, the sign index equal to it (few args: the
    launch overhead matters when a small model is launch-bound)."""
    q, inb = _flat_range(n, I64, BLOCK)
    _fwd_body(O, MK, S, Y, q, q, q, q, inb, HAS_SIGN, CDT, MANUAL_BF16)


@triton.jit
def _masked_weight_bwd_flat(
    G, O, MK, S, Y, n, HAS_SIGN: tl.constexpr, I64: tl.constexpr, CDT: tl.constexpr,
    MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    q, inb = _flat_range(n, I64, BLOCK)
    _bwd_body(G, O, MK, S, Y, q, q, q, q, q, inb, HAS_SIGN, CDT, MANUAL_BF16)


@triton.jit
def _masked_weight_fwd(
    O, MK, S, Y, n, d1, d2, d3, d4,
    o0, o1, o2, o3, o4, m0, m1, m2, m3, m4, y0, y1, y2, y3, y4, s0, s1, s2, s3, s4,
    SAME: tl.constexpr, HAS_SIGN: tl.constexpr, I64: tl.constexpr,
    CDT: tl.constexpr, MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Any strides: the multi-index of each element is recovered from its position ``q``.
    ``SAME``: all tensors share one dense layout walked in memory order, so only the sign
    index (the logical row-major position) needs the multi-index."""
    q, inb = _flat_range(n, I64, BLOCK)
    i0, i1, i2, i3, i4 = _unravel(q, d1, d2, d3, d4)
    li = _dot5(i0, i1, i2, i3, i4, s0, s1, s2, s3, s4)
    if SAME:
        _fwd_body(O, MK, S, Y, q, q, q, li, inb, HAS_SIGN, CDT, MANUAL_BF16)
    else:
        o_off = _dot5(i0, i1, i2, i3, i4, o0, o1, o2, o3, o4)
        m_off = _dot5(i0, i1, i2, i3, i4, m0, m1, m2, m3, m4)
        y_off = _dot5(i0, i1, i2, i3, i4, y0, y1, y2, y3, y4)
        _fwd_body(O, MK, S, Y, o_off, m_off, y_off, li, inb, HAS_SIGN, CDT, MANUAL_BF16)


@triton.jit
def _masked_weight_bwd(
    G, O, MK, S, Y, n, d1, d2, d3, d4,
    g0, g1, g2, g3, g4, o0, o1, o2, o3, o4, m0, m1, m2, m3, m4, y0, y1, y2, y3, y4,
    s0, s1, s2, s3, s4,
    SAME: tl.constexpr, HAS_SIGN: tl.constexpr, I64: tl.constexpr,
    CDT: tl.constexpr, MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    q, inb = _flat_range(n, I64, BLOCK)
    i0, i1, i2, i3, i4 = _unravel(q, d1, d2, d3, d4)
    li = _dot5(i0, i1, i2, i3, i4, s0, s1, s2, s3, s4)
    if SAME:
        _bwd_body(G, O, MK, S, Y, q, q, q, q, li, inb, HAS_SIGN, CDT, MANUAL_BF16)
    else:
        g_off = _dot5(i0, i1, i2, i3, i4, g0, g1, g2, g3, g4)
        o_off = _dot5(i0, i1, i2, i3, i4, o0, o1, o2, o3, o4)
        m_off = _dot5(i0, i1, i2, i3, i4, m0, m1, m2, m3, m4)
        y_off = _dot5(i0, i1, i2, i3, i4, y0, y1, y2, y3, y4)
        _bwd_body(G, O, MK, S, Y, g_off, o_off, m_off, y_off, li, inb, HAS_SIGN, CDT, MANUAL_BF16)


INTERPRETED = type(_masked_weight_fwd).__name__ == "InterpretedFunction"


def manual_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels writing ``dtype`` must round fp32 -> bf16 by hand (the interpreter's
    cast truncates): the ``MANUAL_BF16`` argument of :func:`cast`."""
    return INTERPRETED and dtype == torch.bfloat16
