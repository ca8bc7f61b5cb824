"""Exact k-smallest selection over many tensors without concatenating them.

``torch.nn.utils.prune.global_unstructured`` flattens every score and mask into one vector and
runs ``topk`` on it. Here the k-th smallest score is found by a two-level radix select on the
float32 bit pattern (non-negative floats order like their bits as integers): one 65536-bin
histogram of the high 16 bits, one of the low 16 bits inside the chosen bin. Each pass touches
one tensor at a time, so extra memory is a few copies of the largest tensor, not of all of them.
Ties at the threshold are broken by position: earlier tensors first, then lower flat index.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

_BINS = 1 << 16
_LOW = _BINS - 1
_NONFINITE = 0x7F80  # high 16 bits of +inf; NaN sorts above it
_DEAD = _BINS  # extra bin for entries that are already pruned


def _bits(score: torch.Tensor) -> torch.Tensor:
    # Clearing the sign bit ranks by |score| and makes -0.0 equal to +0.0.
    return score.detach().float().view(torch.int32) & 0x7FFFFFFF


def _kth_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest element (1-based k) and how many of it are taken."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)).item())
    below = int(cum[b - 1].item()) if b > 0 else 0
    return b, k - below


def smallest_k(
    scores: Callable[[int], torch.Tensor],
    alive: Sequence[torch.Tensor],
    k: int,
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Select exactly ``k`` alive entries with the smallest scores across several tensors.

    Args:
        scores: ``scores(i)`` returns the scores of tensor ``i``, ranked by absolute value; it is
            called up to three times per tensor and must return the same values each time.
        alive: bool tensors; only True entries are candidates.
        k: how many entries to select, ``0 <= k <= total alive``.
        names: tensor names for error messages.

    Returns:
        One bool tensor per input, True where the entry is selected; exactly ``k`` in total.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(alive))]
    total = sum(int(a.sum().item()) for a in alive)
    if not 0 <= k <= total:
        raise ValueError(f"cannot select {k} of {total} alive entries")
    if k == 0:
        return [torch.zeros_like(a, dtype=torch.bool) for a in alive]
    if k == total:
        return [a.clone().bool() for a in alive]
    device = alive[0].device
    hist = torch.zeros(_BINS + 1, dtype=torch.int64, device=device)
    for i, a in enumerate(alive):
        hi = torch.where(a, _bits(scores(i)) >> 16, _DEAD)
        counts = torch.bincount(hi.reshape(-1).to(device), minlength=_BINS + 1)
        if counts[_NONFINITE:_DEAD].any():
            raise ValueError(f"scores of tensor {names[i]!r} contain NaN or inf; cannot rank them")
        hist += counts
    b1, k1 = _kth_bin(hist, k)
    hist.zero_()
    for i, a in enumerate(alive):
        bits = _bits(scores(i))
        in_bin = a & ((bits >> 16) == b1)
        hist += torch.bincount((bits[in_bin] & _LOW).to(device), minlength=_BINS + 1)
    b2, ties_left = _kth_bin(hist, k1)
    threshold = (b1 << 16) | b2
    selected = []
    for i, a in enumerate(alive):
        bits = _bits(scores(i))
        chosen = a & (bits < threshold)
        if ties_left:
            tie = a & (bits == threshold)
            n_tie = int(tie.sum().item())
            if n_tie <= ties_left:
                chosen |= tie
            else:
                chosen |= tie & (tie.reshape(-1).cumsum(0).view_as(tie) <= ties_left)
            ties_left -= min(n_tie, ties_left)
        selected.append(chosen)
    return selected
