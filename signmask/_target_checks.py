"""Refusals of the targets a verb found: on the meta device or sharded, hooks moved off their
masks, pruned tensors shadowed by a new Parameter, and modules gone from the searched model."""

from __future__ import annotations

import sys

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
