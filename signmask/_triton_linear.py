"""A fused masked Linear in Triton: the mask and locked signs are applied in the matmul's tiles.

``masked_linear(x, orig, mask, sign, bias)`` computes ``F.linear(x, masked_weight(orig, mask,
sign), bias)`` without ever writing the effective weight:

- forward and grad-input: each weight tile is loaded from ``weight_orig`` with its mask bytes
  (and sign bits), combined in registers and fed to ``tl.dot``;
- grad-weight: ``grad_out.T @ x`` with the mask (and ``s * sgn(orig)``) applied in the epilogue,
  so the gradient of ``weight_orig`` is written once, already masked.

Under autocast the matmuls run in the autocast dtype (inputs cast like ``F.linear``'s), with fp32
accumulation; fp32 products use tf32 exactly where cuBLAS would (``torch.backends.cuda.matmul
.fp32_precision``, or the legacy ``torch.get_float32_matmul_precision``), else IEEE fp32. Kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _triton
from ._triton_kernels import cast, effective_grad, is_negative, manual_bf16


@triton.jit
def _factor(keep, S, li, inb):
    """The locked sign times the mask, in ``keep``'s dtype: -1 where kept and negative, else
    ``keep`` itself (+0.0 where pruned, as an integer factor converts)."""
    return tl.where(is_negative(S, li, inb) & (keep != 0), -1.0, keep).to(keep.dtype)


_INTERP_CONFIG = [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP": 4})]


def _config(bm: int, bn: int, bk: int, stages: int, warps: int):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_stages=stages,
                         num_warps=warps)


# Tensor-core tiles (bf16/fp16 operands, or fp32 as tf32).
_MMA_CONFIGS = [
    _config(*c) for c in ((128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (128, 64, 64, 4, 4),
                          (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4),
                          (16, 128, 128, 4, 4))
]
# IEEE fp32 products run on the FMA units with operands in registers: every tensor-core tile
# above spills there (4-23 KB of local memory per thread on sm_90) or needs more shared memory
# than the SM has; these spill at most 24 B (benchmarks/results/kernel_resources_sm90.md).
_IEEE_CONFIGS = [
    _config(*c) for c in ((64, 64, 16, 3, 4), (32, 64, 32, 3, 4), (64, 32, 32, 3, 4),
                          (32, 32, 32, 3, 4))
]
_GPU_CONFIGS = _MMA_CONFIGS + _IEEE_CONFIGS


def _configs():
    return _INTERP_CONFIG if _triton.INTERPRETED else _GPU_CONFIGS


def _by_precision(configs, named_args, **kwargs):
    """Autotune only the tiles made for the launch's precision (see ``_IEEE_CONFIGS``)."""
    if _triton.INTERPRETED:
        return configs
    return _IEEE_CONFIGS if kwargs.get("PRECISION") == "ieee" else _MMA_CONFIGS


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, I64: tl.constexpr):
    # Grouped ordering: neighbouring programs share A rows, for L2 reuse. (No tl.cdiv, tl.zeros:
    # library @jit functions break the interpreter when triton was imported before
    # TRITON_INTERPRET was set.)
    pid = tl.program_id(0)
    grid_m = (M + BM - 1) // BM
    grid_n = (N + BN - 1) // BN
    group = pid // (GROUP * grid_n)
    first_m = group * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * grid_n)) % size_m
    pid_n = (pid % (GROUP * grid_n)) // size_m
    rm, rn = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)
    if I64:  # then every offset built from them is 64-bit (see _wide)
        rm, rn = rm.to(tl.int64), rn.to(tl.int64)
    return rm, rn


# Keyed on the token count's bucket (TOKENS, a power of two), not on the count itself: a new
# key re-times every config (~0.1 s each on a GPU), and token counts vary from step to step.
@triton.autotune(configs=_configs(), key=["TOKENS", "N", "K", "HAS_SIGN", "PRECISION"],
                 prune_configs_by={"early_config_prune": _by_precision})
