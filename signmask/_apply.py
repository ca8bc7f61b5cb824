"""``signmask.apply``: start a lottery search (IMP, LRR, AWS, OMP) around the user's training loop."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from . import (_checks, _interpolate, _methods, _optimizer_checks, _prune, _recipes, _reparam, _schedule,
               _targets, _undo)
from ._search import Search


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search; a resumed search must match it field by field."""

    method: str
    sparsity: float
    rate: float | None
    prune_steps: int
    rewind: str | int | None
    rewind_step: int | None
    classifier: bool
    seed: int

    def check_same(self, other: dict) -> None:
        for field, mine in dataclasses.asdict(self).items():
            if other.get(field) != mine:
                raise ValueError(
                    f"cannot resume: the saved search has {field}={other.get(field)!r}, "
                    f"this one {field}={mine!r}"
                )

    def metadata(self) -> dict[str, str]:
        """The ticket's metadata: how it was found."""
        rate = "" if self.rate is None else repr(self.rate)
        rewind = "" if self.rewind is None else str(self.rewind)
        return {"method": self.method, "rounds": str(self.prune_steps), "rate": rate,
                "rewind": rewind, "target_sparsity": repr(self.sparsity), "seed": str(self.seed)}


def apply(
    model: nn.Module,
    method: str = "aws",
    sparsity: float = 0.8,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    rate: float | None = None,
    rounds: int | None = None,
    rewind: str | int | None = "default",
    steps_per_epoch: int | None = None,
    classifier: bool | None = None,
    include=None,
    exclude=None,
    filter_fn=None,
    seed: int = 0,
    progress: bool = True,
    steps_per_round: int | None = None,
) -> Search:
    """Turn the user's training loop into a lottery search (IMP, LRR, AWS or OMP).

    Installs an all-ones mask on every selected conv/linear weight (so the model's layout stays
    fixed for optimizers, EMA copies, DDP and ``torch.compile``), and for AWS the normalization
    interpolation, then returns a :class:`Search` to iterate: one iteration per training round.

    Args:
        model: the network at its initialization (a timm model, DDP- or compile-wrapped).
        method: ``"imp"``, ``"lrr"``, ``"aws"`` or ``"omp"``.
        sparsity: target fraction of pruned weights, in (0, 1), reached exactly after the last pruning.
        optimizer: the user's optimizer; its steps are counted, its state reset each round.
        scheduler: the user's LR scheduler (torch or timm), restarted each round.
        rate: fraction of the remaining weights pruned per round (default 0.2; OMP: one step).
        rounds: number of pruning steps instead of ``rate`` (the rate then follows).
        rewind: IMP/OMP rewind point: ``"init"`` (default), ``"500it"``, ``"2ep"``, ``"1ep50it"``
            or a step; ``None``: no rewind (the pruned weights keep training). LRR and AWS do
            not rewind weights (the default and ``None`` are all they take).
        steps_per_epoch: optimizer steps per epoch, needed for ``"ep"`` rewind points.
        classifier: prune the classifier head (default: IMP/OMP yes, LRR/AWS no).
        include, exclude, filter_fn: which conv/linear modules to prune, as in :func:`signmask.prune`.
        seed: seed of AWS's interpolation coefficients (identical on every DDP rank). It is
            independent of ``torch.manual_seed``: give each replicate of a multi-seed study its
            own, or all of them draw the same coefficients.
        progress: a tqdm bar per round and a log line per round, on rank 0 only.
        steps_per_round: total of the progress bar (optional).

    Returns:
        A :class:`Search`.

    Raises:
        TypeError: ``model`` not a module (or a TorchScript one), ``optimizer`` not a
            ``torch.optim.Optimizer`` or one that skipped ``Optimizer.__init__`` (a wrapper such as
            timm's ``Lookahead``: pass the optimizer it wraps), a scheduler without
            ``state_dict`` or a scheduler class instead of an instance, or an option of the wrong
            type (``method``, ``sparsity``, ``rate``, ``rewind``, ``seed``, ``classifier``,
            ``include``, ``filter_fn``...).
        ValueError: unknown method; sparsity or rate outside (0, 1); both rate and rounds (or
            either for OMP); more rounds than weights; a sparsity that prunes nothing; a rewind
            point for LRR/AWS or an unreadable one (an ``"ep"`` point without
            ``steps_per_epoch``); a seed outside [0, 2**64); nothing to prune; a model already
            pruned; an optimizer that trains none of the pruned tensors, or that an open search
            (not done or closed) already drives; a scheduler built on another optimizer (sharing
            no parameter with ``optimizer``); ``"aws"`` (the default) on a model without
            norm layers with affine parameters (use ``"lrr"``);
            a weight on the meta device or sharded (a DTensor); norm layers already interpolated
            by another search; with a rewind to init (IMP, OMP), an uninitialized lazy layer
            anywhere in the model.
        The model is left untouched in every case.

    Example:
        >>> import torch, signmask
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> search = signmask.apply(net, "imp", 0.5, optimizer=opt, rate=0.3, progress=False)
        >>> for r in search:
        ...     for _ in range(3):
        ...         opt.zero_grad(); net(torch.randn(5, 4)).sum().backward(); opt.step()
        >>> len(search), search.ticket.sparsity
        (3, 0.5)
    """
    recipe = _recipes.get_recipe(method)
    sparsity = _checks.check_fraction(sparsity, "sparsity")
    rate, rounds = _rate_or_rounds(recipe, rate, rounds)
    steps = _schedule.prune_count(sparsity, rate, rounds)
    rewind, rewind_step = _rewind_point(recipe, rewind, steps_per_epoch)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_hooked(optimizer)
    _check_undriven(optimizer)
    seed = _checks.check_seed(seed)
    _checks.check_bool(progress, "progress")
    if isinstance(scheduler, type):  # a class has state_dict too, unbound: torch's error names no argument
        raise TypeError(
            f"scheduler must be a scheduler object, got the class {scheduler.__name__}: "
            f"pass {scheduler.__name__}(optimizer, ...)"
        )
    if scheduler is not None and not all(hasattr(scheduler, a) for a in ("state_dict", "load_state_dict")):
        pair = isinstance(scheduler, tuple) and len(scheduler) == 2 and hasattr(scheduler[0], "state_dict")
        raise TypeError(
            f"scheduler must have state_dict()/load_state_dict() (a torch or timm scheduler), "
            f"got {type(scheduler).__name__}"
            + (": timm's create_scheduler_v2 returns (scheduler, num_epochs); pass its first item" if pair else "")
        )
    if scheduler is not None:
        _optimizer_checks.check_scheduler(scheduler, optimizer)
    if steps_per_round is not None:
        steps_per_round = _checks.check_int(steps_per_round, "steps_per_round", minimum=1)
    classifier = _checks.check_bool(classifier, "classifier", optional=True)
    classifier = recipe.classifier if classifier is None else classifier
    targets = _targets.select(
        model, classifier=classifier, include=include, exclude=exclude, filter_fn=filter_fn
    )
    _check_trained(targets, optimizer)
    _check_fresh(model, targets, recipe)
    if rewind_step == 0:
        _check_materialized(model, recipe.name)
    total = sum(_reparam.original(m, n).numel() for m, n in targets.values())
    kept = _schedule.kept_schedule(total, sparsity, rate, steps)
    steps = len(kept)  # steps that would prune nothing are dropped
    config = SearchConfig(method, sparsity, rate, steps, rewind, rewind_step, classifier, seed)
    # The optimizer too: the search hooks it, and a Ctrl-C after that (as inference_mode exits)
    # must not leave those hooks refusing every step.
    undo = _undo.Undo(model, optimizers=[optimizer])
    try:
        _prune.prune_targets(model, targets, _methods.L1Magnitude(0.0))  # all-ones masks
        # Normal tensors even under torch.inference_mode: the alpha, the norms' inits and the
        # snapshots the search makes are written in place by the training outside it.
        with torch.inference_mode(False):
            return Search(
                model, optimizer, scheduler, config, targets=targets, kept=kept,
                progress=progress, steps_per_round=steps_per_round,
            )
    except BaseException:  # e.g. a norm layer attach() refuses, or out of memory
        undo.restore()  # the masks, AWS's norm interpolation if attached, the optimizer's hooks
        raise


