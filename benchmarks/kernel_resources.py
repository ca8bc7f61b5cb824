"""Compile every Triton kernel launch signmask makes, for a CUDA GPU, on a machine without one.

The Triton interpreter (``TRITON_INTERPRET=1``, used by the tests on CPU) runs the kernels'
arithmetic but never type-checks, lowers or register-allocates them. This script does, with
the real compiler and no GPU:

1. the launchers of ``signmask._triton`` and ``signmask._triton_linear`` run on CPU tensors with
   their kernels replaced by recorders, so every launch they would make is captured: flat and
   strided walks, sign locks, fp32 / bf16 / fp16, both fp32 matmul precisions, 64-bit indices;
2. each distinct launch is specialized by Triton's own binder for the target (types, constexprs,
   ``== 1`` and 16-byte alignment) and compiled by ``triton.compile`` for ``sm_<arch>``, once per
   autotune config the launch would try;
3. the cubin's registers and stack (spill) bytes are read by the ``cuobjdump`` that Triton ships,
   the shared memory from the compiled kernel.

Nothing here times anything: it finds kernels that do not compile, spill, or need more shared
memory than the SM has, before a GPU session spends device time on them.

Usage::

    python benchmarks/kernel_resources.py                 # sm_90 (H100/H200), every config
    python benchmarks/kernel_resources.py --arch 80       # A100
    python benchmarks/kernel_resources.py --quick --json  # first config per launch, JSON to
                                                          # stdout, no files (the test's call)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_resources.py: unset TRITON_INTERPRET; it compiles the real kernels")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from signmask import _triton, _triton_linear  # noqa: E402

# Shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
KERNELS = ((_triton, "_masked_weight_fwd_flat"), (_triton, "_masked_weight_fwd"),
           (_triton, "_masked_weight_bwd_flat"), (_triton, "_masked_weight_bwd"),
           (_triton_linear, "_masked_mm"), (_triton_linear, "_masked_grad_mm"))


class _Recorder:
    """Stands in for a kernel or autotuner: ``kernel[grid](*args, **kw)`` is recorded."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.kernel, args, kw))


def _elementwise_launches() -> None:
    """Every path of ``masked_weight_forward/backward``: each weight dtype with each output
    dtype it may be cast to (its own, bf16 and fp16 autocast), the backward getting its
    gradient in that output dtype."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for layout in ("contiguous", "channels_last", "transposed"):
            orig = torch.randn(8, 4, 3, 3, generator=g).to(dtype)
            if layout == "channels_last":
                orig = orig.to(memory_format=torch.channels_last)
            elif layout == "transposed":
                orig = orig.transpose(0, 1)
            mask = torch.rand(orig.shape, generator=g) < 0.5
            if layout == "channels_last":  # the mask buffer shares the weight's layout
                mask = torch.empty_like(orig, dtype=torch.bool).copy_(mask)
            sign = torch.randint(0, 256, ((orig.numel() + 7) // 8,), generator=g,
                                 dtype=torch.uint8)
            for s in (None, sign):
                for out_dtype in dict.fromkeys((dtype, torch.bfloat16, torch.float16)):
                    _triton.masked_weight_forward(orig, mask, s, out_dtype)
                    grad = torch.randn(orig.shape, generator=g).to(out_dtype)
                    if layout == "channels_last":
                        grad = torch.empty_like(orig, dtype=out_dtype).copy_(grad)
                    _triton.masked_weight_backward(grad, orig, mask, s)
    # 64-bit indices: a meta tensor whose strides span more than 2**31 elements.
    huge = torch.empty_strided((2, 2), (2**31, 1), device="meta")
    _triton._launch((_triton._masked_weight_fwd_flat, _triton._masked_weight_fwd),
                    [huge, torch.zeros(2, 2, dtype=torch.uint8)], None, torch.empty(2, 2),
                    tl.float32)


def _linear_launches() -> None:
    """Forward, grad-input and grad-weight GEMMs of ``masked_linear``."""
    g = torch.Generator().manual_seed(0)
    before = torch.get_float32_matmul_precision()
    try:
        for dtype, precision in ((torch.bfloat16, "high"), (torch.float16, "high"),
                                 (torch.float32, "high"), (torch.float32, "highest")):
            torch.set_float32_matmul_precision(precision)
            x = torch.randn(16, 32, generator=g).to(dtype)
            orig = torch.randn(24, 32, generator=g).to(dtype)
            mask_u8 = (torch.rand(orig.shape, generator=g) < 0.5).view(torch.uint8)
            sign = torch.randint(0, 256, (96,), generator=g, dtype=torch.uint8)
            bias = torch.randn(24, generator=g).to(dtype)
            for s in (None, sign):
                for b in (None, bias):
                    _triton_linear._mm(x, orig, mask_u8, s, b, transposed=True)
                gy = torch.randn(16, 24, generator=g).to(dtype)
                _triton_linear._mm(gy, orig, mask_u8, s, None, transposed=False)
                _triton_linear._grad_weight(gy, x, orig, mask_u8, s)
        # 64-bit offsets: a meta weight whose rows lie 2**26 elements apart (bf16, signs locked).
        huge = torch.empty_strided((24, 32), (2**26, 1), dtype=torch.bfloat16, device="meta")
        x, gy = torch.randn(16, 32).bfloat16(), torch.randn(16, 24).bfloat16()
        for transposed, a in ((True, x), (False, gy)):
            _triton_linear._mm(a, huge, mask_u8, sign, None, transposed=transposed)
        _triton_linear._grad_weight(gy, x, huge, mask_u8, sign)
    finally:
        torch.set_float32_matmul_precision(before)


def record_launches() -> list:
    """Every ``(kernel, args, kwargs)`` launch the launchers make for the cases above."""
    launches: list = []
    saved = [(module, name, getattr(module, name)) for module, name in KERNELS]
    check = _triton.check_device
    _triton.check_device = lambda t, what: None  # CPU tensors stand in for CUDA ones
    try:
        for module, name, kernel in saved:
            setattr(module, name, _Recorder(kernel, launches))
        _elementwise_launches()
        _linear_launches()
    finally:
        _triton.check_device = check
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return launches


def _specialize(fn, args: tuple, kw: dict, backend) -> tuple:
    """What ``fn[grid](*args, **kw)`` compiles for ``backend``'s target, from Triton's binder."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kw)
    return fn._pack_args(backend, kw, bound, specialization, options)


