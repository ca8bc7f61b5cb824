"""Figures of the analyses, written atomically (matplotlib, imported only when plotting).

Every function validates its input first, draws on a standalone ``matplotlib.figure.Figure``
with the Agg canvas (pyplot and the global backend are left alone), renders to memory and writes
the file through a temp file in the same folder and ``os.replace``: a reader never sees a
partial file and a failed call leaves no file behind. The format follows the suffix of ``path``.
"""

from __future__ import annotations

import io
import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._files import check_file_path, make_folder, write_atomic
from ._connectivity import Barrier
from ._telemetry import Telemetry

_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    path = check_file_path(path)
    fmt = path.suffix[1:].lower()
    if fmt not in _FORMATS:
        raise ValueError(f"path must end in one of {['.' + f for f in _FORMATS]}, got {str(path)!r}")
    return path, fmt


def _check_mapping(value: Any, arg: str) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a mapping of label -> data, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{arg} must be a non-empty mapping of label -> data, got {value!r}")
    for label in value:
        if not isinstance(label, str):
            raise TypeError(f"{arg} labels must be str, got {type(label).__name__} {label!r}")


def figure(ncols: int, entries: int = 0, *, height: float = 4.0):
    """A figure of ``ncols`` axes, taller by a line per legend entry (legends go below)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(5 * ncols, height + 0.22 * entries), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _legend_below(ax) -> None:
    # Below the axes, not over them: with many labels an inside legend hides the curves.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small")


# Past matplotlib's 10 colours a curve would repeat an earlier one's look: each further round
# of colours gets another marker and line style.
_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))


def _style(i: int) -> dict:
    """Plot keywords of curve ``i``: a colour, marker and line style no other of 40 curves has."""
    marker, linestyle = _STYLES[(i // 10) % len(_STYLES)]
    return {"color": f"C{i % 10}", "marker": marker, "linestyle": linestyle}


def render(fig, fmt: str) -> bytes:
    """The figure as a file of format ``fmt``, in memory: nothing is written if drawing fails."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    return buf.getvalue()


def _write(fig, path: Path, fmt: str) -> Path:
    data = render(fig, fmt)
    make_folder(path)  # as signmask.save does
    return write_atomic(path, data)


def plot_interpolation(barriers: Mapping[str, Barrier], path: str | os.PathLike) -> Path:
    """Plot test error and loss along each interpolation path, one line per label.

    Args:
        barriers: label -> :class:`Barrier` (from :func:`barrier` or :func:`instability`).
        path: the file to write (``.png``, ``.pdf``, ``.svg``, ``.jpg``); missing folders are
            created.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError / ValueError: an empty mapping, a non-str label, a value that is no
            ``Barrier``, or a bad path.
        NotADirectoryError: a folder above ``path`` is a file (missing folders are created).
        IsADirectoryError: ``path`` is a folder.
        ImportError: matplotlib is not installed.

    Example:
        >>> import tempfile, os
        >>> from signmask import analysis
        >>> b = analysis.Barrier((0.0, 0.5, 1.0), (0.2, 0.6, 0.2), (0.1, 0.3, 0.1))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     analysis.plot_interpolation({"IMP": b}, os.path.join(d, "lmc.png")).name
        'lmc.png'
    """
    _check_mapping(barriers, "barriers")
    for label, b in barriers.items():
        if not isinstance(b, Barrier):
            raise TypeError(f"barriers[{label!r}] must be a Barrier, got {type(b).__name__}")
    path, fmt = _check_path(path)
    fig, (ax_err, ax_loss) = figure(2, len(barriers))
    for i, (label, b) in enumerate(barriers.items()):
        ax_err.plot(b.alphas, [100 * e for e in b.errors], **_style(i),
                    label=f"{label} (barrier {100 * b.barrier:.2f}%)")
        ax_loss.plot(b.alphas, b.losses, **_style(i), label=f"{label} (barrier {b.loss_barrier:.3f})")
    ax_err.set(xlabel="interpolation alpha", ylabel="error (%)", title="error along the path")
    ax_loss.set(xlabel="interpolation alpha", ylabel="loss", title="loss along the path")
    _legend_below(ax_err)
    _legend_below(ax_loss)
    return _write(fig, path, fmt)


def _check_curve(label: str, points: Any) -> list[tuple[float, float]]:
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points:
        raise ValueError(f"curves[{label!r}] must be a non-empty sequence of (sparsity, accuracy), "
                         f"got {type(points).__name__} {points!r:.60}")
    out = []
    for point in points:
        if not isinstance(point, Sequence) or len(point) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
            for v in point
        ):
            raise ValueError(f"curves[{label!r}] holds {point!r}; expected (sparsity, accuracy) in [0, 1]")
        out.append((float(point[0]), float(point[1])))
    return sorted(out)


