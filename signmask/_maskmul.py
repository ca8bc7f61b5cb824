"""Multiplying float tensors by small integer factors (masks, signs), fast on CPU.

A bool mask or an int8 factor in {-1, 0, +1} holds 1 byte per weight. torch multiplies a float
tensor by it through type promotion, which on CPU first converts the whole factor to a freshly
allocated float temporary; for large weights that allocation often takes fresh pages from the
OS, and their page faults slow the pass down. Here large CPU tensors are converted into a float
buffer kept between calls, up to ``CHUNK`` elements at a time, and multiplied from it. Each
conversion and each multiply is one parallel region of torch's thread pool, so the chunks are
large: when another job holds a core, every region waits for a descheduled thread, and a pass in
256K-element chunks took 3-14x longer than one in a single chunk
(``benchmarks/grad_mask_cost.py --busy 1``). The products are the same numbers (multiplying by
the float of an exact small integer), so every path is bitwise equal to ``t * factor``.

Elsewhere the plain torch op runs: CUDA (the conversion happens inside the kernel), small
tensors, ``torch.compile`` (which fuses it), ``torch.jit.trace``, functorch transforms (``vmap``,
``torch.func.grad``), products autograd must record (``create_graph=True``), and layouts without
a flat view.
"""

from __future__ import annotations

import torch

# Up to SMALL elements the plain op runs: its temporary (<= 1 MiB in fp32) comes from the heap,
# and the Python around a chunked multiply would cost as much as the multiply.
SMALL = 1 << 18
# Elements converted per region: 4M, so that one conversion and one multiply cover any weight of
# a ResNet-50 or a ViT-B; the buffer is then at most 16 MiB in fp32 (32 MiB in fp64).
CHUNK = 1 << 22

# A cache, not state (no result depends on it): the float buffer of each dtype, grown to the
# largest chunk met so far. A call takes its buffer out while using it, so a call in another
# thread, or one re-entered from inside it, makes its own instead of sharing it.
_buffers: dict[torch.dtype, torch.Tensor] = {}


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """A stride-1 view of every element of ``t`` in memory order, or None (overlaps, gaps)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    try:
        flat = t.permute(order).view(-1)
    except RuntimeError:
        return None
    # Dense only: then empty_like(t) has t's strides, so flat views of t and out line up.
    return flat if flat.stride(0) == 1 else None


def _plain(t: torch.Tensor) -> bool:
    """Whether the plain op runs, no further checks needed: non-CPU or small tensors, tracing.

    This runs on every forward of every pruned tensor; for small ones the Python around the
    multiply costs as much as the multiply. ``jit.trace`` cannot record the chunked path's
    dtype views (and must not see ``numel()`` compared: it warns), so it is asked first.
    """
    return torch.jit.is_tracing() or t.device.type != "cpu" or t.numel() <= SMALL


def _chunked(t: torch.Tensor, factor: torch.Tensor) -> tuple | None:
    """Flat views of ``t`` and ``factor`` (an integer tensor) when the chunked CPU path applies,
    else None. Callers have ruled out :func:`_plain` tensors."""
    if (
        factor.device.type != "cpu"
        or factor.dtype not in (torch.uint8, torch.int8)  # exact small integers only
        or not t.is_floating_point()
        or t.shape != factor.shape
        or t.stride() != factor.stride()
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()  # vmap, grad, jacrev: plain ops batch
        or faking()
    ):
        return None
    flat_t, flat_f = _flat(t), _flat(factor)
    if flat_t is None or flat_f is None:
        return None
    return flat_t, flat_f


def faking() -> bool:
    """Whether ops run under FakeTensorMode (torch.export, shape propagation, make_fx, memory
    estimators): their tensors are stand-ins without data, so nothing made then may be kept
    for later calls (a buffer, a table), nor a kept one mixed with them."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _recorded(t: torch.Tensor) -> bool:
    # out= kernels cannot be recorded by autograd: a product that must be differentiable (a
    # gradient under create_graph=True, say) takes the plain op.
    return t.requires_grad and torch.is_grad_enabled()