def _configs(kernel, args: tuple, kw: dict) -> list:
    """The autotune configs the launch would try (after the kernel's own pruning)."""
    if not _tuned(kernel)[1]:
        return [None]
    kernel.nargs = dict(zip(kernel.fn.arg_names, args))  # what Autotuner.run sets before pruning
    return kernel.prune_configs(kw)


def _resources(cubin: bytes) -> dict:
    tool = triton.knobs.nvidia.cuobjdump.path  # the one Triton ships (or TRITON_CUOBJDUMP_PATH)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if regs is None or stack is None:
        raise RuntimeError(f"cuobjdump printed no REG/STACK figures:\n{text}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(stack.group(1))}


def _label(fn, signature: dict, kw: dict, config) -> dict:
    pointers = {k: v for k, v in signature.items() if v.startswith("*")}
    flags = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in kw.items()}
    tile = None
    if config is not None:
        tile = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return {"kernel": fn.__name__, "pointers": pointers, "constexprs": flags, "config": tile}


def _tuned(kernel) -> tuple:
    """The JIT function behind ``kernel`` and whether an autotuner wraps it."""
    tuner = isinstance(kernel, triton.runtime.Autotuner)
    return (kernel.fn if tuner else kernel), tuner


def compile_launch(kernel, args: tuple, kw: dict, backend, quick: bool) -> list[dict]:
    """Compile one recorded launch for ``backend``'s target, once per config; a record each."""
    fn, _ = _tuned(kernel)
    configs = _configs(kernel, args, kw)
    records = []
    for config in configs[:1] if quick else configs:
        extra = {}
        if config is not None:
            extra = config.kwargs | {"num_warps": config.num_warps,
                                     "num_stages": config.num_stages}
        options, signature, constexprs, attrs = _specialize(fn, args, kw | extra, backend)
        record = _label(fn, signature, kw, config)
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=backend.target, options=options.__dict__)
            record |= _resources(compiled.asm["cubin"])
            record["shared_bytes"] = compiled.metadata.shared
        except Exception as exc:  # noqa: BLE001 - reported: the caller lists every failure
            lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
            # Triton's first line is the position, the last one the reason
            record["error"] = f"{type(exc).__name__}: {lines[0]} ... {lines[-1]}"[:400]
        record["compile_s"] = round(time.perf_counter() - t0, 2)
        records.append(record)
    return records


def run(arch: int, quick: bool) -> list[dict]:
    """A record per distinct launch and config."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    unique = {}
    for kernel, args, kw in record_launches():
        fn, tuner = _tuned(kernel)
        probe = kw | (kernel.configs[0].kwargs if tuner else {})
        _, signature, constexprs, attrs = _specialize(fn, args, probe, backend)
        key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs))
        unique.setdefault(key, (kernel, args, kw))
    return [r for launch in unique.values() for r in compile_launch(*launch, backend, quick)]


def _markdown(env: dict, arch: int, records: list[dict]) -> str:
    limit = SHARED_LIMIT.get(arch)
    lines = [
        f"# Triton kernels compiled for sm_{arch} (static: no GPU, nothing timed)\n",
        _common.env_markdown(env), "",
        f"Stack = local memory per thread (spills); shared limit per block: {limit} B.\n",
        "| kernel | pointers | flags | tile (BM,BN,BK / warps / stages) | regs | stack B "
        "| shared B | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in records:
        ptrs = " ".join(f"{k}={v[1:]}" for k, v in r["pointers"].items())
        flags = " ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                         if k not in ("BLOCK", "MANUAL_BF16", "UPCAST", "CDT"))
        c = r["config"]
        tile = "" if c is None else f"{c['BM']},{c['BN']},{c['BK']} / {c['num_warps']} / {c['num_stages']}"
        note = r.get("error", "")
        if not note and limit and r["shared_bytes"] > limit:
            note = "over the shared limit: skipped by the autotuner"
        elif not note and r["stack_bytes"]:
            note = "spills"
        lines.append(f"| {r['kernel']} | {ptrs} | {flags} | {tile} | {r.get('registers', '')} | "
                     f"{r.get('stack_bytes', '')} | {r.get('shared_bytes', '')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="only the first config per launch")
    parser.add_argument("--json", action="store_true", help="print JSON to stdout, write nothing")
    args = parser.parse_args(argv)
    records = run(args.arch, args.quick)
    payload = {"triton": triton.__version__, "arch": args.arch,
               "shared_limit": SHARED_LIMIT.get(args.arch), "kernels": records}
    if args.json:
        print(json.dumps(payload))
        return 0
    env = _common.environment("cpu")
    payload = {"environment": env} | payload
    paths = _common.write_results(f"kernel_resources_sm{args.arch}", payload,
                                  _markdown(env, args.arch, records))
    bad = [r for r in records if "error" in r]
    spills = [r for r in records if r.get("stack_bytes")]
    print(f"{len(records)} compiled for sm_{args.arch} with triton {triton.__version__}: "
          f"{len(bad)} errors, {len(spills)} spill; wrote {', '.join(map(str, paths))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
