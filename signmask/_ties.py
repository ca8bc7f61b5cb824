"""Tied weights: one Parameter held by two modules, or two tensors on the same memory.

A mask on one user of a tied weight would leave the others reading it dense, and the projection
backend or a transfer, which write ``weight_orig`` in place, would change it for all of them.
Ties through memory (``nn.Parameter(w.t())``, ``nn.Parameter(w.data)``: a different Parameter
object on ``w``'s storage) are found by comparing storage addresses and byte ranges, once per
call, never per forward.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping

import torch
from torch import nn

from . import _reparam, _targets


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id of each Parameter -> the canonical names of the module slots holding it."""
    holders: dict[int, list[str]] = {}
    for name, param, kind in _slots(model):
        if kind == "Parameter":
            holders.setdefault(id(param), []).append(name)
    return holders


def _slots(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(canonical name, tensor, ``"Parameter"`` or ``"buffer"``) of every module slot of
    ``model``; a module reachable under two names is still one slot. ``<name>_orig`` is named
    ``<name>``, as the tickets name a pruned tensor."""
    seen = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for kind, table in (("Parameter", module._parameters), ("buffer", module._buffers)):
            for tname, tensor in table.items():
                if tensor is None or (id(module), tname) in seen:
                    continue
                seen.add((id(module), tname))
                if kind == "Parameter" and tname.endswith("_orig"):
                    tname = tname[: -len("_orig")]
                yield _targets.canonical(f"{fqn}.{tname}" if fqn else tname), tensor, kind


def _extent(t: torch.Tensor) -> tuple[tuple, int, int, bool] | None:
    """(storage key, first byte, end byte, dense) of the memory ``t`` reads, or None where there
    is none to compare: an empty tensor, one on the meta device, or a tensor subclass without
    storage (sparse, wrapper subclasses). ``dense``: every byte of the range is one of ``t``'s."""
    try:
        if t.is_meta or t.numel() == 0:
            return None
        base, start = t.untyped_storage().data_ptr(), t.data_ptr()
        span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))  # torch strides are >= 0
        size = t.element_size()
    except Exception:  # noqa: BLE001 -- each storage-less kind raises its own error
        return None
    if base == 0:
        return None
    return (t.device, base), start, start + (span + 1) * size, _dense(t)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its range, each byte once (torch's "non-overlapping and
    dense"): its strides, smallest first, are the products of the sizes before them. An
    expanded tensor (a stride 0) never is, even where its range has as many bytes as it has
    elements."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _units(t: torch.Tensor, low: int, unit: int) -> torch.Tensor:
    """Indices (in ``unit`` bytes from address ``low``) of every unit of memory ``t`` reads."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    at = torch.arange(span + 1).as_strided(tuple(t.shape), tuple(t.stride())).reshape(-1)
    per = t.element_size() // unit
    first = (t.data_ptr() - low) // unit + at * per
    return (first[:, None] + torch.arange(per)).reshape(-1)


def _overlap(a: torch.Tensor, b: torch.Tensor, ea: tuple, eb: tuple) -> bool:
    """Whether ``a`` and ``b`` (extents ``ea``, ``eb`` from :func:`_extent`, on one storage)
    share a byte. Disjoint ranges share none, two dense ones that meet do; else (views with
    gaps: ``w[:, ::2]`` beside ``w[:, 1::2]``) the bytes are compared, on the CPU: rare, and
    only for these two tensors."""
    if max(ea[1], eb[1]) >= min(ea[2], eb[2]):
        return False
    if ea[3] and eb[3]:
        return True
    unit = math.gcd(a.element_size(), b.element_size())
    low = min(ea[1], eb[1])
    marks = torch.zeros((max(ea[2], eb[2]) - low) // unit, dtype=torch.bool)
    marks[_units(a, low, unit)] = True
    return bool(marks[_units(b, low, unit)].any())


def _sharing(targets: Mapping[str, tuple[nn.Module, str]], model: nn.Module) -> tuple[str, str, str] | None:
    """The first target whose Parameter shares memory with another tensor of ``model`` (a
    Parameter or a buffer; not the same object, which :func:`_holders` finds): (its name, the
    other's name, the other's kind), or None."""
    origs = {id(_reparam.original(m, n)): key for key, (m, n) in targets.items()}
    by_storage: dict[tuple, list] = {}
    seen = set()
    for name, tensor, kind in _slots(model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        extent = _extent(tensor)
        if extent is not None:
            by_storage.setdefault(extent[0], []).append((name, tensor, kind, extent))
    for group in by_storage.values():
        group.sort(key=lambda entry: entry[3][1])  # by first byte: only neighbours can meet
        for i, (name, tensor, own_kind, extent) in enumerate(group):
            for other, t, kind, e in group[i + 1:]:
                if e[1] >= extent[2]:
                    break
                if (id(tensor) in origs or id(t) in origs) and _overlap(tensor, t, extent, e):
                    if id(tensor) in origs:
                        return origs[id(tensor)], other, kind
                    return origs[id(t)], name, own_kind
    return None


def check_untied(targets: Mapping[str, tuple[nn.Module, str]], model: nn.Module, *,
                 remedy: str | None = None) -> None:
    """Refuse a target whose Parameter another module of ``model`` also holds, or whose memory
    another Parameter or buffer of ``model`` shares, before anything is changed.

    Args:
        targets: canonical name -> (module, tensor name) of the tensors to mask or write.
        model: the model holding them, searched for the other holders.
        remedy: ends the message; by default, the ``exclude=`` that leaves the tied targets out
            (only conv/linear modules can be excluded: a tied embedding is no target anyway).

    Raises:
        ValueError: naming the target and the other tensor.
    """
    holders = _holders(model)
    for key, (module, name) in targets.items():
        names = holders.get(id(_reparam.original(module, name)), [key])
        others = [n for n in names if n != key]
        if others:
            chosen = [n.rpartition(".")[0] for n in names if n in targets]
            raise ValueError(
                f"{key} and {others[0]} share one Parameter (tied weights); a mask on one would "
                f"leave the other reading it dense: {remedy or f'pass exclude={chosen!r} or untie them'}"
            )
    shared = _sharing(targets, model)
    if shared is not None:
        key, other, kind = shared
        chosen = [n.rpartition(".")[0] for n in (key, other) if n in targets]
        raise ValueError(
            f"{key} and {other} (a {kind}) are different tensors on the same memory (tied "
            "weights, as nn.Parameter(w.t()) or nn.Parameter(w.data) make them); a mask on one "
            f"would leave the other reading it dense: {remedy or f'pass exclude={chosen!r} or untie them'}"
        )
