"""Refusals of the targets a verb found: on the meta device or sharded, hooks moved off their
masks, pruned tensors shadowed by a new Parameter, modules gone from the searched model, a dtype
that cannot be masked, and names a reparametrization would take already in use."""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import _reparam
from ._checks import moved_hook, some

SHARD_AFTER = "prune, apply, transfer and set_backend before sharding the model"
GATHER_FIRST = (
    "gather a full state dict first (get_model_state_dict(model, options=StateDictOptions("
    "full_state_dict=True))) and load it into an unsharded model with signmask.load_state_dict"
)


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing it: nothing
    can be one before that module is imported)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(value, dtensor)


def check_local(targets: dict[str, tuple[nn.Module, str]], fix: str = SHARD_AFTER) -> None:
    """Refuse targets on the meta device (no values to rank, sign or mask) or whose Parameter is
    a DTensor (sharded by FSDP2's ``fully_shard`` or tensor parallelism): masks are whole local
    tensors, and mixing them with shards fails mid-way. ``fix`` ends the DTensor message."""
    meta = [k for k, (m, n) in targets.items() if _reparam.original(m, n).is_meta]
    if meta:
        raise ValueError(
            f"{some(meta)} {'is' if len(meta) == 1 else 'are'} on the "
            "meta device (shapes, no values); materialize the model first: "
            "model.to_empty(device=...), then initialize or load its weights"
        )
    sharded = [k for k, (m, n) in targets.items() if is_dtensor(_reparam.original(m, n))]
    if sharded:
        raise ValueError(
            f"{some(sharded)} {'is a DTensor' if len(sharded) == 1 else 'are DTensors'} "
            f"(sharded by fully_shard or tensor parallelism); signmask works on local "
            f"tensors: {fix}"
        )


def check_attached(targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Refuse pruning hooks on modules that hold no ``<name>_mask``: torch.ao.quantization's
    ``fuse_modules`` and ``convert`` move or copy a pruned module's hooks onto the module they
    build, where they have nothing to compute from (every verb failed in a bare ``KeyError``)."""
    moved = [k for k, (m, n) in targets.items() if n + "_mask" not in m._buffers]
    if moved:
        module, name = targets[moved[0]]
        raise ValueError(
            f"{some(moved)} {'has' if len(moved) == 1 else 'have'} a pruning hook but "
            f"{'its module' if len(moved) == 1 else 'the module of the first'} "
            f"({type(module).__name__}) holds {moved_hook(name)}"
        )


def check_unshadowed(targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Refuse pruned tensors whose module was assigned a new Parameter of that name since
    (``fuse_conv_bn_eval``, module surgery): the forward refuses them, a ticket of them would
    record the hidden ``<name>_orig``, and recomputing the weight (a new mask, a backend) fails
    half-way with torch's own ``TypeError``."""
    shadowed = [k for k, (m, n) in targets.items()
                if n in m._parameters and _reparam.find_hook(m, n)[1] is not None]
    if shadowed:
        raise ValueError(
            f"{some(shadowed)} {'was' if len(shadowed) == 1 else 'were'} "
            "assigned a new Parameter after pruning (torch.nn.utils.fusion.fuse_conv_bn_eval and "
            f"module surgery do), which hides the pruned {targets[shadowed[0]][1]}_orig; make the "
            "pruning permanent first: signmask.remove(model) keeps the new Parameter"
        )


def check_present(model: nn.Module, targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Refuse targets whose module left ``model`` since they were chosen (``reset_classifier()``,
    module surgery): a search would go on pruning the old module, and its ticket would miss the
    new one, silently."""
    present = {id(m) for m in model.modules()}
    gone = [key for key, (module, _) in targets.items() if id(module) not in present]
    if gone:
        raise ValueError(
            f"the module{'s' if len(gone) > 1 else ''} holding {some(gone)} "
            f"{'were' if len(gone) > 1 else 'was'} replaced or "
            "removed during the search (reset_classifier() and module surgery do); the search "
            "prunes the modules it started with: change the model before signmask.apply or "
            "after the search"
        )


def check_dtype(key: str, weight: torch.Tensor, *, locked: bool) -> None:
    """Refuse a weight that cannot be masked (an 8-bit float: torch multiplies none of them by
    a mask) or, with ``locked``, sign-locked (a complex one has no sign bit), before any change.

    Raises:
        TypeError: naming ``key`` and its dtype.
    """
    if weight.is_floating_point() and weight.element_size() == 1:
        raise TypeError(
            f"{key} is {weight.dtype}: torch multiplies no 8-bit float by a mask; prune the "
            "model in a wider dtype and cast it afterwards"
        )
    if locked and weight.is_complex():
        raise TypeError(f"{key} is {weight.dtype}: a sign lock needs real weights")


def check_names_free(key: str, module: nn.Module, name: str) -> None:
    """Refuse an unpruned ``module.<name>`` whose module already has an attribute that
    :func:`_reparam.install` would add (``<name>_orig``, ``_mask``, ``_sign``), its own or its class's (a
    method, a property): registering it would fail half-way through a model, or a Parameter of
    that name would silently replace the weight."""
    if _reparam.find_hook(module, name)[1] is not None:
        return  # pruned: those are its own
    roles = {"_orig": "the original weight", "_mask": "its mask", "_sign": "its locked signs"}
    roles = {name + suffix: f"pruning gives {role}" for suffix, role in roles.items()}
    check_free(key, module, roles, "prune this tensor")


def check_free(key: str, module: nn.Module, roles: dict[str, str], doing: str) -> None:
    """Refuse ``module`` (``key`` in the message) when it already has an attribute named in
    ``roles`` (name -> what a reparametrization gives it), its own or its class's (a method,
    a property). The class dicts are read, so a property is not run. ``doing`` ends the message.
    """
    slots = (module.__dict__, module._parameters, module._buffers, module._modules)
    for attr, role in roles.items():
        owner = _defining_class(module, attr)
        if owner is None and not any(attr in d for d in slots):
            continue
        where = "" if owner is None else f" (of its class {owner.__name__})"
        raise ValueError(
            f"{key}: {type(module).__name__} already has an attribute {attr!r}{where}, the name "
            f"{role}; rename that attribute to {doing}"
        )


def _defining_class(module: nn.Module, attr: str) -> type | None:
    """The class of ``module`` that defines ``attr`` (read from the class dicts: a property is
    not run), leaving out ``nn.Module`` itself, whose names every module has."""
    return next((c for c in type(module).__mro__ if c not in nn.Module.__mro__ and attr in vars(c)), None)
