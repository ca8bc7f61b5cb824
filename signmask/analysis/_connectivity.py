"""Linear mode connectivity: error barriers and instability to SGD noise (Frankle et al. 2020).

The error of ``(1 - a) * W1 + a * W2`` along an even grid of ``a`` in [0, 1]; the barrier is
the highest error on the path minus the mean of the two endpoints' errors. BatchNorm running
statistics are re-estimated at every point before it is evaluated.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import itertools
import math
import numbers
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_model
from ._common import TOLERANCE, check_iterable, clone
from ._bn_stats import bn_modules, reestimate_bn_named
from ._evaluation import LossFn, evaluate_named
from ._interpolation import check_masks, plan_blend, write_blend

STABLE_BARRIER = 0.02  # Frankle et al. 2020: stable to SGD noise when the error barrier is < 2%


def _as_floats(values: Iterable[Any], what: str) -> tuple[float, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{what} must be real numbers, got {type(v).__name__} {v!r}")
        out.append(float(v))
    if not all(math.isfinite(v) for v in out):  # an inf loss would make loss_barrier NaN
        raise ValueError(f"{what} must be finite (no NaN or inf), got {tuple(out)}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Barrier:
    """Loss and error along a linear path between two networks.

    ``barrier = max(errors) - (errors[0] + errors[-1]) / 2`` (Frankle et al. 2020), likewise
    ``loss_barrier`` with the losses; both are >= 0 since the maximum includes the endpoints.

    Args:
        alphas: the interpolation coefficients, strictly increasing from 0.0 to 1.0.
        losses: mean loss at each alpha, finite (no NaN or inf).
        errors: error rate in [0, 1] at each alpha.

    Raises:
        TypeError: a value that is not a real number (the field is named).
        ValueError: fewer than 2 points, lengths differ, bad grid, a NaN or infinite value (the
            field is named), errors outside [0, 1].

    Example:
        >>> from signmask.analysis import Barrier
        >>> b = Barrier((0.0, 0.5, 1.0), (0.3, 0.9, 0.5), (0.1, 0.25, 0.2))
        >>> round(b.barrier, 4), round(b.loss_barrier, 4), b.stable
        (0.1, 0.5, False)
    """

    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    errors: tuple[float, ...]
    barrier: float = dataclasses.field(init=False)
    loss_barrier: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        alphas = _as_floats(self.alphas, "alphas")
        losses = _as_floats(self.losses, "losses")
        errors = _as_floats(self.errors, "errors")
        if len(alphas) < 2 or not len(alphas) == len(losses) == len(errors):
            raise ValueError(
                "alphas, losses and errors need the same length >= 2, got "
                f"{len(alphas)}, {len(losses)}, {len(errors)}"
            )
        if alphas[0] != 0.0 or alphas[-1] != 1.0 or any(x >= y for x, y in zip(alphas, alphas[1:])):
            raise ValueError(f"alphas must increase strictly from 0.0 to 1.0, got {alphas}")
        if any(not 0.0 <= e <= 1.0 for e in errors):
            raise ValueError(f"errors must be fractions in [0, 1], got {errors}")
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "barrier", max(errors) - (errors[0] + errors[-1]) / 2)
        object.__setattr__(self, "loss_barrier", max(losses) - (losses[0] + losses[-1]) / 2)

    @property
    def stable(self) -> bool:
        """True when ``barrier < 0.02`` (stable to SGD noise, Frankle et al. 2020).

        A barrier within 1e-9 of 0.02 (floating-point rounding of error fractions) is not below
        it.
        """
        return self.barrier < STABLE_BARRIER - TOLERANCE


def _check_loader(loader: Any, arg: str) -> None:
    """Refuse a ``loader`` that cannot be iterated, can be iterated only once (a generator), or
    (when it has a length) is empty."""
    check_iterable(loader, arg)  # not iter(loader): that would start a DataLoader's workers
    if isinstance(loader, collections.abc.Iterator):  # iter(it) is it: the second pass is empty
        raise TypeError(
            f"{arg} is read once per point, but a {type(loader).__name__} can be read only once; "
            "pass a list of batches or a DataLoader"
        )
    try:
        empty = len(loader) == 0
    except TypeError:  # no length (a generator, an IterableDataset's DataLoader): cannot tell
        empty = False
    if empty:
        raise ValueError(
            f"{arg} must yield at least one batch, got an empty {type(loader).__name__}"
        )


def _nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``model`` holding NaN or inf, or None."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _check_finite(model: nn.Module, arg: str) -> None:
    """Refuse a diverged model before any evaluation: every point's loss would be NaN."""
    name = _nonfinite(model)
    if name is not None:
        raise ValueError(f"{arg}'s {name} holds NaN or infinite values (a diverged run?); "
                         "there is no loss along a path to it")


