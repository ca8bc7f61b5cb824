"""Interpolation of norm layers' affine parameters with their init (AWS), in prune's layout.

During the AWS search every norm layer's ``weight``/``bias`` is replaced in the TRAINING forward
by ``a * init + (1 - a) * trained``, one scalar ``a`` shared by all layers. An interpolated
tensor ``weight`` of a norm module becomes, as with ``torch.nn.utils.prune``:

- ``weight_orig``: the trained Parameter (the same object at the same position, so optimizers
  keep working);
- ``weight_init``: a persistent buffer holding its value when :func:`attach` ran;
- a forward pre-hook, :class:`NormInterpolation`, that sets ``module.weight`` to
  ``torch.lerp(weight_orig, weight_init, alpha)`` in training mode and to a (differentiable,
  non-Parameter) alias of ``weight_orig`` in eval mode. Running statistics are left alone;
- a :class:`~signmask._reparam.DetachWeight` post-hook, so ``copy.deepcopy`` works after a
  grad-enabled forward (pytorch#37322); a penalty on ``module.weight`` after the forward then
  gets no gradient (write it on the lerp of ``weight_orig`` and ``weight_init``).

``alpha`` is a 0-dim float tensor owned by the caller, who updates it in place (``fill_``,
``copy_``); the hooks only hold a reference to it, so keep it on the parameters' device and
dtype (elsewhere every layer converts it at every training forward). ``copy.deepcopy`` and
pickling give the copy one alpha of its own, no longer the caller's. Between forwards
``module.weight`` is the value the last forward used: read ``weight_orig`` for the trained one,
and call :func:`detach` before fusing norms into convs (timm's ``fuse``/``reparameterize``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _targets
from ._reparam import add_detach, original, rename, restore, stash_outside
from ._target_checks import check_free
from ._targets import FilterFn, canonical, has_tensor

_TENSORS = ("weight", "bias")
_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Norm layers that subclass plain nn.Module (timm's RmsNorm, SimpleNorm, EvoNorm*, InplaceAbn,
# ...) are only recognisable by name; "Abn" is timm's activated batch norm.
_NAME_HINTS = ("Norm", "Abn")
# They own a `weight` too and a name may say "Norm" (weight-norm convs); never norm layers here.
_NOT_NORMS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)


def is_norm(module: nn.Module) -> bool:
    """Tell whether ``module`` is a normalization layer owning affine Parameters.

    The rule: ``module`` is a torch norm (a ``_NormBase`` subclass -- BatchNorm, SyncBatchNorm,
    InstanceNorm and their lazy forms --, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``) or a class
    in its MRO has ``"Norm"`` or ``"Abn"`` in its name (timm's own layers) and its ``weight`` and
    ``bias`` are per-channel vectors (at most one dimension above 1: a cosine classifier
    ``NormedLinear`` holds a matrix), it is not a conv/linear/embedding, and it owns a Parameter
    ``weight`` or ``bias`` itself (recurse=False; also when already reparametrized as
    ``weight_orig``). Buffers do not count, so ``FrozenBatchNorm2d`` and ``affine=False`` layers
    are not norms here.

    Args:
        module: any module.

    Returns:
        True for the layers :func:`attach` selects (before ``filter_fn``).

    Example:
        >>> from torch import nn
        >>> is_norm(nn.BatchNorm2d(3)), is_norm(nn.BatchNorm2d(3, affine=False))
        (True, False)
        >>> is_norm(nn.Conv2d(3, 3, 1))
        False
    """
    if isinstance(module, _NOT_NORMS):
        return False
    owned = [t for t in _TENSORS if has_tensor(module, t)]
    if isinstance(module, _NORM_BASES):
        return bool(owned)
    named = any(h in cls.__name__ for cls in type(module).__mro__ for h in _NAME_HINTS)
    return named and bool(owned) and all(_per_channel(original(module, t)) for t in owned)


def _per_channel(t: torch.Tensor) -> bool:
    return sum(d > 1 for d in t.shape) <= 1


class NormInterpolation:
    """Forward pre-hook setting ``module.<name>`` for each interpolated tensor (module docs)."""

    def __init__(self, names: tuple[str, ...], alpha: torch.Tensor) -> None:
        self.names = tuple(names)
        self.alpha = alpha

    def value(self, module: nn.Module, name: str) -> torch.Tensor:
        """Return the tensor ``module.<name>`` stands for in ``module``'s current mode."""
        orig = module._parameters.get(name + "_orig")
        if orig is None:  # parametrized since: computed, as stock prune reads it
            orig = getattr(module, name + "_orig")
        if not module.training:
            # A view, not the Parameter: setattr would register a Parameter again, and eval-mode
            # training (frozen BN statistics) still needs gradients to reach `orig`.
            return orig.view_as(orig)
        alpha = self.alpha
        if alpha.device != orig.device:
            # A blocking CPU->GPU copy synchronizes the stream. A non-blocking one from pageable
            # memory stages the value at once; from pinned memory it would read `alpha` later,
            # possibly after the caller's next fill_, so that case pays for the blocking copy.
            cpu = alpha.device.type == "cpu"
            alpha = alpha.to(orig.device, orig.dtype, non_blocking=cpu and not alpha.is_pinned())
        elif alpha.dtype != orig.dtype:
            alpha = alpha.to(orig.dtype)  # lerp wants a tensor weight of the tensors' dtype
        return torch.lerp(orig, module._buffers[name + "_init"], alpha)

    def __call__(self, module: nn.Module, inputs) -> None:
        for name in self.names:
            stash_outside(module, name)
            setattr(module, name, self.value(module, name))

    def __repr__(self) -> str:
        return f"NormInterpolation({list(self.names)!r})"


def _hook(module: nn.Module) -> tuple[int | None, NormInterpolation | None]:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, NormInterpolation):
            return key, hook
    return None, None


