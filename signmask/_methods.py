"""Pruning methods: ``torch.nn.utils.prune.BasePruningMethod`` subclasses and their registry.

Each method works with stock prune (``L1Magnitude.apply(module, "weight", amount=0.2)``) and with
:func:`signmask.prune`, which also runs the ranking methods globally over many tensors at once.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
from torch.nn.utils import prune as _prune

from ._checks import SEED_LIMIT, check_key, check_seed
from ._select import smallest_k

METHODS: dict[str, type["RankedPruning"]] = {}

_TENSOR_STRIDE = 7919


def tensor_seed(seed: int, index: int) -> int:
    """The CPU generator seed of the ``index``-th tensor: ``seed + 7919 * index`` (mod 2**64)."""
    return (seed + _TENSOR_STRIDE * index) % SEED_LIMIT


def register_method(name: str) -> Callable[[type], type]:
    """Register a ranking pruning method under ``name`` for ``signmask.prune(method=name)``."""

    def deco(cls: type) -> type:
        cls.NAME = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type["RankedPruning"]:
    """Look up a registered method; unknown names raise ``ValueError`` (no str: ``TypeError``)
    listing the valid ones."""
    return METHODS[check_key(name, METHODS, "method", "pruning method")]


def check_amount(amount: float | int) -> float | int:
    """Validate an amount as ``torch.nn.utils.prune`` reads it: a float is a fraction in [0, 1]
    of the remaining weights, an int a number of weights (>= 0)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"amount must be a float in [0, 1] or an int count, got {type(amount).__name__} {amount!r}"
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount, a number of weights, must be >= 0, got {amount!r}")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount, a fraction, must be in [0, 1], got {amount!r}")
    return float(amount)


def count_to_prune(amount: float | int, alive: int, where: str = "the selected tensors") -> int:
    """How many of ``alive`` weights ``amount`` prunes: an int as is, a fraction rounded with
    Python's ``round`` (half to even), the rule ``torch.nn.utils.prune`` uses, so
    ``alive - round(amount * alive)`` remain.

    Raises:
        ValueError: an int ``amount`` above ``alive``.
    """
    if isinstance(amount, int):
        if amount > alive:
            raise ValueError(f"amount={amount} weights to prune, but {where} have only {alive} left unpruned")
        return amount
    return round(amount * alive)


class RankedPruning(_prune.BasePruningMethod):
    """Prune the fraction ``amount`` of still-alive entries with the smallest scores.

    Subclasses define :meth:`scores`. Ties are broken by position (lower flat index first), so
    the result is deterministic.
    """

    PRUNING_TYPE = "unstructured"
    NAME = "ranked"

    def __init__(self, amount: float | int) -> None:
        self.amount = check_amount(amount)

    def scores(self, t: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return self.compute_masks([t], [default_mask])[0]

    def compute_masks(
        self,
        tensors: Sequence[torch.Tensor],
        default_masks: Sequence[torch.Tensor],
        names: Sequence[str] | None = None,
        index_offset: int = 0,
    ) -> list[torch.Tensor]:
        """Masks for several tensors ranked jointly (global pruning); dtypes follow the defaults.

        ``index_offset`` numbers the tensors for :meth:`scores` (layer-wise calls differ by it).
        """
        # A bool mask is used as it is (``== 1`` would copy it through int64); nothing here
        # writes to it.
        alive = [m if m.dtype == torch.bool else m == 1 for m in default_masks]
        where = repr(names[0]) if names is not None and len(names) == 1 else "the selected tensors"
        k = count_to_prune(self.amount, sum(int(a.count_nonzero()) for a in alive), where)
        wide = any(t.dtype == torch.float64 for t in tensors)  # L1 scores keep the weights' dtype
        drop = smallest_k(lambda i: self.scores(tensors[i], index_offset + i), alive, k, names, wide=wide)
        del alive
        out = []
        for i, m in enumerate(default_masks):  # each selection freed once applied
            out.append(m.masked_fill(drop[i], 0))
            drop[i] = None
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(amount={self.amount})"


@register_method("magnitude")
class L1Magnitude(RankedPruning):
    """Magnitude (L1) unstructured pruning: the smallest ``|w|`` go first."""

    def scores(self, t: torch.Tensor, index: int) -> torch.Tensor:
        return t.detach().abs()


@register_method("random")
class RandomPruning(RankedPruning):
    """Random unstructured pruning (a baseline); ``seed`` makes it reproducible.

    Without a seed, one is drawn from torch's global generator, so ``torch.manual_seed`` fixes it.
    """

    def __init__(self, amount: float | int, seed: int | None = None) -> None:
        super().__init__(amount)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = check_seed(seed)

    def scores(self, t: torch.Tensor, index: int) -> torch.Tensor:
        # Drawn on the CPU in float32: a CUDA generator, or float64 under
        # torch.set_default_dtype, gives other numbers, and a seed must name one mask wherever
        # the model lives and whatever the process's default dtype.
        gen = torch.Generator().manual_seed(tensor_seed(self.seed, index))
        return torch.rand(t.shape, generator=gen, dtype=torch.float32).to(t.device)

    def __repr__(self) -> str:
        return f"RandomPruning(amount={self.amount}, seed={self.seed})"


class FromSignedMask(_prune.BasePruningMethod):
    """Keep exactly the entries where a signed mask in {-1, 0, +1} is non-zero (a stored ticket)."""

    PRUNING_TYPE = "unstructured"
    NAME = "ticket"

    def __init__(self, signed_mask: torch.Tensor | None) -> None:
        self.signed_mask = signed_mask
        self.shape = None if signed_mask is None else tuple(signed_mask.shape)

    def spent(self) -> "FromSignedMask":
        """A history record of this method that holds no per-weight tensor."""
        record = FromSignedMask(None)
        record.shape = self.shape
        return record

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if self.signed_mask.shape != default_mask.shape:
            raise ValueError(
                f"signed mask has shape {tuple(self.signed_mask.shape)}, "
                f"tensor has {tuple(default_mask.shape)}"
            )
        keep = self.signed_mask.to(default_mask.device) != 0
        return default_mask.masked_fill(~keep, 0)

    def __repr__(self) -> str:
        return f"FromSignedMask(shape={self.shape})"
