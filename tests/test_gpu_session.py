"""benchmarks/gpu_session.py: the one command a GPU lease gets must keep its time limits and
bring back what finished, whatever a step does."""

import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_session  # noqa: E402


def _write(name: str) -> list[str]:
    """A step writing ``name`` into the results folder, as the benchmarks do."""
    code = f"import os, pathlib; (pathlib.Path(os.environ['SIGNMASK_RESULTS_DIR']) / {name!r}).write_text('x')"
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":  # killed, waiting for its (also killed) parent's parent to reap it
            return False
        time.sleep(0.05)
    return True


def _session(monkeypatch, tmp_path, plan, budget):
    results = tmp_path / "results"
    results.mkdir()
    (results / "old.json").write_text("committed earlier")
    os.utime(results / "old.json", (time.time() - 3600,) * 2)
    monkeypatch.setenv("SIGNMASK_RESULTS_DIR", str(results))
    monkeypatch.setattr(gpu_session, "steps", lambda dry, xdist: plan)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--budget", str(budget), "--out", str(out)])
    rc = gpu_session.main()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = sorted(tar.getnames())
        records = json.loads(tar.extractfile("session.json").read())
    return rc, out, names, records


def test_a_step_over_its_limit_is_stopped_and_the_others_still_run(monkeypatch, tmp_path):
    pid_file = tmp_path / "child.pid"
    sleeper = [sys.executable, "-c", "import pathlib, subprocess, sys, time; "
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid)); time.sleep(60)"]
    plan = [
        gpu_session.Step("first", _write("first.json"), cap_s=20, floor_s=1),
        gpu_session.Step("slow", sleeper, cap_s=2, floor_s=1),
        gpu_session.Step("last", _write("last.md"), cap_s=20, floor_s=1),
    ]
    t0 = time.monotonic()
    rc, out, names, records = _session(monkeypatch, tmp_path, plan, budget=60)
    assert time.monotonic() - t0 < 20  # the sleeper did not hold the session
    assert not _alive(int(pid_file.read_text()))  # nor did its child outlive it
    assert rc == 1
    assert [r["status"] for r in records] == ["ok", "stopped at its 2 s limit", "ok"]
    # Only what this session wrote, plus the log and the records; nothing older.
    assert names == ["results/first.json", "results/last.md", "session.json", "session.log"]
    log = (out / "session.log").read_text()
    assert "===== slow: stopped at its 2 s limit" in log and "===== last: ok" in log


def test_later_steps_keep_their_floor_and_a_step_without_its_floor_is_skipped(monkeypatch, tmp_path):
    plan = [
        gpu_session.Step("big", _write("big.json"), cap_s=100, floor_s=1),
        gpu_session.Step("greedy", _write("greedy.json"), cap_s=100, floor_s=50),
        gpu_session.Step("small", _write("small.json"), cap_s=100, floor_s=5),
    ]
    rc, _, names, records = _session(monkeypatch, tmp_path, plan, budget=40)
    # 30 s after the 10 s reserve; the later floors come off first: "big" is left 30 - 55 s,
    # "greedy" 30 - 5 = 25 s of the 50 it needs, "small" all 30.
    assert [r["step"] for r in records] == ["big", "greedy", "small"]
    assert records[0]["status"].startswith("skipped") and records[1]["status"].startswith("skipped")
    assert records[2]["status"] == "ok" and records[2]["limit_s"] <= 30
    assert names == ["results/small.json", "session.json", "session.log"]
    assert rc == 1


@pytest.mark.parametrize("budget, expected", [(200, 100.0), (70, 55.0)])
def test_limit_is_the_cap_or_what_the_later_floors_leave(monkeypatch, budget, expected):
    plan = [gpu_session.Step("a", [], cap_s=100, floor_s=10), gpu_session.Step("b", [], cap_s=100, floor_s=5)]
    # A fixed clock of few significant bits: (now + budget) - now is then exactly budget. The
    # real monotonic clock's value made it 70.00000000000364 in some runs.
    now = 1024.0
    monkeypatch.setattr(gpu_session.time, "monotonic", lambda: now)
    assert gpu_session.limit(0, plan, now + budget, reserve_s=10) == expected
