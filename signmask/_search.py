"""``Search``: a lottery search (IMP, LRR, AWS, OMP) driving the user's own training loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import (_distributed, _interpolate, _io, _methods, _prune, _recipes, _reparam, _resume,
               _snapshot, _target_checks, _targets)
from ._progress import OWN_RECORDS, RoundBar, metric, moved_rates_warning, no_step_warning, warn_at_user
from ._extract import extract
from ._ticket import Ticket


class Search:
    """A lottery search driving the user's training loop; made by :func:`signmask.apply`.

    Iterate it: each iteration is one training round, run by the user's own code. When the body
    of a round ends the search prunes, rewinds the weights (IMP, OMP) and restarts the optimizer
    and LR schedule. Round 0 trains the dense network; the last round trains at the target
    sparsity, after which :attr:`ticket` holds the signed mask ``sign(theta_T * M_T)`` (with the
    bias and dense classifier signs, and the trained norm parameters ``transfer(norms=True)``
    copies).

    The explicit steps :meth:`start_round` / :meth:`finish_round` do the same for loops that cannot
    be wrapped in a ``for``. :meth:`state_dict` / :meth:`load_state_dict` make it resumable.

    Attributes: ``round`` (0 is dense), ``step`` (optimizer steps so far), ``start_step`` and
    ``round_step`` (where a resumed loop goes on), ``sparsity``, ``done``, ``history`` (one
    record per round: sparsity, steps and what :meth:`report` got), ``len(search)`` (rounds).

    Example:
        >>> import torch, signmask
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=2, classifier=True,
        ...                         progress=False)
        >>> for r in search:                      # round 0 dense, then one per pruning
        ...     opt.zero_grad()
        ...     net(torch.randn(4, 8)).square().mean().backward()
        ...     opt.step()
        ...     search.report(loss=0.0)
        >>> len(search), search.done, search.ticket.kept, search.ticket.numel
        (3, True, 40, 80)
    """

    def __init__(self, model, optimizer, scheduler, config, *, targets, kept, progress, steps_per_round):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config, self.kept_schedule = config, kept
        recipe = _recipes.get_recipe(config.method)
        self._targets = targets
        self.steps_per_round = steps_per_round
        self.round, self.step, self.round_start_step = 0, 0, 0
        self.in_round, self.done = False, False
        self.history: list[dict[str, Any]] = []
        self._ticket: Ticket | None = None
        self._bar = RoundBar(progress)
        self._rewind_weights = _snapshot.take_weights(model) if config.rewind_step == 0 else None
        self._restart = _snapshot.take_schedule(optimizer, scheduler)
        self._restart_pending = config.rewind_step not in (None, 0)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._alpha = None
        if recipe.interpolate_norms:
            device = _reparam.original(*next(iter(targets.values()))).device
            self._alpha = torch.zeros((), device=device)
            _interpolate.attach(model, self._alpha)
        self._hooks = [  # a failure: apply() takes them off
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ----------------------------------------------------------------------------- rounds
    def __len__(self) -> int:
        """Number of training rounds: the dense one plus one per pruning step."""
        return self.config.prune_steps + 1

    def __iter__(self) -> Iterator[int]:
        """Yield each round's index: the body of the loop trains that round, then the search
        prunes, rewinds and restarts (:meth:`start_round` / :meth:`finish_round` around it)."""
        while not self.done:
            if not self.in_round:
                self.start_round()
            else:
                self._check_open("iterating")  # closed mid-round: do not run the loop body
            yield self.round
            self._finish_round()

    @property
    def sparsity(self) -> float:
        """Current fraction of pruned weights among the searched tensors."""
        total = sum(mask.numel() for mask in self._masks("sparsity").values())
        return 1.0 - self._kept() / total

    @property
    def start_step(self) -> int:
        """The training step the current round starts from in the user's counting.

        It is the rewind step in IMP/OMP rounds after the first, else 0
        (``start_step // steps_per_epoch`` is the epoch a loop restarts at; timm schedulers take
        it as their epoch).
        """
        return (self.config.rewind_step or 0) if self.round > 0 else 0

    @property
    def round_step(self) -> int:
        """Optimizer steps taken in the current round; 0 between rounds.

        Between rounds ``round`` names the next one, which has taken none. A resumed loop picks
        up at step ``start_step + round_step`` of its own counting (IMP/OMP rounds after the
        first train from the rewind step on).
        """
        return self.step - self.round_start_step if self.in_round else 0

    def start_round(self) -> int:
        """Begin the next training round (for loops that cannot be a ``for`` over the search).

        Returns:
            The round's index (0 is the dense round).

        Raises:
            RuntimeError: a round is already running, or the search is done or closed.

        Example:
            >>> import torch, signmask
            >>> net = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=1,
            ...                         classifier=True, progress=False)
            >>> while not search.done:
            ...     r = search.start_round()
            ...     opt.zero_grad(); net(torch.ones(2, 4)).sum().backward(); opt.step()
            ...     search.finish_round()
            >>> r, search.sparsity
            (1, 0.5)
        """
        self._check_open("start_round")
        if self.in_round:
            raise RuntimeError(f"round {self.round} is already running; call finish_round() first")
        record = {"round": self.round, "sparsity": self.sparsity}
        # Torch can fail below (out of memory) and so can Ctrl-C: a round half started would
        # refuse the next call. The AWS draw is put back too: a seed names one run.
        with _snapshot.kept_on_failure(self, model=False):
            self._draw_alpha()
            self.in_round, self.round_start_step = True, self.step
            self.history.append(record)
            self._bar.open_round(self)
        return self.round

    def report(self, **metrics: float) -> None:
        """Record the user's metrics (``accuracy=0.93``) for the current round's log line.

        Args:
            metrics: name -> real number or one-element real tensor (a loss as it comes),
                kept in ``history[-1]`` as floats.

        Raises:
            RuntimeError: no round is running (its line is printed already).
            TypeError: a metric is not a real number or a one-element real tensor.
            ValueError: a metric is named like the search's own records (``round``,
                ``sparsity``, ``steps``).

        Example:
            >>> import torch, signmask
            >>> net = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=1,
            ...                         classifier=True, progress=False)
            >>> search.start_round()
            0
            >>> search.report(acc=0.75)
            >>> search.history[-1]
            {'round': 0, 'sparsity': 0.0, 'acc': 0.75}
        """
        if not self.in_round:  # a finished round's line is printed already
            raise RuntimeError(
                "report(): no round is running; call it inside `for r in search:` or between "
                "start_round() and finish_round()"
            )
        own = sorted(set(metrics) & set(OWN_RECORDS))
        if own:
            raise ValueError(f"report(): {own} are the search's own records; name the metrics otherwise")
        values = {k: metric(k, v) for k, v in metrics.items()}  # all checked before any is kept
        self.history[-1].update(values)

    def finish_round(self) -> None:
        """End the current round: prune, rewind and restart, or after the last round, make the ticket.

        Raises:
            RuntimeError: no round is running, or the search is done or closed.
            ValueError: the rewind point lies beyond the training done in round 0 (nothing changes;
                train on and call again); the optimizer's parameter groups changed since
                :func:`signmask.apply`, or a searched tensor's module was replaced or removed.
            Where torch fails midway (out of memory) or on Ctrl-C, the search, model, optimizer
            and scheduler are left as they were, the round still running: call it again.
            Once an IMP/OMP rewind has written the weights (its last step: a Ctrl-C during that
            write surfaces after it), the round end is complete; under the projection backend
            the next step or forward masks the rewound weights if the failure came before.

        Example:
            >>> import torch, signmask
            >>> net = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=1,
            ...                         classifier=True, progress=False)
            >>> search.start_round()
            0
            >>> opt.zero_grad(); net(torch.ones(2, 4)).sum().backward(); opt.step()
            >>> search.finish_round()  # prunes to the target; round 1 trains at it
            >>> search.sparsity, search.done
            (0.5, False)
        """
        self._finish_round()

    def _finish_round(self) -> None:
        """:meth:`finish_round`, one call below the user's code whether it iterates or calls it."""
        self._check_open("finish_round")
        if not self.in_round:
            raise RuntimeError(f"round {self.round} has not started; call start_round() first")
        if self.config.rewind_step and self._rewind_weights is None:
            raise ValueError(
                f"rewind point {self.config.rewind!r} is step {self.config.rewind_step}, but round 0 "
                f"trained only {self.step} optimizer steps; train longer or rewind earlier"
            )
        _target_checks.check_present(self.model, self._targets)
        if self.round_step == 0 and _distributed.rank0():  # one warning, not one per DDP rank
            warn_at_user(no_step_warning(self))  # at the loop's finish_round() or `for` line
        # Valid state cannot fail below, but torch can (out of memory) and so can Ctrl-C: a round
        # pruned but not rewound, or rewound but not restarted. Everything is put back (the masks
        # by their flips, the search's attributes, optimizer, scheduler), but the weights, which
        # a copy would double: their rewind is the last write, one call (see _snapshot.rewind).
        with _snapshot.kept_on_failure(self) as writes:
            self._end_round(writes)
        self._bar.close_round(self)  # the round's line, once it ended

    def _end_round(self, writes: _snapshot.RoundWrites) -> None:
        """:meth:`finish_round`'s changes, everything checked before, told to ``writes``."""
        self._capture_schedule()
        if self.round < self.config.prune_steps:  # the rewind and restart fit model and optimizer
            _snapshot.check_restartable(self.model, self.optimizer, self._rewind_weights, self._restart)
        self.history[-1]["steps"] = self.round_step
        if self.round == self.config.prune_steps:
            meta = self.config.metadata()
            self._ticket = extract(self.model, biases=True, dense=True, norms=True, metadata=meta)
            self._remove_hooks()
            self.in_round, self.done = False, True
            return
        self._prune_to(self.kept_schedule[self.round], writes.flips)
        _snapshot.put_schedule(self.optimizer, self.scheduler, self._restart)
        self.round, self.in_round = self.round + 1, False  # before the rewind: the last write
        if self._rewind_weights is not None:
            _snapshot.rewind(self.model, self._targets, self._rewind_weights, writes.written)

    @property
    def ticket(self) -> Ticket:
        """The signed mask found by the search, with method, rounds, rate and rewind in its metadata."""
        if self._ticket is None:
            raise RuntimeError(
                f"the search is in round {self.round} of {len(self)}; the ticket exists after the last round"
            )
        return self._ticket

    def save(self, path: str | os.PathLike) -> Path:
        """Save :attr:`ticket` atomically as ``.safetensors`` (see :func:`signmask.save`).

        Args:
            path: the file to write; missing folders above it are created.

        Returns:
            The path written, as a ``pathlib.Path``.

        Raises:
            RuntimeError: the search has not finished its last round (no ticket yet).
            TypeError / ValueError / OSError: a bad ``path``, as :func:`signmask.save` raises.

        Example:
            >>> import os, tempfile, torch, signmask
            >>> net = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=1,
            ...                         classifier=True, progress=False)
            >>> for r in search:
            ...     opt.zero_grad(); net(torch.ones(2, 4)).sum().backward(); opt.step()
            >>> with tempfile.TemporaryDirectory() as d:
            ...     path = search.save(os.path.join(d, "lrr.safetensors"))
            ...     signmask.load(path).metadata["method"]
            'lrr'
        """
        return _io.save(self.ticket, path)

    # ------------------------------------------------------------------------ internals
    def _check_open(self, what: str) -> None:
        if self.done:
            raise RuntimeError(f"{what}(): the search is done; its ticket is in .ticket")
        if not self._hooks:
            raise RuntimeError(f"{what}(): the search was closed")

    def _masks(self, what: str) -> dict[str, torch.Tensor]:
        """The searched tensors' masks; a RuntimeError naming one that lost its mask."""
        masks = {}
        for key, (module, name) in self._targets.items():
            masks[key] = module._buffers.get(name + "_mask")
            if masks[key] is None:
                raise RuntimeError(
                    f"{what}: {key} is no longer pruned (signmask.remove or prune.remove ran on "
                    "it); the search reads its masks to the end: make the pruning permanent "
                    "after the search"
                )
        return masks

    def _kept(self) -> int:
        # count_nonzero, not sum(): that would copy a bool mask to int64 (the masks are binary).
        return sum(int(mask.count_nonzero()) for mask in self._masks("the search").values())

    def _prune_to(self, kept: int, flips: list) -> None:
        # A count, not a fraction: (alive - kept) / alive could round to one weight more or less.
        ranker = _methods.L1Magnitude(self._kept() - kept)
        _prune.prune_targets(self.model, self._targets, ranker, flips_out=flips)
        _distributed.broadcast_masks(self._targets)

    def close(self, *copies: nn.Module) -> None:
        """Remove the search's hooks (optimizer hooks, norm interpolation) and end it.

        The masks stay. The search calls this itself after its last round; call it to abandon a
        search.

        Args:
            copies: copies of the model made after :func:`apply` (``ModelEmaV3(model).module``):
                their norm interpolation comes off too. Callable again after the search ended.

        Raises:
            TypeError: a copy is not an ``nn.Module``.
            ValueError: a copy holds none of the search's masks (made before :func:`apply`: an
                EMA made then pairs its tensors with the pruned model's by position, and
                averages the wrong ones; make it after apply). Nothing is removed then.

        Example:
            >>> import copy, torch, signmask
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "aws", 0.5, optimizer=opt, classifier=True,
            ...                         progress=False)
            >>> ema = copy.deepcopy(net)
            >>> search.close(ema)  # abandon the search: hooks and interpolation come off
            >>> type(ema[1].weight).__name__, search.sparsity
            ('Parameter', 0.0)
        """
        _targets.check_copies(copies, self._targets)
        self._remove_hooks(*copies)
        self._bar.close_round(self)

    def _remove_hooks(self, *copies: nn.Module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for model in (self.model, *copies):
            if _interpolate.interpolated(model):
                _interpolate.detach(model)

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self.in_round:
            state = "done" if self.done else f"between rounds (round {self.round} not started)"
            raise RuntimeError(f"optimizer.step() called while the search is {state}; train inside its rounds")
        if self.step == 0 and not self._restart_pending and _distributed.rank0():  # restarts go to apply's
            moved = moved_rates_warning(self)
            if moved:
                warn_at_user(moved)
        self._capture_schedule()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.step == self.config.rewind_step and self._rewind_weights is None:
            self._rewind_weights = _snapshot.take_weights(self.model)
        self._draw_alpha()
        self._bar.update()

    def _capture_schedule(self) -> None:
        # The schedule a rewind to step k restarts from is the one the user's loop set after
        # step k (a per-epoch scheduler steps after the epoch's last optimizer step).
        if self._restart_pending and self._rewind_weights is not None:
            self._restart = _snapshot.take_schedule(self.optimizer, self.scheduler)
            self._restart_pending = False

    def _draw_alpha(self) -> None:
        if self._alpha is not None:
            # fill_ with a Python number (a CPU-to-CUDA copy_ would wait for the device each
            # step), drawn in float32 whatever the default dtype, so that a seed names one draw.
            a = torch.rand((), generator=self._generator, dtype=torch.float32).item()
            self._alpha.fill_(a)

    # --------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to resume the search.

        That is the round, step counters, rewind snapshot, restart point, masks, the
        interpolation RNG and the current ``a``, the history (and the ticket when done). Save it
        beside the model's, optimizer's and scheduler's own state_dicts.

        Returns:
            A dict of plain tensors, numbers, strings, lists and dicts, which ``torch.load``
            reads back with ``weights_only=True``.

        Raises:
            RuntimeError: a searched tensor is no longer pruned (``signmask.remove`` ran).

        Example:
            >>> import io, torch, signmask
            >>> net = torch.nn.Linear(4, 4)
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=1,
            ...                         classifier=True, progress=False)
            >>> buf = io.BytesIO()
            >>> torch.save(search.state_dict(), buf); _ = buf.seek(0)
            >>> fresh = torch.nn.Linear(4, 4)
            >>> opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1)
            >>> resumed = signmask.apply(fresh, "lrr", 0.5, optimizer=opt2, rounds=1,
            ...                          classifier=True, progress=False)
            >>> resumed.load_state_dict(torch.load(buf, weights_only=True))
            >>> resumed.round, resumed.step
            (0, 0)
        """
        return _resume.state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`.

        Call it right after :func:`signmask.apply` on the fresh model and optimizer, then load the
        model's, optimizer's and scheduler's own state_dicts.

        Args:
            state: what :meth:`state_dict` returned (after a ``torch.save`` / ``torch.load``
                round trip, ``weights_only=True`` included).

        Raises:
            ValueError: another version, another search configuration, a model whose masked
                tensors differ (names or shapes), or an entry missing or of the wrong kind (an
                edited or corrupted checkpoint). Nothing is changed then.
            RuntimeError: the search was closed or is done.
        """
        _resume.restore(self, state)
