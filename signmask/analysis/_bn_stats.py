"""BatchNorm statistics re-estimated over a loader, as for a network after interpolation."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from .._interpolate import NormInterpolation
from .._checks import check_int, check_model, some
from ._common import check_iterable, device_of, limit, rng_kept, split_batch


def bn_modules(model: nn.Module) -> list[nn.Module]:
    """List the modules whose running statistics :func:`reestimate_bn` re-estimates.

    Those owning a tensor ``running_var`` buffer and a numeric ``momentum`` with which their
    train-mode forward averages it: torch BatchNorm, SyncBatchNorm, InstanceNorm with
    ``track_running_stats``, timm's ``BatchNormAct2d`` and ``EvoNorm2dB*`` (which keep only a
    running variance)... (not ``FrozenBatchNorm2d``, which has no momentum).

    Example:
        >>> from torch import nn
        >>> len(bn_modules(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        1
    """
    scripted = [n for n, m in model.named_modules()
                if isinstance(m, torch.jit.ScriptModule) and "running_var" in dict(m.named_buffers(recurse=False))]
    if scripted:
        # Its buffers are no dict the pass can reset and restore, yet a train-mode forward would
        # still fold the batches into them by momentum: neither skipping nor re-estimating is right.
        raise TypeError(
            f"{some(scripted)} {'is a TorchScript module' if len(scripted) == 1 else 'are TorchScript modules'} "
            "holding BatchNorm statistics (running_var), which re-estimation cannot reset and "
            "restore; re-estimate the eager model, then script it"
        )
    return [
        m for m in model.modules()
        if isinstance(m._buffers.get("running_var"), torch.Tensor) and _numeric_momentum(m)
    ]


def _numeric_momentum(m: nn.Module) -> bool:
    if not hasattr(m, "momentum"):
        return False
    momentum = m.momentum
    return momentum is None or (isinstance(momentum, (float, int)) and not isinstance(momentum, bool))


class _CumulativeMomentum:
    """Forward pre-hook: momentum ``1 / k`` before a layer's ``k``-th call, i.e. the cumulative
    average of torch's ``momentum=None`` (which counts calls too), for kinds without that mode
    (InstanceNorm reads None as 0, EvoNorm needs a number) and layers called several times per
    forward alike."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, inputs) -> None:
        self.calls += 1
        module.momentum = 1.0 / self.calls


def _upcast(layer: nn.Module, shared: set[int]) -> torch.dtype | None:
    """Make a torch BatchNorm whose parameters and buffers all hold one 16-bit dtype float32
    for the pass, and return that dtype (None for any other layer, left as it is).

    torch's in-place 16-bit average by ``(batch - running) / k`` loses every batch once that
    is under half an ulp (15% off the mean after 200 bf16 batches). In float32 the average is
    exact to far below a 16-bit ulp, and rounds once when the layer goes back. ``F.batch_norm``
    takes 16-bit inputs with float32 parameters and statistics and still returns the input's
    dtype, so the layers after it see what they would.
    """
    if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or _entangled(layer, shared):
        return None
    dtypes = {t.dtype for t in _floats(layer)}
    if len(dtypes) != 1 or next(iter(dtypes)).itemsize >= 4:
        return None
    _convert(layer, torch.float32)
    return dtypes.pop()


def _entangled(layer: nn.Module, shared: set[int]) -> bool:
    """Whether converting ``layer`` alone could leave it or others with mixed dtypes: a tensor
    it shares with another module (ids in ``shared``), a parametrized tensor, or a forward
    pre-hook other than AWS's interpolation (stock prune's would keep a float32 weight)."""
    return (nn.utils.parametrize.is_parametrized(layer)
            or any(id(t) in shared for t in _floats(layer))
            or any(not isinstance(h, NormInterpolation) for h in layer._forward_pre_hooks.values()))


def _shared(model: nn.Module) -> set[int]:
    """ids of the parameters and buffers that more than one module of ``model`` holds."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            seen[id(t)] = seen.get(id(t), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _floats(layer: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))
            if t.is_floating_point()]


def _convert(layer: nn.Module, dtype: torch.dtype) -> None:
    # Through .data, not layer.to(): the Parameter and buffer objects stay whatever
    # torch.__future__ says about conversions (an optimizer holding them keeps them).
    for t in _floats(layer):
        t.data = t.data.to(dtype)


def _downcast(upcast: dict) -> None:
    """Return the layers :func:`_upcast` made float32 to their dtypes (their statistics
    rounded once); idempotent."""
    for m, dtype in upcast.items():
        _convert(m, dtype)


def _refresh_norms(upcast: dict) -> None:
    """Recompute the weights of AWS-interpolated layers among ``upcast``: the pass left them
    float32 (a read before the next forward would see that dtype)."""
    with torch.no_grad():
        for m in upcast:
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, NormInterpolation):
                    hook(m, ())


def _reset(layer: nn.Module) -> None:
    if callable(getattr(layer, "reset_running_stats", None)):
        layer.reset_running_stats()
        return
    for name, value in (("running_mean", 0), ("running_var", 1), ("num_batches_tracked", 0)):
        buffer = layer._buffers.get(name)
        if buffer is not None:
            buffer.fill_(value)


def _keep_uncalled(saved: list, calls: dict) -> None:
    """Put back the statistics of the layers the pass never called (a branch the model runs in
    eval mode only, an unused head): reset, they would hold mean 0 and variance 1."""
    with torch.no_grad():
        for m, _, buffers in saved:
            if calls[m].calls == 0:
                for k, b in buffers.items():
                    m._buffers[k].copy_(b)


def _interpolation_hooks(model: nn.Module) -> dict:
    """AWS's norm-interpolation hooks in ``model`` -> the coefficient tensor each holds."""
    return {
        hook: hook.alpha
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, NormInterpolation)
    }


def reestimate_bn(model: nn.Module, loader: Iterable, *, batches: int | None = None) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm-like layer, in place.

    Each layer that owns a ``running_var`` buffer and a numeric ``momentum`` (torch BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``, timm's ``BatchNormAct2d`` and
    ``EvoNorm2dB*``; not ``FrozenBatchNorm2d``) is reset, then the whole model runs one no-grad pass
    over ``loader`` in train mode (dropout active, as in training, drawing from torch's global
    generators, whose states are restored after; the layers themselves in train mode even
    where the model's ``train()`` keeps them frozen), each layer's ``momentum``
    set to ``1 / k`` before its ``k``-th call: the cumulative average of torch's
    ``momentum=None`` (with batches of equal size, the mean of the per-batch means and unbiased
    variances), which InstanceNorm and EvoNorm do not offer themselves. BatchNorms holding a
    16-bit dtype run the pass in float32 (their outputs keep the input's dtype) and round their
    statistics once at the end: torch's 16-bit in-place average stalls (15% off after 200 bf16
    batches). The momenta and every module's train/eval flag are restored. A compiled model runs
    the pass eagerly (``force_eager``): the momenta it sets would recompile it at every batch.
    A model without such layers is returned at once, without reading ``loader``. Norm layers under
    AWS's interpolation use their trained parameters (``a = 0``) during the pass, so the
    statistics are those of the network as evaluated. A layer the pass never calls (a branch run
    in eval mode only, an unused head) keeps its statistics instead of mean 0 and variance 1.

    Args:
        model: any model.
        loader: iterable of inputs tensors or ``(inputs, ...)`` tuples or lists of tensors (a
            ``DataLoader``; not dicts); inputs are moved to the model's device.
        batches: use only the first ``batches`` batches (default: all).

    Returns:
        ``model``.

    Raises:
        TypeError: bad ``model``, ``batches`` or batch type (a dict batch too, naming the forms
            taken); a TorchScript submodule holding
            BatchNorm statistics (re-estimate the eager model, then script it).
        ValueError: ``batches < 1`` or the loader yields no batch. On any error (the forward's
            too) the running statistics, momenta and modes are restored.

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
        >>> _ = analysis.reestimate_bn(net, [torch.tensor([[0.0, 1.0], [2.0, 3.0]])])
        >>> net[0].running_mean.tolist(), net.training
        ([1.0, 2.0], True)
    """
    return reestimate_bn_named(model, loader, batches, "loader")


def _eager(model: nn.Module):
    """Run a compiled ``model`` (or one holding a compiled submodule) eagerly: the momentum the
    pass changes at every call would recompile it at each batch, until dynamo's recompile limit,
    which every compiled model of the process shares. The stance is process-wide, so an eager
    model leaves it alone (compiled models trained in other threads stay compiled)."""
    compiled = any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
                   or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def reestimate_bn_named(model: nn.Module, loader: Iterable, batches: int | None,
                        arg: str) -> nn.Module:
    """:func:`reestimate_bn`, its errors naming the loader ``arg`` (``barrier``'s train_loader)."""
    check_model(model, "model")
    check_iterable(loader, arg)
    if batches is not None:
        batches = check_int(batches, "batches", minimum=1)
    layers = bn_modules(model)
    if not layers:
        return model
    saved = [(m, m.momentum, {k: b.clone() for k, b in m._buffers.items() if b is not None})
             for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    device = device_of(model)
    mixed = _interpolation_hooks(model)
    counters, upcast = [], {}
    try:
        for hook in mixed:
            hook.alpha = torch.zeros_like(hook.alpha)  # the hook's own: the caller's a stays
        shared = _shared(model)
        with torch.no_grad():
            for m in layers:
                _reset(m)
                dtype = _upcast(m, shared)
                if dtype is not None:
                    upcast[m] = dtype
        model.train()
        calls = {}
        for m in layers:
            m.training = True  # a model may keep its norms frozen in its own train()
            calls[m] = _CumulativeMomentum()
            counters.append(m.register_forward_pre_hook(calls[m]))
        seen = 0
        # Dropout draws from the global generators, which are put back after: a re-estimation
        # (and each barrier point's) must not shift the caller's later random numbers.
        with torch.no_grad(), rng_kept(device), _eager(model):
            for batch in limit(loader, batches):
                inputs, _ = split_batch(batch, need_target=False, arg=arg)
                model(inputs.to(device))
                seen += 1
        if seen == 0:
            raise ValueError(f"{arg} yielded no batch; cannot re-estimate BatchNorm statistics")
        _downcast(upcast)
        _keep_uncalled(saved, calls)
    except BaseException:
        _downcast(upcast)
        with torch.no_grad():
            for m, _, buffers in saved:
                for k, b in buffers.items():
                    m._buffers[k].copy_(b)
        raise
    finally:
        for handle in counters:
            handle.remove()
        for hook, alpha in mixed.items():
            hook.alpha = alpha
        _refresh_norms(upcast)
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return model