def _rate_or_rounds(recipe: _recipes.Recipe, rate, rounds) -> tuple:
    """The checked ``rate`` (default 0.2) or ``rounds`` (OMP: one, and no rate)."""
    if rate is not None and rounds is not None:
        raise ValueError(f"pass rate= or rounds=, not both (got rate={rate!r}, rounds={rounds!r})")
    if recipe.one_shot:
        if rate is not None or rounds not in (None, 1):
            raise ValueError(
                f"method='{recipe.name}' prunes once; rate=/rounds= do not apply "
                f"(got rate={rate!r}, rounds={rounds!r})"
            )
        return None, 1
    if rate is None and rounds is None:
        rate = 0.2
    return (None if rate is None else _checks.check_fraction(rate, "rate")), rounds


def _rewind_point(recipe: _recipes.Recipe, rewind, steps_per_epoch) -> tuple:
    """The rewind point as given (the recipe's for ``"default"``) and its optimizer step."""
    if rewind == "default":
        rewind = recipe.rewind
    elif rewind is not None and recipe.rewind is None:
        raise ValueError(f"method='{recipe.name}' does not rewind weights; rewind={rewind!r} applies to imp/omp")
    rewind_step = _schedule.parse_rewind(rewind, steps_per_epoch)
    if rewind is not None and not isinstance(rewind, str):
        rewind = rewind_step  # a numpy int as a plain int: the state must load with weights_only
    return rewind, rewind_step


