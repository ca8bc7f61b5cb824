"""Validation and tensor lookup shared by the analysis modules."""

from __future__ import annotations

import collections.abc
import copy
import itertools
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import _checks, _reparam, _targets

# Accuracies and errors are fractions of a test set (0.11 - 0.09 is 0.020000000000000004):
# within this of a threshold a value counts as on it, so the same counts get one verdict.
TOLERANCE = 1e-9


def check_iterable(value: Any, arg: str) -> None:
    """Raise ``TypeError`` naming ``arg`` unless ``value`` can be iterated (a loader, a list)."""
    if not (isinstance(value, collections.abc.Iterable) or hasattr(type(value), "__getitem__")):
        raise TypeError(f"{arg} must be an iterable of batches, got {type(value).__name__}")


def tensor_names(names: Iterable[str] | None) -> list[str] | None:
    """``names`` read once into a list (None stays None), so that a generator serves every model
    it is looked up in; a single str is one name.

    Raises:
        TypeError: ``names`` is not an iterable of names.
    """
    if names is None:
        return None
    if isinstance(names, str):
        return [names]
    if not isinstance(names, collections.abc.Iterable):
        raise TypeError(f"names must be an iterable of tensor names, got {type(names).__name__} {names!r}")
    return list(names)


def weights(
    model: nn.Module, names: Iterable[str] | None = None, *, arg: str = "model"
) -> dict[str, tuple[nn.Module, str]]:
    """Canonical name -> (module, "weight") for every conv/linear weight of ``model``.

    ``names`` (canonical tensor names such as ``"layer1.0.conv1.weight"``) restricts and orders
    the result; an unknown name raises ``ValueError`` listing some valid ones. A caller looking
    the same names up in several models passes them through :func:`tensor_names` first.
    """
    chosen = tensor_names(names)
    found = _targets.layer_weights(model, owner=arg)
    if not found:
        raise ValueError(f"{arg} ({type(model).__name__}) has no conv/linear weight")
    if chosen is None:
        return found
    if not chosen:
        raise ValueError("names must name at least one tensor, got none")
    unknown = [n for n in chosen if n not in found]
    if unknown:
        raise ValueError(
            f"names {unknown[:5]} are not conv/linear weights of {arg}; valid names look like "
            f"{sorted(found)[:3]}"
        )
    return {n: found[n] for n in chosen}


def check_mask(key: str, module: nn.Module, name: str, owner: str | None = None) -> None:
    """Refuse ``module.<name>``'s prune mask (``key``, of the argument ``owner`` where several
    models are read) where it holds values other than 0 and 1, before anything is read or
    changed: ``custom_from_mask`` takes any, and the forward uses every non-zero entry (negated,
    scaled), where the analysis reads a 1 as kept and all else as pruned, as ``extract`` does."""
    mask = module._buffers.get(name + "_mask")
    if mask is not None:
        _checks.check_binary(f"{key} of {owner}" if owner else key, mask,
                             "signmask.analysis reads a mask's 1s as kept and all else as pruned")


def kept_mask(key: str, module: nn.Module, name: str, owner: str | None = None) -> torch.Tensor | None:
    """The bool keep-mask of ``module.<name>`` (``_reparam.current_mask``: the live buffer of a
    bool mask, not to be written), or None where it is not pruned; refused as by
    :func:`check_mask` where it is not binary."""
    check_mask(key, module, name, owner)
    return _reparam.current_mask(module, name)


def same_names(a: Mapping[str, Any], b: Mapping[str, Any], what_a: str, what_b: str) -> None:
    """Raise ``ValueError`` when two name -> tensor maps do not have the same keys."""
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        raise ValueError(
            f"{what_a} and {what_b} differ: only in {what_a}: {only_a[:5]}, only in {what_b}: "
            f"{only_b[:5]}"
        )


def clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for ``torch.nn.utils.prune`` models.

    Stock prune hooks leave ``module.<name> = orig * mask`` as a non-leaf tensor, which deepcopy
    refuses (pytorch#37322); those attributes are detached for the copy and put back after.
    """
    swapped = []
    for module, name in _targets.pruned(model).values():
        value = module.__dict__.get(name)
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            swapped.append((module, name, value))
            module.__dict__[name] = value.detach()
    try:
        return copy.deepcopy(model)
    finally:
        for module, name, value in swapped:
            module.__dict__[name] = value


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def split_batch(batch: Any, *, need_target: bool,
                arg: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` of a loader's batch: a tuple or list ``(inputs, targets, ...)`` of
    tensors, or where no target is needed (BatchNorm re-estimation) also a bare inputs tensor or
    ``(inputs,)``. A dict batch is refused: which key holds the inputs is the dataset's own
    convention, and a guess could evaluate the wrong tensor.

    Raises:
        TypeError: any other batch; the message names ``arg``, the loader that yielded it, and the
            batch forms it takes.
    """
    if isinstance(batch, torch.Tensor):
        if need_target:
            raise TypeError(f"{arg} must yield (inputs, targets) pairs, got a single tensor")
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        if len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
            return batch[0], batch[1]
        if not need_target:
            return batch[0], None
    forms = ("(inputs, targets, ...) tuples or lists of tensors" if need_target
             else "an inputs tensor or (inputs, ...) tuples or lists of tensors")
    hint = ""
    if isinstance(batch, collections.abc.Mapping):
        hint = ("; dict batches are not read (which key holds the inputs is the dataset's "
                "convention): make the loader yield (inputs, targets) tuples, e.g. with a "
                "DataLoader collate_fn")
    raise TypeError(f"{arg} must yield {forms}, got {_describe(batch)}{hint}")


def _describe(batch: Any) -> str:
    """A batch's type and what it holds: a bare "tuple" does not say which element is wrong
    (nested inputs, a list of labels, a missing target)."""
    kind = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        items = ", ".join(type(b).__name__ for b in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"{kind} ({items})"
    if isinstance(batch, collections.abc.Mapping):  # a dict batch: name its keys to map from
        return f"{kind} with keys {list(batch)[:5]}"
    return kind


def rng_kept(device: torch.device):
    """A context that restores torch's global generators that building on ``device`` can draw
    from: the CPU's always, and the accelerator's of ``device``."""
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def limit(loader: Iterable, batches: int | None) -> Iterable:
    """The first ``batches`` batches of ``loader`` (all of them for None)."""
    return loader if batches is None else itertools.islice(loader, batches)
