"""Snapshots a lottery search rewinds to: model weights, optimizer hyperparameters, LR schedule."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from . import _prune, _reparam, _targets, _undo

# Reparametrization buffers are not weights: masks move on, norm inits and signs never change.
# They sit beside an ``<name>_orig`` Parameter; a user's own ``scale_init`` does not.
_NOT_WEIGHTS = ("_mask", "_sign", "_init")


def live_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical state_dict key -> live tensor for every parameter and persistent buffer that
    training changes (masks, sign locks and norm-init buffers left out). A module's extra state
    (``get_extra_state``, any object, a fresh one at each call) is no weight: not rewound.

    Raises:
        ValueError: two of them have the same canonical name (see :func:`signmask._targets.canonical_tensors`).
    """
    state = model.state_dict(keep_vars=True)
    kept = []
    for key, tensor in state.items():
        if key.rpartition(".")[2] == _targets.EXTRA_STATE:
            continue
        suffix = next((s for s in _NOT_WEIGHTS if key.endswith(s)), None)
        if suffix is None or key[: -len(suffix)] + "_orig" not in state:
            kept.append((key, tensor))
    # Refused, not overwritten: a rewind would restore one of two same-named tensors only.
    return _targets.canonical_tensors(kept, owner="model")


def take_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's weights and running statistics."""
    with torch.no_grad():
        return {k: t.detach().clone() for k, t in live_weights(model).items()}


def rewind(model: nn.Module, targets: dict[str, tuple[nn.Module, str]],
           snapshot: dict[str, torch.Tensor], written: list | None = None) -> None:
    """Copy ``snapshot`` into the model in place (Parameter objects stay; optimizers keep them),
    and each target's ``module.<name>`` for the values put. The caller checked that the keys
    fit (:func:`check_restartable`, before the round end's first write).

    Inside a search's round end, which a failure must leave as it was: the one write comes
    last, as a single torch call, which fails before it writes anything; every
    ``module.<name>`` is computed before it, from the snapshot's values (a recorded alias is
    put back after a failure). Only under the projection backend, whose ``module.<name>`` is a
    view of ``<name>_orig`` that it masks in place, are they masked after the write (the next
    step or forward would, too). ``written`` takes each weight and its version counter just
    before the write: a changed counter says the write happened (see :func:`kept_on_failure`)."""
    live = live_weights(model)
    source = {id(t): snapshot[k] for k, t in live.items()}
    projected = []
    with torch.no_grad():
        for module, name in targets.values():
            hook = _reparam.find_hook(module, name)[1]
            backend = getattr(hook, "backend", "torch")
            if backend == "projection":
                projected.append((module, name))
                continue
            orig = _reparam.original(module, name)
            # As the write will cast it: a model moved or cast since the snapshot (model.cuda(),
            # .to(bf16) after apply) else gets a float32 weight, or a device mismatch every round.
            values = source[id(orig)].to(orig.device, orig.dtype)
            module.__dict__[name] = hook.apply_mask(module, values=values).detach()
        if written is not None:
            written[:] = [(t, t._version) for t in live.values()]
        torch._foreach_copy_(list(live.values()), [snapshot[k] for k in live])
    # A compiled forward skips the projection backend's check of orig's version.
    for module, name in projected:
        _reparam.refresh(module, name)


