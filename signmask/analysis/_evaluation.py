"""Evaluation helpers: loss and error rate over a loader."""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_model
from ._common import check_iterable, device_of, limit, split_batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
            for batch in limit(loader, batches):
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
