"""``load_state_dict``: a pruned model's state dict into a freshly created model."""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from typing import Mapping

import torch
from torch import nn

from . import (_checks, _interpolate, _methods, _parents, _projection, _reparam, _target_checks, _targets,
               _ties, _undo)


def _without_data(value) -> str | None:
    """What ``value`` is when it is not a tensor holding data that torch's ``copy_`` reads (for
    the error), else None. torch finds out only while copying, after the keys before it."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    if _target_checks.is_dtensor(value):
        return f"a DTensor (a sharded state dict): {_target_checks.GATHER_FIRST}"
    if value.is_nested:  # before the layout: a nested tensor may be "strided" too
        return "a nested tensor"
    if value.layout != torch.strided:
        return f"a {str(value.layout).removeprefix('torch.')} tensor"
    if value.is_quantized:
        return f"a quantized tensor ({value.dtype}; dequantize() it first)"
    return "a meta tensor" if value.is_meta else None


def _check_keys(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, strict: bool) -> None:
    """Raise before copying anything: ``nn.Module.load_state_dict`` copies the matching keys
    before it reports missing, unexpected or mis-shaped ones."""
    problems = []
    if strict:
        missing, unexpected = sorted(own.keys() - given.keys()), sorted(given.keys() - own.keys())
        if missing:
            problems.append(f"missing keys {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}")
    for key in sorted(own.keys() & given.keys()):
        if key.endswith(_targets.EXTRA_STATE):  # any object, handed to the module's set_extra_state
            continue
        value, found = given[key], _without_data(given[key])
        if found is not None:
            problems.append(f"{key}: expected a tensor with data in the state_dict, found {found}")
        elif tuple(own[key].shape) != tuple(value.shape):
            problems.append(
                f"{key}: shape {tuple(value.shape)} in the state_dict, {tuple(own[key].shape)} in the model"
            )
    if problems:
        raise RuntimeError("cannot load the state_dict: " + "; ".join(problems))


def _check_initialized(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse a lazy tensor that ``state_dict`` loads into (as itself or pruned): torch would
    materialize it, which no rollback can undo, and installing a mask needs its shape first."""
    for fqn, module in model.named_modules(remove_duplicate=False):  # a shared module: every name
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            key = f"{fqn}.{name}" if fqn else name
            if key in state_dict or key + "_orig" in state_dict:
                _targets.check_initialized(key, module, tensor, "loading a state dict into it")


