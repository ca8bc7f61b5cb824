"""Sanity-check baselines for lottery tickets (Ma et al. 2021) and the prize verdict.

- :func:`random_reinit`: the ticket's binary mask on a new init (the init's own values);
- :func:`random_prune`: random masks with exactly the ticket's per-layer kept counts;
- :func:`equal_width`: the width of a dense network with as many parameters as the ticket;
- :func:`verdict`: "jackpot", "secondary prize" or "no prize" from the three accuracies.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
from typing import Callable, Iterable

import torch
from torch import nn

from .. import _methods, _parents, _reparam, _targets, _undo
from .. import _transfer as _transfer_mod
from .._ticket import Ticket
from .._checks import check_bool, check_int, check_model, check_real, check_seed
from ._common import TOLERANCE, kept_mask, rng_kept


def random_reinit(ticket: Ticket | str | os.PathLike, model: nn.Module, *,
                  check_architecture: bool = True) -> nn.Module:
    """Install the ticket's binary mask on ``model``, keeping ``model``'s own init values and signs.

    The "random reinit" baseline: ``signmask.transfer(ticket, model, signs="keep")``.

    Args:
        ticket: a :class:`~signmask.Ticket` or the path of a saved one.
        model: an unpruned model of the ticket's architecture (a fresh init).
        check_architecture: refuse a ticket recorded for another architecture.

    Returns:
        ``model``, pruned in place.

    Raises:
        TypeError / ValueError: as :func:`signmask.transfer` (``model`` not an ``nn.Module``,
            another architecture...); ``model`` is then untouched.

    Example:
        >>> import torch, signmask
        >>> from signmask import analysis
        >>> ticket = signmask.extract(signmask.prune(torch.nn.Linear(4, 4), 0.5))
        >>> new = analysis.random_reinit(ticket, torch.nn.Linear(4, 4))
        >>> int(new.weight_mask.sum())
        8
    """
    check_model(model, "model")  # before reading a ticket file
    ticket = _transfer_mod.resolve(ticket, "random_reinit")
    return _transfer_mod.transfer(ticket, model, signs="keep",
                                  check_architecture=check_architecture)


def random_prune(ticket: Ticket | str | os.PathLike, model: nn.Module, *, seed: int,
                 check_architecture: bool = True) -> nn.Module:
    """Prune ``model`` at random, keeping exactly as many weights per tensor as ``ticket``.

    The "random pruning" baseline (same per-layer density, random positions). Tensor ``i`` in the
    ticket's order is ranked by :class:`signmask._methods.RandomPruning` scores seeded with
    ``seed + 7919 * i`` (drawn on the CPU, so a seed gives the same masks on every device), and
    exactly its ``kept`` highest-scored entries are kept; the mask is installed as by
    :func:`signmask.prune` (``extract`` reports method ``"random"``). ``model``'s values are not
    changed; the ticket's signs are not used.

    Args:
        ticket: a :class:`~signmask.Ticket` or the path of a saved one.
        model: an unpruned model of the ticket's architecture.
        seed: an int in [0, 2**64); different seeds give different positions.
        check_architecture: refuse a ticket recorded for another architecture.

    Returns:
        ``model``, pruned in place.

    Raises:
        TypeError: ``seed`` is not an int, ``model`` is not an ``nn.Module``, ``ticket`` neither
            a Ticket nor a path, or ``check_architecture`` not a bool.
        ValueError: ``seed`` outside [0, 2**64), another architecture, missing or mis-shaped
            tensors, an already-pruned tensor; ``model`` is then untouched.
        FileNotFoundError: ``ticket`` is a path to no file.

    Example:
        >>> import torch, signmask
        >>> from signmask import analysis
        >>> ticket = signmask.extract(signmask.prune(torch.nn.Linear(10, 10), 0.9))
        >>> int(analysis.random_prune(ticket, torch.nn.Linear(10, 10), seed=0).weight_mask.sum())
        10
    """
    seed = check_seed(seed)
    check_model(model, "model")  # before reading a ticket file
    ticket = _transfer_mod.resolve(ticket, "random_prune")
    if check_bool(check_architecture, "check_architecture"):  # transfer's own check: refused alike
        _transfer_mod.check_same_architecture(ticket, model)
    plan = _transfer_mod.match_tensors(ticket, model, {"mask": ticket.masks})
    masks = []
    for index, (_, key, module, name, target, signed) in enumerate(plan):
        numel, kept = signed.numel(), int(signed.count_nonzero())
        ranker = _methods.RandomPruning(numel - kept, seed=seed)  # an int: a count
        full = torch.ones_like(target, dtype=torch.bool)
        keep = ranker.compute_masks([target], [full], [key], index_offset=index)[0]
        masks.append((module, name, keep, ranker))
    # Valid input cannot fail below, but torch can (out of memory at the k-th tensor), and so can
    # Ctrl-C: the masks installed before it are put back, as signmask.prune does.
    undo = _undo.Undo(model)
    try:
        with torch.no_grad():
            for module, name, keep, ranker in masks:
                _reparam.install(module, name, keep, ranker)
        _parents.link(model)
    except BaseException:
        undo.restore()
        raise
    return model


def count_params(model: nn.Module) -> int:
    """Count the parameters of ``model`` that are not pruned.

    A pruned tensor (``<name>_orig`` with a ``<name>_mask`` buffer) counts its kept entries;
    every other Parameter (biases, norms, an unpruned classifier) counts in full. Shared
    Parameters count once.

    Args:
        model: any model, pruned or dense.

    Returns:
        The number of parameters the pruned network really has.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a stock prune mask holds values other than 0 and 1 (``custom_from_mask``
            takes any; the forward uses every non-zero one), or a lazy layer's parameter is still
            uninitialized (run one forward first).

    Example:
        >>> import torch, signmask
        >>> from signmask import analysis
        >>> net = signmask.prune(torch.nn.Linear(10, 10), 0.5)
        >>> analysis.count_params(net)  # 50 weights + 10 biases
        60
    """
    check_model(model, "model")
    return _count(model, "model")


def _count(model: nn.Module, arg: str) -> int:
    """:func:`count_params`, its errors naming the model ``arg`` (``make_model(8)``)."""
    seen, total = set(), 0
    for fqn, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):  # torch's error names neither
                raise ValueError(
                    f"{arg}'s {fqn + '.' if fqn else ''}{pname} is an uninitialized lazy "
                    "parameter, of no size yet: run one forward on a dummy batch first (on the "
                    "meta device too, inside make_model for equal_width)"
                )
            seen.add(id(p))
            mask = None
            if pname.endswith("_orig"):
                name = pname[: -len("_orig")]
                mask = kept_mask(_targets.canonical(f"{fqn}.{name}" if fqn else name), module, name)
            total += p.numel() if mask is None else int(mask.sum())
    return total


def equal_width(make_model: Callable[[int], nn.Module], target_params: int,
                widths: Iterable[int], *, device: str | torch.device = "meta") -> int:
    """Find the width whose dense model has the parameter count closest to ``target_params``.

    Builds ``make_model(w)`` for each width (one at a time, under ``torch.device(device)``: on
    ``"meta"`` nothing is allocated or initialized) and counts it with :func:`count_params`.
    torch's global RNG is left as it was: the candidates' inits do not shift the caller's draws.
    Of equally close widths the first in ``widths`` wins. Use ``count_params(ticket_model)`` as
    the target for the "small dense network of equal parameter count" baseline.

    Args:
        make_model: ``make_model(width) -> nn.Module``.
        target_params: the parameter count to match, >= 1.
        widths: candidate widths (ints), at least one.
        device: where the candidates are built (``"cpu"`` for factories that fail on meta).

    Returns:
        The chosen width.

    Raises:
        TypeError: ``make_model`` is not callable, returns no ``nn.Module``, or a width is not an int.
        ValueError: ``target_params < 1``, no widths, or a candidate holding a lazy parameter not
            yet initialized (``nn.LazyLinear``: run a forward inside ``make_model``).

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> make = lambda w: torch.nn.Linear(10, w)  # 11 params per unit of width
        >>> analysis.equal_width(make, 45, range(1, 10))
        4
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be callable, got {type(make_model).__name__}")
    target_params = check_int(target_params, "target_params", minimum=1)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, collections.abc.Iterable):
        raise TypeError(f"widths must be an iterable of ints, got {type(widths).__name__} {widths!r}")
    candidates = [check_int(w, "widths entry", minimum=1) for w in widths]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TypeError(f"device must be a torch.device or a device string, got {device!r}") from None
    if not candidates:
        raise ValueError(f"widths must hold at least one width, got an empty {type(widths).__name__}")
    best, best_gap = None, None
    for width in candidates:
        with rng_kept(device), torch.device(device):
            model = make_model(width)
        check_model(model, f"make_model({width})")
        gap = abs(_count(model, f"make_model({width})") - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
        del model
    return best


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Ma et al. 2021's prize for a ticket, from the conditions of their "rigorous definition".

    The conditions a verdict can check (the paper's first, a non-trivial sparsity trained long
    enough, is the experiment's design):

    - ``beats_small_dense`` (2): ``ticket_acc - small_dense_acc > margin``; not checked (True)
      when ``small_dense_acc`` is None;
    - ``beats_reinit`` (3): ``ticket_acc - reinit_acc > margin`` (strictly; 0.5% by default, the
      paper's "clear gap"). The paper compares with the reinit "trained with any learning
      rates": pass the best of those;
    - ``matches_dense`` (4): ``ticket_acc >= dense_acc - similar``, "similar to or higher than"
      the dense network trained at the same learning rate;
    - ``matches_well_trained`` (5): ``ticket_acc >= well_trained_acc - similar``, the dense
      network at its best learning rate; ``dense_acc`` stands in when ``well_trained_acc`` is None.

    ``similar`` is the paper's "similar accuracy", a drop of at most 0.5% on CIFAR-10 (the
    default), 1% on CIFAR-100 and Tiny-ImageNet, 1.5% on ImageNet-1K.

    ``prize`` is ``"jackpot"`` when all hold, ``"secondary prize"`` when all but (5) hold, and
    ``"no prize"`` otherwise: a ticket that does not beat its random reinit wins nothing, however
    accurate. Differences within ``TOLERANCE`` (1e-9) of a boundary count as on it, so ``0.905``
    vs ``0.9`` with margin ``0.005`` does not beat the reinit.

    Args:
        ticket_acc, dense_acc, reinit_acc: accuracies in [0, 1].
        margin: required lead over random reinit and the small dense network, in [0, 1).
        well_trained_acc, small_dense_acc: accuracies in [0, 1], or None.
        similar: the largest drop below a dense network that still counts as matching it, in
            [0, 1).

    Raises:
        TypeError / ValueError: a value is not a real number in range.

    Example:
        >>> from signmask.analysis import Verdict
        >>> Verdict(0.93, 0.92, 0.90).prize
        'jackpot'
        >>> Verdict(0.93, 0.92, 0.90, well_trained_acc=0.94).prize
        'secondary prize'
        >>> Verdict(0.917, 0.920, 0.905, well_trained_acc=0.921).prize  # drops: 0.3 and 0.4 points
        'jackpot'
    """

    ticket_acc: float
    dense_acc: float
    reinit_acc: float
    margin: float = 0.005
    well_trained_acc: float | None = None
    small_dense_acc: float | None = None
    similar: float = 0.005

    def __post_init__(self) -> None:
        optional = ("well_trained_acc", "small_dense_acc")
        for field in ("ticket_acc", "dense_acc", "reinit_acc") + optional:
            value = getattr(self, field)
            if not (value is None and field in optional):
                object.__setattr__(self, field, check_real(value, field, low=0.0, high=1.0))
        for field in ("margin", "similar"):
            value = check_real(getattr(self, field), field, low=0.0, high=1.0, high_open=True)
            object.__setattr__(self, field, value)

    def _leads(self, other: float) -> bool:
        return self.ticket_acc - other > self.margin + TOLERANCE

    @property
    def beats_small_dense(self) -> bool:
        """The ticket beats the small dense network by more than ``margin`` (True if not given)."""
        return self.small_dense_acc is None or self._leads(self.small_dense_acc)

    @property
    def beats_reinit(self) -> bool:
        """The ticket beats random reinit by more than ``margin``."""
        return self._leads(self.reinit_acc)

    @property
    def matches_dense(self) -> bool:
        """The ticket's accuracy is similar to or above the dense network's at the same rate.

        That is, at most ``similar`` below the accuracy of the dense network trained at the
        ticket's learning rate.
        """
        return self.ticket_acc >= self.dense_acc - self.similar - TOLERANCE

    @property
    def matches_well_trained(self) -> bool:
        """The ticket's accuracy is similar to or above the well-trained dense network's."""
        best = self.dense_acc if self.well_trained_acc is None else self.well_trained_acc
        return self.ticket_acc >= best - self.similar - TOLERANCE

    @property
    def prize(self) -> str:
        """``"jackpot"``, ``"secondary prize"`` or ``"no prize"``."""
        if not (self.beats_small_dense and self.beats_reinit and self.matches_dense):
            return "no prize"
        return "jackpot" if self.matches_well_trained else "secondary prize"

    @property
    def reasons(self) -> tuple[str, ...]:
        """One sentence per condition checked, saying whether it holds and by how much."""
        def lead(other: float, holds: bool) -> str:
            return f"{self.ticket_acc - other:+.4f} {'>' if holds else '<='} margin {self.margin:.4f}"

        def reach(other: float, holds: bool) -> str:
            return (f"ticket {self.ticket_acc:.4f} {'>=' if holds else '<'} {other:.4f} - similar "
                    f"{self.similar:.4f}")

        out = []
        if self.small_dense_acc is not None:
            out.append(f"lead over small dense {lead(self.small_dense_acc, self.beats_small_dense)}")
        out.append(f"lead over random reinit {lead(self.reinit_acc, self.beats_reinit)}")
        out.append(f"dense at same lr: {reach(self.dense_acc, self.matches_dense)}")
        if self.well_trained_acc is not None:
            out.append(f"well-trained dense: {reach(self.well_trained_acc, self.matches_well_trained)}")
        return tuple(out)

    def __str__(self) -> str:
        return f"{self.prize} ({'; '.join(self.reasons)})"


def verdict(ticket_acc: float, dense_acc: float, reinit_acc: float, *, margin: float = 0.005,
            well_trained_acc: float | None = None, small_dense_acc: float | None = None,
            similar: float = 0.005) -> Verdict:
    """Judge a ticket: ``"jackpot"``, ``"secondary prize"`` or ``"no prize"`` (see :class:`Verdict`).

    Args:
        ticket_acc: test accuracy of the trained ticket, in [0, 1].
        dense_acc: of the dense network trained at the ticket's learning rate.
        reinit_acc: of the ticket's mask on a random reinit (:func:`random_reinit`), trained:
            the best over the learning rates tried.
        margin: required lead over the reinit and the small dense network (default 0.5%).
        well_trained_acc: of the dense network at its best learning rate; None: ``dense_acc``.
        small_dense_acc: of a dense network with the ticket's parameter count
            (:func:`equal_width`); None: not checked.
        similar: the largest drop below a dense network that still matches it (Ma et al.: 0.5%
            on CIFAR-10, the default; 1% on CIFAR-100 and Tiny-ImageNet; 1.5% on ImageNet-1K).

    Returns:
        A :class:`Verdict`; ``.prize`` holds the string.

    Raises:
        TypeError / ValueError: an accuracy outside [0, 1], or ``margin`` or ``similar``
            outside [0, 1).

    Example:
        >>> from signmask import analysis
        >>> analysis.verdict(0.93, 0.92, 0.90).prize
        'jackpot'
        >>> analysis.verdict(0.92, 0.92, 0.918).prize  # matches dense, not clearly above its reinit
        'no prize'
        >>> analysis.verdict(0.93, 0.92, 0.90, well_trained_acc=0.94).prize
        'secondary prize'
    """
    return Verdict(ticket_acc, dense_acc, reinit_acc, margin, well_trained_acc, small_dense_acc, similar)
