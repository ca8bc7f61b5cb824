"""The Triton kernels compile for an H100 (sm_90) with the real compiler, on a CPU-only machine.

``test_triton.py`` checks the kernels' arithmetic through the interpreter, which never lowers
them; here ``benchmarks/kernel_resources.py`` records every launch the launchers make and
compiles each one with Triton's own specialization (first autotune config only: ``--quick``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_resources.py"


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--quick", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def kernels(report) -> list[dict]:
    return report["kernels"]


def _flags(r: dict, *names: str) -> tuple:
    return tuple(r["constexprs"].get(n) for n in names)


def test_every_launch_compiles(kernels):
    errors = [(r["kernel"], r["pointers"], r["constexprs"], r["error"])
              for r in kernels if "error" in r]
    assert errors == []


# Stack (spill) bytes per thread a first autotune config may use, on any triton version. Register
# allocation changes between releases: the first tile of the sign-locked fp32 `_masked_grad_mm`
# (tf32, 128x128x64) spills 112 B on triton 3.6 (the floor, and the GPU image's), nothing on
# 3.7.1 (CI's), 16 B on 3.8.0 and 24 B on 3.9.0; 3.6's fp32 locked `_masked_mm` (ieee, 64x64x16)
# 8 B. The autotuner times every config, so a spilling one is at worst not picked
# (benchmarks/NOTES.md); tensor-core tiles that do not fit spill kilobytes, far over this.
SPILL_ALLOWED = 128


def test_no_kernel_spills_or_overflows_shared_memory(report, kernels):
    assert report["shared_limit"] == 232448  # bytes one block may use on sm_90 (227 KB)
    spills = [(r["kernel"], r["constexprs"], r["stack_bytes"]) for r in kernels
              if r.get("stack_bytes", 0) > SPILL_ALLOWED]
    assert spills == []
    over = [(r["kernel"], r["config"], r["shared_bytes"]) for r in kernels
            if r.get("shared_bytes", 0) > report["shared_limit"]]
    assert over == []


def test_every_path_of_the_launchers_is_compiled(kernels):
    ptr = lambda r, name: r["pointers"].get(name)  # noqa: E731
    elementwise = {
        (r["kernel"], *_flags(r, "HAS_SIGN", "SAME", "I64"), ptr(r, "O"), ptr(r, "G"), ptr(r, "Y"))
        for r in kernels if r["kernel"].startswith("_masked_weight")
    }
    expected = {("_masked_weight_fwd", False, False, True, "*fp32", None, "*fp32")}  # 64-bit
    for w in ("*fp32", "*bf16", "*fp16"):  # weight_orig; outputs: its own dtype or autocast's
        for out in dict.fromkeys((w, "*bf16", "*fp16")):
            for sign in (False, True):
                # a shared non-contiguous layout (channels_last) takes the flat kernel unless
                # signs are locked (their bit index is the logical position)
                walks = [(None, "_flat"), (False, "")] + ([(True, "")] if sign else [])
                for same, suffix in walks:
                    expected.add((f"_masked_weight_fwd{suffix}", sign, same, False, w, None, out))
                    expected.add((f"_masked_weight_bwd{suffix}", sign, same, False, w, out, w))
    assert elementwise == expected

    gemms = {(r["kernel"], *_flags(r, "HAS_SIGN", "PRECISION", "I64"), r["pointers"]["A"])
             for r in kernels if "mm" in r["kernel"]}
    assert gemms == {
        (kernel, sign, precision, False, dtype)
        for kernel in ("_masked_mm", "_masked_grad_mm")
        for sign in (False, True)
        for precision, dtype in (("tf32", "*bf16"), ("tf32", "*fp16"), ("tf32", "*fp32"),
                                 ("ieee", "*fp32"))
    } | {(kernel, True, "tf32", True, "*bf16") for kernel in ("_masked_mm", "_masked_grad_mm")}


def test_ieee_fp32_gets_its_own_tiles(kernels):
    from signmask import _triton_linear  # interpreted here: only the config lists are read

    ieee = {tuple(r["config"].values()) for r in kernels if _flags(r, "PRECISION") == ("ieee",)}
    first = _triton_linear._IEEE_CONFIGS[0]
    assert ieee == {(*first.kwargs.values(), first.num_warps, first.num_stages)}
