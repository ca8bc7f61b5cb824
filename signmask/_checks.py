"""Argument checks shared by every public function.

Each returns the value in its canonical type or raises naming the argument, what was expected
and what was found. Bools are refused where a number is expected (``True`` would read as 1).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterable

import torch
from torch import nn


def check_model(model: Any, arg: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``; raise ``TypeError`` naming ``arg`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_eager_model(model: Any, arg: str) -> nn.Module:
    """:func:`check_model`, refusing a TorchScript module too (``torch.jit.trace``, ``script``,
    ``load``): its submodules are no longer ``nn.Conv2d`` / ``nn.Linear`` and its ``_parameters``
    no dict, so pruning it crashed deep inside and a traced pruned model read as unpruned."""
    check_model(model, arg)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{arg} is a TorchScript module ({type(model).__name__}), which signmask cannot change "
            "or read: call it on the eager model (before torch.jit.trace or torch.jit.script)"
        )
    return model


def some(names, limit: int = 3) -> str:
    """The first ``limit`` of ``names`` as a list, with " ..." when there are more: how an error
    names a few of many tensors or modules."""
    names = list(names)
    return f"{names[:limit]}{' ...' if len(names) > limit else ''}"


def check_bool(value: Any, arg: str, *, optional: bool = False) -> bool | None:
    """Return ``value`` as a bool if it is one (numpy's, or a one-element bool tensor), or None
    if ``optional`` allows it; raise ``TypeError`` naming ``arg`` otherwise (a string such as
    ``"no"`` would read as true, a tensor of several bools has no truth value)."""
    if optional and value is None:
        return None
    if _is_bool(value):
        return bool(value)
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"{arg} must be a bool{' or None' if optional else ''}, got {name} {value!r}")


def _is_bool(value: Any) -> bool:
    # numpy's bool without importing numpy; older numpy lets operator.index take it as 0 or 1,
    # as torch does a one-element bool tensor (one element only: bool() of more raises).
    kind = type(value)
    return (isinstance(value, bool) or kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
            or isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1)


def check_int(value: Any, arg: str, *, minimum: int) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``.

    Integers are what ``operator.index`` takes: ints, numpy ints, one-element integer tensors.

    Raises:
        TypeError: ``value`` is no integer (a float, a string, a bool).
        ValueError: ``value`` is below ``minimum``.
    """
    try:
        if _is_bool(value):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {number}")
    return number


# torch.Generator.manual_seed takes [0, 2**64); per-tensor seeds wrap around inside it.
SEED_LIMIT = 2**64


def check_seed(seed: Any, arg: str = "seed") -> int:
    """Return ``seed`` as an int if it is an integer in [0, 2**64) (see :func:`check_int`)."""
    value = check_int(seed, arg, minimum=0)
    if value >= SEED_LIMIT:
        raise ValueError(f"{arg} must be an int below 2**64, got {value}")
    return value


def check_real(value: Any, arg: str, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real in ``[low, high]`` (an end is open
    with ``low_open`` / ``high_open``)."""
    opening, closing = "(" if low_open else "[", ")" if high_open else "]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if not math.isfinite(number) or below or above:
        raise ValueError(f"{arg} must be a finite number in {opening}{low}, {high}{closing}, got {value!r}")
    return number


def check_fraction(value: Any, arg: str) -> float:
    """Return ``value`` as a float strictly between 0 and 1 (a sparsity, a pruning rate)."""
    return check_real(value, arg, low=0, high=1, low_open=True, high_open=True)


def check_key(key: Any, valid: Iterable[str], arg: str, what: str) -> str:
    """Return ``key`` if it is one of the names ``valid`` (a registry's keys, a fixed choice).

    Raises:
        TypeError: ``key`` is no str (``None``, a list).
        ValueError: an unknown name. Both messages name ``arg`` and list the valid names.
    """
    names = sorted(valid)
    if not isinstance(key, str):
        raise TypeError(f"{arg} must be a str, one of {names}, got {type(key).__name__} {key!r}")
    if key not in names:
        raise ValueError(f"{arg}={key!r} is not a known {what}; valid: {names}")
    return key


def check_finite(key: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Refuse NaN or infinite ``values`` (only where the bool ``where`` is True): their signs
    mean nothing. For ``extract`` and ``prune(signs="locked")``, whose locks read them."""
    bad = ~torch.isfinite(values)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        raise ValueError(
            f"{key} holds {int(bad.sum())} NaN or infinite {'kept ' if where is not None else ''}"
            "weights (a diverged run?); their signs mean nothing"
        )


def moved_hook(name: str) -> str:
    """Why a pruning hook of ``<name>`` sits on a module without ``<name>_mask``, and the fix."""
    return (f"no {name}_mask: torch.ao.quantization's fuse_modules (and fuse_modules_qat) moves "
            "a pruned module's forward pre-hooks onto the fused module, and convert "
            "(quantize_dynamic too) copies them onto the quantized one; make the pruning "
            "permanent first: signmask.remove(model) before fusing or converting (both copy the "
            "model unless inplace=True)")


def is_binary(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is 0 or 1 (stock prune's ``custom_from_mask`` takes any)."""
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def odd_values(mask: torch.Tensor) -> list[float]:
    """Up to five distinct entries of ``mask`` other than 0 and 1, for error messages."""
    odd = mask[(mask != 0) & (mask != 1)]
    return sorted(float(v) for v in odd.unique()[:5].tolist())


def check_binary(key: str, mask: torch.Tensor, reader: str) -> None:
    """Refuse ``key``'s prune mask where it holds values other than 0 and 1 (``custom_from_mask``
    takes any): the forward uses every non-zero entry (negated, scaled), where ``reader`` (who
    reads the mask, and how: the middle of the message) takes only the 1s as kept.

    Raises:
        ValueError: naming ``key``, up to five of the odd values, and the remedies.
    """
    if not is_binary(mask):
        raise ValueError(
            f"{key}: its prune mask is not binary (0/1 expected, found values "
            f"{odd_values(mask)}); {reader}, so its kept weights would differ from those the "
            "forward uses: make that pruning permanent first (torch.nn.utils.prune.remove) or "
            "give it a 0/1 mask"
        )
