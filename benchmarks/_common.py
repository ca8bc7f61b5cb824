"""Shared helpers of the benchmark scripts: environment record, timers, memory probes, output,
torch.compile counts.

Memory on CPU is read from the kernel: ``/proc/self/status`` VmHWM (peak resident set) after
resetting it by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). Each measured method
runs in its own process with ``MALLOC_MMAP_THRESHOLD_`` fixed, so large tensors get fresh pages
from mmap and give them back when freed: the peak then counts what the method itself allocated.
On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from signmask._compat import import_timm  # noqa: E402, F401 (the benchmarks call _common.import_timm)
from signmask._files import write_atomic  # noqa: E402

# SIGNMASK_RESULTS_DIR: elsewhere, for dry runs that must not overwrite the committed results.
RESULTS = Path(os.environ.get("SIGNMASK_RESULTS_DIR") or ROOT / "benchmarks" / "results")
# Fixed mmap threshold (128 KiB): glibc otherwise raises it after frees and reuses heap pages.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def environment(device: str) -> dict:
    """Versions, hardware and the exact command, for the results file."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    info.update(_git_state())
    for name in ("triton", "timm", "numpy"):
        try:
            info[name] = __import__(name).__version__ if name != "timm" else import_timm().__version__
        except Exception as e:  # noqa: BLE001 - record why, never fail the benchmark
            info[name] = f"unavailable ({type(e).__name__})"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_state() -> dict:
    commit = _git("rev-parse", "HEAD")
    if not commit:  # the device machine's copy has no .git: gpu_session passes the commit along
        return {"git_commit": os.environ.get("SIGNMASK_GIT_COMMIT", ""), "git_dirty": None}
    # The code only: results written by an earlier run (or a parallel one) are not a change.
    dirty = _git("status", "--porcelain", "--", "signmask", "benchmarks", ":!benchmarks/results")
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall time of one region: CUDA events on GPU, ``perf_counter`` on CPU (both synced)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "Timer":
        sync(self.device)
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def summary(samples_ms: list[float]) -> dict:
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) >= 2 else [samples_ms[0]] * 9
    return {
        "median_ms": statistics.median(samples_ms),
        "p10_ms": qs[0],
        "p90_ms": qs[-1],
        "n": len(samples_ms),
    }


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory ``field`` of ``/proc/self/status`` (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of a region: bytes above the level at entry (CPU RSS or CUDA alloc)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            if not reset_peak_rss():
                raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs)")
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
            self.retained = torch.cuda.memory_allocated() - self.base
        else:
            self.peak = rss_bytes("VmHWM") - self.base
            self.retained = rss_bytes() - self.base


def run_child(args: list[str], timeout: float = 900) -> dict:
    """Run ``python <args>`` in a fresh process (memory isolation); parse its last JSON line."""
    env = dict(os.environ, **CHILD_ENV)
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<stem>.json`` and ``.md``, each atomically (an interrupted run leaves the
    previous file whole)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    write_atomic(json_path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())
    write_atomic(md_path, markdown.encode())
    return json_path, md_path


def env_markdown(env: dict) -> str:
    keys = ("date_utc", "gpu", "cuda", "cpu", "cpu_count", "torch_threads", "python", "torch",
            "triton", "timm", "git_commit", "loadavg_at_start")
    rows = [f"- {k}: `{env[k]}`" for k in keys if k in env]
    return "\n".join(rows + [f"- command: `{env['command']}`"]) + "\n"


def hook_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors a module's forward pre-hooks hold: stock ``global_unstructured`` leaves each hook a
    view of one flat fp32 mask (4 B per weight), apart from the ``weight_mask`` buffers."""
    found, todo = [], list(module._forward_pre_hooks.values())
    while todo:
        obj = todo.pop()
        for value in getattr(obj, "__dict__", {}).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, (tuple, list)):  # a PruningContainer's methods
                todo.extend(v for v in value if hasattr(v, "__dict__"))
    return found


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def configure_dynamo(limit: int) -> None:
    """Raise dynamo's recompile limit to at least ``limit`` and make hitting it an error: past the
    limit dynamo runs the frame eagerly, and a benchmark would time a model uncompiled unnoticed."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


def dynamo_counts() -> Counter:
    """Dynamo's process-wide counts so far: graphs compiled, graph breaks, ops captured."""
    counters = torch._dynamo.utils.counters
    return Counter({"graphs": counters["stats"]["unique_graphs"],
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "ops_captured": counters["stats"]["calls_captured"]})


def graphs_run(model: torch.nn.Module, x: torch.Tensor, amp_dtype) -> int:
    """How many compiled graphs one forward of ``model`` on ``x`` runs: the AOTAutograd nodes
    (``CompiledFunctionBackward``) in its output's autograd graph. An eager forward has none, so
    this shows the steps run compiled, not just that something was compiled once. On torch 2.11
    a compiled node may hide its inputs, so graphs upstream of it are not counted there."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        todo, seen, found = [model(x).grad_fn], set(), 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += type(node).__name__ == "CompiledFunctionBackward"
        try:
            todo.extend(child for child, _ in node.next_functions)
        except RuntimeError:  # torch 2.11 refuses it on some CompiledFunctionBackward nodes
            pass  # counted already; only the graphs upstream of it go unseen
    return found
