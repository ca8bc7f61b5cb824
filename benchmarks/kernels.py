"""Kernel micro-benchmarks (GPU): the masked weight and the fused masked Linear.

1. Ceilings measured on the device: copy bandwidth (bytes read + written) and a bf16 matmul.
2. ``masked_weight``: stock prune (``orig * float_mask``), the torch backend and the Triton
   kernel, forward and forward+backward, free and sign-locked, fp32 out and bf16 out (the bf16
   rows include autocast's cast for the torch paths). Reported with the fewest bytes each must
   move and the fraction of the copy bandwidth reached.
3. ``masked_linear``: forward+backward under bf16 autocast of dense ``F.linear`` (with the
   weight cast autocast does), the hook paths (torch / Triton masked weight, then cuBLAS), and
   the fused Triton kernel, over token counts from weight-bound (8) to compute-bound (8192).

Every timed function is first checked against the torch path on fresh random inputs (bitwise
for the masked weight, relative error for the matmuls). Masked weights: medians of device time
(``triton.testing.do_bench``); masked linears: medians of 10 back-to-back calls between two
events, host time included (:func:`bench_loop`).

Usage::

    python benchmarks/kernels.py            # CUDA
    python benchmarks/kernels.py --dry      # CPU, Triton interpreter, tiny sizes: checks only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--dry" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from signmask import _bits, _reparam, _triton, _triton_linear  # noqa: E402


def bench(fn, device: str) -> float:
    """Median milliseconds of ``fn()`` on the device (``do_bench``: the L2 cache flushed before
    each call, only the call between the events: device time, host time hidden)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return _host_timed(fn, calls=1, rounds=2)


def bench_loop(fn, device: str, calls: int = 10, rounds: int = 15) -> float:
    """Median milliseconds per call of ``calls`` back-to-back calls between two events, as a
    training step issues them: the host's time (Python, autograd, hooks) counts wherever the
    device would wait for it. Small-token matmuls take tens of microseconds on the device, less
    than their host work; ``do_bench`` would hide part of that behind its cache flush."""
    if device != "cuda":
        return _host_timed(fn, calls=1, rounds=2)
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _host_timed(fn, calls: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def ceilings(device: str, dry: bool) -> dict:
    n = 2**16 if dry else 2**28  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    k = 64 if dry else 8192
    a = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=device, dtype=torch.bfloat16)
    mm = bench(lambda: a @ b, device)
    return {"copy_gbps": 2 * n * 4 / ms / 1e6, "bf16_matmul_tflops": 2 * k**3 / mm / 1e9}


def weight_case(shape, locked: bool, channels_last: bool, device: str):
    orig = torch.randn(shape, device=device)
    mask = torch.rand(shape, device=device) < 0.1
    if channels_last:
        orig = orig.contiguous(memory_format=torch.channels_last)
        mask = mask.contiguous(memory_format=torch.channels_last)
    sign = _bits.pack_signs(torch.rand(shape, device=device) < 0.5) if locked else None
    return orig.requires_grad_(), mask, sign


def weight_impls(orig, mask, sign, out_dtype):
    float_mask = mask.to(orig.dtype)  # what stock prune keeps (4 bytes per weight)
    impls = {
        "torch": lambda: _reparam.masked_weight(orig, mask, sign).to(out_dtype),
        "triton": lambda: _triton.masked_weight(orig, mask, sign, out_dtype),
    }
    if sign is None:
        impls = {"stock": lambda: (orig * float_mask).to(out_dtype), **impls}
    return impls


