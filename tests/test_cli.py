"""python -m signmask inspect."""

import os
import subprocess
import sys

import pytest
import torch

import signmask
from signmask import _cli
from _util import tiny


def test_inspect_prints_metadata_and_per_layer_table(tmp_path):
    model = signmask.prune(tiny(), 0.5)
    ticket = signmask.extract(model, metadata={"rounds": "1"})
    path = signmask.save(ticket, tmp_path / "t.safetensors")
    out = subprocess.run([sys.executable, "-m", "signmask", "inspect", str(path)], capture_output=True, text=True, check=True).stdout
    assert "method: magnitude" in out and "architecture: TinyNet" in out and "rounds: 1" in out
    assert f"torch {torch.__version__}" in out
    assert f"sparsity: {ticket.sparsity:.4f} ({ticket.kept} of {ticket.numel} weights kept, 3 masked tensors)" in out
    m = ticket.masks["conv2.weight"]
    kept, neg = int(m.count_nonzero()), int((m < 0).sum())
    row = next(line for line in out.splitlines() if line.startswith("conv2.weight"))
    assert row.split() == ["conv2.weight", "6x6x3x3", f"{kept}/{m.numel()}", f"{1 - kept / m.numel():.4f}", f"{100 * neg / kept:.1f}"]


def test_inspect_counts_the_norm_parameters(tmp_path):
    model = signmask.prune(tiny(), 0.5)
    path = signmask.save(signmask.extract(model, norms=True), tmp_path / "t.safetensors")
    assert "  norm parameters: 4 tensors, 24 values (float32)" in _cli.inspect(str(path)).splitlines()
    plain = signmask.save(signmask.extract(model), tmp_path / "p.safetensors")
    assert "norm parameters" not in _cli.inspect(str(plain))


def test_inspect_bad_file_exits_1_with_message(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    proc = subprocess.run([sys.executable, "-m", "signmask", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "bad.safetensors" in proc.stderr and proc.stdout == ""


def test_inspect_shows_versions_metadata_that_is_not_json_as_it_is(tmp_path):
    for i, text in enumerate(["torch 2.1", "[1, 2]"]):
        ticket = signmask.extract(signmask.prune(tiny(), 0.5), metadata={"versions": text})
        path = signmask.save(ticket, tmp_path / f"v{i}.safetensors")
        assert f"  versions: {text}" in signmask._cli.inspect(str(path))


# ---------------------------------- _cli: behaviour pinned by mutation testing


def test_inspect_missing_file_exits_1_with_a_message(tmp_path, capsys):
    # C02: FileNotFoundError (an OSError) is reported, not raised
    assert _cli.main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.safetensors" in err


def test_inspect_table_shows_an_empty_tensor_with_sparsity_0_as_layer_sparsity_does(tmp_path):
    # C04: 0-element tensors must not divide by zero; and Ticket.layer_sparsity() documents 0.0
    t = signmask.Ticket({"a.weight": torch.tensor([1, 0, -1, 1]), "e.weight": torch.zeros(0, 3, dtype=torch.int8)},
                        {"e.bias": torch.zeros(0, dtype=torch.int8)})
    assert t.layer_sparsity()["e.weight"] == 0.0
    lines = _cli.inspect(str(signmask.save(t, tmp_path / "t.safetensors"))).splitlines()
    assert next(line for line in lines if line.startswith("e.weight")).split() == ["e.weight", "0x3", "0/0", "0.0000", "-"]
    assert lines[-1].split() == ["e.bias", "(dense", "sign)", "0", "0/0", "0.0000", "-"]


def test_inspect_lists_metadata_keys_sorted(tmp_path):
    # C05
    t = signmask.Ticket({"a.weight": torch.tensor([1, 0])}, {}, {"zeta": "1", "alpha": "2", "mid": "3"})
    lines = _cli.inspect(str(signmask.save(t, tmp_path / "t.safetensors"))).splitlines()
    keys = [line.split(":")[0].strip() for line in lines[1:] if line.startswith("  ") and not line.startswith("  sparsity")]
    assert keys == ["alpha", "mid", "zeta"]


def _inspect(tmp_path, ticket):
    return _cli.inspect(str(signmask.save(ticket, tmp_path / "t.safetensors")))


def test_inspect_table_lists_dense_signs_after_the_masks(tmp_path):
    t = signmask.Ticket({"a.weight": torch.tensor([1, 0, -1, 1])}, {"a.bias": torch.tensor([1, -1, -1])})
    rows = [line.split() for line in _inspect(tmp_path, t).splitlines()[-2:]]
    assert rows == [["a.weight", "4", "3/4", "0.2500", "33.3"],
                    ["a.bias", "(dense", "sign)", "3", "3/3", "0.0000", "66.7"]]


def test_inspect_shows_deeply_nested_versions_metadata_as_it_is(tmp_path):
    # json.loads raises RecursionError, not ValueError, on deep nesting
    text = "[" * 100_000
    t = signmask.Ticket({"a.weight": torch.tensor([1, 0])}, {}, {"versions": text})
    assert f"  versions: {text}" in _inspect(tmp_path, t).splitlines()


def test_inspect_table_columns_line_up(tmp_path):
    # names left-aligned, numbers right-aligned, the header counted in every width
    t = signmask.Ticket({"a.weight": torch.tensor([1, 0, -1, 1]), "long.name.weight": torch.ones(2, 3, dtype=torch.int8)})
    table = _inspect(tmp_path, t).splitlines()[-4:]
    assert len({len(line) for line in table}) == 1
    assert not any(line.endswith(" ") for line in table)
    assert table[2].startswith("a.weight ") and table[3].startswith("long.name.weight ")


def test_inspect_table_names_a_0_d_tensor_scalar(tmp_path):
    row = _inspect(tmp_path, signmask.Ticket({"s.weight": torch.tensor(-1)})).splitlines()[-1]
    assert row.split() == ["s.weight", "scalar", "1/1", "0.0000", "100.0"]


def test_inspect_corrupt_file_returns_1_with_a_message_not_a_traceback(tmp_path, capsys):
    # a ValueError from load (not an OSError) is reported too
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert _cli.main(["inspect", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "bad.safetensors" in captured.err and captured.out == ""


def test_inspect_into_a_closed_pipe_returns_0(tmp_path, monkeypatch):
    # `python -m signmask inspect t | head`: the reader went away; not an error
    path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1, 0])}), tmp_path / "t.safetensors")

    def closed(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    monkeypatch.setattr(_cli, "print", closed, raising=False)
    assert _cli.main(["inspect", str(path)]) == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_inspect_onto_a_full_disk_says_so_in_one_line(tmp_path):
    # Only BrokenPipeError was caught: the write error of a full disk ended in a traceback.
    path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1, 0])}), tmp_path / "t.safetensors")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "signmask", "inspect", str(path)], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == "error: cannot write the table: [Errno 28] No space left on device\n"
