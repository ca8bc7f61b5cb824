"""Backends computing the effective weight of pruned tensors, and :func:`set_backend`.

A backend decides how ``module.weight`` is produced from ``weight_orig``, ``weight_mask`` and
``weight_sign``; the layout and the numbers never change (beyond floating-point rounding):

- ``"torch"`` (default): the hook computes ``orig * mask`` with torch ops (compiles cleanly).
- ``"triton"``: one fused Triton kernel forward and one backward (CUDA). Under autocast it writes
  the weight directly in the autocast dtype, replacing autocast's own cast of the weight.
- ``"projection"``: no per-forward work; the masks are applied in place to the weights, the
  gradients and the optimizer state instead (see ``_projection``). Needs ``optimizer=``.
- ``"auto"``: per call, ``"triton"`` for CUDA tensors in eager mode when triton is installed,
  else ``"torch"`` (on CPU, and under ``torch.compile``, where inductor fuses the torch ops).

The choice is stored per tensor on its :class:`~signmask._reparam.SignMaskHook` (``backend``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Mapping

import torch
from torch import nn
from torch.autograd import forward_ad as _forward_ad

from . import _checks, _reparam, _target_checks, _targets, _ties, _undo

BACKENDS: dict[str, "Backend"] = {}

# Forwards that hand the weight straight to F.linear / F.conv* / F.conv_transpose*, which
# autocast runs in lower precision. Subclasses with their own forward (weight standardization,
# "same" padding...) may use the weight otherwise, so they keep orig's dtype.
AUTOCAST_LOWERED = frozenset(cls.forward for cls in _targets.PRUNABLE_TYPES)

Targets = Mapping[str, "tuple[nn.Module, str]"]


def register_backend(name: str) -> Callable[[type], type]:
    """Register a :class:`Backend` subclass under ``name`` (``set_backend(model, name)``)."""

    def deco(cls: type) -> type:
        cls.name = name
        BACKENDS[name] = cls()
        return cls

    return deco


def get_backend(name: str) -> "Backend":
    """The registered backend ``name``; unknown names raise ``ValueError`` (no str:
    ``TypeError``) listing the valid keys.

    Example:
        >>> get_backend("torch").name
        'torch'
    """
    return BACKENDS[_checks.check_key(name, BACKENDS, "backend", "backend")]


class Backend:
    """How a :class:`~signmask._reparam.SignMaskHook` computes its tensor (a strategy)."""

    name = ""

    def check(self, targets: Targets, optimizer: torch.optim.Optimizer | None) -> None:
        """Raise before anything changes if this backend cannot serve ``targets``."""

    def attach(self, targets: Targets, optimizer: torch.optim.Optimizer | None) -> None:
        """Prepare ``targets`` (already checked); called before the hooks switch to it."""

    def weight(self, hook, module: nn.Module, orig, mask, sign, own_forward: bool) -> torch.Tensor:
        """The effective tensor; ``own_forward``: for ``module``'s own forward (else a parent
        reads it, or no forward at all), see :meth:`SignMaskHook.apply_mask`."""
        raise NotImplementedError


@register_backend("torch")
class TorchBackend(Backend):
    """Plain torch ops, the reference path: ``orig * mask`` (or ``s * |orig| * mask``)."""

    def weight(self, hook, module, orig, mask, sign, own_forward):
        return _reparam.masked_weight(orig, mask, sign)


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether ``import triton`` can work (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def consumer_dtype(module: nn.Module, orig: torch.Tensor) -> torch.dtype:
    """The dtype the module's op will cast the weight to: autocast's, else ``orig``'s.

    Mirrors autocast's eligibility rule (floating tensors other than fp64) for the stock conv
    and linear forwards autocast runs in lower precision. Only while grad mode is on (training):
    ``prune.remove`` and ``install`` call the hook under ``no_grad`` and must get ``orig``'s
    dtype back even inside an autocast region.
    """
    device = orig.device.type
    if (
        torch.is_grad_enabled()
        and type(module).forward in AUTOCAST_LOWERED
        and orig.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return orig.dtype


# What the Triton kernels compute (declared here: _backends must not import triton).
KERNEL_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))


def transformed() -> bool:
    """Whether the Triton autograd Function cannot serve the current call: ``jit.trace`` is
    recording, or a ``torch.func`` transform (vmap, grad, jvp) or forward-mode AD is active (the
    Function has no vmap rule and no jvp; the torch path supports them all)."""
    return (
        torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or _forward_ad._current_level >= 0
    )


@register_backend("triton")
class TritonBackend(Backend):
    """One Triton kernel per forward and per backward (``signmask._triton``)."""

    def check(self, targets, optimizer):
        if not triton_installed():
            raise ImportError("backend='triton' needs triton: pip install 'signmask[triton]'")
        from . import _triton

        for key, (module, name) in targets.items():
            orig = _reparam.original(module, name)
            if orig.dtype not in KERNEL_DTYPES:
                raise TypeError(
                    f"backend='triton' computes fp32, bf16, fp16 and fp64 weights; {key} is "
                    f"{orig.dtype} (use backend='torch')"
                )
            _triton.check_device(orig, key)

    def weight(self, hook, module, orig, mask, sign, own_forward):
        from . import _triton

        # Moved to CPU after set_backend (e.g. to save), or cast to another dtype, or under a
        # transform the kernel's Function has no rule for: the torch path gives equal numbers.
        if (
            (not orig.is_cuda and not _triton.INTERPRETED)
            or orig.dtype not in KERNEL_DTYPES
            or (not torch.compiler.is_compiling() and transformed())
        ):
            return _reparam.masked_weight(orig, mask, sign)
        return self.kernel(module, orig, mask, sign, own_forward)

    @staticmethod
    def kernel(module, orig, mask, sign, own_forward: bool) -> torch.Tensor:
        """The kernel's weight, without the checks of :meth:`weight` (done by the caller)."""
        from . import _triton

        dtype = consumer_dtype(module, orig) if own_forward else orig.dtype
        return _triton.masked_weight(orig, mask, sign, dtype)


