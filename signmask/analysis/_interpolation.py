"""Points on the straight line between two networks of the same architecture and mask."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import _bits, _reparam, _targets
from .._checks import check_model, check_real
from ._common import check_mask, clone, same_names


def _tensors(model: nn.Module, arg: str) -> dict[str, torch.Tensor]:
    """Canonical name -> live tensor for every parameter and buffer (non-persistent included);
    two tensors of one canonical name are refused, naming ``arg``."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return _targets.canonical_tensors(named, owner=arg)


def _differences(key: str, a: torch.Tensor, b: torch.Tensor, pruned: dict) -> int:
    """How many entries of a mask, or kept entries of a packed sign lock, differ."""
    b = b.to(a.device)
    if not key.endswith("_sign"):  # bool (signmask) or float (stock prune) masks: compare keeps
        return int(((a != 0) != (b != 0)).count_nonzero())  # sum() would copy to int64
    module, name = pruned[key[: -len("_sign")]]
    shape = _reparam.original(module, name).shape
    keep = _reparam.current_mask(module, name)
    bits_a, bits_b = _bits.sign_bits(a, shape), _bits.sign_bits(b, shape)
    return int(((bits_a != bits_b) & keep).count_nonzero())


def check_masks(model: nn.Module, arg: str) -> dict[str, tuple[nn.Module, str]]:
    """``_targets.pruned(model)``, its masks refused by :func:`check_mask` where one is not
    binary (a path between masks read as keeps would pass two different ones as equal)."""
    pruned = _targets.pruned(model)
    for key, (module, name) in pruned.items():
        check_mask(key, module, name, arg)
    return pruned


def _check_pruned_alike(model_a: nn.Module, model_b: nn.Module, ta: dict, tb: dict) -> None:
    """Where the two models' tensor names differ only as a tensor pruned in one model and not in
    the other would make them (``<name>_orig``, ``_mask``, ``_sign`` against ``<name>``), say
    that, naming the tensor and the pruned model: the list of names would show it only by its
    suffixes. Other differences are left to :func:`same_names`."""
    pa, pb = _targets.pruned(model_a), _targets.pruned(model_b)
    only_a, only_b = pa.keys() - pb.keys(), pb.keys() - pa.keys()

    def plain(names, pruned_here):  # each name of a tensor pruned here only, as unpruned
        out = set()
        for key in names:
            base, _, suffix = key.rpartition("_")
            out.add(base if suffix in ("orig", "mask", "sign") and base in pruned_here else key)
        return out

    if not (only_a or only_b) or plain(ta, only_a) != plain(tb, only_b):
        return
    diffs = sorted([(k, "model_a", "model_b") for k in only_a] + [(k, "model_b", "model_a") for k in only_b])
    key, pruned, dense = diffs[0]
    more = f" ({len(diffs) - 1} more tensors are pruned in one model only)" if len(diffs) > 1 else ""
    raise ValueError(
        f"tensor {key!r} is pruned in {pruned} and not in {dense}{more}; interpolation needs both "
        f"networks under the same masks (or, to compare two dense networks, signmask.remove on "
        f"the pruned one first)"
    )


def plan_blend(model_a: nn.Module, model_b: nn.Module) -> dict[str, str]:
    """Name -> how to blend it (``"blend"``, ``"keep"``, ``"magnitude"``); raise on mismatch.

    Masks and the kept entries' sign locks (``"keep"``) must be equal in both models; integer
    buffers (``num_batches_tracked``) are kept from ``model_a``.
    """
    ta, tb = _tensors(model_a, "model_a"), _tensors(model_b, "model_b")
    if ta.keys() != tb.keys():
        _check_pruned_alike(model_a, model_b, ta, tb)
    same_names(ta, tb, "model_a", "model_b")
    pruned_a, pruned_b = check_masks(model_a, "model_a"), check_masks(model_b, "model_b")
    if pruned_a.keys() != pruned_b.keys():
        diff = sorted(pruned_a.keys() ^ pruned_b.keys())
        raise ValueError(f"model_a and model_b prune different tensors: first difference {diff[0]!r}")
    structural = {f"{k}{s}" for k in pruned_a for s in ("_mask", "_sign")}
    locked = {f"{k}_orig" for k, (m, n) in pruned_a.items() if _reparam.is_sign_locked(m, n)}
    plan = {}
    for key, a in ta.items():
        b = tb[key]
        mask = key in structural and key.endswith("_mask")  # its dtype depends on who pruned
        if a.shape != b.shape or (a.dtype != b.dtype and not mask):
            raise ValueError(
                f"tensor {key!r} differs: model_a has {tuple(a.shape)} {a.dtype}, model_b has "
                f"{tuple(b.shape)} {b.dtype}"
            )
        if key in structural:
            n = _differences(key, a, b, pruned_a)
            if n:
                raise ValueError(
                    f"{key!r} differs between model_a and model_b ({n} entries); "
                    "interpolation needs both networks under the same mask and sign locks"
                )
            plan[key] = "keep"
        elif key in locked:
            plan[key] = "magnitude"
        else:
            plan[key] = "blend" if a.is_floating_point() else "keep"
    return plan


