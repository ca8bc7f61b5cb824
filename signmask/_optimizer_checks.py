"""Checks of the optimizer that trains a model's pruned tensors (for ``apply`` and the
``"projection"`` backend, which both hook into its steps)."""

from __future__ import annotations

import warnings

import torch

from . import _reparam


def untrained(targets: dict[str, tuple[nn.Module, str]], optimizer) -> list[str]:
    """Keys of ``targets`` whose Parameter (``<name>_orig`` once pruned) ``optimizer`` does not
    hold in any of its param groups."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [key for key, (m, n) in targets.items() if id(_reparam.original(m, n)) not in held]


def warn_vanishing_eps(targets: dict[str, tuple[nn.Module, str]], optimizer, stacklevel: int) -> None:
    """Warn where ``optimizer``'s ``eps`` rounds to 0 in the dtype of a tensor to prune it trains
    (fp16 with Adam's 1e-8): a pruned entry's update is then 0 / (sqrt(0) + 0) = NaN, which the
    mask multiply keeps (stock prune's too), so the model's outputs turn NaN at the first step."""
    held = {id(_reparam.original(m, n)): key for key, (m, n) in targets.items()}
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0
                or group.get("fused")):
            continue
        for p in group["params"]:
            key = held.get(id(p))
            if key is None or not p.is_floating_point():
                continue
            if torch.tensor(eps, dtype=p.dtype) == 0:
                warnings.warn(
                    f"{type(optimizer).__name__}(eps={eps}) trains {key} in {p.dtype}, where eps "
                    "rounds to 0: the update of a pruned entry (zero gradient and state) is 0/0 "
                    "= NaN, and the mask multiply keeps NaN, so outputs turn NaN at the first "
                    "step; use eps >= 1e-7, fused=True, or fp32 weights under autocast",
                    UserWarning,
                    stacklevel=stacklevel + 1,
                )
                return


def _driven(scheduler) -> list:
    """The optimizers ``scheduler`` sets learning rates on: its own ``optimizer`` (torch's and
    timm's schedulers keep one) and those of the schedulers it chains (torch's ``SequentialLR``
    and ``ChainedScheduler`` keep them in ``_schedulers``)."""
    found, todo, seen = [], [scheduler], set()
    while todo:
        one = todo.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        if getattr(one, "optimizer", None) is not None:
            found.append(one.optimizer)
        chained = getattr(one, "_schedulers", None)
        if isinstance(chained, (list, tuple)):
            todo.extend(chained)
    return found


def check_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a scheduler that sets the learning rates of another optimizer than ``optimizer``:
    the search restarts the schedule each round, and it would drive nothing the search trains.
    One whose optimizer shares a param group dict (timm's ``Lookahead`` shares its base's list)
    or a parameter with ``optimizer`` passes, and so does one that names no optimizer (a
    duck-typed scheduler: nothing to compare).

    Raises:
        ValueError: every optimizer the scheduler names shares no param group or parameter
            with ``optimizer``.
    """
    others = _driven(scheduler)
    groups = {id(g) for g in optimizer.param_groups}
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for other in others:
        theirs = getattr(other, "param_groups", None)
        if other is optimizer or not isinstance(theirs, (list, tuple)):
            return  # the same optimizer, or one whose groups cannot be read: not refused
        for group in theirs:
            if id(group) in groups or (
                    isinstance(group, dict) and any(id(p) in params for p in group.get("params", ()))):
                return
    if others:
        names = ", ".join(sorted({type(o).__name__ for o in others}))
        raise ValueError(
            f"scheduler {type(scheduler).__name__} drives another optimizer ({names}) than "
            f"optimizer= ({type(optimizer).__name__}), sharing no parameter with it: the schedule "
            "the search restarts each round would set no learning rate it trains with; build the "
            "scheduler on the optimizer passed as optimizer="
        )
