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
