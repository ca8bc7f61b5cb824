"""``prune``, ``remove`` and ``load_state_dict``: the model-level pruning front."""

from __future__ import annotations

import inspect
import warnings
from collections import Counter, OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune as _prune

from . import _methods, _parents, _reparam, _targets

_SCOPES = ("global", "layer")
_EXTRA_STATE = "_extra_state"  # nn.Module's key suffix for get_extra_state()
_SIGN_MODES = ("free", "locked")


def _check_choice(value, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {list(valid)}")
    return value


def check_prunable(key: str, module: nn.Module, name: str, *, signs: str | None) -> None:
    """Refuse a tensor whose current pruning state conflicts with the request."""
    _reparam.check_names_free(key, module, name)
    _, hook = _reparam.find_hook(module, name)
    if hook is None:
        return
    if not isinstance(hook, _reparam.SignMaskHook):
        mask = module._buffers[name + "_mask"]
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{key}: its existing prune mask is not binary; cannot add to it")
    if signs == "free" and _reparam.is_sign_locked(module, name):
        raise ValueError(
            f"{key} is sign-locked; pruning it again with signs='free' conflicts "
            "(pass signs=None to keep the lock, or signmask.remove() first)"
        )


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id of each Parameter -> the canonical names of the module slots holding it."""
    holders: dict[int, list[str]] = {}
    slots = set()
    for fqn, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is None or (id(module), pname) in slots:
                continue  # a module reachable under two names is still one slot
            slots.add((id(module), pname))
            pname = pname[: -len("_orig")] if pname.endswith("_orig") else pname
            holders.setdefault(id(param), []).append(_targets.canonical(f"{fqn}.{pname}" if fqn else pname))
    return holders


def check_untied(targets: Mapping[str, tuple[nn.Module, str]], model: nn.Module) -> None:
    """Refuse a target whose Parameter another module (or tensor) of ``model`` also holds.

    A mask on one user of a tied Parameter (a head tied to an embedding) would leave the others
    reading it dense, and the projection backend or a transfer would zero it for all of them.
    """
    holders = _holders(model)
    for key, (module, name) in targets.items():
        names = holders.get(id(_reparam.original(module, name)), [key])
        others = [n for n in names if n != key]
        if others:
            raise ValueError(
                f"{key} and {others[0]} share one Parameter (tied weights); a mask on one would "
                "leave the other reading it dense: exclude both (exclude=) or untie them"
            )


def prune(
    model: nn.Module,
    amount: float | int,
    *,
    method: str = "magnitude",
    scope: str = "global",
    signs: str | None = None,
    classifier: bool = True,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: _targets.FilterFn | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Prune the fraction ``amount`` of the still-unpruned conv/linear weights, in place.

    Repeated calls prune a fraction of the REMAINING weights, like stacked ``torch.nn.utils.prune``
    calls. Exactly ``round(amount * alive)`` weights are pruned (Python's ``round``, half to even,
    as in ``torch.nn.utils.prune``); ties are broken by position, so the result is deterministic.
    As in ``torch.nn.utils.prune``, an int ``amount`` is a number of weights, not a fraction.

    Args:
        model: any ``nn.Module`` (a timm model, a compiled or DDP-wrapped one).
        amount: fraction in [0, 1] of the remaining weights to prune (a float), or how many of
            them (an int; per tensor with ``scope="layer"``).
        method: a registered ranking method: ``"magnitude"`` (L1) or ``"random"``.
        scope: ``"global"`` ranks all selected tensors together; ``"layer"`` each on its own.
        signs: ``"locked"`` freezes the current sign of every kept weight
            (``w = s * |w_orig| * mask``); ``"free"`` refuses sign-locked tensors; ``None``
            keeps each tensor's mode (new tensors are free).
        classifier: also prune the classifier head (open_lth does in ResNets; AWS does not).
        include: globs of module names to consider (default: all conv/linear).
        exclude: globs of module names to skip.
        filter_fn: ``filter_fn(module, name) -> bool``; False skips the module.
        seed: seed of ``method="random"``.

    Returns:
        ``model``, pruned in prune's layout (``weight_orig``, bool ``weight_mask``).

    Raises:
        TypeError: ``amount`` not a number.
        ValueError: ``amount`` outside [0, 1] (a float) or above the weights left (an int),
            unknown method/scope/signs, ``seed`` for a
            method without one, nothing to prune, tied weights, or a conflicting earlier pruning. The model is then left untouched.

    Example:
        >>> import torch, signmask
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
        >>> net = signmask.prune(net, 0.5)
        >>> int(net[0].weight_mask.sum() + net[1].weight_mask.sum())
        60
    """
    amount = _methods.check_amount(amount)
    method_cls = _methods.get_method(method)
    _check_choice(scope, _SCOPES, "scope")
    if signs is not None:
        _check_choice(signs, _SIGN_MODES, "signs")
    if seed is not None and "seed" not in inspect.signature(method_cls).parameters:
        raise ValueError(f"seed= is not an option of method={method!r}: it is deterministic")
    ranker = method_cls(amount) if seed is None else method_cls(amount, seed=seed)
    targets = _targets.select(
        model, classifier=classifier, include=include, exclude=exclude, filter_fn=filter_fn
    )
    return prune_targets(model, targets, ranker, scope=scope, signs=signs)


def prune_targets(
    model: nn.Module,
    targets: dict[str, tuple[nn.Module, str]],
    ranker: _methods.RankedPruning,
    *,
    scope: str = "global",
    signs: str | None = None,
) -> nn.Module:
    """Prune ``targets`` (from ``_targets.select(model)``) with ``ranker``: ``prune``'s core,
    for callers that already selected (``apply``, the search), so selection warns once."""
    check_untied(targets, model)
    for key, (module, name) in targets.items():
        check_prunable(key, module, name, signs=signs)
    names = list(targets)
    weights = [_reparam.original(m, n) for m, n in targets.values()]
    masks = []
    for (m, n), w in zip(targets.values(), weights):
        current = _reparam.current_mask(m, n)
        masks.append(torch.ones_like(w, dtype=torch.bool) if current is None else current)
    if scope == "global":
        new_masks = ranker.compute_masks(weights, masks, names)
    else:
        new_masks = [
            ranker.compute_masks([w], [m], [k], index_offset=i)[0]
            for i, (w, m, k) in enumerate(zip(weights, masks, names))
        ]
    with torch.no_grad():
        for (module, name), keep in zip(targets.values(), new_masks):
            negative = None
            if signs == "locked" and not _reparam.is_sign_locked(module, name):
                # From the live Parameter: module.<name> is only refreshed by a forward.
                negative = torch.signbit(_reparam.original(module, name))
            _reparam.install(module, name, keep, ranker, negative=negative)
    _parents.link(model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Make all pruning of ``model`` permanent, like ``prune.remove`` on every pruned tensor.

    Each ``weight`` becomes a plain Parameter (the same object as ``weight_orig``) holding the
    effective values: zeros where pruned, locked signs applied.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: nothing in ``model`` is pruned.

    Example:
        >>> import torch, signmask
        >>> net = signmask.prune(torch.nn.Linear(4, 4), 0.25)
        >>> net = signmask.remove(net)
        >>> int((net.weight == 0).sum()), hasattr(net, "weight_mask")
        (4, False)
    """
    _targets.check_model(model, "model")
    found = _targets.pruned(model)
    if not found:
        raise ValueError(f"nothing in {type(model).__name__} is pruned; nothing to remove")
    _targets.check_local(found, _targets.GATHER_FIRST)
    for module, name in found.values():
        _prune.remove(module, name)
    _parents.link(model)
    return model


def _without_data(value) -> str | None:
    """What ``value`` is when it is not a tensor holding data (for the error), else None."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    if _targets.is_dtensor(value):
        return f"a DTensor (a sharded state dict): {_targets.GATHER_FIRST}"
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
        if key.endswith(_EXTRA_STATE):  # any object, handed to the module's set_extra_state
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


def _module_key(fqn: str) -> str:
    """A module's name without wrapper prefixes; a child named exactly ``module`` or
    ``_orig_mod`` (the wrapped model itself) becomes the root's ``""``."""
    return _targets.canonical(fqn + ".")[:-1] if fqn else ""


def _owns(module: nn.Module, leaf: str) -> bool:
    """Whether ``module``'s own state dict (pruned or not) can hold the entry ``leaf``."""
    if leaf in module._parameters or leaf in module._buffers:
        return True
    if leaf == _EXTRA_STATE:
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
    ``torch.compile``) are matched to the model's own.

    Args:
        model: a model of the state dict's architecture, pruned or not.
        state_dict: the state dict of a pruned (or unpruned) model.
        strict: as ``nn.Module.load_state_dict``: every key must match. With ``False``, missing
            and unexpected keys are skipped, and a ``UserWarning`` lists them (torch returns
            them; this returns the model); mis-shaped values still raise.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``state_dict`` not a mapping.
        ValueError: a masked tensor names no module of ``model`` or has another shape.
        RuntimeError: missing or unexpected keys (with ``strict``), other mismatched shapes, or
            values that are not tensors with data, as ``nn.Module.load_state_dict`` raises.
        The model is left untouched in every case.

    Example:
        >>> import torch, signmask
        >>> sd = signmask.prune(torch.nn.Linear(4, 4), 0.5).state_dict()
        >>> fresh = signmask.load_state_dict(torch.nn.Linear(4, 4), sd)
        >>> bool(torch.equal(fresh.weight_mask, sd["weight_mask"]))
        True
    """
    _targets.check_model(model, "model")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    state_dict = _own_names(model, state_dict)  # from here on, keys are the model's own names
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module: every name
    plan = {}  # pruned tensor's key -> (module, tensor, mask, locked)
    for key, mask in state_dict.items():
        if not key.endswith("_mask") or key[: -len("_mask")] + "_orig" not in state_dict:
            continue
        owner, _, tensor = key[: -len("_mask")].rpartition(".")
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
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            # prune.custom_from_mask takes any values; as a bool mask they would compute otherwise.
            values = sorted({float(v) for v in mask.unique()[:6].tolist()})
            raise ValueError(f"state_dict {key!r} is not a binary mask: it holds {values}")
        _reparam.check_names_free(f"{owner}.{tensor}" if owner else tensor, module, tensor)
        locked = key[: -len("_mask")] + "_sign" in state_dict
        plan[key[: -len("_mask")]] = (module, tensor, mask, locked)
    _targets.check_local({k: (m, t) for k, (m, t, _, _) in plan.items()}, _targets.GATHER_FIRST)
    installed = []
    with torch.no_grad():
        for module, tensor, mask, locked in plan.values():
            if _reparam.find_hook(module, tensor)[1] is None:
                keep = mask.to(_reparam.original(module, tensor).device) != 0
                negative = torch.zeros_like(keep) if locked else None
                _reparam.install(module, tensor, keep, _methods.FromSignedMask(keep), negative=negative)
                installed.append((module, tensor))
    try:
        _check_keys(model.state_dict(), state_dict, strict=strict)
        skipped = model.load_state_dict(state_dict, strict=strict)
    except Exception:
        for module, tensor in installed:
            _reparam.uninstall(module, tensor)
        raise
    if skipped.missing_keys or skipped.unexpected_keys:
        warnings.warn(
            f"load_state_dict(strict=False) left {len(skipped.missing_keys)} tensors of the model "
            f"as they were (missing keys {skipped.missing_keys[:5]}) and skipped "
            f"{len(skipped.unexpected_keys)} keys the model does not have {skipped.unexpected_keys[:5]}",
            UserWarning,
            stacklevel=2,
        )
    for module, tensor, _, _ in plan.values():
        _reparam.refresh(module, tensor)
    _parents.link(model)
    return model