def _check_path_args(model: nn.Module, eval_loader: Any, train_loader: Any, points: Any,
                     loss_fn: Any, bn_batches: Any, eval_batches: Any, *,
                     arg: str = "model") -> tuple[int, bool]:
    """Check every argument :func:`barrier` takes beside the second model, naming the bad one.

    Runs before anything is trained or evaluated, so a bad argument fails at once instead of
    after :func:`instability`'s two trainings. ``train_loader`` is checked only when ``model``
    has BatchNorm-like layers (it is unused otherwise).

    Returns:
        ``(points, has_bn)``: ``points`` as an int and whether BatchNorm must be re-estimated.
    """
    check_model(model, arg)
    points = check_int(points, "points", minimum=2)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(logits, targets), got "
                        f"{type(loss_fn).__name__}")
    for value, name in ((bn_batches, "bn_batches"), (eval_batches, "eval_batches")):
        if value is not None:
            check_int(value, name, minimum=1)
    _check_loader(eval_loader, "eval_loader")
    has_bn = bool(bn_modules(model))
    if has_bn:
        if train_loader is None:
            raise ValueError(
                f"{type(model).__name__} has BatchNorm running statistics, which must be "
                "re-estimated at every interpolation point: pass train_loader="
            )
        _check_loader(train_loader, "train_loader")
    return points, has_bn


