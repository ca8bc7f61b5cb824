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


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One torchrun of two gloo ranks for the DDP tests (a launch costs seconds): its folder."""
    out = tmp_path_factory.mktemp("ddp")
    # Rank 1 perturbs its weights before each pruning: only the broadcast keeps masks equal.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        "--nproc_per_node=2", str(HERE / "_ddp_worker.py"), str(out), "--perturb", "--ema",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_ddp_ranks_share_masks_and_alpha(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
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


def ema_oracle(run: dict) -> dict[str, torch.Tensor]:
    """ModelEmaV3(decay=0.5) by hand in float64: floating entries move halfway to the model after
    each step, others are copied. Keys are the EMA's after close (a norm's ``weight`` was
    ``weight_orig`` in the model); a pruned weight's is its effective weight ``orig * mask``."""
    out = {}
    for key in run["ema"]:
        src = key if key in run["start"] else key + "_orig"
        start = run["start"][src]
        if not start.is_floating_point():
            out[key] = run["steps"][-1][src]
            continue
        mask = run["steps"][0].get(key.removesuffix("_orig") + "_mask")
        ema = start.double()
        for step in run["steps"]:
            mask = step.get(key.removesuffix("_orig") + "_mask", mask)
            value = step[src].double()
            ema = ema + 0.5 * ((value if mask is None else value * mask) - ema)
        out[key] = ema if mask is None else ema * mask
    return out


def test_ddp_timm_order_ema_of_the_model_inside(ddp_run):
    # README (the layout is fixed up front): in timm's train.py order, apply on the DDP model,
    # then ModelEmaV3(unwrap_model(model)), ema.update(model) each step, search.close(ema.module).
    runs = [torch.load(ddp_run / f"ema{r}.pt", weights_only=True) for r in (0, 1)]
    for run in runs:
        assert run["interpolated"] == [True, False] and run["norms_are_parameters"]
        ema, last, oracle = run["ema"], run["steps"][-1], ema_oracle(run)
        assert ema.keys() == oracle.keys() and not any(k.endswith("_init") for k in ema)
        masks = [k for k in last if k.endswith("_mask")]
        assert masks and not all(last[k].all() for k in masks)  # pruned in round 1
        for key in masks:
            assert torch.equal(ema[key], last[key]), key
        for key, value in ema.items():
            if not value.is_floating_point():  # masks, num_batches_tracked: copied
                assert torch.equal(value, oracle[key]), key
                continue
            mask = ema.get(key.removesuffix("_orig") + "_mask")
            mine = value.double() if mask is None else value.double() * mask
            torch.testing.assert_close(mine, oracle[key], rtol=1e-5, atol=1e-6, msg=key)
    # Every rank trained the same weights (DDP) into the same EMA; running statistics are
    # each rank's own, as in timm (its train.py averages them with distribute_bn).
    for key, value in runs[0]["ema"].items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(value, runs[1]["ema"][key]), key