def _check_trained(targets, optimizer) -> None:
    """Refuse an optimizer training none of ``targets``; warn about those it leaves out."""
    untrained = _optimizer_checks.untrained(targets, optimizer)
    if len(untrained) == len(targets):
        raise ValueError(
            f"optimizer trains none of the tensors to prune ({sorted(targets)[:3]} ...); pass "
            "the optimizer training this model"
        )
    if untrained:
        warnings.warn(
            f"optimizer does not train {_checks.some(untrained, 5)} "
            f"({len(untrained)} of the {len(targets)} tensors to prune): the search ranks them by "
            "magnitudes that never train; exclude them (exclude=) to keep them dense",
            UserWarning,
            stacklevel=3,  # the caller of apply()
        )
    _optimizer_checks.warn_vanishing_eps(targets, optimizer, stacklevel=3)


def _check_hooked(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that skipped ``Optimizer.__init__`` (timm's ``Lookahead``). That wraps
    the class's ``step`` to run torch's step hooks, through which the search counts steps, and a
    wrapper's step may run none (every round "took no optimizer step", an IMP rewind point never
    reached). torch's ``zero_grad`` wraps it on its first call too, so a hooked ``step`` proves
    nothing: such a wrapper also shares its base's parameter groups, which the restart's
    ``load_state_dict`` replaces on the base only, and from round 1 on its scheduler would set
    rates the base no longer reads. The registry checked is one only ``__init__`` makes."""
    initialized = isinstance(getattr(optimizer, "_optimizer_load_state_dict_post_hooks", None), dict)
    if not (initialized and getattr(type(optimizer).step, "hooked", False)):
        raise TypeError(
            f"optimizer {type(optimizer).__name__} skips torch.optim.Optimizer.__init__ (a "
            "wrapper, as timm's Lookahead is): its step() may run no step hooks, through which "
            "the search counts steps, and restarting it each round would not reach the "
            "optimizer it wraps; pass that one (Lookahead's _base_optimizer); the scheduler may "
            "go on driving the wrapper"
        )


def _check_undriven(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that an open search (not done, not closed) already drives: each search
    counts every step as its own and, after each of its rounds, restarts the whole optimizer
    (state and learning rates), so two would silently restart each other's mid-round."""
    for hook in optimizer._optimizer_step_pre_hooks.values():
        other = getattr(hook, "__self__", None)
        if isinstance(other, Search):
            raise ValueError(
                f"optimizer already drives an open search ({other.config.method!r}, round "
                f"{other.round} of {len(other)}, on {type(other.model).__name__}): each search "
                "restarts the optimizer's state and learning rates after its rounds, so two would "
                "restart each other's; finish or close() that search first, search both parts in "
                "one apply (include=), or give this search an optimizer of its own"
            )


def _check_materialized(model: nn.Module, method: str) -> None:
    """Refuse a lazy parameter or buffer anywhere in ``model`` (pruned or not) when the search
    snapshots every weight at once to rewind to: a lazy one has no values yet, and torch's own
    error names none."""
    for fqn, module in model.named_modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            _targets.check_initialized(
                f"{fqn}.{name}" if fqn else name, module, tensor,
                f"apply(method={method!r}), which snapshots every weight to rewind to",
            )


def _check_fresh(model: nn.Module, targets, recipe: _recipes.Recipe) -> None:
    """Refuse a model already pruned or interpolated, and AWS on a model without norm layers."""
    already = sorted(k for k, (m, n) in targets.items() if _reparam.find_hook(m, n)[1] is not None)
    if already:
        raise ValueError(f"{already[:3]} are already pruned; apply() starts from an unpruned model")
    if recipe.interpolate_norms and _interpolate.interpolated(model):
        names = sorted(_interpolate.interpolated(model))
        raise ValueError(
            f"the model's norm layers {_checks.some(names)} are already "
            "interpolated: another AWS search is attached; call its close() first (or let it "
            "finish), which takes the interpolation off; on a copy of that search's model "
            "(copy.deepcopy, an EMA), call its close(copy)"
        )
    if recipe.interpolate_norms and not any(_interpolate.is_norm(m) for m in model.modules()):
        raise ValueError(
            f"method='aws' interpolates normalization layers, and {type(model).__name__} has none "
            "with affine parameters; without them AWS is LRR: use method='lrr'"
        )