def check_same_keys(live: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(live.keys() - snapshot.keys()), sorted(snapshot.keys() - live.keys())
    if missing or extra:
        raise ValueError(f"{what} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in live.items():
        if tuple(t.shape) != tuple(snapshot[k].shape):
            raise ValueError(
                f"{what} does not match the model: {k} has shape {tuple(snapshot[k].shape)} there, "
                f"{tuple(t.shape)} in the model"
            )


def check_restartable(model: nn.Module, optimizer: torch.optim.Optimizer,
                      weights: dict[str, torch.Tensor] | None, schedule: dict) -> None:
    """Raise if the rewind ``weights`` (None: no rewind) or the restart ``schedule`` no longer
    fit ``model`` and ``optimizer`` (a module replaced, a parameter group added)."""
    if weights is not None:
        check_same_keys(live_weights(model), weights, "the rewind snapshot")
    then = [len(g["params"]) for g in schedule["param_groups"]]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if then != now:
        raise ValueError(
            f"the optimizer's parameter groups changed during the search (sizes {then} when "
            f"it started, {now} now); each round restarts the optimizer as it was: add the "
            "groups before signmask.apply"
        )


def take_schedule(optimizer: torch.optim.Optimizer, scheduler: Any | None) -> dict:
    """The optimizer's hyperparameters (learning rates...) without its state, and the scheduler's
    state: what restarting the optimizer and the LR schedule returns to."""
    groups = copy.deepcopy(optimizer.state_dict()["param_groups"])
    return {"param_groups": groups, "scheduler": scheduler_state(scheduler)}


def put_schedule(optimizer: torch.optim.Optimizer, scheduler: Any | None, snapshot: dict) -> None:
    """Restart: clear the optimizer's state (momentum, Adam moments) and restore hyperparameters
    and the LR schedule from ``snapshot``."""
    live = optimizer.param_groups
    optimizer.load_state_dict({"state": {}, "param_groups": copy.deepcopy(snapshot["param_groups"])})
    # load_state_dict made a new list of new group dicts, holding the snapshot's keys only. Others
    # may hold the old ones (a wrapper such as timm's Lookahead, which the scheduler drives, or
    # the user's own reference), and they would set learning rates the optimizer no longer reads:
    # refill the old ones and put them back. Keys added since the snapshot stay in them (a
    # scheduler made after apply: SWALR's swa_lr, initial_lr).
    for old, new in zip(live, optimizer.param_groups):
        _refill(old, new)
    optimizer.param_groups = live
    if scheduler is not None and snapshot["scheduler"] is not None:
        load_scheduler_state(scheduler, snapshot["scheduler"])


def _plateau(scheduler: Any) -> bool:
    """Whether ``scheduler`` wraps a torch ``ReduceLROnPlateau`` whose state its own
    ``state_dict`` leaves out (timm's ``PlateauLRScheduler`` keeps only ``best`` and
    ``last_epoch``, not the patience and cooldown counts nor its noise's ``restore_lr``)."""
    inner = getattr(scheduler, "lr_scheduler", None)
    return isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau) and hasattr(scheduler, "restore_lr")


def scheduler_state(scheduler: Any | None) -> Any:
    """A deep copy of ``scheduler.state_dict()`` (None without a scheduler), for a timm plateau
    schedule with the wrapped scheduler's whole state and ``restore_lr`` added: a restart must
    return to the plateau counts of its snapshot, as a freshly built schedule starts from none."""
    if scheduler is None:
        return None
    state = copy.deepcopy(scheduler.state_dict())
    if _plateau(scheduler) and isinstance(state, dict):
        state["signmask_plateau"] = copy.deepcopy(
            {"lr_scheduler": scheduler.lr_scheduler.state_dict(), "restore_lr": scheduler.restore_lr})
    return state


def load_scheduler_state(scheduler: Any, state: Any) -> None:
    """Load a deep copy of :func:`scheduler_state`'s ``state`` into ``scheduler``. A snapshot
    without the plateau entry (a search state saved by an older signmask) loads as before."""
    state = copy.deepcopy(state)
    extra = state.pop("signmask_plateau", None) if isinstance(state, dict) and _plateau(scheduler) else None
    scheduler.load_state_dict(state)
    if extra is not None:
        scheduler.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        scheduler.restore_lr = extra["restore_lr"]


def _refill(old: dict, new: dict) -> None:
    """Give group ``old`` the values of ``new``, copying into a tensor ``old`` holds (an LR as a
    0-dim tensor) rather than replacing it: torch's schedulers fill it in place, and a compiled
    or CUDA-graphed step reads that tensor."""
    for key, value in new.items():
        now = old.get(key)
        same_kind = isinstance(now, torch.Tensor) and isinstance(value, torch.Tensor)
        if same_kind and now is not value and now.shape == value.shape and now.dtype == value.dtype:
            with torch.no_grad():
                now.copy_(value)
        else:
            old[key] = value


class RoundRecord:
    """What a search's round start or end changes beside the model's tables and values (which
    an ``_undo.Undo`` record puts back), for :meth:`restore` after a failure: the search's
    attributes, its history's records, its AWS generator and ``a``, the optimizer's attributes
    (``load_state_dict`` replaces its state and groups) and parameter groups (a tensor learning
    rate is written in place: a copy of it), and the scheduler's state (a deep copy, as
    :func:`take_schedule`)."""

    def __init__(self, search) -> None:
        self.search, self.attributes = search, dict(search.__dict__)
        self.history = [(record, dict(record)) for record in search.history]
        self.generator = search._generator.get_state()
        self.alpha = None if search._alpha is None else search._alpha.item()
        opt = self.optimizer = search.optimizer
        self.opt_attributes = dict(opt.__dict__)
        with torch.no_grad():
            self.groups = [(g, dict(g), {k: v.clone() for k, v in g.items() if isinstance(v, torch.Tensor)})
                           for g in opt.param_groups]
        scheduler = search.scheduler
        self.scheduler = scheduler_state(scheduler)

    def restore(self, undo: _undo.Undo | None) -> None:
        """Put it all back, with ``undo`` after the optimizer's attributes: its state dict, back
        then, is the one the record fills."""
        self.optimizer.__dict__.clear()
        self.optimizer.__dict__.update(self.opt_attributes)
        with torch.no_grad():
            for group, items, tensors in self.groups:
                group.clear()
                group.update(items)
                for k, v in tensors.items():
                    items[k].copy_(v)
        if undo is not None:
            undo.restore()  # the optimizer's own state dict, back above
        if self.scheduler is not None:
            load_scheduler_state(self.search.scheduler, self.scheduler)
        search = self.search
        search.__dict__.clear()
        search.__dict__.update(self.attributes)
        search.history[:] = [record for record, _ in self.history]
        for record, items in self.history:
            record.clear()
            record.update(items)
        search._generator.set_state(self.generator)
        if self.alpha is not None:
            search._alpha.fill_(self.alpha)


@dataclasses.dataclass
class RoundWrites:
    """What a round end tells :func:`kept_on_failure` as it goes: the masks' flips
    (:func:`_prune.unflip`), and the weights :func:`rewind` writes with their version counters."""

    flips: list = dataclasses.field(default_factory=list)
    written: list = dataclasses.field(default_factory=list)

    def rewound(self) -> bool:
        """Whether the rewind's write ran: the round end's last step, so it is complete."""
        return any(t._version != version for t, version in self.written)


@contextlib.contextmanager
def kept_on_failure(search, *, model: bool = True):
    """Put the search (:class:`RoundRecord`) and, with ``model``, the model and optimizer (an
    ``_undo.Undo`` record; the masks by the flips in the :class:`RoundWrites` the block is
    given) back if the block fails, unless its rewind wrote the weights: a Ctrl-C during that
    one long call surfaces as it returns, and the round end is then complete, not undone (its
    weights are not kept, and calling it again would prune the rewound weights)."""
    record, writes = RoundRecord(search), RoundWrites()
    undo = _undo.Undo(search.model, optimizers=[search.optimizer]) if model else None
    try:
        with undo.saving() if undo is not None else contextlib.nullcontext():
            yield writes
    except BaseException:
        if not writes.rewound():
            _prune.unflip(writes.flips)
            record.restore(undo)
        raise