def _check(module: nn.Module, label: str) -> tuple[str, ...]:
    """Names of the tensors to interpolate in ``module``; raise if it cannot be interpolated."""
    if _hook(module)[1] is not None:
        raise ValueError(f"norm layer {label!r} is already interpolated; call detach() first")
    params = module._parameters
    names = tuple(t for t in _TENSORS if params.get(t) is not None)
    for t in _TENSORS:
        if t + "_orig" in params:
            raise ValueError(f"{label}.{t} is already reparametrized ({t}_orig exists, pruned?)")
    for t in names:
        if isinstance(params[t], nn.parameter.UninitializedParameter):
            raise ValueError(f"{label}.{t} is not materialized yet; run one forward first")
        roles = {t + "_orig": f"interpolation gives the trained {t}",
                 t + "_init": f"interpolation gives the initial {t}"}
        check_free(label, module, roles, "interpolate this layer")
    return names


def _install(module: nn.Module, names: tuple[str, ...], alpha: torch.Tensor) -> None:
    for t in names:
        param = module._parameters[t]
        rename(module._parameters, t, t + "_orig")
        module.register_buffer(t + "_init", param.detach().clone())
    hook = NormInterpolation(names, alpha)
    module.register_forward_pre_hook(hook)
    for t in names:
        add_detach(module, t)
    # `module.weight` must exist between forwards too, as it did before.
    with torch.no_grad():
        hook(module, ())


def _uninstall(module: nn.Module) -> None:
    key, hook = _hook(module)
    names = hook.names if hook is not None else _TENSORS
    if key is not None:
        del module._forward_pre_hooks[key]
    for t in names:
        restore(module, t, ("_init",))


def attach(
    model: nn.Module, alpha: torch.Tensor, *, filter_fn: FilterFn | None = None
) -> dict[str, nn.Module]:
    """Interpolate every norm layer of ``model`` with its current values, by ``alpha``.

    Args:
        model: the model (DataParallel/DDP/compiled wrappers are fine: names are canonical).
        alpha: 0-dim floating tensor, shared by all layers and read at every training forward;
            update it in place (``alpha.fill_(a)``) once per step.
        filter_fn: ``(module, canonical name) -> bool``; False leaves that norm layer alone.

    Returns:
        Canonical module name -> module, for every layer now interpolated.

    Raises:
        TypeError: ``alpha`` is not a floating-point tensor.
        ValueError: ``alpha`` is not 0-dim, no norm layer is selected, a selected layer is
            already interpolated/reparametrized or not materialized, or two norm layers have one
            canonical name (``bn`` beside ``module.bn``); the model is left untouched.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> alpha = torch.tensor(0.0)
        >>> list(attach(net, alpha))
        ['1']
        >>> [k for k in net.state_dict() if k.startswith("1.")]
        ['1.weight_orig', '1.bias_orig', '1.weight_init', '1.bias_init']
        >>> _ = alpha.fill_(0.5)  # the next training forward uses (init + trained) / 2
        >>> detach(net)
        ['1']
    """
    if not isinstance(alpha, torch.Tensor) or not alpha.is_floating_point():
        raise TypeError(f"alpha must be a floating-point torch.Tensor, got {alpha!r}")
    if alpha.dim() != 0:
        raise ValueError(f"alpha must be a 0-dim tensor, got shape {tuple(alpha.shape)}")
    chosen: dict[str, tuple[nn.Module, tuple[str, ...], str]] = {}
    for fqn, module in model.named_modules():
        name = canonical(fqn)
        if not is_norm(module):
            continue
        if name in chosen:  # another module: named_modules() yields each module once
            raise _targets.same_name_error(name, chosen[name][2], fqn, None)
        if filter_fn is not None and not filter_fn(module, name):
            continue
        chosen[name] = (module, _check(module, name), fqn)
    if not chosen:
        raise ValueError(f"no norm layer with affine parameters to interpolate in "
                         f"{type(model).__name__} (filter_fn={filter_fn})")
    done = []
    try:
        for module, names, _ in chosen.values():
            done.append(module)
            _install(module, names, alpha)
    except BaseException:
        for module in done:
            _uninstall(module)
        raise
    return {name: module for name, (module, _, _) in chosen.items()}


def interpolated(model: nn.Module) -> dict[str, nn.Module]:
    """Return canonical module name -> module for every layer carrying the interpolation.

    Raises:
        ValueError: two interpolated layers have one canonical name (``bn`` beside
            ``module.bn``, each attached on its own): one entry would hide the other.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> interpolated(net)
        {}
    """
    out, where = {}, {}
    for fqn, module in model.named_modules():
        if _hook(module)[1] is not None:
            name = canonical(fqn)
            if name in out:  # another module: named_modules() yields each module once
                raise _targets.same_name_error(name, where[name], fqn, None)
            out[name], where[name] = module, fqn
    return out


def detach(model: nn.Module) -> list[str]:
    """Remove every interpolation: each layer uses its trained Parameters again.

    Hooks, ``_init`` buffers and attribute aliases go; each Parameter object returns under its
    old name at its old position, so ``state_dict()`` (keys, order, values) is that of a model
    never interpolated, and optimizers holding the Parameters keep working.

    Returns:
        The canonical names of the modules restored, in model order.

    Raises:
        ValueError: two interpolated layers have one canonical name, as :func:`interpolated`
            raises; the model is left untouched.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.GroupNorm(1, 2))
        >>> _ = attach(net, torch.tensor(0.3))
        >>> detach(net)
        ['0']
        >>> list(net.state_dict())
        ['0.weight', '0.bias']
    """
    found = interpolated(model)
    for module in found.values():
        _uninstall(module)
    return list(found)