@register_backend("auto")
class AutoBackend(Backend):
    """``"triton"`` for CUDA tensors in eager mode when triton is installed, else ``"torch"``."""

    def weight(self, hook, module, orig, mask, sign, own_forward):
        # resolve() made the triton backend's checks: call its kernel directly, not twice.
        if self.resolve(orig) == "triton":
            return TritonBackend.kernel(module, orig, mask, sign, own_forward)
        return _reparam.masked_weight(orig, mask, sign)

    @staticmethod
    def resolve(orig: torch.Tensor) -> str:
        """The concrete backend ``"auto"`` uses for ``orig`` right now."""
        if (
            orig.is_cuda
            and orig.dtype in KERNEL_DTYPES
            and triton_installed()
            and not torch.compiler.is_compiling()
            and not transformed()
        ):
            return "triton"
        return "torch"


def _signmask_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    targets = _targets.require_pruned(model, "no backend to set", fix=_target_checks.SHARD_AFTER)
    _target_checks.check_unshadowed(targets)
    for key, (module, name) in targets.items():
        if not isinstance(_reparam.find_hook(module, name)[1], _reparam.SignMaskHook):
            if name == "weight" and isinstance(module, _targets.PRUNABLE_TYPES):
                raise ValueError(
                    f"{key} is pruned by a stock torch.nn.utils.prune hook; adopt it first with "
                    f"signmask.prune(model, 0.0, include={key.rpartition('.')[0]!r})"
                )
            # signmask.prune adopts conv/linear weights only: a bias or a raw Parameter
            # (MultiheadAttention's in_proj_weight) would stay stock-pruned.
            raise ValueError(
                f"{key} is pruned by a stock torch.nn.utils.prune hook, and signmask computes "
                "conv/linear weights only: make that pruning permanent first: "
                f"torch.nn.utils.prune.remove(module, {name!r})"
            )
        _check_layout(key, module, name)
    return targets


