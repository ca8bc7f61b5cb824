"""Launching the masked-weight Triton kernels, with their autograd and ``torch.compile`` op.

- :func:`masked_weight`: the effective weight ``orig * mask`` (or ``s * |orig| * mask``) in one
  pass over ``weight_orig``, the bool mask and the packed sign bits, written directly in the
  dtype the consumer needs (bf16 under autocast, replacing autocast's own cast). Its backward
  masks (and sign-corrects) the incoming gradient in one pass. Used by the prune-style hooks.

The kernels themselves live in ``_triton_kernels``; this module checks the tensors, plans the
walk (flat, one shared dense layout, or any strides) and launches on the tensors' device. The
fused Linear (mask applied inside the matmul's tile loads) lives in ``_triton_linear``.

Any shape and strides (channels_last conv weights included), fp32, bf16 (and fp16/fp64).
This module imports triton at import time; ``signmask`` imports it only when a Triton backend
is used. With ``TRITON_INTERPRET=1`` set before this import, kernels run on CPU tensors
(slowly; for tests). Under ``torch.compile`` :func:`masked_weight` goes through the custom op
``signmask::masked_weight`` (registered autograd), so it adds no graph break.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from ._backends import KERNEL_DTYPES
from ._triton_kernels import (
    INTERPRETED,
    _masked_weight_bwd,
    _masked_weight_bwd_flat,
    _masked_weight_fwd,
    _masked_weight_fwd_flat,
    manual_bf16,
)

_BLOCK = 1024
_MAX_RANK = 5
I32_MAX = 2**31 - 1


def check_device(t: torch.Tensor, what: str) -> None:
    """Refuse tensors the kernels cannot reach: CPU tensors need ``TRITON_INTERPRET=1``."""
    if not t.is_cuda and not (INTERPRETED and t.device.type == "cpu"):
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors; {what} is on {t.device} "
            "(use backend='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton "
            "to run the kernels on CPU for testing)"
        )


def _compute_dtype(dtype: torch.dtype):
    # 16-bit math is done in fp32: exact here (products with 0/1 and +-1), and the interpreter
    # cannot do bf16 arithmetic at all.
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dense_order(t: torch.Tensor) -> list[int] | None:
    """Dims from outermost to innermost in memory if ``t`` is dense and non-overlapping."""
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return order


def _pad(values: list[int], fill: int) -> list[int]:
    return [fill] * (_MAX_RANK - len(values)) + list(values)


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _plan(shape: torch.Size, tensors: list[torch.Tensor]) -> tuple[int, list[int], list[list[int]]]:
    """How a kernel walks ``tensors`` (all of ``shape``): mode, sizes, strides (sign's last)."""
    if all(t.is_contiguous() for t in tensors):
        return 0, [], []  # the flat kernel needs no sizes or strides
    logical = _contiguous_strides(shape)
    unused = [_pad([0] * len(shape), 0)]
    order = _dense_order(tensors[0])
    if order is not None and all(t.stride() == tensors[0].stride() for t in tensors):
        sizes = [shape[d] for d in order]
        return 1, _pad(sizes, 1), unused * len(tensors) + [_pad([logical[d] for d in order], 0)]
    strides = [_pad(list(t.stride()), 0) for t in tensors]
    return 2, _pad(list(shape), 1), strides + [_pad(logical, 0)]


def prepare(orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor | None) -> tuple:
    if orig.dtype not in KERNEL_DTYPES:
        raise TypeError(f"orig must be a float tensor (fp32, bf16, fp16, fp64), got {orig.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != orig.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(orig.shape)}, got {tuple(mask.shape)}"
        )
    if sign is not None:
        need = (orig.numel() + 7) // 8
        if sign.dtype != torch.uint8:
            raise TypeError(f"sign must be uint8 (packed bits, 1 = negative), got {sign.dtype}")
        if sign.numel() != need:
            raise ValueError(
                f"sign must hold {need} uint8 bytes (1 bit per weight), got {sign.numel()}"
            )
        sign = sign.reshape(-1).contiguous()
    check_device(orig, "orig")
    for what, t in (("mask", mask), ("sign", sign)):
        if t is not None and t.device != orig.device:
            raise RuntimeError(f"{what} must be on orig's device {orig.device}, got {t.device}")
    return mask.view(torch.uint8), sign


def span(t: torch.Tensor) -> int:
    """Largest element offset of ``t`` (decides 32- or 64-bit index arithmetic)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def on_device(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device the current one while a kernel is launched.

    Triton launches on the current device and its current stream, whatever device the tensors
    are on: a weight on ``cuda:1`` while ``cuda:0`` is current (model parallelism, a
    ``device_map``, DDP without ``set_device``) would be read from the wrong device.
    """
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _launch(kernels, tensors: list[torch.Tensor], sign, out: torch.Tensor, cdt) -> torch.Tensor:
    """Run an elementwise kernel (flat or strided) over ``tensors``, then ``sign``, into ``out``."""
    n = out.numel()
    if n == 0:
        return out
    flat_kernel, strided_kernel = kernels
    if out.dim() > _MAX_RANK:  # rare: walk flat contiguous copies (out is contiguous here)
        tensors = [t.contiguous().view(-1) for t in tensors]
        out_flat = out.view(-1)
    else:
        out_flat = out
    mode, sizes, strides = _plan(out_flat.shape, tensors + [out_flat])
    reach = n if mode == 0 else max(span(t) for t in tensors)
    meta = dict(HAS_SIGN=sign is not None, I64=max(n, reach) > I32_MAX - _BLOCK, CDT=cdt,
                MANUAL_BF16=manual_bf16(out.dtype), BLOCK=_BLOCK)
    grid = ((n + _BLOCK - 1) // _BLOCK,)  # not triton.cdiv: a host call costs ~7 us
    sign_arg = sign if sign is not None else tensors[-1]
    with on_device(out):
        if mode == 0 or (mode == 1 and sign is None):
            flat_kernel[grid](*tensors, sign_arg, out_flat, n, **meta)
        else:
            # 8 warps (4 elements per thread): with 4, the backward with locked signs and any
            # strides held 8 elements' worth of five index vectors and spilled
            # (kernel_resources.py)
            strided_kernel[grid](*tensors, sign_arg, out_flat, n, *sizes[1:],
                                 *[v for st in strides for v in st], SAME=mode == 1,
                                 num_warps=8, **meta)
    return out


def _empty_like(orig: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.contiguous_format if orig.dim() > _MAX_RANK else torch.preserve_format
    return torch.empty_like(orig, dtype=dtype, memory_format=fmt)


def masked_weight_forward(
    orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The effective weight in ``out_dtype`` (no autograd); strides follow ``orig``."""
    mask_u8, sign = prepare(orig, mask, sign)
    out = _empty_like(orig, out_dtype)
    kernels = (_masked_weight_fwd_flat, _masked_weight_fwd)
    return _launch(kernels, [orig, mask_u8], sign, out, _compute_dtype(orig.dtype))


def masked_weight_backward(
    grad: torch.Tensor,
    orig: torch.Tensor,
    mask: torch.Tensor,
    sign: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``orig`` of :func:`masked_weight_forward`, in ``orig``'s dtype.

    Without ``sign`` the values of ``orig`` are not read: ``orig`` may be ``out`` itself (the
    buffer to write, laid out like ``orig``).
    """
    mask_u8, sign = prepare(orig, mask, sign)
    out = _empty_like(orig, orig.dtype) if out is None else out
    cdt = _compute_dtype(orig.dtype)
    kernels = (_masked_weight_bwd_flat, _masked_weight_bwd)
    return _launch(kernels, [grad, orig, mask_u8], sign, out, cdt)


class MaskedWeight(torch.autograd.Function):
    """Autograd of :func:`masked_weight_forward`: one kernel forward, one backward."""

    @staticmethod
    def forward(ctx, orig, mask, sign, out_dtype):
        # orig is saved only when signs are locked (its sign enters the gradient); free masks
        # keep just the metadata, so in-place edits of orig before backward stay legal.
        ctx.save_for_backward(mask, sign, orig if sign is not None else None)
        out = masked_weight_forward(orig, mask, sign, out_dtype)
        ctx.layout = (out.shape, out.stride(), orig.dtype)  # the gradient's layout
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, sign, orig = ctx.saved_tensors
        shape, stride, dtype = ctx.layout
        out = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            return _graph_grad(grad, out.zero_() if orig is None else orig, mask, sign), None, None, None
        orig = out if orig is None else orig
        return masked_weight_backward(grad, orig, mask, sign, out), None, None, None


def _graph_grad(grad, orig, mask, sign):
    """The torch path's gradient, recorded for double backward (gradient penalties, Hessian-vector
    products): the kernel writes a plain buffer autograd cannot see into. Free masks ignore
    ``orig``'s values (the gradient is ``grad * mask``)."""
    from . import _reparam  # not at import: _reparam reaches this module through _backends

    ref = orig.detach().requires_grad_()
    weight = _reparam.masked_weight(ref, mask, sign).to(grad.dtype)
    return torch.autograd.grad(weight, ref, grad, create_graph=True)[0]


# Explicit schemas: torch 2.4 cannot infer them from this module's postponed annotations.
@torch.library.custom_op(
    "signmask::masked_weight",
    mutates_args=(),
    schema="(Tensor orig, Tensor mask, Tensor? sign, ScalarType out_dtype) -> Tensor",
)
def _masked_weight_op(
    orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    return masked_weight_forward(orig, mask, sign, out_dtype)


@torch.library.custom_op(
    "signmask::masked_weight_grad",
    mutates_args=(),
    schema="(Tensor grad, Tensor orig, Tensor mask, Tensor? sign) -> Tensor",
)
def _masked_weight_grad_op(
    grad: torch.Tensor, orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor | None
) -> torch.Tensor:
    return masked_weight_backward(grad, orig, mask, sign)


@_masked_weight_op.register_fake
def _(orig, mask, sign, out_dtype):
    return _empty_like(orig, out_dtype)


@_masked_weight_grad_op.register_fake
def _(grad, orig, mask, sign):
    return _empty_like(orig, orig.dtype)


def _setup_context(ctx, inputs, output):
    orig, mask, sign, _ = inputs
    ctx.save_for_backward(orig, mask, sign)


def _op_backward(ctx, grad):
    orig, mask, sign = ctx.saved_tensors
    return _masked_weight_grad_op(grad, orig, mask, sign), None, None, None


_masked_weight_op.register_autograd(_op_backward, setup_context=_setup_context)


def masked_weight(
    orig: torch.Tensor,
    mask: torch.Tensor,
    sign: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable effective weight computed by one Triton kernel.

    Args:
        orig: the trainable tensor (``weight_orig``), any strides.
        mask: bool keep-mask of the same shape.
        sign: packed sign bits (``weight_sign``, 1 = negative) or None.
        out_dtype: dtype of the result (default ``orig.dtype``); pass the autocast dtype to
            fold autocast's cast of the weight into this pass.

    Returns:
        ``orig * mask`` or ``|orig| * (s * mask)``, bitwise equal to the torch path followed by
        a cast to ``out_dtype`` (signed zeros and NaN included), with the strides of ``orig``.

    Raises:
        RuntimeError: the tensors are on CPU and the kernels are not interpreted, or ``mask``
            or ``sign`` is not on ``orig``'s device.
        TypeError: ``orig`` not a float tensor, ``mask`` not bool, ``sign`` not uint8.
        ValueError: ``mask`` not of ``orig``'s shape, ``sign`` not ``ceil(numel / 8)`` bytes.
    """
    out_dtype = orig.dtype if out_dtype is None else out_dtype
    if torch.compiler.is_compiling():
        return _masked_weight_op(orig, mask, sign, out_dtype)
    return MaskedWeight.apply(orig, mask, sign, out_dtype)