def _take_values(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each tensor of ``model``'s state with a copy of its values, for :func:`_put_values`
    (a lazy one has none, and :func:`_check_initialized` made sure nothing loads into it).
    The copies live in host memory: a model filling its GPU must still load."""
    tensors = {
        id(t): t
        for t in model.state_dict(keep_vars=True).values()
        if isinstance(t, torch.Tensor) and not nn.parameter.is_lazy(t)
    }
    with torch.no_grad():
        return [(t, t.detach().to("cpu", copy=True)) for t in tensors.values()]


def _put_values(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the values :func:`_take_values` saved back into the same tensor objects."""
    with torch.no_grad():
        for tensor, values in saved:
            tensor.copy_(values)


def _trained_norms(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` with AWS's norm interpolation taken off: ``<name>_orig`` (the trained
    value) as ``<name>``, ``<name>_init`` dropped. A pruned tensor has a ``_mask``, never an
    ``_init``, so the two are not confused."""
    bases = {k[: -len("_init")] for k in state_dict if k.endswith("_init")}
    bases = {b for b in bases if b + "_orig" in state_dict and b + "_mask" not in state_dict}
    if not bases:
        return state_dict
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("_orig") and key[: -len("_orig")] in bases:
            out[key[: -len("_orig")]] = value
        elif not (key.endswith("_init") and key[: -len("_init")] in bases):
            out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def _module_key(fqn: str) -> str:
    """A module's name without wrapper prefixes; a child named exactly ``module`` or
    ``_orig_mod`` (the wrapped model itself) becomes the root's ``""``."""
    return _targets.canonical(fqn + ".")[:-1] if fqn else ""


def _owns(module: nn.Module, leaf: str) -> bool:
    """Whether ``module``'s own state dict (pruned or not) can hold the entry ``leaf``."""
    if leaf in module._parameters or leaf in module._buffers:
        return True
    if leaf == _targets.EXTRA_STATE:
        return type(module).get_extra_state is not nn.Module.get_extra_state
    base, _, suffix = leaf.rpartition("_")
    return suffix in ("orig", "mask", "sign") and _targets.has_tensor(module, base)


def _own_names(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state_dict`` with its keys renamed to ``model``'s own, where only wrapper prefixes
    (``module.``, ``_orig_mod.``) differ: a DDP or compiled model's checkpoint loads into the
    bare model and back. A key already naming an entry of the model stays (a child called
    ``module`` is not a prefix then); keys naming nothing of the model stay as they are
    (unexpected keys)."""
    modules = list(model.named_modules(remove_duplicate=False))  # a shared module: every name
    by_name = dict(modules)
    by_key: dict[str, list] = {}
    for fqn, module in modules:
        by_key.setdefault(_module_key(fqn), []).append((fqn, module))

    def rename(key: str) -> str:
        owner, _, leaf = key.rpartition(".")
        if owner in by_name and _owns(by_name[owner], leaf):
            return key
        for fqn, module in by_key.get(_module_key(owner), ()):
            if _owns(module, leaf):
                return f"{fqn}.{leaf}" if fqn else leaf
        return key

    renamed = {key: rename(key) for key in state_dict}
    if all(k == v for k, v in renamed.items()):
        return state_dict
    counts = Counter(renamed.values())
    twins = sorted(k for k, v in renamed.items() if counts[v] > 1)
    if twins:
        raise RuntimeError(f"cannot load the state_dict: keys {twins[:4]} name the same tensor of the model")
    out = OrderedDict((renamed[k], v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions (BatchNorm...), keyed by module prefix
        out._metadata = OrderedDict((_renamed_module(k, by_name, by_key), v) for k, v in metadata.items())
    return out


def _renamed_module(prefix: str, by_name: dict, by_key: dict) -> str:
    """The model's name of the module a state dict's metadata ``prefix`` names."""
    if prefix in by_name:
        return prefix
    found = by_key.get(_module_key(prefix))
    return found[-1][0] if found else prefix


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """Load a pruned model's ``state_dict`` into a freshly created model of the same architecture.

    Plain ``model.load_state_dict`` fails on the ``*_orig`` / ``*_mask`` keys of an unpruned
    model; this installs the masks (and sign locks) first, then loads every value. Keys that
    differ from the model's only by wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of
    ``torch.compile``) are matched to the model's own. A checkpoint taken during an AWS search
    loads its norm layers' trained values (``<name>_orig``; the interpolation's ``<name>_init``
    is dropped), unless ``model`` is interpolated itself.

    Args:
        model: a model of the state dict's architecture, pruned or not.
        state_dict: the state dict of a pruned (or unpruned) model.
        strict: as ``nn.Module.load_state_dict``: every key must match. With ``False``, missing
            and unexpected keys are skipped, and a ``UserWarning`` lists them (torch returns
            them; this returns the model); mis-shaped values still raise.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is a TorchScript one), ``state_dict`` not a
            mapping of str keys, or a masked weight of ``model`` is an 8-bit float (or complex and
            sign-locked).
        ValueError: a masked tensor names no module of ``model`` or has another shape, or the
            state dict loads into a lazy layer that has no shape yet (run a forward pass first),
            a masked tensor of ``model`` is sharded (a DTensor), or a mask is not binary, or a
            masked tensor of ``model`` is tied to another (one Parameter in two modules, or two
            tensors on the same memory), as the mask would leave the other reading it dense.
        RuntimeError: missing or unexpected keys (with ``strict``), other mismatched shapes, or
            values that are not tensors with data that torch can copy (a sparse, quantized,
            nested or meta tensor), as ``nn.Module.load_state_dict`` raises.
        The model's tensors are left untouched in every case, an error raised by a module's
        own loading code (``set_extra_state``, a load hook) included: a copy of them, held in
        host memory while it loads, puts their values back. Python state that an earlier
        module's ``set_extra_state`` set is not undone.

    Example:
        >>> import torch, signmask
        >>> sd = signmask.prune(torch.nn.Linear(4, 4), 0.5).state_dict()
        >>> fresh = signmask.load_state_dict(torch.nn.Linear(4, 4), sd)
        >>> bool(torch.equal(fresh.weight_mask, sd["weight_mask"]))
        True
    """
    _checks.check_eager_model(model, "model")
    _checks.check_bool(strict, "strict")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    odd = [k for k in state_dict if not isinstance(k, str)]
    if odd:
        raise TypeError(f"state_dict keys must be str names, got {type(odd[0]).__name__} {odd[0]!r}")
    if not _interpolate.interpolated(model):
        state_dict = _trained_norms(state_dict)
    state_dict = _own_names(model, state_dict)  # from here on, keys are the model's own names
    _check_initialized(model, state_dict)
    plan = _mask_plan(model, state_dict)
    _target_checks.check_local({k: (m, t) for k, (m, t, _, _) in plan.items()}, _target_checks.GATHER_FIRST)
    _ties.check_untied(_plan_targets(model, plan), model,
                       remedy="untie them before load_state_dict, which installs the state dict's masks")
    skipped = _install_and_load(model, plan, state_dict, strict)
    if skipped.missing_keys or skipped.unexpected_keys:
        warnings.warn(
            f"load_state_dict(strict=False) left {len(skipped.missing_keys)} tensors of the model "
            f"as they were (missing keys {skipped.missing_keys[:5]}) and skipped "
            f"{len(skipped.unexpected_keys)} keys the model does not have {skipped.unexpected_keys[:5]}",
            UserWarning,
            stacklevel=2,
        )
    return model


def _mask_plan(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Pruned tensor's key -> ``(module, tensor name, mask, locked)`` for every ``<name>_mask``
    of ``state_dict`` with its ``<name>_orig``, each checked against ``model``."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module: every name
    plan = {}
    for key, mask in state_dict.items():
        base = key[: -len("_mask")]
        if not key.endswith("_mask") or base + "_orig" not in state_dict:
            continue
        owner, _, tensor = base.rpartition(".")
        module = modules.get(owner)
        if module is None or not _targets.has_tensor(module, tensor):
            raise ValueError(f"state_dict masks {key!r}, but the model has no tensor {owner}.{tensor}")
        shape = _reparam.original(module, tensor).shape
        found = _without_data(mask)  # as _check_keys says of the other keys
        if found is not None:
            raise RuntimeError(f"{key}: expected a tensor with data in the state_dict, found {found}")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(
                f"state_dict {key!r} has shape {tuple(mask.shape)}; the model's "
                f"{owner}.{tensor} has {tuple(shape)}"
            )
        if not _checks.is_binary(mask):
            # prune.custom_from_mask takes any values; as a bool mask they would compute otherwise.
            raise ValueError(
                f"state_dict {key!r} is not a binary mask (0/1 expected, found values "
                f"{_checks.odd_values(mask)}): make that pruning permanent in the source model "
                "first (torch.nn.utils.prune.remove) or give it a 0/1 mask"
            )
        _target_checks.check_names_free(f"{owner}.{tensor}" if owner else tensor, module, tensor)
        locked = base + "_sign" in state_dict
        _target_checks.check_dtype(base, _reparam.original(module, tensor), locked=locked)
        plan[base] = (module, tensor, mask, locked)
    return plan


def _plan_targets(model: nn.Module, plan: dict) -> dict[str, tuple[nn.Module, str]]:
    """The ``plan``'s tensors, each once, under the name :mod:`._ties` gives its slot (the first
    of a shared module's names): a module under two names is one tensor, not tied weights."""
    first: dict[int, str] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        first.setdefault(id(module), fqn)
    targets = {}
    for module, tensor, _, _ in plan.values():
        fqn = first[id(module)]
        targets.setdefault(_targets.canonical(f"{fqn}.{tensor}" if fqn else tensor), (module, tensor))
    return targets


def _install_and_load(model: nn.Module, plan: dict, state_dict, strict: bool):
    """Install the ``plan``'s masks where ``model`` has none yet, load ``state_dict`` and refresh
    the pruned weights; on any error, uninstall them and put every value of ``model`` back.
    Returns torch's missing and unexpected keys."""
    # torch copies module by module, and a module's own loading code (set_extra_state, a
    # _load_from_state_dict or hook) can still raise midway: the copies put every value back.
    saved = _take_values(model)
    # The aliases refreshed and parents linked too; under the projection backend, the gradients
    # and the optimizer state it masks (and reflects) for the loaded weights.
    optimizers = _projection.optimizers(_targets.pruned(model))
    undo, installed = _undo.Undo(model, optimizers=optimizers), []
    try:
        with undo.saving():
            with torch.no_grad():
                for module, tensor, mask, locked in plan.values():
                    if _reparam.find_hook(module, tensor)[1] is None:
                        keep = mask.to(_reparam.original(module, tensor).device) != 0
                        negative = torch.zeros_like(keep) if locked else None
                        installed.append((module, tensor))  # before: uninstall undoes a partial one
                        _reparam.install(module, tensor, keep, _methods.FromSignedMask(keep), negative=negative)
            _check_keys(model.state_dict(), state_dict, strict=strict)
            skipped = model.load_state_dict(state_dict, strict=strict)
            for module, tensor, _, _ in plan.values():
                _reparam.refresh(module, tensor)  # allocates: may run out of memory too
            _parents.link(model)
    except BaseException:
        for module, tensor in reversed(installed):
            _reparam.uninstall(module, tensor)
        undo.restore(refresh=False)
        _put_values(saved)  # last: over the loaded values the projection's entries went back to
        undo.refresh()  # the effective weights, of the values put back
        raise
    return skipped
