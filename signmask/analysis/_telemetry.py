"""Early-phase telemetry: how far weights move from their init (Frankle et al. 2020).

:class:`Telemetry` records, per conv/linear weight and over all of them, the fraction of
weights whose sign changed since init, the L2 distance and the cosine similarity to init, and
(after :meth:`Telemetry.finish`) the distance and cosine similarity to the final weights.

Weights are compared as the forward uses them (masked, sign-locked) and only where the mask
keeps them, so pruned zeros neither count as sign changes nor move the distances; a dense
tensor counts every entry. A sign "changes" when ``torch.sign`` differs (a weight that became
exactly 0 has changed). Sums run in float64 on CPU.

Memory: the init snapshot holds one CPU copy of the tracked weights; every record adds another
copy (and a 1-byte-per-weight mask for pruned tensors) unless ``keep_snapshots=False`` (then
:meth:`Telemetry.finish` is unavailable). Use ``every=k`` to keep one record per k steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .. import _reparam
from .._checks import check_bool, check_int, check_key, check_model, some
from ._common import kept_mask, weights

METRICS = ("sign_changed", "dist_init", "cos_init", "dist_final", "cos_final")


@dataclasses.dataclass(frozen=True)
class Stats:
    """Movement of one tensor (or of all tracked tensors) at one step.

    Args:
        sign_changed: fraction in [0, 1] of counted weights whose sign differs from init
            (``torch.sign``: a weight initialized to exactly 0 counts once it moves).
        dist_init: L2 distance to init, >= 0.
        cos_init: cosine similarity to init, in [-1, 1] (NaN when a side is all zero).
        dist_final, cos_final: the same to the final weights, None until ``finish()`` (runs
            again, for a record added after it).

    Raises:
        ValueError: a value outside its range (NaN passes: a diverged weight).

    Example:
        >>> from signmask.analysis import Stats
        >>> Stats(0.0, 0.0, 1.0)
        Stats(sign_changed=0.0, dist_init=0.0, cos_init=1.0, dist_final=None, cos_final=None)
    """

    sign_changed: float
    dist_init: float
    cos_init: float
    dist_final: float | None = None
    cos_final: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.sign_changed <= 1.0 or math.isnan(self.sign_changed)):
            raise ValueError(f"sign_changed must be in [0, 1], got {self.sign_changed}")
        for name in ("dist_init", "dist_final"):
            value = getattr(self, name)
            if value is not None and not (value >= 0.0 or math.isnan(value)):  # NaN: diverged
                raise ValueError(f"{name} must be >= 0 or NaN, got {value}")
        for name in ("cos_init", "cos_final"):
            value = getattr(self, name)
            if value is not None and not (-1.0 <= value <= 1.0 or math.isnan(value)):
                raise ValueError(f"{name} must be in [-1, 1] or NaN, got {value}")


@dataclasses.dataclass(frozen=True)
class Record:
    """The :class:`Stats` of every tracked tensor (``layers``) and of all together (``total``).

    Args:
        step: the training step recorded.
        layers: canonical tensor name -> its :class:`Stats`.
        total: the :class:`Stats` of all tracked tensors together.

    Example:
        >>> import torch
        >>> from signmask.analysis import Telemetry
        >>> rec = Telemetry(torch.nn.Linear(2, 2))
        >>> rec.record(0)
        True
        >>> r = rec.records[0]
        >>> r.step, list(r.layers), r.total.sign_changed
        (0, ['weight'], 0.0)
    """

    step: int
    layers: Mapping[str, Stats]
    total: Stats


class _Sums:
    """Float64 sums over the counted entries of two tensors ``x`` (now) and ``y`` (reference)."""

    def __init__(self) -> None:
        self.count = self.changed = 0
        self.d2 = self.xy = self.xx = self.yy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None) -> "_Sums":
        if keep is not None:
            x, y = x[keep], y[keep]
        x64, y64 = x.reshape(-1).double(), y.reshape(-1).double()
        self.count += x64.numel()
        self.changed += int((torch.sign(x64) != torch.sign(y64)).sum())
        diff = x64 - y64
        self.d2 += float(diff @ diff)
        self.xy += float(x64 @ y64)
        self.xx += float(x64 @ x64)
        self.yy += float(y64 @ y64)
        return self

    def merge(self, other: "_Sums") -> "_Sums":
        """Add ``other``'s sums into these (a total built from per-tensor sums) and return self."""
        for field, value in vars(other).items():  # every field: a sum added later merges too
            setattr(self, field, getattr(self, field) + value)
        return self

    def distance(self) -> float:
        return math.sqrt(self.d2)

    def cosine(self) -> float:
        denom = math.sqrt(self.xx * self.yy)  # sqrt(v * v) == v exactly: cosine(w, w) == 1.0
        cos = self.xy / denom if denom != 0.0 else math.nan
        # Clamped against rounding; NaN (a diverged weight) must pass: min(1.0, nan) is 1.0.
        return cos if math.isnan(cos) else max(-1.0, min(1.0, cos))

    def fraction(self) -> float:
        return self.changed / self.count if self.count else math.nan


