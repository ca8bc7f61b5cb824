"""When a lottery search prunes and where it rewinds: density schedules and rewind points."""

from __future__ import annotations

import math
import numbers
import re

from ._checks import check_int

# Read with fullmatch: a `$` also matches before a final "\n". [0-9], not \d (any script's digits).
_REWIND = re.compile(r"(?:([0-9]+)ep)?(?:([0-9]+)it)?")


def parse_rewind(spec: str | int | None, steps_per_epoch: int | None) -> int | None:
    """The optimizer step a rewind point names: ``"init"`` is 0, ``"500it"`` 500, ``"2ep"`` two
    epochs, ``"1ep50it"`` one epoch and 50 steps; an int is a step. ``None`` means no rewind.

    Raises:
        TypeError: ``steps_per_epoch`` is not an int.
        ValueError: an unreadable spec, ``"ep"`` without ``steps_per_epoch``, or a
            ``steps_per_epoch`` below 1.

    Example:
        >>> parse_rewind("1ep50it", steps_per_epoch=100)
        150
    """
    if steps_per_epoch is not None:
        steps_per_epoch = check_int(steps_per_epoch, "steps_per_epoch", minimum=1)
    if spec is None:
        return None
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        if spec < 0:
            raise ValueError(f"rewind must be a step >= 0, got {spec}")
        return int(spec)
    if not isinstance(spec, str):
        raise TypeError(f"rewind must be a str or an int step, got {type(spec).__name__} {spec!r}")
    if spec == "init":
        return 0
    match = _REWIND.fullmatch(spec)
    if not spec or match is None:
        raise ValueError(
            f"cannot read rewind point {spec!r}; expected 'init', '<N>it', '<N>ep' or '<N>ep<M>it' "
            "(e.g. '500it', '2ep', '1ep50it') or an int step"
        )
    epochs, iters = (int(g) if g else 0 for g in match.groups())
    if match.group(1) and steps_per_epoch is None:
        raise ValueError(f"rewind={spec!r} counts epochs; pass steps_per_epoch= (e.g. len(loader))")
    return epochs * int(steps_per_epoch or 0) + iters  # a plain int: numpy ints do not load weights_only


def prune_count(sparsity: float, rate: float | None, rounds: int | None) -> int:
    """How many pruning steps reach ``sparsity`` when each prunes ``rate`` of the remaining weights
    (the last one prunes less, to land on the target exactly), or ``rounds`` if given.

    Example:
        >>> prune_count(0.8, 0.2, None)   # 0.8 ** 7 = 0.21 > 0.2, so 8 steps
        8
    """
    if rounds is not None:
        return check_int(rounds, "rounds", minimum=1)
    # The tolerance keeps an exact power (0.36 = 0.6 ** 2) from asking for one more step.
    return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-rate) - 1e-9))


def kept_schedule(total: int, sparsity: float, rate: float | None, rounds: int) -> list[int]:
    """Weights kept after each pruning step: ``round(total * (1 - rate) ** i)``, the last exactly
    ``round(total * (1 - sparsity))``. Every step prunes at least one weight.

    With ``rate=None`` (the user fixed ``rounds``) each step prunes the same fraction of the
    weights left, ``1 - (1 - sparsity) ** (1 / rounds)``; a count that rounding would repeat is
    lowered by one (raised where the later steps need the room), and more rounds than weights
    to prune are refused. With a ``rate``, a step whose rounded
    count is not below the previous one (or ``total``) is dropped: small models get fewer rounds.

    Raises:
        ValueError: ``sparsity`` keeps no weight or prunes none (rounded); more ``rounds`` than
            weights to prune.

    Example:
        >>> kept_schedule(1000, 0.5, 0.2, 4)
        [800, 640, 512, 500]
        >>> kept_schedule(516, 0.4887, 0.2, 4)  # 516 * 0.8 ** 3 rounds to the target, 264
        [413, 330, 264]
    """
    explicit = rate is None  # the user fixed the number of rounds: keep every one
    if explicit:
        rate = 1.0 - (1.0 - sparsity) ** (1.0 / rounds)
    kept = [round(total * (1.0 - rate) ** i) for i in range(1, rounds)]
    final = round(total * (1.0 - sparsity))
    if final < 1:
        raise ValueError(f"sparsity={sparsity} keeps no weight of {total}")
    if final >= total:
        raise ValueError(f"sparsity={sparsity} prunes no weight of {total} (rounded)")
    if explicit:
        if rounds > total - final:
            raise ValueError(
                f"rounds={rounds} prunings cannot each prune a weight: sparsity={sparsity} prunes "
                f"{total - final} of {total} weights"
            )
        steps, previous = [], total
        for i, k in enumerate(kept + [final], start=1):
            previous = max(min(k, previous - 1), final + rounds - i)
            steps.append(previous)
        return steps
    steps, previous = [], total  # each step must prune something: drop repeated counts
    for k in kept + [final]:
        if final <= k < previous:
            steps.append(k)
            previous = k
    return steps
