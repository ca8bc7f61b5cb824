"""signmask.analysis plots: PNG files written atomically; matplotlib imported only to plot."""

import os

import pytest
import torch

from signmask import analysis
from signmask.analysis import _plots

from _util import tiny

PNG = b"\x89PNG\r\n\x1a\n"
BARRIER = analysis.Barrier((0.0, 0.5, 1.0), (0.2, 0.9, 0.3), (0.05, 0.4, 0.1))


def telemetry(finish=True):
    model = tiny(0)
    rec = analysis.Telemetry(model)
    for step in range(3):
        with torch.no_grad():
            model.fc.weight.add_(0.1)
        rec.record(step)
    if finish:
        rec.finish()
    return rec


def calls():
    return [
        lambda path: analysis.plot_interpolation({"IMP": BARRIER, "AWS": BARRIER}, path),
        lambda path: analysis.plot_sparsity_accuracy({"IMP": [(0.8, 0.9), (0.0, 0.92)], "random": [(0.5, 0.7)]}, path),
        lambda path: analysis.plot_telemetry(telemetry(), path),
        lambda path: analysis.plot_telemetry(telemetry(finish=False), path, layer="fc.weight"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_plots_write_png_atomically(tmp_path, index):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")  # replaced, not appended to
    out = calls()[index](str(path))
    assert out == path
    assert path.read_bytes().startswith(PNG)
    assert os.listdir(tmp_path) == ["figure.png"]  # no temp file left


def _drawn(index, labels, tmp_path, monkeypatch):
    """The figure plot_interpolation (index 0) or plot_sparsity_accuracy (1) draws for ``labels``."""
    figures = []
    monkeypatch.setattr(_plots, "_write", lambda fig, path, fmt: figures.append(fig) or path)
    if index == 0:
        analysis.plot_interpolation(dict.fromkeys(labels, BARRIER), tmp_path / "lmc.png")
    else:
        analysis.plot_sparsity_accuracy({k: [(0.01 * i, 0.5)] for i, k in enumerate(labels)}, tmp_path / "s.png")
    (fig,) = figures
    return fig


@pytest.mark.parametrize("index", range(2))
def test_many_labels_leave_the_curves_visible(tmp_path, monkeypatch, index):
    # Seven labels, as aws_reproduction draws: each legend must sit outside every axes' area.
    labels = [f"network {i} with a long label <-> its solution" for i in range(7)]
    fig = _drawn(index, labels, tmp_path, monkeypatch)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert len(ax.get_legend().get_texts()) == 7
        assert all(not legend.overlaps(other.get_window_extent(renderer)) for other in fig.axes)


def test_plot_telemetry_of_one_layer_names_it_in_every_panel(tmp_path, monkeypatch):
    # The sign panel of one layer's figure looked like the whole model's (only two panels said).
    figures = []
    monkeypatch.setattr(_plots, "_write", lambda fig, path, fmt: figures.append(fig) or path)
    analysis.plot_telemetry(telemetry(), tmp_path / "t.png", layer="fc.weight")
    analysis.plot_telemetry(telemetry(), tmp_path / "t.png")
    one, every = ([ax.get_title() for ax in fig.axes] for fig in figures)
    assert len(one) == 3 and all(title.endswith(" (fc.weight)") for title in one)
    assert [title + " (fc.weight)" for title in every] == one


@pytest.mark.parametrize("index", range(2))
def test_every_curve_of_many_looks_different(tmp_path, monkeypatch, index):
    # aws_reproduction's sparsity plot has 11 curves; matplotlib's cycle has 10 colours.
    fig = _drawn(index, [f"curve {i}" for i in range(25)], tmp_path, monkeypatch)
    for ax in fig.axes:
        looks = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(looks) == 25 and len(set(looks)) == 25
        assert looks[0] == ("C0", "o", "-")  # up to 10 curves look as they always did


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        analysis.plot_interpolation({"IMP": BARRIER}, tmp_path / "lmc.png")
    assert os.listdir(tmp_path) == []


def test_bad_inputs_raise(tmp_path):
    png = tmp_path / "x.png"
    with pytest.raises(ValueError, match="non-empty mapping"):
        analysis.plot_interpolation({}, png)
    with pytest.raises(TypeError, match=r"barriers\['a'\] must be a Barrier"):
        analysis.plot_interpolation({"a": (0.0, 1.0)}, png)
    with pytest.raises(TypeError, match="labels must be str"):
        analysis.plot_interpolation({1: BARRIER}, png)
    with pytest.raises(ValueError, match=r"\(sparsity, accuracy\) in \[0, 1\]"):
        analysis.plot_sparsity_accuracy({"a": [(0.5, 90.0)]}, png)
    with pytest.raises(ValueError, match=r"non-empty sequence of \(sparsity, accuracy\), got list \[\]"):
        analysis.plot_sparsity_accuracy({"a": []}, png)
    with pytest.raises(ValueError, match=r"curves\['a'\] must be a non-empty sequence .*, got str '0.5, 0.9'"):
        analysis.plot_sparsity_accuracy({"a": "0.5, 0.9"}, png)
    with pytest.raises(ValueError, match="telemetry has no records"):
        analysis.plot_telemetry(analysis.Telemetry(tiny(0)), png)
    with pytest.raises(TypeError, match="Telemetry"):
        analysis.plot_telemetry(BARRIER, png)
    with pytest.raises(ValueError, match="unknown layer"):
        analysis.plot_telemetry(telemetry(), png, layer="nope")
    with pytest.raises(ValueError, match="must end in one of"):
        analysis.plot_interpolation({"a": BARRIER}, tmp_path / "x.txt")
    with pytest.raises(ValueError, match="names a folder, not a file"):
        analysis.plot_interpolation({"a": BARRIER}, str(tmp_path / "x.png") + os.sep)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file' is not a folder"):
        analysis.plot_interpolation({"a": BARRIER}, tmp_path / "file" / "x.png")
    with pytest.raises(TypeError, match="Barrier"):  # refused before any folder is made
        analysis.plot_interpolation({"a": 1}, tmp_path / "missing" / "x.png")
    with pytest.raises(TypeError, match="path"):
        analysis.plot_interpolation({"a": BARRIER}, 3)
    assert os.listdir(tmp_path) == ["file"]


def test_the_public_front_is_explicit():
    assert all(hasattr(analysis, name) for name in analysis.__all__)
    public = {n for n in dir(analysis) if not n.startswith("_")}
    assert public <= set(analysis.__all__)


@pytest.mark.parametrize("index", range(4))
def test_plot_creates_missing_folders_as_save_does(tmp_path, index):
    # every plot's docstring says so
    path = tmp_path / "figs" / "deep" / "lmc.png"
    assert calls()[index](path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_telemetry_waits_for_finish_to_cover_records_added_after_it(tmp_path, monkeypatch):
    rec = telemetry()
    with torch.no_grad():
        rec.model.fc.weight.add_(0.1)
    rec.record(3)
    with pytest.raises(ValueError, match=r"dist_final is unknown at steps \[3\], recorded after the last finish"):
        analysis.plot_telemetry(rec, tmp_path / "t.png")
    assert os.listdir(tmp_path) == []
    rec.finish()
    figures = []
    monkeypatch.setattr(_plots, "_write", lambda fig, path, fmt: figures.append(fig) or path)
    analysis.plot_telemetry(rec, tmp_path / "t.png")
    dist = figures[0].axes[1].get_lines()
    assert [line.get_label() for line in dist] == ["to init", "to final"]
    assert list(dist[1].get_ydata()) == rec.series("dist_final")