def min_bytes(numel: int, locked: bool, out_dtype, backward: bool, mask: int = 1) -> int:
    """Fewest bytes: read orig (4) + mask (``mask``: 1, stock's float mask 4) (+ sign 1/8),
    write out; backward: read grad, mask (+ sign, + orig if locked), write the fp32 gradient."""
    out = torch.tensor([], dtype=out_dtype).element_size()
    fwd = numel * (4 + mask + out) + (numel // 8 if locked else 0)
    bwd = numel * (out + mask + 4) + ((numel // 8 + 4 * numel) if locked else 0)
    return fwd + (bwd if backward else 0)


def masked_weight_rows(device: str, dry: bool, ceil: dict, rows: list[dict], save) -> None:
    """Append the masked-weight rows to ``rows``, calling ``save()`` after each shape."""
    shapes = [((64, 48), False), ((8, 6, 3, 3), True)] if dry else [
        ((4096, 4096), False), ((3072, 768), False), ((512, 512, 3, 3), True)]
    for shape, channels_last in shapes:
        for locked in (False, True):
            for out_dtype in (torch.float32, torch.bfloat16):
                orig, mask, sign = weight_case(shape, locked, channels_last, device)
                impls = weight_impls(orig, mask, sign, out_dtype)
                ref = impls["torch"]().detach()
                # In the weight's layout, as a channels_last conv's backward hands it back: a
                # contiguous one would time the strided kernel, which training never runs.
                layout = torch.channels_last if channels_last else torch.contiguous_format
                grad = torch.randn(ref.shape, device=device).to(out_dtype).contiguous(memory_format=layout)
                for name, fn in impls.items():
                    got = fn()
                    if not torch.equal(got, ref):
                        raise AssertionError(f"{name} masked weight differs from the torch path")
                    fwd = bench(fn, device)
                    both = bench(lambda: torch.autograd.grad(fn(), orig, grad), device)
                    numel = orig.numel()
                    row = {"shape": list(shape), "channels_last": channels_last, "locked": locked,
                           "out": str(out_dtype).replace("torch.", ""), "impl": name,
                           "fwd_ms": fwd, "fwd_bwd_ms": both}
                    for key, ms, bwd in (("fwd", fwd, False), ("fwd_bwd", both, True)):
                        gbps = min_bytes(numel, locked, out_dtype, bwd, 4 if name == "stock" else 1) / ms / 1e6
                        row[f"{key}_gbps"] = gbps
                        row[f"{key}_of_copy"] = gbps / ceil["copy_gbps"]
                    rows.append(row)
                    print(f"  masked_weight {shape} cl={channels_last} locked={locked} "
                          f"{row['out']:8s} {name:7s} fwd {fwd:.4f} ms ({row['fwd_of_copy']:.0%} of copy)  "
                          f"fwd+bwd {both:.4f} ms", flush=True)
        save()


def linear_impls(orig, mask, sign, bias):
    def hook(weight_fn):
        return lambda x: F.linear(x, weight_fn(), bias)

    return {
        "dense": lambda x: F.linear(x, orig, bias),
        "hook-torch": hook(lambda: _reparam.masked_weight(orig, mask, sign)),
        "hook-triton": hook(lambda: _triton.masked_weight(orig, mask, sign, torch.bfloat16)),
        "fused": lambda x: _triton_linear.masked_linear(x, orig, mask, sign, bias),
    }


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def masked_linear_rows(device: str, dry: bool, rows: list[dict], save) -> None:
    """Append the masked-linear rows to ``rows``, calling ``save()`` after each weight."""
    dims = [(48, 40)] if dry else [(4096, 4096), (3072, 768), (768, 3072)]
    tokens = [8, 33] if dry else [8, 64, 512, 2048, 8192]
    for n_out, k_in in dims:
        for locked in (False, True):
            orig, mask, sign = weight_case((n_out, k_in), locked, False, device)
            bias = torch.randn(n_out, device=device, requires_grad=True)
            impls = linear_impls(orig, mask, sign, bias)
            for m in tokens:
                x = torch.randn(m, k_in, device=device, requires_grad=True)
                grad = torch.randn(m, n_out, device=device, dtype=torch.bfloat16)

                def run(fn):
                    with torch.autocast(device, dtype=torch.bfloat16):
                        y = fn(x)
                    return [y] + list(torch.autograd.grad(y, (x, orig, bias), grad))

                ref = run(impls["hook-torch"])
                for name, fn in impls.items():
                    if name != "dense":
                        errs = [rel(g, r) for g, r in zip(run(fn), ref)]
                        if max(errs) > 2e-2:
                            raise AssertionError(f"{name} linear differs from the torch path: {errs}")
                    ms = bench_loop(lambda: run(fn), device)
                    rows.append({"out_in": [n_out, k_in], "tokens": m, "locked": locked,
                                 "impl": name, "fwd_bwd_ms": ms})
                base = next(r["fwd_bwd_ms"] for r in rows[-len(impls):] if r["impl"] == "dense")
                print(f"  linear {n_out}x{k_in} tokens={m:5d} locked={locked} " + "  ".join(
                    f"{r['impl']} {r['fwd_bwd_ms'] / base:.3f}x" for r in rows[-len(impls):]), flush=True)
            save()


def markdown(res: dict, env: dict) -> str:
    lines = ["# Kernel micro-benchmarks\n", _common.env_markdown(env),
             f"Ceilings: copy {res['ceilings']['copy_gbps']:.0f} GB/s, bf16 matmul "
             f"{res['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s\n",
             "## masked weight\n",
             "| shape | channels_last | locked | out | impl | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in res["masked_weight"]:
        lines.append(f"| {r['shape']} | {r['channels_last']} | {r['locked']} | {r['out']} | {r['impl']} | "
                     f"{r['fwd_ms']:.4f} | {r['fwd_of_copy']:.0%} | {r['fwd_bwd_ms']:.4f} | {r['fwd_bwd_of_copy']:.0%} |")
    lines += ["\n## masked linear, forward+backward under bf16 autocast (x dense; 10 back-to-back calls "
              "between two events, host time included)\n",
              "| out x in | tokens | locked | dense ms | hook-torch | hook-triton | fused |",
              "|---|---:|---|---:|---:|---:|---:|"]
    groups: dict = {}
    for r in res["masked_linear"]:
        groups.setdefault((tuple(r["out_in"]), r["tokens"], r["locked"]), {})[r["impl"]] = r["fwd_bwd_ms"]
    for (dims, m, locked), g in groups.items():
        d = g["dense"]
        lines.append(f"| {dims[0]}x{dims[1]} | {m} | {locked} | {d:.4f} | {g['hook-torch'] / d:.3f} | "
                     f"{g['hook-triton'] / d:.3f} | {g['fused'] / d:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("needs CUDA (or --dry)")
    torch.manual_seed(0)
    env = _common.environment(device)
    ceil = ceilings(device, args.dry)
    print(f"ceilings: {ceil}", flush=True)
    stem = args.out or ("kernels_dry" if args.dry else "kernels_cuda")
    res = {"environment": env, "ceilings": ceil, "complete": False,
           "masked_weight": [], "masked_linear": []}
    # Written as it goes: a run stopped at a time limit (gpu_session.py) keeps what it did.
    save = lambda: _common.write_results(stem, res, markdown(res, env))  # noqa: E731
    masked_weight_rows(device, args.dry, ceil, res["masked_weight"], save)
    masked_linear_rows(device, args.dry, res["masked_linear"], save)
    res["complete"] = True
    print("wrote", *save())


if __name__ == "__main__":
    main()