def plot_sparsity_accuracy(curves: Mapping[str, Sequence[tuple[float, float]]],
                           path: str | os.PathLike) -> Path:
    """Plot accuracy against sparsity, one line per label (points sorted by sparsity).

    Args:
        curves: label -> ``[(sparsity, accuracy), ...]``, both fractions in [0, 1].
        path: the file to write (``.png``, ``.pdf``, ``.svg``, ``.jpg``); missing folders are
            created.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError / ValueError: an empty mapping or curve, a non-str label, a value outside
            [0, 1], or a bad path.
        NotADirectoryError: a folder above ``path`` is a file (missing folders are created).
        IsADirectoryError: ``path`` is a folder.
        ImportError: matplotlib is not installed.

    Example:
        >>> import tempfile, os
        >>> from signmask import analysis
        >>> curves = {"IMP": [(0.0, 0.9), (0.8, 0.88)]}  # label -> [(sparsity, accuracy), ...]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     analysis.plot_sparsity_accuracy(curves, os.path.join(d, "s.png")).name
        's.png'
    """
    _check_mapping(curves, "curves")
    checked = {label: _check_curve(label, points) for label, points in curves.items()}
    path, fmt = _check_path(path)
    fig, (ax,) = figure(1, len(checked))
    for i, (label, points) in enumerate(checked.items()):
        ax.plot([100 * s for s, _ in points], [100 * a for _, a in points], **_style(i), label=label)
    ax.set(xlabel="sparsity (%)", ylabel="accuracy (%)", title="accuracy vs sparsity")
    _legend_below(ax)
    return _write(fig, path, fmt)


def plot_telemetry(telemetry: Telemetry, path: str | os.PathLike, *, layer: str | None = None) -> Path:
    """Plot a :class:`Telemetry`'s sign changes, distances and cosine similarities over steps.

    Distances and similarities to the final weights appear once :meth:`Telemetry.finish` ran;
    records added after it must wait for ``finish`` to run again (until then, ValueError).

    Args:
        telemetry: a recorder with at least one record.
        path: the file to write (``.png``, ``.pdf``, ``.svg``, ``.jpg``); missing folders are
            created.
        layer: one tracked tensor's name (default: all tracked tensors together).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError / ValueError: not a ``Telemetry``, no records, an unknown layer, records
            added after the last ``finish``, or a bad path.
        NotADirectoryError: a folder above ``path`` is a file (missing folders are created).
        IsADirectoryError: ``path`` is a folder.
        ImportError: matplotlib is not installed.

    Example:
        >>> import tempfile, os, torch
        >>> from signmask import analysis
        >>> net = torch.nn.Linear(4, 4)
        >>> rec = analysis.Telemetry(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.mul_(-1)
        >>> rec.record(1), len(rec.finish())
        (True, 1)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     analysis.plot_telemetry(rec, os.path.join(d, "early.png")).name
        'early.png'
    """
    if not isinstance(telemetry, Telemetry):
        raise TypeError(f"telemetry must be a Telemetry, got {type(telemetry).__name__}")
    if not telemetry.records:
        raise ValueError("telemetry has no records; call record(step) during training first")
    series = {"sign_changed": telemetry.series("sign_changed", layer),
              "dist_init": telemetry.series("dist_init", layer),
              "cos_init": telemetry.series("cos_init", layer)}
    # any record with final distances means finish() ran: series() refuses a partial curve
    if any(r.total.dist_final is not None for r in telemetry.records):
        series["dist_final"] = telemetry.series("dist_final", layer)
        series["cos_final"] = telemetry.series("cos_final", layer)
    path, fmt = _check_path(path)
    steps, of = telemetry.steps, f" ({layer})" if layer else ""
    fig, (ax_sign, ax_dist, ax_cos) = figure(3)
    ax_sign.plot(steps, [100 * v for v in series["sign_changed"]], "o-")
    ax_sign.set(xlabel="step", ylabel="weights with changed sign (%)",
                title="sign changes since init" + of)
    for ax, metric, what in ((ax_dist, "dist", "L2 distance"), (ax_cos, "cos", "cosine similarity")):
        for ref in ("init", "final"):
            if f"{metric}_{ref}" in series:
                ax.plot(steps, series[f"{metric}_{ref}"], "o-", label=f"to {ref}")
        ax.set(xlabel="step", ylabel=what, title=what + of)
        ax.legend()
    return _write(fig, path, fmt)
