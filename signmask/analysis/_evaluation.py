"""Evaluation helpers: BatchNorm statistics re-estimation, loss and error over a loader."""

from __future__ import annotations

import contextlib
import itertools
import numbers
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._interpolate import NormInterpolation
from .._checks import check_int, check_model, some
from ._common import check_iterable, device_of, rng_kept, split_batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _limit(loader: Iterable, batches: int | None) -> Iterable:
    return loader if batches is None else itertools.islice(loader, batches)


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
            for batch in _limit(loader, batches):
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


class Evaluation(NamedTuple):
    """Mean loss and error rate (fraction misclassified, in [0, 1]) over a loader.

    Returned by :func:`evaluate`; a ``NamedTuple``, so ``loss, error = evaluate(...)`` works.
    Its ``accuracy`` property is ``1.0 - error``, the fraction of counted targets whose top-1
    class is right.

    Args:
        loss: the mean of ``loss_fn`` over the counted targets.
        error: the fraction of counted targets whose top-1 class is wrong.

    Example:
        >>> from signmask.analysis import Evaluation
        >>> loss, error = Evaluation(0.25, 0.1)
        >>> error
        0.1
        >>> Evaluation(0.25, 0.25).accuracy
        0.75
    """

    loss: float
    error: float

    @property
    def accuracy(self) -> float:
        """``1.0 - error``: the fraction of counted targets whose top-1 class is right."""
        return 1.0 - self.error


def evaluate(model: nn.Module, loader: Iterable, *, loss_fn: LossFn = F.cross_entropy,
             batches: int | None = None) -> Evaluation:
    """Compute the mean loss and the top-1 error of ``model`` over ``loader``.

    Runs in eval mode without gradients and restores every module's train/eval flag. The loss
    is ``loss_fn(logits, targets)`` (a batch mean) weighted by the batch's counted targets;
    16-bit logits reach ``loss_fn`` in float32, as under autocast.
    Negative targets (``cross_entropy``'s ``ignore_index``, -100, for unlabeled pixels) name no
    class: they count in neither the error nor the weights. A prediction holding a NaN logit
    (a diverged model) names no class either, and counts as wrong.

    Args:
        model: a classifier returning logits of shape ``(N, C, ...)``.
        loader: iterable of ``(inputs, targets, ...)`` tuples or lists of tensors (not dicts),
            with class-index targets of shape ``(N, ...)``.
        loss_fn: batch-mean loss (default ``torch.nn.functional.cross_entropy``).
        batches: use only the first ``batches`` batches (default: all).

    Returns:
        ``Evaluation(loss, error)``.

    Raises:
        TypeError: bad arguments or batches (a single tensor, a dict), a model returning no
            tensor, a loss that is not a scalar, targets of a dtype the default
            ``cross_entropy`` refuses (not int64 or uint8).
        ValueError: ``batches < 1``, an empty loader (or one whose targets are all negative), or
            logits and targets of mismatched shapes (unbatched samples, with 0-d targets,
            included), logits of a single class (a binary classifier's one logit), a target
            past the last class (ignored targets must be negative).

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> net = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> data = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))]
        >>> analysis.evaluate(net, data).error
        0.5
    """
    return evaluate_named(model, loader, loss_fn, batches, "loader")


def evaluate_named(model: nn.Module, loader: Iterable, loss_fn: LossFn, batches: int | None,
                   arg: str) -> Evaluation:
    """:func:`evaluate`, its errors naming the loader ``arg`` (``barrier``'s eval_loader)."""
    check_model(model, "model")
    check_iterable(loader, arg)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if batches is not None:
        batches = check_int(batches, "batches", minimum=1)
    modes = [(m, m.training) for m in model.modules()]
    device = device_of(model)
    total_loss, wrong, count, seen = 0.0, 0, 0, 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in _limit(loader, batches):
                inputs, targets = split_batch(batch, need_target=True, arg=arg)
                logits = _logits(model(inputs.to(device)), targets)
                _check_target_dtype(targets, loss_fn, arg)  # after the shapes: soft labels fail there
                targets, seen = targets.to(logits.device), seen + 1
                counted = targets >= 0
                n = int(counted.sum())
                if n:  # a batch of ignored targets only: cross_entropy's mean is 0/0
                    total_loss += _scalar(loss_fn(_loss_dtype(logits), targets)) * n
                wrong += int((~_right(logits, targets) & counted).sum())
                count += n
    finally:
        for m, training in modes:
            m.training = training
    if count == 0:
        what = "only negative (ignored) targets" if seen else "no batch"
        raise ValueError(f"{arg} yielded {what}; nothing to evaluate")
    return Evaluation(total_loss / count, wrong / count)


def _right(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Where the top-1 class is the target. argmax takes a NaN for the largest logit, so a
    diverged model would score every target of class 0 (or of its NaN column) right: a
    prediction holding NaN names no class, and is wrong."""
    return (logits.argmax(dim=1) == targets) & ~logits.isnan().any(dim=1)


def _check_target_dtype(targets: torch.Tensor, loss_fn: LossFn, arg: str) -> None:
    # cross_entropy's own error ("expected target dtype to be Long or Byte") names no loader;
    # another loss_fn may take other targets.
    if loss_fn is F.cross_entropy and targets.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            f"{arg} must yield class-index targets of dtype int64 (or uint8) for the default "
            f"loss_fn, F.cross_entropy; got {targets.dtype} (convert them with targets.long())"
        )


def _logits(logits, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model must return a logits tensor (N, C, ...), returned {type(logits).__name__}")
    # a 0-d target has no batch axis to compare (logits (C,) pass the dim test): refuse it first
    if targets.dim() == 0 or logits.dim() != targets.dim() + 1 \
            or logits.shape[0] != targets.shape[0] or logits.shape[2:] != targets.shape[1:]:
        unbatched = "; a 0-d target is an unbatched sample: batch the loader" \
            if targets.dim() == 0 else ""
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match class-index targets "
            f"of shape {tuple(targets.shape)} (expected logits (N, C, ...)){unbatched}"
        )
    if logits.shape[1] == 1:  # argmax over one column is always class 0: the error would be wrong
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} hold one class (axis 1), which names no "
            "top-1 prediction; for a binary classifier's single logit z, return "
            "torch.cat([torch.zeros_like(z), z], 1) (its cross-entropy is z's BCE)"
        )
    classes = logits.shape[1]
    # a target past the last class (a loss_fn's ignore_index=255) would count as wrong
    if targets.numel() and int(targets.max()) >= classes:
        raise ValueError(
            f"targets hold class {int(targets.max())}, but logits of shape "
            f"{tuple(logits.shape)} have {classes} classes (axis 1); mark ignored targets with a "
            "negative value (cross_entropy's ignore_index, -100)"
        )
    return logits


def _loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits in float32, as autocast gives them to cross_entropy: its 16-bit batch mean
    is rounded to 8 (bf16) or 11 bits, 0.1% off at a loss of 2.5 (exact: every 16-bit value is
    a float32 one)."""
    return logits.float() if logits.is_floating_point() and logits.itemsize < 4 else logits


def _scalar(loss) -> float:
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # a .item() already
        return float(loss)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar batch mean, returned {found}")
    return float(loss)