def _run(out_flat, t_flat, f_flat) -> None:
    n, dtype = t_flat.numel(), t_flat.dtype
    buf = _buffers.pop(dtype, None)  # dict.pop is atomic: no other call can hold it too
    if buf is None or buf.numel() < min(n, CHUNK):
        # A normal tensor even under inference_mode: an inference tensor could not be written
        # in place by a later call outside it.
        with torch.inference_mode(False):  # and on the CPU whatever torch.device() says
            buf = torch.empty(min(n, CHUNK), dtype=dtype, device="cpu")
    try:
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            floats = buf[: stop - start]
            floats.copy_(f_flat[start:stop])
            torch.mul(t_flat[start:stop], floats, out=out_flat[start:stop])
    finally:
        _buffers[dtype] = buf


def as_int(factor: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A bool ``factor`` as its integer view: the same 0/1 factors, but torch's CPU kernels
    promote bool ~3x slower. Not while ``jit.trace`` records (it cannot record dtype views) nor
    under ``torch.compile``: inductor fuses the product anyway, and torch 2.11's cannot lower a
    bool-to-uint8 view (``torch.bool is not supported by torch.iinfo``)."""
    if factor.dtype != torch.bool or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return factor
    return factor.view(dtype)


def mul_(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply ``t`` in place by ``factor`` (bool, or small integers, the same shape); ``t``.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.5, -2.0, 3.0])
        >>> mul_(w, torch.tensor([True, False, True]))
        tensor([1.5000, -0.0000, 3.0000])
    """
    return _product(t, factor, inplace=True)


def mul(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t * factor`` as a new tensor of ``t``'s dtype and layout (see :func:`mul_`)."""
    return _product(t, factor, inplace=False)


def _integer_view(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Only beside floats: an int8 or bool t times a uint8 factor would promote to another dtype.
    return as_int(factor) if t.is_floating_point() or t.is_complex() else factor


def _product(t: torch.Tensor, factor: torch.Tensor, inplace: bool) -> torch.Tensor:
    factor = _integer_view(t, factor)
    views = None if _plain(t) or _recorded(t) else _chunked(t, factor)
    if views is None:
        return t.mul_(factor) if inplace else t * factor
    return _apply(t, views, inplace)


def _apply(t: torch.Tensor, views: tuple, inplace: bool) -> torch.Tensor:
    t_flat, f_flat = views
    if inplace:
        _run(t_flat, t_flat, f_flat)
        return t
    out = torch.empty_like(t)  # same strides as t, so its flat view lines up with t's
    _run(_flat(out), t_flat, f_flat)
    return out


class MulFactor(torch.autograd.Function):
    """``t * factor`` differentiable in ``t``: the backward is ``grad * factor`` (chunked too)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: torch.Tensor, views: tuple) -> torch.Tensor:
        ctx.save_for_backward(factor)
        ctx.save_for_forward(factor)
        return _apply(t, views, inplace=False)  # multiply() found the chunked path applies

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return mul(grad, factor), None, None  # differentiable itself under create_graph=True

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _factor_tangent, _views) -> torch.Tensor:
        (factor,) = ctx.saved_tensors
        return tangent * factor


def multiply(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t * factor`` with autograd, taking the chunked path where it applies.

    Example:
        >>> import torch
        >>> o = torch.ones(2, requires_grad=True)
        >>> multiply(o, torch.tensor([1, 0], dtype=torch.int8)).sum().backward()
        >>> o.grad
        tensor([1., 0.])
    """
    # As an integer view first: torch's CPU kernels promote bool ~3x slower than uint8.
    factor = _integer_view(t, factor)
    if _plain(t):  # no autograd.Function overhead where the plain op runs anyway
        return t * factor
    with torch.no_grad():  # the flat views feed out= kernels only: no autograd nodes for them
        views = _chunked(t, factor)
    return t * factor if views is None else MulFactor.apply(t, factor, views)
