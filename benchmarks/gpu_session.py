"""Every GPU check and benchmark of this repository in one command that fits a device lease.

A lent GPU comes with about 15 minutes of device time, its start included, and at most 10
minutes per command (``.library/device/README.md``): one call, no second chance. This runs the
steps below in order of importance, each in its own process under a time limit cut from what is
left of ``--budget``, so a slow step (compilation, autotuning) costs the steps after it their
spare time but never their turn; a step without its minimum left is skipped and says so. The
benchmarks write their results model by model (section by section), so a step stopped at its
limit keeps what it finished.

Steps: ``probe`` (GPU, driver, versions, clocks), ``tests`` (the Triton kernels and every backend
against the torch path, real kernels), ``train_step`` (the issue's table: 20 timed steps after 3
warm-up), ``global_prune``, ``hook_overhead``, ``kernels``, ``summarize``.

Everything comes back in at most three files under ``--out`` (the device tool returns at most
8): ``session.log`` (every step's output, in order), ``results.tar.gz`` (the result files the
steps wrote, the logs, ``session.json``) and ``SUMMARY.md``. They are rewritten after every
step, so a command killed from outside still returns what was done.

Usage (the device tool's command; pass the commit, since the copy it runs in has no ``.git``)::

    SIGNMASK_GIT_COMMIT=$(git rev-parse HEAD) \\
        python3 benchmarks/gpu_session.py --budget 510 --out "$OUT"      # timeout_s 570
    python benchmarks/gpu_session.py --dry --budget 400                  # here: CPU, interpreter
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclasses.dataclass(frozen=True)
class Step:
    """One process of the session: its command, the most time it gets and the least it needs."""

    name: str
    argv: list[str]
    cap_s: float
    floor_s: float


def steps(dry: bool, xdist: bool) -> list[Step]:
    """The session's steps in order. ``dry``: the same code paths on CPU at toy sizes."""
    bench = lambda script, *a: [PY, f"benchmarks/{script}.py", *a]  # noqa: E731
    probe = ("import torch, triton, sys; print(sys.version); print('torch', torch.__version__, "
             "'cuda', torch.version.cuda, 'triton', triton.__version__); "
             "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')")
    tests = [PY, "-m", "pytest", "tests/test_triton.py", "tests/test_backends.py", "tests/test_projection.py",
             "tests/test_resume.py",
             "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if xdist:  # Triton compiles on the host: spread the first compilations over the cores
        tests += ["-n", "8"]
    if dry:
        return [
            Step("probe", [PY, "-c", probe], 30, 5),
            Step("tests", tests, 120, 30),
            Step("train_step", bench("train_step", "--preset", "dry"), 150, 30),
            Step("global_prune", bench("global_prune", "--device", "cpu", "--model", "resnet18",
                                       "--repeats", "1", "--out", "global_prune_dry"), 60, 10),
            Step("hook_overhead", bench("hook_overhead", "--rounds", "3", "--warmup", "1",
                                        "--inner", "2", "--out", "hook_overhead_dry"), 60, 10),
            Step("kernels", bench("kernels", "--dry"), 60, 10),
            Step("summarize", bench("summarize"), 20, 5),
        ]
    smi = ("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
           "clocks.mem,temperature.gpu,power.draw,power.limit --format=csv; ")
    return [
        Step("probe", ["bash", "-c", smi + shlex.join([PY, "-c", probe])], 30, 5),
        Step("tests", tests, 120, 40),
        Step("train_step", bench("train_step", "--preset", "gpu", "--steps", "20", "--warmup", "3"),
             210, 90),
        Step("global_prune", bench("global_prune", "--device", "cuda", "--repeats", "5"), 60, 25),
        # 8 variants x 3 phases: 18 rounds of 10 calls keep it well inside its cap (it writes
        # after every round anyway).
        Step("hook_overhead", bench("hook_overhead", "--device", "cuda", "--rounds", "15",
                                    "--warmup", "3", "--inner", "10"), 45, 20),
        Step("kernels", bench("kernels"), 150, 40),
        Step("summarize", bench("summarize"), 20, 5),
    ]


def limit(i: int, plan: list[Step], deadline: float, reserve_s: float) -> float:
    """Seconds step ``i`` may run: its cap, less what the later steps need at least."""
    later = sum(s.floor_s for s in plan[i + 1:])
    return min(plan[i].cap_s, deadline - time.monotonic() - later - reserve_s)


def run_step(step: Step, seconds: float, log: io.TextIOBase, env: dict) -> dict:
    """Run ``step`` for at most ``seconds``, its output appended to ``log``; its record."""
    log.write(f"\n===== {step.name}: {shlex.join(step.argv)} (limit {seconds:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    # A new session, so that a timeout kills the step's own children too (CPU memory processes).
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=seconds)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = f"stopped at its {seconds:.0f} s limit"
    wall = time.monotonic() - t0
    log.write(f"===== {step.name}: {status} after {wall:.1f} s\n")
    log.flush()
    return {"step": step.name, "status": status, "wall_s": round(wall, 1),
            "limit_s": round(seconds, 1), "command": shlex.join(step.argv)}


def bundle(out: Path, results: Path, since: float, records: list[dict], log_path: Path) -> None:
    """Write ``results.tar.gz`` (result files newer than ``since``, the log, the step records)
    and ``SUMMARY.md`` into ``out``, each atomically."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(results.glob("*")):
            if path.is_file() and path.stat().st_mtime >= since:
                tar.add(path, arcname=f"results/{path.name}")
        tar.add(log_path, arcname="session.log")
        data = (json.dumps(records, indent=2) + "\n").encode()
        info = tarfile.TarInfo("session.json")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    _write(out / "results.tar.gz", buf.getvalue())
    summary = results / "SUMMARY.md"
    if summary.exists() and summary.stat().st_mtime >= since:
        _write(out / "SUMMARY.md", summary.read_bytes())


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def table(records: list[dict]) -> str:
    rows = [f"{'step':14s} {'wall s':>7s} {'limit s':>7s}  status"]
    rows += [f"{r['step']:14s} {r['wall_s']:7.1f} {r['limit_s']:7.1f}  {r['status']}" for r in records]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=510,
                        help="seconds for everything (give the device tool's timeout_s ~60 more)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the three files go (default: $OUT, else a new temp folder)")
    parser.add_argument("--dry", action="store_true",
                        help="CPU, Triton interpreter, toy sizes; results go to a temp folder")
    parser.add_argument("--only", nargs="*", help="run only these steps (names as in the log)")
    args = parser.parse_args()
    start_wall, start = time.time(), time.monotonic()
    deadline = start + args.budget
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_session_"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry:  # never overwrite the committed results with toy numbers
        env["SIGNMASK_RESULTS_DIR"] = tempfile.mkdtemp(prefix="gpu_session_results_")
        env["TRITON_INTERPRET"] = "1"
    results = Path(env.get("SIGNMASK_RESULTS_DIR") or ROOT / "benchmarks" / "results")
    results.mkdir(parents=True, exist_ok=True)
    xdist = not args.dry and _has("xdist")
    plan = [s for s in steps(args.dry, xdist) if not args.only or s.name in args.only]
    log_path, records = out / "session.log", []
    with open(log_path, "w") as log:
        log.write(f"gpu_session {'(dry) ' if args.dry else ''}budget {args.budget:.0f} s, "
                  f"commit {env.get('SIGNMASK_GIT_COMMIT', '?')}, results in {results}\n")
        for i, step in enumerate(plan):
            seconds = limit(i, plan, deadline, reserve_s=10)
            if seconds < step.floor_s:
                records.append({"step": step.name, "status": f"skipped: {seconds:.0f} s left, "
                                f"needs {step.floor_s:.0f}", "wall_s": 0.0, "limit_s": max(seconds, 0.0),
                                "command": shlex.join(step.argv)})
            else:
                records.append(run_step(step, seconds, log, env))
            print(f"[{time.monotonic() - start:6.1f} s] {step.name}: {records[-1]['status']}", flush=True)
            bundle(out, results, start_wall - 1, records, log_path)
    print("\n" + table(records))
    print(f"\n{time.monotonic() - start:.0f} s in all; files in {out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
