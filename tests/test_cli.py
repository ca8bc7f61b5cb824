"""python -m signmask inspect."""

import subprocess
import sys

import torch

import signmask
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
