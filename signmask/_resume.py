"""Saving and resuming a lottery search: :meth:`signmask.Search.state_dict` and
:meth:`~signmask.Search.load_state_dict`, whose state is validated whole before any of it is
applied (an edited or corrupted checkpoint must change nothing)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import _checks, _reparam, _snapshot, _targets
from ._ticket import Ticket

STATE_VERSION = 1


def check_entries(state: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what a state of the right version lacks for the checks that
    read it before :func:`check_state` (a ``KeyError`` would name no checkpoint)."""
    missing = sorted({"config", "masks", "rewind_weights"} - state.keys())
    if missing:
        raise ValueError(f"cannot resume: the search state has no {missing} (an edited or corrupted "
                         "checkpoint?)")
    for key in ("config", "masks"):
        if not isinstance(state[key], dict):
            value = state[key]
            raise ValueError(f"cannot resume: state[{key!r}] should be a dict, found "
                             f"{type(value).__name__} {value!r:.60}")
    for key, mask in state["masks"].items():
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"cannot resume: state['masks'][{key!r}] should be a tensor, found "
                             f"{type(mask).__name__}")


def check_fits(state: dict[str, Any], model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` when the saved search masked other tensors (names or shapes) than
    ``masks``, the resuming search's, or its rewind snapshot is no dict of tensors or names other
    weights than ``model``'s."""
    mine = {k: tuple(mask.shape) for k, mask in masks.items()}
    theirs = {k: tuple(v.shape) for k, v in state["masks"].items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:5]
        raise ValueError(f"cannot resume: the saved search masked other tensors than this model has: {diff}")
    rewind = state["rewind_weights"]
    if rewind is None:
        return
    if not isinstance(rewind, dict):
        raise ValueError(f"cannot resume: state['rewind_weights'] should be None or a dict of tensors, "
                         f"found {type(rewind).__name__} {rewind!r:.60}")
    for key, value in rewind.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot resume: state['rewind_weights'][{key!r}] should be a tensor, found "
                             f"{type(value).__name__}")
    _snapshot.check_same_keys(_snapshot.live_weights(model), rewind, "the saved rewind snapshot")


def check_state(state: dict[str, Any], generator_state: torch.Tensor, interpolating: bool,
                scheduler_state: Any = None) -> Ticket | None:
    """Raise ``ValueError`` for a state the search cannot apply whole; the ticket of a finished
    search, else None.

    Args:
        state: :meth:`signmask.Search.state_dict`'s output, version and config already checked.
        generator_state: the resuming search's own AWS generator state (dtype and shape to match).
        interpolating: whether the search interpolates norms (then ``alpha`` must be a float).
        scheduler_state: the resuming search's own scheduler state (None without a scheduler):
            where it is a dict (torch's and timm's schedulers), the restart's must be one too.
    """
    def bad(key: str, expected: str) -> ValueError:
        value = state.get(key)
        return ValueError(f"cannot resume: state[{key!r}] should be {expected}, found {type(value).__name__} {value!r:.60}")

    for key in ("round", "step", "round_start_step"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
            raise bad(key, "an int >= 0")
    for key in ("in_round", "done", "restart_pending"):
        if not isinstance(state.get(key), bool):
            raise bad(key, "a bool")
    for key, mask in state["masks"].items():
        if not _checks.is_binary(mask):  # check_entries refused non-tensors
            raise ValueError(f"cannot resume: state['masks'][{key!r}] is not a 0/1 mask: it holds "
                             f"{_checks.odd_values(mask)}")
    generator, mine = state.get("generator"), generator_state
    if not isinstance(generator, torch.Tensor) or generator.dtype != mine.dtype or generator.shape != mine.shape:
        raise bad("generator", f"a torch.Generator state ({mine.dtype}, {tuple(mine.shape)})")
    try:  # on a scratch generator: restore() sets it after the masks and counters are written
        torch.Generator().set_state(generator.cpu())
    except RuntimeError as e:  # torch's "Invalid mt19937 state" names no entry
        raise ValueError(f"cannot resume: state['generator'] is not a valid torch.Generator state "
                         f"({e}; an edited or corrupted checkpoint?)") from None
    alpha = state.get("alpha")
    if interpolating and not (isinstance(alpha, float) and 0.0 <= alpha <= 1.0):
        raise bad("alpha", "a float in [0, 1]")
    restart = state.get("restart")
    if not (isinstance(restart, dict) and {"param_groups", "scheduler"} <= restart.keys()):
        raise bad("restart", "the optimizer and scheduler snapshot (a dict)")
    groups, scheduler = restart["param_groups"], restart["scheduler"]
    # Read at the end of the round: a bad one would raise after the round had trained. A
    # scheduler's state is whatever its own state_dict() gives (a duck-typed one's need not be
    # a dict), and none is loaded into a search without a scheduler.
    dict_scheduler = isinstance(scheduler_state, dict)
    scheduler_ok = scheduler is None or not dict_scheduler or isinstance(scheduler, dict)
    if not (isinstance(groups, list) and scheduler_ok
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise bad("restart", "the optimizer and scheduler snapshot (param_groups: a list of dicts with "
                  f"'params'{'; scheduler: None or a dict' if dict_scheduler else ''})")
    # A timm plateau schedule's counts (_snapshot.scheduler_state; absent from older states).
    plateau = scheduler.get("signmask_plateau", {}) if isinstance(scheduler, dict) else {}
    if plateau != {} and not (isinstance(plateau, dict) and isinstance(plateau.get("lr_scheduler"), dict)
                              and isinstance(plateau.get("restore_lr", ()), (list, type(None)))):
        raise ValueError("cannot resume: state['restart']['scheduler']['signmask_plateau'] should be a dict with "
                         "'lr_scheduler' (a dict) and 'restore_lr' (None or a list), found "
                         f"{type(plateau).__name__} {plateau!r:.60}")
    if not (isinstance(state.get("history"), list) and all(isinstance(h, dict) for h in state["history"])):
        raise bad("history", "a list of dicts")
    if not state["done"]:
        return None
    if not isinstance(state.get("ticket"), dict):
        raise bad("ticket", "the finished search's ticket (a dict)")
    try:
        return Ticket(**state["ticket"])
    except (TypeError, ValueError) as e:  # its tensors' own errors, named as state['ticket']'s
        raise ValueError(f"cannot resume: state['ticket'] is not a ticket: {e}") from None



def state_of(search) -> dict[str, Any]:
    """What :meth:`signmask.Search.state_dict` returns (see there)."""
    return {
        "version": STATE_VERSION,
        "config": dataclasses.asdict(search.config),
        "round": search.round,
        "in_round": search.in_round,
        "done": search.done,
        "step": search.step,
        "round_start_step": search.round_start_step,
        "masks": {k: mask.detach().cpu().clone() for k, mask in search._masks("state_dict()").items()},
        "rewind_weights": search._rewind_weights,
        "restart": search._restart,
        "restart_pending": search._restart_pending,
        "generator": search._generator.get_state(),
        "alpha": None if search._alpha is None else float(search._alpha),
        "history": [dict(h) for h in search.history],
        "ticket": None if search._ticket is None else dataclasses.asdict(search._ticket),
    }


def _without_extra_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without modules' extra state in its rewind snapshot, which searches saved
    before 2026-12-07 took as weights (a shallow copy: the caller's dict is not edited)."""
    rewind = state["rewind_weights"]
    if not isinstance(rewind, dict):
        return state
    kept = {k: v for k, v in rewind.items()
            if not (isinstance(k, str) and k.rpartition(".")[2] == _targets.EXTRA_STATE)}
    return state if len(kept) == len(rewind) else {**state, "rewind_weights": kept}


def restore(search, state: dict[str, Any]) -> None:
    """:meth:`signmask.Search.load_state_dict`'s work: check ``state`` whole, then apply it."""
    version = state.get("version") if isinstance(state, dict) else None
    if type(version) is not int or version != STATE_VERSION:  # True == 1, but is no version
        found = version if isinstance(state, dict) else type(state).__name__
        if type(found) is int and found > STATE_VERSION:
            raise ValueError(f"the search state is of version {found}, saved by a newer signmask; this one "
                             f"resumes version {STATE_VERSION}: upgrade signmask to resume it")
        raise ValueError(f"not a signmask search state (version {STATE_VERSION} expected, found {found!r})")
    search._check_open("load_state_dict")
    check_entries(state)
    state = _without_extra_state(state)
    search.config.check_same(state["config"])
    check_fits(state, search.model, search._masks("load_state_dict()"))
    # everything, before the first write
    scheduler = search.scheduler
    ticket = check_state(state, search._generator.get_state(), search._alpha is not None,
                         None if scheduler is None else scheduler.state_dict())
    # ... and computed: a new generator, and each mask's flip to the saved one (XORed into
    # either, it gives the other; 1 byte per weight in all, as the saved masks themselves).
    generator = torch.Generator()  # the search's own is not written: a failure keeps it
    # A CPU generator's state, though torch.load(..., map_location="cuda") puts it on the GPU.
    generator.set_state(state["generator"].cpu())
    with torch.no_grad():
        flips = [(mask, mask._version, (state["masks"][k] != 0).to(mask.device).bitwise_xor_(mask))
                 for k, mask in search._masks("load_state_dict()").items()]
    # Valid state cannot fail below, but torch can (out of memory) and so can Ctrl-C: the masks
    # written (by their flips), the weights refreshed (under projection: its weights, gradients
    # and state masked), the counters and the hooks a finished search takes off are put back.
    with _snapshot.kept_on_failure(search) as writes:
        writes.flips += flips
        _apply(search, state, flips, generator, ticket)


def _apply(search, state: dict[str, Any], flips: list, generator, ticket) -> None:
    """:func:`restore`'s writes, everything computed and checked before."""
    with torch.no_grad():
        for mask, _, flip in flips:
            mask.bitwise_xor_(flip)
        # module.<name> for the new masks at once, as signmask.load_state_dict does: a
        # compiled forward, or a read before the next forward, must not see the old ones.
        for module, name in search._targets.values():
            _reparam.refresh(module, name)
        if search._alpha is not None:
            search._alpha.fill_(state["alpha"])
    for key in ("round", "in_round", "step", "round_start_step"):
        setattr(search, key, state[key])
    search._rewind_weights, search._restart = state["rewind_weights"], state["restart"]
    search._restart_pending = state["restart_pending"]
    search._generator = generator
    search.history = [dict(h) for h in state["history"]]
    if state["done"]:
        search._ticket = ticket
        search.close()
        search.in_round, search.done = False, True
    elif search.in_round:
        search._bar.open_round(search)