def _compare(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
             ) -> tuple[dict[str, _Sums], _Sums]:
    """The sums of each ``(now, reference, keep)`` triple, and of all of them together."""
    layers, total = {}, _Sums()
    for key, (x, y, keep) in pairs.items():
        layers[key] = _Sums().add(x, y, keep)
        # a fresh _Sums holds exactly this tensor's terms, so merging adds the same numbers
        # in the same order as a second add() would, without computing them twice
        total.merge(layers[key])
    return layers, total


def _both(keep: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    """The entries two masks both keep (None: a dense tensor, which keeps every entry)."""
    return keep if other is None else (other if keep is None else keep & other)


def _to_init(sums: _Sums) -> Stats:
    return Stats(sums.fraction(), sums.distance(), sums.cosine())


def _with_final(stats: Stats, sums: _Sums) -> Stats:
    return dataclasses.replace(stats, dist_final=sums.distance(), cos_final=sums.cosine())


class Telemetry:
    """Record how the conv/linear weights of ``model`` move away from their init.

    Creating it snapshots the weights as the init; call :meth:`record` during training and
    :meth:`finish` at the end. Each record holds, per tensor and over all of them, the fraction
    of weights whose sign changed since init (``torch.sign`` differs; a weight that became 0
    has changed), the L2 distance and the cosine similarity to init; ``finish`` adds the
    distance and cosine similarity to the final weights. Weights are compared as the forward
    uses them (masked, sign-locked) and only where the mask keeps them; sums run in float64.

    Training may go on after :meth:`finish`: records added later have no final distances
    (``None``) until ``finish`` runs again, which compares every record with the weights then;
    meanwhile :meth:`series` of a final metric raises, naming those records' steps.

    Memory: one CPU copy of the tracked weights for the init, and one more per record (plus a
    1-byte mask per pruned weight) unless ``keep_snapshots=False`` (then no ``finish``); use
    ``every=k`` to keep one record per k steps.

    Args:
        model: the model being trained (read at every :meth:`record`).
        every: record only steps that are multiples of ``every``.
        names: canonical tensor names to track (default: every conv/linear weight).
        keep_snapshots: keep a CPU copy of the weights of every record, for :meth:`finish`.

    Raises:
        TypeError / ValueError: bad ``model``, ``every < 1``, or unknown ``names``; a stock
            prune mask holding values other than 0 and 1 (``custom_from_mask`` takes any).

    Example:
        >>> import torch
        >>> from signmask.analysis import Telemetry
        >>> net = torch.nn.Linear(4, 4)
        >>> rec = Telemetry(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.neg_()
        >>> rec.record(1)
        True
        >>> rec.records[-1].total.sign_changed, rec.records[-1].total.cos_init
        (1.0, -1.0)
    """

    def __init__(self, model: nn.Module, *, every: int = 1, names: Iterable[str] | None = None,
                 keep_snapshots: bool = True) -> None:
        self.model = check_model(model, "model")
        self.every = check_int(every, "every", minimum=1)
        self.keep_snapshots = check_bool(keep_snapshots, "keep_snapshots")
        self._targets = weights(model, names)
        self._init = {k: w for k, (w, _) in self._read(model, self._targets).items()}
        self._snapshots: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        self._records: list[Record] = []
        self._finished = False

    @staticmethod
    def _read(model: nn.Module, targets: Mapping[str, tuple[nn.Module, str]], owner: str | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        out = {}
        for key, (module, name) in targets.items():
            mask = kept_mask(key, module, name, owner)
            out[key] = (_reparam.effective(module, name).to("cpu", copy=True),
                        None if mask is None else mask.to("cpu", copy=True))
        return out

    @property
    def records(self) -> tuple[Record, ...]:
        """The records so far, in step order."""
        return tuple(self._records)

    @property
    def steps(self) -> tuple[int, ...]:
        """The recorded steps."""
        return tuple(r.step for r in self._records)

    def record(self, step: int) -> bool:
        """Record the weights' movement at ``step`` if it is a multiple of ``every``.

        Args:
            step: the training step, an int >= 0, larger than every step recorded before.

        Returns:
            True when a record was added.

        Raises:
            TypeError / ValueError: ``step`` is not an int, negative, or not increasing; a
                stock prune mask holds values other than 0 and 1 (given since).

        Example:
            >>> import torch
            >>> from signmask.analysis import Telemetry
            >>> rec = Telemetry(torch.nn.Linear(2, 2), every=10)
            >>> rec.record(5), rec.record(10), rec.steps
            (False, True, (10,))
        """
        step = check_int(step, "step", minimum=0)
        if self._records and step <= self._records[-1].step:
            raise ValueError(f"step must increase: got {step} after {self._records[-1].step}")
        if step % self.every:
            return False
        now = self._read(self.model, self._targets)
        layers, total = _compare({key: (w, self._init[key], keep) for key, (w, keep) in now.items()})
        self._records.append(Record(step, {key: _to_init(sums) for key, sums in layers.items()},
                                    _to_init(total)))
        if self.keep_snapshots:
            self._snapshots.append(now)
        return True

    def finish(self, final: nn.Module | None = None) -> tuple[Record, ...]:
        """Add the distance and cosine similarity to the final weights to every record.

        Entries count where both the record's and the final mask keep them. It may run again
        (after more records): every record is then compared with the new final weights.

        Args:
            final: the trained model (default: the tracked model as it is now).

        Returns:
            The updated records.

        Raises:
            TypeError: ``final`` is not an ``nn.Module``.
            ValueError: ``keep_snapshots=False``, ``final`` lacks a tracked tensor (another
                architecture) or its tensors have other shapes, or a stock prune mask of
                ``final`` holds values other than 0 and 1.

        Example:
            >>> import torch
            >>> from signmask.analysis import Telemetry
            >>> net = torch.nn.Linear(4, 4)
            >>> rec = Telemetry(net)
            >>> rec.record(0)
            True
            >>> rec.finish()[0].total.dist_final  # nothing moved yet
            0.0
        """
        if not self.keep_snapshots:
            raise ValueError(
                "finish() needs the records' weights: create Telemetry with keep_snapshots=True"
            )
        final = self.model if final is None else check_model(final, "final")
        found = weights(final, arg="final")
        missing = [key for key in self._targets if key not in found]
        if missing:  # the user's names= (if any) were checked against the tracked model
            raise ValueError(
                f"final ({type(final).__name__}) lacks {len(missing)} of the {len(self._targets)} "
                f"conv/linear weights this Telemetry tracks, {some(missing)}; final has "
                f"{some(sorted(found))}: finish() compares with a model of the tracked one's architecture"
            )
        targets = {key: found[key] for key in self._targets}
        last = self._read(final, targets, "final")
        for key, (w, _) in last.items():
            if w.shape != self._init[key].shape:
                raise ValueError(f"{key!r} has shape {tuple(w.shape)} in final, "
                                 f"{tuple(self._init[key].shape)} when tracked")
        updated = []
        for rec, snap in zip(self._records, self._snapshots):
            pairs = {}
            for key, (w, keep) in snap.items():
                final_w, final_keep = last[key]
                pairs[key] = (w, final_w, _both(keep, final_keep))
            layers, total = _compare(pairs)
            updated.append(Record(rec.step, {key: _with_final(rec.layers[key], sums)
                                             for key, sums in layers.items()},
                                  _with_final(rec.total, total)))
        self._records = updated
        self._finished = True
        return self.records

    def series(self, metric: str, layer: str | None = None) -> list[float]:
        """Return one metric over the recorded steps, for one tensor or (``layer=None``) all.

        Args:
            metric: one of ``"sign_changed"``, ``"dist_init"``, ``"cos_init"``, ``"dist_final"``,
                ``"cos_final"``.
            layer: a tracked tensor's canonical name, or None for all tracked tensors together.

        Returns:
            One value per record, in step order.

        Raises:
            TypeError: ``metric`` is not a str.
            ValueError: unknown ``metric`` or ``layer``, or a final metric before :meth:`finish`
                or while records added after the last ``finish`` lack it.

        Example:
            >>> import torch
            >>> from signmask.analysis import Telemetry
            >>> net = torch.nn.Linear(4, 4)
            >>> rec = Telemetry(net)
            >>> for step in range(3):
            ...     with torch.no_grad():
            ...         _ = net.weight.mul_(-1)
            ...     _ = rec.record(step)
            >>> rec.series("sign_changed")
            [1.0, 0.0, 1.0]
        """
        check_key(metric, METRICS, "metric", "metric")
        if layer is not None and layer not in self._targets:
            raise ValueError(f"unknown layer {layer!r}; tracked: {list(self._targets)[:5]}")
        values = [getattr(r.total if layer is None else r.layers[layer], metric) for r in self._records]
        missing = [r.step for r, v in zip(self._records, values) if v is None]
        if missing and not self._finished:
            raise ValueError(f"{metric} is known only after finish()")
        if missing:
            raise ValueError(f"{metric} is unknown at steps {missing[:5]}, recorded after the last "
                             "finish(): call finish() again to compare every record with the final "
                             "weights")
        return values

