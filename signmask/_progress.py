"""A search's console output (a tqdm bar over each round's steps, then one log line per round)
and the records it prints."""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from typing import Any

import torch

from . import _distributed, _snapshot

# Frames a warning about the user's optimizer.step() looks past: torch's wrappers of the step
# (its own, and one per LR scheduler made on the optimizer) and signmask's hooks; timm's too
# where it is imported (see _libraries).
_OWN_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))

# The search's own records; every other key of a round's record is a metric the user reported.
OWN_RECORDS = ("round", "sparsity", "steps")


class RoundBar:
    """The bar of the round running now (on rank 0 only, and only if ``enabled``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def shown(self) -> bool:
        """Whether a bar is shown for a round: ``enabled``, and on rank 0."""
        return self.enabled and _distributed.rank0()

    def open(self, desc: str, total: int | None, initial: int) -> None:
        if not self.shown():
            return
        from tqdm.auto import tqdm  # not at import: tqdm is needed only when a bar is shown

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False)

    def open_round(self, search) -> None:
        """Open the bar of ``search``'s current round (its description counts every mask: only
        when a bar is shown)."""
        if self.shown():
            c = search.config
            desc = f"{c.method} round {search.round}/{c.prune_steps} ({search.sparsity:.1%} sparse)"
            self.open(desc, search.steps_per_round, search.round_step)

    def close_round(self, search) -> None:
        """:meth:`close` for ``search``'s current round."""
        self.close(search.config.method, search.history)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self, method: str, history: list[dict[str, Any]]) -> None:
        """Close the bar, if one is open, and print the round's line (``history[-1]``) under it."""
        if self.bar is None:
            return
        from tqdm.auto import tqdm

        self.bar.close()
        self.bar = None
        tqdm.write(log_line(method, history[-1]))


def log_line(method: str, record: dict[str, Any]) -> str:
    """``aws round 2: sparsity 36.00%, 500 steps acc=0.91``: one round's record as a line."""
    extras = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in OWN_RECORDS)
    steps = record.get("steps", 0)
    line = f"{method} round {record['round']}: sparsity {record['sparsity']:.2%}, {steps} step{'' if steps == 1 else 's'}"
    return f"{line} {extras}".rstrip()


def no_step_warning(search) -> str:
    """The warning for a round of ``search`` in which its optimizer never stepped: the likely
    causes (the loop steps another optimizer; an IMP/OMP loop resuming at the rewind point ends
    there), then what the round's end reads if neither holds."""
    c = search.config
    text = (
        f"round {search.round} took no optimizer step: {type(search.optimizer).__name__}, the "
        "optimizer given to apply(), never stepped. If the loop steps another optimizer, pass that "
        "one to apply()"
    )
    if c.rewind_step and search.round > 0:
        text += f"; a loop resuming at the rewind point (step {c.rewind_step}) must run past it"
    if search.round == c.prune_steps:
        return text + "; otherwise the ticket takes its signs from untrained weights"
    return text + "; otherwise this round's pruning ranks untrained weights"


def moved_rates_warning(search) -> str | None:
    """The warning for learning rates that moved between :func:`signmask.apply` and the first
    step of ``search``'s optimizer (a scheduler made after apply, a warm-up's first rate): every
    round restarts the rates apply() saw, so rounds after the first would not begin as round 0
    did. None where they did not move, where the scheduler given to apply() stepped since (each
    restart replays that), or where the groups changed (which the round's end refuses)."""
    if search.scheduler is not None and not _same_state(search.scheduler, search._restart["scheduler"]):
        return None
    then = [g.get("lr") for g in search._restart["param_groups"]]
    now = [g.get("lr") for g in search.optimizer.param_groups]
    if len(then) != len(now) or all(_same_rate(a, b) for a, b in zip(then, now)):
        return None
    shown = ["[" + ", ".join(f"{float(r):.4g}" if isinstance(r, (numbers.Real, torch.Tensor)) else repr(r)
                             for r in rates) + "]" for rates in (then, now)]
    return (
        f"learning rates moved between apply() and the first optimizer step ({shown[0]} at "
        f"apply(), {shown[1]} now), as a scheduler made after apply() moves them (a warm-up's "
        "first rate): every round restarts the optimizer, and the scheduler given to apply(), as "
        "they were at apply(), so rounds after the first would not begin as round 0 did; make "
        "the scheduler before apply() and pass it (scheduler=)"
    )


def warn_at_user(text: str) -> None:
    """Warn at the first frame outside torch, signmask and timm: the user's ``optimizer.step()``,
    under however many wrappers torch's schedulers and timm's ``Lookahead`` put around it."""
    libraries = _libraries()
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(libraries):
        level, frame = level + 1, frame.f_back
    warnings.warn(text, UserWarning, stacklevel=level)


def _libraries() -> tuple[str, ...]:
    """The package folders whose frames :func:`warn_at_user` looks past. timm's ``Lookahead``
    steps the optimizer given to apply() from its own step(); timm is looked up as the warning
    comes, never imported here (``import signmask`` stays free of it), and it may have been
    imported after signmask."""
    timm = getattr(sys.modules.get("timm"), "__file__", None)
    return _OWN_LIBRARIES + ((os.path.dirname(timm) + os.sep,) if timm else ())


def _same_state(scheduler, saved: dict | None) -> bool:
    """Whether ``scheduler``'s state is still ``saved`` (what apply() took); False where the two
    cannot be compared (tensors in them: then it may have stepped)."""
    try:  # in the snapshot's own form, which holds more than a state_dict (timm's plateau)
        return bool(_snapshot.scheduler_state(scheduler) == saved)
    except (RuntimeError, TypeError, ValueError):
        return False


def _same_rate(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # a tensor LR (fused, compiled)
        return torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())
    return a == b


def metric(name: str, value) -> float:
    """``value`` of the metric ``name`` for :meth:`Search.report` as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        return float(value.detach().item())  # a loss tensor as it comes: its number, not its graph
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" \
            if isinstance(value, torch.Tensor) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"report(): metric {name!r} must be a real number or a one-element real "
                        f"tensor, got {shown}")
    return float(value)
