"""Exact k-smallest selection over many tensors without concatenating them.

``torch.nn.utils.prune.global_unstructured`` flattens every score and mask into one vector and
runs ``topk`` on it. Here the k-th smallest score is found by a radix select on the float bit
pattern (non-negative floats order like their bits as integers), 16 bits per pass: a 65536-bin
histogram of the high 16 bits, then one of the next 16 bits inside the chosen bin, and so on:
two passes for float32 (and float16/bfloat16, widened exactly), four when any score is float64.
Each pass touches one tensor at a time, so extra memory is a few copies of the largest tensor,
not of all of them. Ties at the threshold are broken by position: earlier tensors first, then
lower flat index.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

_BINS = 1 << 16
_CHUNK = 1 << 20  # entries per slice in prefix_end: bounds its int64 index temporaries
_LOW = _BINS - 1
_DEAD = _BINS  # extra bin for entries that are already pruned
# Key width -> (key dtype, high 16 bits of +inf: NaN and inf sort at or above it).
_WIDTHS = {32: (torch.int32, 0x7F80), 64: (torch.int64, 0x7FF0)}


def _key(score: torch.Tensor, width: int) -> torch.Tensor:
    """``|score|`` as an integer of ``width`` bits that orders like the value; -0.0 == +0.0."""
    dtype = torch.float64 if width == 64 else torch.float32
    return score.detach().to(dtype).view(_WIDTHS[width][0]) & ((1 << (width - 1)) - 1)


def _kth_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest element (1-based k) and how many of it are taken."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)).item())
    below = int(cum[b - 1].item()) if b > 0 else 0
    return b, k - below


def prefix_end(flags: torch.Tensor, n: int) -> int:
    """Length of the shortest prefix of ``flags`` (bool, flat order) holding ``n >= 1`` True
    entries; there must be at least ``n``.

    Counted slice by slice: a cumsum or ``nonzero`` over the whole tensor would cost 8-16 bytes
    per entry in int64.
    """
    flat, left = flags.reshape(-1), n
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        found = int(part.count_nonzero())
        if found >= left:
            return start + int(part.nonzero()[left - 1]) + 1
        left -= found
    raise ValueError(f"fewer than {n} True entries")  # callers count first: never reached


def smallest_k(
    scores: Callable[[int], torch.Tensor],
    alive: Sequence[torch.Tensor],
    k: int,
    names: Sequence[str] | None = None,
    *,
    wide: bool = False,
) -> list[torch.Tensor]:
    """Select exactly ``k`` alive entries with the smallest scores across several tensors.

    Args:
        scores: ``scores(i)`` returns the scores of tensor ``i``, ranked by absolute value; it is
            called up to three (``wide``: five) times per tensor and must return the same
            values each time.
        alive: bool tensors; only True entries are candidates.
        k: how many entries to select, ``0 <= k <= total alive``.
        names: tensor names for error messages.
        wide: some scores are float64: rank on 64-bit keys (four passes instead of two), or
            float64 scores would be rounded to float32 and ties would appear.

    Returns:
        One bool tensor per input, True where the entry is selected; exactly ``k`` in total.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(alive))]
    total = sum(int(a.count_nonzero()) for a in alive)  # a.sum() would copy a to int64
    if not 0 <= k <= total:
        raise ValueError(f"cannot select {k} of {total} alive entries")
    if k == 0:
        return [torch.zeros_like(a, dtype=torch.bool) for a in alive]
    if k == total:
        return [a.clone().bool() for a in alive]
    device = alive[0].device
    width = 64 if wide else 32
    levels, nonfinite = width // 16, _WIDTHS[width][1]
    hist = torch.zeros(_BINS + 1, dtype=torch.int64, device=device)
    for i, a in enumerate(alive):
        hi = torch.where(a, _key(scores(i), width) >> (width - 16), _DEAD)
        counts = torch.bincount(hi.reshape(-1).to(device), minlength=_BINS + 1)
        if counts[nonfinite:_DEAD].any():
            raise ValueError(f"scores of tensor {names[i]!r} contain NaN or inf; cannot rank them")
        hist += counts
        del hi  # before the next tensor's keys exist: one tensor's temporaries at a time
    prefix, left = _kth_bin(hist, k)
    for level in range(1, levels):  # the next 16 bits, among entries whose higher bits match
        shift = width - 16 * (level + 1)
        hist.zero_()
        for i, a in enumerate(alive):
            key = _key(scores(i), width)
            digits = key[a & ((key >> (shift + 16)) == prefix)] >> shift & _LOW
            hist += torch.bincount(digits.to(device), minlength=_BINS + 1)
            del key, digits
        digit, left = _kth_bin(hist, left)
        prefix = prefix << 16 | digit
    threshold, ties_left = prefix, left
    selected = []
    for i, a in enumerate(alive):
        bits = _key(scores(i), width)
        chosen = a & (bits < threshold)
        if ties_left:
            tie = a & (bits == threshold)
            n_tie = int(tie.count_nonzero())
            if n_tie > ties_left:  # only the first ties_left ties in flat order
                flat = tie.reshape(-1)  # a view, or a row-major copy of a strided tie
                flat[prefix_end(flat, ties_left) :] = False
                tie = flat.view(tie.shape)
            chosen |= tie
            del tie
            ties_left -= min(n_tie, ties_left)
        selected.append(chosen)
    return selected