@triton.jit(do_not_specialize=["TOKENS"])  # a key only: no binary per its value's divisibility
def _masked_mm(
    A, W, MK, S, BIAS, C, M, N, K,
    sa_m, sa_k, sw_k, sw_n, sm_k, sm_n, ss_k, ss_n, sc_m, sc_n, TOKENS,
    HAS_SIGN: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    MANUAL_BF16: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):
    """C[M, N] = A[M, K] @ Weff(k, n), Weff read from W / mask MK / sign bits S by strides."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP, I64)
    rm64 = rm.to(tl.int64)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        if I64:
            rk = rk.to(tl.int64)
        a_ok = (rm[:, None] < M) & (rk[None, :] < K)
        a = tl.load(A + rm64[:, None] * sa_m + rk[None, :] * sa_k, mask=a_ok, other=0)
        w_ok = (rk[:, None] < K) & (rn[None, :] < N)
        w = tl.load(W + rk[:, None] * sw_k + rn[None, :] * sw_n, mask=w_ok, other=0)
        keep = tl.load(MK + rk[:, None] * sm_k + rn[None, :] * sm_n, mask=w_ok, other=0)
        keep = keep.to(tl.float32)
        if HAS_SIGN:
            # |w| * s * keep: the values of _effective's (only the signs of pruned zeros, which
            # no product in the sum can tell, may differ), in fewer registers in the dot's loop.
            w = tl.abs(w.to(tl.float32)) * _factor(keep, S, rk[:, None] * ss_k + rn[None, :] * ss_n,
                                                   w_ok)
        else:
            w = w.to(tl.float32) * keep
        w = cast(w, A.dtype.element_ty, MANUAL_BF16)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns as integers
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
    c_ok = (rm[:, None] < M) & (rn[None, :] < N)
    out = cast(acc, C.dtype.element_ty, MANUAL_BF16)
    tl.store(C + rm64[:, None] * sc_m + rn[None, :] * sc_n, out, mask=c_ok)


@triton.autotune(configs=_configs(), key=["M", "N", "TOKENS", "HAS_SIGN", "PRECISION"],
                 prune_configs_by={"early_config_prune": _by_precision})
@triton.jit(do_not_specialize=["TOKENS"])
def _masked_grad_mm(
    A, B, O, MK, S, C, M, N, K,
    sa_m, sa_k, sb_k, sb_n, so_m, so_n, sm_m, sm_n, ss_m, ss_n, sc_m, sc_n, TOKENS,
    HAS_SIGN: tl.constexpr, UPCAST: tl.constexpr, MANUAL_BF16: tl.constexpr,
    PRECISION: tl.constexpr, I64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):
    """C[M, N] = (A[M, K] @ B[K, N]) * mask (* s * sgn(O)): the gradient of ``weight_orig``."""
    rm, rn = _tile_ids(M, N, BM, BN, GROUP, I64)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        rk = (k0 + tl.arange(0, BK)).to(tl.int64)
        a = tl.load(A + rm[:, None] * sa_m + rk[None, :] * sa_k,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        b = tl.load(B + rk[:, None] * sb_k + rn[None, :] * sb_n,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    keep = tl.load(MK + rm[:, None] * sm_m + rn[None, :] * sm_n, mask=ok, other=0)
    g = effective_grad(acc, keep.to(tl.float32), O, rm[:, None] * so_m + rn[None, :] * so_n, S,
                        rm[:, None] * ss_m + rn[None, :] * ss_n, ok, HAS_SIGN, tl.float32)
    tl.store(C + rm[:, None] * sc_m + rn[None, :] * sc_n, cast(g, C.dtype.element_ty, MANUAL_BF16),
             mask=ok)


def _precision(dtype: torch.dtype) -> str:
    """``"tf32"`` where cuBLAS (``F.linear``) would use tf32 for ``dtype`` operands, else
    ``"ieee"``. Only fp32 has a choice; 16-bit operands always use the MMA units."""
    if dtype != torch.float32:
        return "tf32"
    # torch >= 2.9: what cuBLAS reads, set by the new API (torch.backends[.cuda.matmul]
    # .fp32_precision) and by the legacy setters alike; after a new-API setting,
    # get_float32_matmul_precision() raises ("mix of the legacy and new APIs").
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new is not None:
        return "tf32" if new == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# The largest BM/BN/BK of any config: lanes past a tile's edge compute offsets too.
_TILE_MAX = 256


def _wide(tensors, sign_stride: int) -> bool:
    """Whether an element offset of the GEMM's tiles (or a sign bit's index, whose row stride is
    ``sign_stride``) may pass int32: then the kernels compute offsets in int64."""
    steps = [abs(st) for t in tensors for st in t.stride()] + [sign_stride]
    reach = max(_triton.span(t) for t in tensors) + _TILE_MAX * max(steps)
    numel = max(t.numel() for t in tensors)
    return max(reach, numel + _TILE_MAX * sign_stride) > _triton.I32_MAX


def _bucket(tokens: int) -> int:
    return triton.next_power_of_2(max(tokens, 1))


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def _upcast(dtype: torch.dtype) -> bool:
    return _triton.INTERPRETED and dtype != torch.float32


def _mm(a, orig, mask_u8, sign, bias, *, transposed: bool) -> torch.Tensor:
    """``a @ Weff.T`` (forward, ``transposed``) or ``a @ Weff`` (grad-input)."""
    n_out, k_in = orig.shape
    M = a.shape[0]
    # Weff(k, n) of the GEMM: weight[n, k] in the forward, weight[k, n] for grad-input.
    if transposed:
        K, N, wk, wn, mk, mn, sk, sn = k_in, n_out, 1, 0, 1, 0, 1, k_in
    else:
        K, N, wk, wn, mk, mn, sk, sn = n_out, k_in, 0, 1, 0, 1, k_in, 1
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    with _triton.on_device(c):
        _masked_mm[_grid(M, N)](
            a, orig, mask_u8, sign if sign is not None else mask_u8,
            bias if bias is not None else a, c, M, N, K, a.stride(0), a.stride(1),
            orig.stride(wk), orig.stride(wn), mask_u8.stride(mk), mask_u8.stride(mn), sk, sn,
            c.stride(0), c.stride(1), _bucket(M),
            HAS_SIGN=sign is not None, HAS_BIAS=bias is not None, UPCAST=_upcast(a.dtype),
            MANUAL_BF16=manual_bf16(a.dtype), PRECISION=_precision(a.dtype),
            I64=_wide((a, orig, mask_u8, c), k_in),
        )
    return c


def _grad_weight(gy, x, orig, mask_u8, sign) -> torch.Tensor:
    n_out, k_in = orig.shape
    c = torch.empty_like(orig)
    with _triton.on_device(c):
        _masked_grad_mm[_grid(n_out, k_in)](
            gy.t(), x, orig, mask_u8, sign if sign is not None else mask_u8, c,
            n_out, k_in, gy.shape[0], gy.stride(1), gy.stride(0), x.stride(0), x.stride(1),
            orig.stride(0), orig.stride(1), mask_u8.stride(0), mask_u8.stride(1), k_in, 1,
            c.stride(0), c.stride(1), _bucket(gy.shape[0]),
            HAS_SIGN=sign is not None, UPCAST=_upcast(gy.dtype),
            MANUAL_BF16=manual_bf16(c.dtype), PRECISION=_precision(gy.dtype),
            I64=_wide((gy, x, orig, mask_u8, c), k_in),
        )
    return c


class MaskedLinear(torch.autograd.Function):
    """Autograd of the fused masked linear; inputs checked and already in the compute dtype,
    ``mask_u8`` and ``sign`` as :func:`_triton.prepare` returns them, ``bias`` contiguous."""

    @staticmethod
    def forward(ctx, x, orig, mask_u8, sign, bias):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 is ambiguous with 0 features
        y = _mm(x2, orig, mask_u8, sign, bias, transposed=True)
        ctx.save_for_backward(x2, orig, mask_u8, sign)
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], orig.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises, not a silent zero
    def backward(ctx, grad):
        x2, orig, mask_u8, sign = ctx.saved_tensors
        gy = grad.reshape(x2.shape[0], orig.shape[0])
        if gy.dtype != x2.dtype:
            gy = gy.to(x2.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(gy, orig, mask_u8, sign, None, transposed=False).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = _grad_weight(gy, x2, orig, mask_u8, sign)
        if ctx.needs_input_grad[4]:
            gb = gy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gw, None, None, gb


_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_linear(x, orig, mask, sign, bias, autocast: bool) -> None:
    """What :func:`masked_linear` checks beyond ``_triton.prepare`` (mask and sign dtypes,
    sizes and devices)."""
    if x.dim() == 0:
        raise ValueError("masked_linear: x must be [..., in_features], got a 0-d tensor")
    if orig.dim() != 2:
        raise ValueError(
            "masked_linear: orig must be 2-D [out_features, in_features], "
            f"got shape {tuple(orig.shape)}"
        )
    if x.shape[-1] != orig.shape[1]:
        raise ValueError(
            "masked_linear: x.shape[-1] must equal in_features = orig.shape[1]; "
            f"got orig {tuple(orig.shape)} and x {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (orig.shape[0],):
        raise ValueError(
            f"masked_linear: bias must have shape ({orig.shape[0]},) = (out_features,) of orig "
            f"{tuple(orig.shape)}, got {tuple(bias.shape)}"
        )
    floats = {"x": x, "orig": orig, "bias": bias}
    for name, t in floats.items():
        if t is not None and t.dtype not in _LINEAR_DTYPES:
            raise TypeError(
                f"masked_linear: {name} must be float32, bfloat16 or float16, "
                f"got {_dtype_name(t.dtype)}"
            )
    if not autocast:  # under autocast x and bias are cast here, orig inside the kernel
        for name in ("orig", "bias"):
            t = floats[name]
            if t is not None and t.dtype != x.dtype:
                raise TypeError(
                    f"masked_linear: {name} must have x's dtype {_dtype_name(x.dtype)} outside "
                    f"autocast (as in F.linear), got {_dtype_name(t.dtype)}"
                )
    for name, t in (("orig", orig), ("bias", bias)):  # mask and sign: _triton.prepare, against orig
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"masked_linear: {name} must be on x's device {x.device}, got {t.device}"
            )


def masked_linear(
    x: torch.Tensor,
    orig: torch.Tensor,
    mask: torch.Tensor,
    sign: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, masked_weight(orig, mask, sign), bias)`` with the mask fused into the matmul.

    Args:
        x: input ``[..., in_features]``, any strides; fp32, bf16 or fp16.
        orig: ``weight_orig`` ``[out_features, in_features]``, any strides; fp32, bf16 or fp16,
            of ``x``'s dtype unless autocast is on (as ``F.linear`` requires).
        mask: bool keep-mask of ``orig``'s shape.
        sign: packed sign bits (1 = negative, ``ceil(orig.numel() / 8)`` uint8 bytes) or None.
        bias: ``[out_features]`` (exactly; no broadcasting) or None; of ``x``'s dtype unless
            autocast is on.

    Returns:
        ``[..., out_features]`` in the autocast dtype when autocast is on, else ``x.dtype``.

    Raises:
        ValueError: a shape does not fit: x 0-d, orig not 2-D or not ``[*, x.shape[-1]]``, mask
            not of orig's shape, sign not ``ceil(orig.numel() / 8)`` bytes, bias not
            ``[out_features]``.
        TypeError: a dtype does not fit: x, orig or bias not fp32/bf16/fp16, orig or bias not of
            x's dtype outside autocast, mask not bool, sign not uint8.
        RuntimeError: orig, mask, sign or bias not on x's device, or CPU tensors while the
            kernels are not interpreted; and at a double backward (``create_graph=True``): the
            backward is differentiable once only.
    """
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    _check_linear(x, orig, mask, sign, bias, autocast)
    if torch.compiler.is_compiling():  # the custom op checks mask and sign itself
        from torch.nn import functional as F

        return F.linear(x, _triton.masked_weight(orig, mask, sign, x.dtype), bias)
    mask_u8, flat_sign = _triton.prepare(orig, mask, sign)
    if autocast:
        dtype = torch.get_autocast_dtype(device)
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads it with stride 1
    with torch.autocast(device, enabled=False):
        return MaskedLinear.apply(x, orig, mask_u8, flat_sign, bias)
