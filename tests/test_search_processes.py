"""A search across processes: killed with SIGKILL and resumed, and under DDP with two ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import signmask

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "_resume_worker.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_round_then_resume_gives_identical_ticket(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    proc = worker(str(whole))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    proc = worker(str(killed), "--delay", "0.05")
    for line in proc.stdout:
        if line.split()[1:] == ["2", "2"]:  # round 2, two steps into it
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "ticket.safetensors").exists()
    state = torch.load(killed / "ckpt.pt", weights_only=True)["search"]
    assert state["in_round"] and state["round"] == 2 and 2 <= state["step"] - state["round_start_step"] < 5

    proc = worker(str(killed), "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    first = out.split("\n")[0].split()
    assert first[1] == "2" and int(first[2]) > 2  # it went on from the checkpoint, not from scratch
    # The same bytes (save writes the metadata in sorted order, whatever the process).
    a, b = ((d / "ticket.safetensors").read_bytes() for d in (whole, killed))
    assert a == b and signmask.load(whole / "ticket.safetensors").metadata["method"] == "aws"


def test_ddp_ranks_share_masks_and_alpha(tmp_path):
    # Rank 1 perturbs its weights before each pruning: only the broadcast keeps masks equal.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        "--nproc_per_node=2", str(HERE / "_ddp_worker.py"), str(tmp_path), "--perturb",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["alphas"] == r1["alphas"]
    assert len(set(r0["alphas"])) == len(r0["alphas"])  # a fresh a every step
    assert len(r0["masks"]) == 4  # 0.7 ** 3 = 0.34 < 0.4: three prunings, four rounds
    for m0, m1 in zip(r0["masks"] + [r0["ticket"]], r1["masks"] + [r1["ticket"]]):
        assert m0.keys() == m1.keys()
        for k in m0:
            assert torch.equal(m0[k] != 0, m1[k] != 0), k
    assert r0["stale"] == r1["stale"] == [0, 0, 0, 0]
    assert all(m.all() for m in r0["masks"][0].values())  # round 0 is dense
    assert not any(m.all() for m in r0["masks"][-1].values())