def _check_seeds(seeds: Any) -> tuple[int, int]:
    """Return ``seeds`` as two different ints; raise naming ``seeds`` otherwise."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, collections.abc.Iterable):
        raise TypeError(f"seeds must be a pair of ints, got {type(seeds).__name__} {seeds!r}")
    pair = tuple(seeds)
    if len(pair) != 2:
        raise ValueError(f"seeds must be a pair of ints, got {len(pair)} values: {pair!r}")
    pair = tuple(check_int(s, f"seeds[{i}]", minimum=-(2**63)) for i, s in enumerate(pair))
    if pair[0] == pair[1]:
        raise ValueError(f"seeds must differ, got {pair!r}")
    return pair


def barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    eval_loader: Iterable,
    *,
    train_loader: Iterable | None = None,
    points: int = 11,
    loss_fn: LossFn = F.cross_entropy,
    bn_batches: int | None = None,
    eval_batches: int | None = None,
) -> Barrier:
    """Evaluate the linear path from ``model_a`` to ``model_b`` and measure its error barrier.

    At each ``alpha = i / (points - 1)`` the network :func:`interpolate` builds is, when it has
    BatchNorm-like layers, re-estimated with :func:`reestimate_bn` over ``train_loader``, then
    evaluated with :func:`evaluate` over ``eval_loader``. The endpoints are treated like every
    other point (copies of the two models, re-estimated too), so ``errors[0]`` is the error of
    ``model_a`` with re-estimated statistics, not with its own. One copy of ``model_a`` is made
    and rewritten at each point; the two models are never modified.

    Args:
        model_a: the network at ``alpha = 0``.
        model_b: the network at ``alpha = 1`` (same architecture, mask and sign locks).
        eval_loader: batches to evaluate on (the test set): ``(inputs, targets, ...)`` tuples or
            lists of tensors, as :func:`evaluate` reads them.
        train_loader: batches to re-estimate BatchNorm statistics on (training data): inputs
            tensors or ``(inputs, ...)`` tuples or lists, as :func:`reestimate_bn` reads them;
            required when the model has BatchNorm-like layers, unused otherwise. Neither
            loader may yield dicts (``{"image": x, "label": y}``): which key holds the inputs
            is the dataset's convention; a ``DataLoader`` ``collate_fn`` returning
            ``(inputs, targets)`` turns them into pairs.
        points: number of alphas on the even grid, >= 2 (Frankle uses 30, AWS 11).
        loss_fn: batch-mean loss (default cross-entropy).
        bn_batches: re-estimate on the first ``bn_batches`` batches only.
        eval_batches: evaluate on the first ``eval_batches`` batches only.

    Returns:
        A :class:`Barrier`.

    Raises:
        TypeError / ValueError: as :func:`interpolate` (different masks...), ``points < 2``, a
            ``loss_fn`` that is not callable, ``bn_batches`` or ``eval_batches`` not an int >= 1,
            a loader that is not iterable, is a one-shot iterator (a generator) or has length 0,
            or BatchNorm layers without ``train_loader``; all checked before any evaluation,
            each error naming its argument. A loader found to yield a batch of another form
            (a dict, a single tensor for ``eval_loader``) or none is named too
            (``train_loader`` or ``eval_loader``), with the forms it takes. A path with a
            NaN or infinite loss (the target class given a logit of -inf) is refused, as
            :class:`Barrier` refuses it.

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> torch.manual_seed(0) and None
        >>> net, data = torch.nn.Linear(4, 3), [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> analysis.barrier(net, net, data, points=3).barrier
        0.0
    """
    points, has_bn = _check_path_args(model_a, eval_loader, train_loader, points, loss_fn,
                                      bn_batches, eval_batches, arg="model_a")
    check_model(model_b, "model_b")
    plan = plan_blend(model_a, model_b)
    for model, arg in ((model_a, "model_a"), (model_b, "model_b")):
        _check_finite(model, arg)
    alphas = [i / (points - 1) for i in range(points)]
    work = clone(model_a)
    losses, errors = [], []
    for alpha in alphas:
        write_blend(work, model_a, model_b, alpha, plan)
        if has_bn:  # the loaders' own names in errors: two are in play here
            reestimate_bn_named(work, train_loader, bn_batches, "train_loader")
        loss, error = evaluate_named(work, eval_loader, loss_fn, eval_batches, "eval_loader")
        losses.append(loss)
        errors.append(error)
    return Barrier(tuple(alphas), tuple(losses), tuple(errors))


def _check_binds(train: Callable, model: nn.Module) -> None:
    """Refuse a ``train`` that cannot take ``(model, seed)`` (``train(model)``) before any training,
    showing its signature: the call would fail with only the function's own name."""
    try:
        signature = inspect.signature(train)
    except (TypeError, ValueError):  # a builtin without a signature: its call will tell
        return
    try:
        signature.bind(model, 0)
    except TypeError:
        name = getattr(train, "__name__", type(train).__name__)
        raise TypeError(f"train must be callable as train(model, seed), got {name}{signature}") from None


def instability(
    model: nn.Module,
    train: Callable[[nn.Module, int], nn.Module | None],
    eval_loader: Iterable,
    *,
    seeds: tuple[int, int] = (0, 1),
    train_loader: Iterable | None = None,
    points: int = 11,
    loss_fn: LossFn = F.cross_entropy,
    bn_batches: int | None = None,
    eval_batches: int | None = None,
) -> Barrier:
    """Measure instability to SGD noise: train two copies with different seeds, then :func:`barrier`.

    ``model`` is the shared starting state (at init, or rewound to step k). Two deep copies are
    trained by ``train(copy, seed)``, once with each seed; ``train`` trains the copy it gets (in
    place, or returns the trained model) and uses ``seed`` for the data order / augmentation
    noise. It builds its own optimizer; to continue from a saved optimizer state, load it there
    (``opt.load_state_dict(state)``: the copy's parameters come in the same order). ``model`` is
    not modified. Stable when ``.stable`` (barrier < 2%).

    Args:
        model: the starting network (pruned or dense).
        train: ``train(model, seed) -> nn.Module | None``.
        eval_loader: as :func:`barrier`.
        seeds: the two different integer seeds.
        train_loader, points, loss_fn, bn_batches, eval_batches: as :func:`barrier`.

    Returns:
        The :class:`Barrier` between the two trained copies.

    Raises:
        TypeError / ValueError: bad ``train`` or ``seeds``, any argument :func:`barrier` would
            refuse (checked before training, so no training is wasted), ``train`` returning
            anything but None or an ``nn.Module``, a copy left with NaN or infinite values by
            its training (a diverged run, named by its seed before the other copy trains), or
            as :func:`barrier` (different masks).

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> def train(net, seed):  # a stand-in for a real training loop
        ...     torch.manual_seed(seed)
        ...     with torch.no_grad():
        ...         net.weight.add_(0.01 * torch.randn_like(net.weight))
        >>> torch.manual_seed(0) and None
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> analysis.instability(torch.nn.Linear(4, 3), train, data, points=3).alphas
        (0.0, 0.5, 1.0)
    """
    if not callable(train):
        raise TypeError(f"train must be callable as train(model, seed), got {type(train).__name__}")
    _check_binds(train, model)
    seeds = _check_seeds(seeds)
    points, _ = _check_path_args(model, eval_loader, train_loader, points, loss_fn, bn_batches,
                                 eval_batches)
    check_masks(model, "model")  # barrier's check of the copies, before they are trained
    trained = []
    for seed in seeds:
        net = clone(model)
        out = train(net, seed)
        if out is not None and not isinstance(out, nn.Module):
            raise TypeError(f"train must return None or an nn.Module, got {type(out).__name__}")
        trained.append(net if out is None else out)
        # At once, naming the seed: barrier would name its own model_a/model_b, after the
        # other copy's training too.
        name = _nonfinite(trained[-1])
        if name is not None:
            raise ValueError(f"train(model, {seed}) left {name} holding NaN or infinite values (a "
                             "diverged run?); there is no loss along a path to it")
    return barrier(trained[0], trained[1], eval_loader, train_loader=train_loader, points=points,
                   loss_fn=loss_fn, bn_batches=bn_batches, eval_batches=eval_batches)