def _check_layout(key: str, module: nn.Module, name: str) -> None:
    """Refuse a mask or sign buffer edited out of the layout every backend reads (a float mask
    assigned by hand, one moved to another device): found midway, the backend would already
    have changed the tensors before it."""
    orig = _reparam.original(module, name)  # names a parametrized weight_orig
    wanted = {name + "_mask": (torch.bool, tuple(orig.shape)),
              name + "_sign": (torch.uint8, (-(-orig.numel() // 8),))}  # packed, 1 bit per weight
    for buffer, (dtype, shape) in wanted.items():
        t = module._buffers.get(buffer)
        if t is None and buffer.endswith("_sign"):
            continue  # a free tensor
        found = (t.dtype, tuple(t.shape), t.device) if isinstance(t, torch.Tensor) else None
        if found != (dtype, shape, orig.device):
            what = f"{found[0]} of shape {found[1]} on {found[2]}" if found else type(t).__name__
            raise ValueError(
                f"{key.removesuffix(name)}{buffer} must be {dtype} of shape {shape} on "
                f"{orig.device}, beside its weight (as signmask.prune makes it), found {what}"
            )


def set_backend(
    model: nn.Module, backend: str, *, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Choose how every pruned tensor of ``model`` computes its effective weight, in place.

    Args:
        model: a model pruned by :func:`signmask.prune` (or loaded by ``load_state_dict``).
        backend: ``"torch"``: the hook computes ``orig * mask`` with torch ops (compiles
            cleanly); ``"triton"``: one fused Triton kernel forward and one backward (CUDA);
            ``"projection"``: no per-forward work, the masks are applied in place to the
            weights, the gradients and the optimizer state (exact for elementwise optimizers;
            a gradient given new values in place after ``backward()``, ``p.grad.add_(noise)``,
            is not masked again: assign ``p.grad = p.grad + noise`` instead);
            ``"auto"``: ``"triton"`` for CUDA tensors in eager mode when triton is installed,
            else ``"torch"``. The numbers are the same with each, up to floating-point rounding.
        optimizer: the optimizer training ``model``; required by ``"projection"``, which hooks
            its ``step``. Other backends need none: they unhook ``model``'s tensors (and only
            those) from the optimizer they were projected for, and from ``optimizer`` if given.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is a TorchScript one), ``backend`` not a
            str, ``optimizer`` not a ``torch.optim.Optimizer``; ``"triton"`` with a tensor of a
            dtype its kernels do not compute (not fp32/bf16/fp16/fp64).
        ValueError: unknown backend, nothing pruned, a stock prune hook, a mask or sign buffer
            of another dtype, shape or device than signmask makes, ``"projection"``
            without an optimizer, with one it cannot serve exactly or that does not train every
            pruned tensor, with a frozen tensor, or with a pruned weight tied to another
            tensor of ``model`` (the same Parameter, or one on the same memory); a pruned
            weight assigned a new Parameter since; a pruning hook moved onto a module without
            its mask (``torch.ao.quantization``'s ``fuse_modules`` and ``convert`` do); a weight
            on the meta device or sharded (a DTensor).
        ImportError: ``"triton"`` without triton installed.
        RuntimeError: ``"triton"`` with CPU tensors (unless ``TRITON_INTERPRET=1``).
        The model is left untouched in every case. Where torch fails midway (out of memory) or
        on Ctrl-C, the model, the optimizers' hooks and the Parameters' gradient hooks are put
        back, and the network computes and trains as before; only pruned entries of
        ``weight_orig``, its gradient and its optimizer state that ``"projection"`` zeroed
        (values nothing reads under the masks) may stay 0.

    Example:
        >>> import torch, signmask
        >>> net = signmask.prune(torch.nn.Linear(4, 4), 0.5)
        >>> net = signmask.set_backend(net, "auto")
        >>> net(torch.ones(1, 4)).shape
        torch.Size([1, 4])
    """
    _checks.check_eager_model(model, "model")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    impl = get_backend(backend)
    targets = _signmask_targets(model)
    impl.check(targets, optimizer)
    if backend == "projection":  # it zeroes pruned entries of weight_orig in place
        _ties.check_untied(targets, model, remedy="untie them before set_backend(model, "
                           "'projection'), which zeroes the pruned entries in place")
    # Valid input cannot fail below, but torch can (out of memory at the k-th layer) and so can
    # Ctrl-C: the layers before would be switched, their hooks on the optimizers and Parameters
    # changed, and under projection their weights and state masked. The record puts back all
    # but the pruned entries zeroed (dead=True: nothing reads them; keeping them would copy
    # about 4 bytes per pruned weight and state tensor every call).
    undo = _undo.Undo(model, optimizers=_projection.optimizers(targets, optimizer))
    try:
        with undo.saving(dead=True):
            if backend != "projection":
                for module, name in targets.values():
                    _projection.forget(module, name)
                if optimizer is not None:  # as documented; forget() covers the one remembered (weakly)
                    _projection.unhook_optimizer(optimizer, targets)
            impl.attach(targets, optimizer)
            for module, name in targets.values():
                _reparam.find_hook(module, name)[1].backend = backend
                _reparam.refresh(module, name)
    except BaseException:
        undo.restore()
        raise
    return model


from . import _projection  # noqa: E402  (registers "projection"; last: it subclasses Backend)