_CHUNK = 1 << 20  # entries blended at a time: float64 temporaries of a few MiB, not ~40 B/entry


def _slices(*tensors: torch.Tensor):
    """Matching slices of same-shape tensors, about ``_CHUNK`` entries each: flat ones where
    all are contiguous, else blocks of leading-dim rows (every entry is computed on its own, so
    how they are grouped changes no value)."""
    if all(t.is_contiguous() for t in tensors):
        tensors = tuple(t.view(-1) for t in tensors)
    if tensors[0].dim() == 0:
        yield tensors
        return
    rows = max(1, _CHUNK // max(1, tensors[0][:1].numel()))
    for start in range(0, tensors[0].shape[0], rows):
        yield tuple(t[start : start + rows] for t in tensors)


def _blend_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                negative: torch.Tensor | None = None) -> None:
    """Write ``(1 - alpha) * a + alpha * b`` into ``out``, computed in float64 and rounded once
    to ``out``'s dtype, slice by slice; the endpoints are ``a`` and ``b`` themselves (``0 * inf``
    would make them NaN). With ``negative`` (sign bits, int8): the blend of ``|a|`` and ``|b|``,
    negated where the bit is 1."""
    parts = (out, a, b) if negative is None else (out, a, b, negative)
    for o, x, y, *bits in _slices(*parts):
        x, y = x.detach(), y.detach()
        if bits:
            x, y = x.abs(), y.abs()
        if alpha in (0.0, 1.0):
            o.copy_(x if alpha == 0.0 else y)
        else:  # copies (copy=True): a float64 x or y would otherwise be scaled in place
            x64 = x.to(torch.float64, copy=True).mul_(1.0 - alpha)
            o.copy_(x64.add_(y.to(x.device, torch.float64, copy=True).mul_(alpha)))
        if bits:  # negated after rounding, as the magnitudes were before
            o.copy_(torch.where(bits[0].bool(), -o, o))


def write_blend(target: nn.Module, model_a: nn.Module, model_b: nn.Module, alpha: float,
                plan: dict[str, str]) -> None:
    """Write the blend at ``alpha`` into ``target`` (a copy of ``model_a``), as ``plan`` says."""
    ta, tb = _tensors(model_a, "model_a"), _tensors(model_b, "model_b")
    tt = _tensors(target, "target")
    owners = {}
    for key, (module, name) in _targets.pruned(target).items():
        owners[f"{key}_orig"] = (module, name)
    with torch.no_grad():
        for key, how in plan.items():
            if how == "keep":
                tt[key].copy_(ta[key])
            elif how == "blend":
                _blend_into(tt[key], ta[key], tb[key], alpha)
            else:  # sign-locked: locked sign times the blended magnitudes
                module, name = owners[key]
                bits = _bits.sign_bits(module._buffers[name + "_sign"], tt[key].shape)
                _blend_into(tt[key], ta[key], tb[key], alpha, negative=bits)
        for module, name in owners.values():
            _reparam.refresh(module, name)


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """Build the network ``(1 - alpha) * model_a + alpha * model_b`` as a new model.

    The result is a ``copy.deepcopy`` of ``model_a`` in which every floating-point parameter and
    buffer (running statistics included) is ``(1 - alpha) * a + alpha * b``, computed in float64
    and rounded once, so ``alpha=0`` and ``alpha=1`` give ``model_a`` and ``model_b`` exactly.
    Masks, and the signs locked on kept entries, must be equal in both models and are copied;
    integer buffers (``num_batches_tracked``) are ``model_a``'s. A sign-locked tensor gets the
    locked signs times the blended magnitudes, so its effective weight is the blend of the
    effective weights.

    Args:
        model_a: the network at ``alpha = 0``.
        model_b: the network at ``alpha = 1``, same architecture and pruning layout.
        alpha: the interpolation coefficient, in [0, 1].

    Returns:
        A new model; ``model_a`` and ``model_b`` are not modified.

    Raises:
        TypeError: a model is not an ``nn.Module`` or ``alpha`` is not a real number.
        ValueError: ``alpha`` outside [0, 1]; two tensors of one model have the same name once
            the ``module.`` / ``_orig_mod.`` wrapper prefixes are stripped (both are named); the
            models' tensors differ in names, shapes or dtypes, a tensor is pruned in one model
            only, or a mask or sign lock differs (the first differing tensor is named); a stock
            prune mask holds values other than 0 and 1 (``custom_from_mask`` takes any; the
            forward uses every non-zero one).

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> mid = analysis.interpolate(a, b, 0.5)
        >>> bool(torch.allclose(mid.weight, (a.weight + b.weight) / 2))
        True
    """
    check_model(model_a, "model_a")
    check_model(model_b, "model_b")
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    plan = plan_blend(model_a, model_b)
    out = clone(model_a)
    write_blend(out, model_a, model_b, alpha, plan)
    return out
