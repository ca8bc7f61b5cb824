"""Where the projection backend's CPU step goes: its one gradient-mask pass, against the floor.

The ``projection`` backend runs no forward work; its cost over dense is, per step, one in-place
multiply of every pruned tensor's gradient by its bool mask (plus a little host work per
tensor). This script splits the two on the CPU preset's models and sets the mask pass beside
what one pass over the same tensors can cost at best:

- step time, interleaved in one process (as ``train_step.py`` does): dense, ``projection``, and
  ``projection`` with the gradient mask switched off (a diagnostic variant: its pruned weights
  drift, so it trains wrongly; only its time is of use), plus the time spent inside the mask
  pass during the projection steps;
- one pass over tensors of the model's pruned shapes (gradient-like fp32 values, 90%-sparse
  random masks): signmask's multiply (``_maskmul.mul_``, what the backend runs: one conversion
  of the mask into a kept float buffer and one multiply per 4M weights), the same in chunks of
  256K into a fresh 1 MiB buffer (signmask's path before 2026-12-07, for reference), torch's
  promoted multiply (``t.mul_(mask.view(torch.uint8))``: a fresh float temporary of the whole
  mask), and a scalar ``t.mul_(1.0)``, the floor of any in-place pass (read and write 4 B per
  weight; the mask adds 1 B read).

``--busy N`` keeps N busy-looping processes running beside the whole run, each in a session of
its own: another job on the machine. Linux's autogroup scheduling shares the CPUs fairly between
sessions, so this process's threads get fewer cores than torch's thread pool has threads, and
every parallel region (one per op above torch's grain size) waits for a descheduled thread: the
number of ops per pass then matters more than their bytes. (Spinning children of the same
session, as data-loader workers are, slow every variant alike.)

Usage::

    python benchmarks/grad_mask_cost.py                  # CPU preset models, fused optimizers
    python benchmarks/grad_mask_cost.py --models mlp2048x3@b8 --steps 10
    python benchmarks/grad_mask_cost.py --busy 1 --out grad_mask_cost_cpu_busy
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import train_step  # noqa: E402

from signmask import _maskmul, _projection_ops  # noqa: E402

VARIANTS = ("dense", "projection", "projection, no grad mask")


def _small_chunks(t: torch.Tensor, mask: torch.Tensor, chunk: int = 1 << 18) -> None:
    """signmask's CPU multiply before 2026-12-07: 256K-element chunks through a fresh buffer."""
    flat_t, flat_m = t.view(-1), mask.view(-1).view(torch.uint8)
    buf = torch.empty(chunk, dtype=t.dtype)
    for start in range(0, flat_t.numel(), chunk):
        stop = min(start + chunk, flat_t.numel())
        floats = buf[: stop - start]
        floats.copy_(flat_m[start:stop])
        torch.mul(flat_t[start:stop], floats, out=flat_t[start:stop])


PASSES = {
    "signmask": lambda t, m: _maskmul.mul_(t, m),
    "256K chunks": _small_chunks,
    "promoted": lambda t, m: t.mul_(m.view(torch.uint8)),
    "scalar floor": lambda t, m: t.mul_(1.0),
}


@contextlib.contextmanager
def _grad_mask(mode: str, spent: list[float]):
    """Run the projection's gradient mask as ``mode`` says: ``"timed"`` (summing its time into
    ``spent``) or ``"off"``; the real function is back on exit."""
    real = _projection_ops.mask_grad

    def timed(*args):
        with _common.Timer("cpu") as t:
            real(*args)
        spent.append(t.ms)

    _projection_ops.mask_grad = timed if mode == "timed" else (lambda *args: None)
    try:
        yield
    finally:
        _projection_ops.mask_grad = real


def _step(model, optimizer, x, y) -> float:
    with _common.Timer("cpu") as t:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return t.ms


def time_steps(spec, steps: int, warmup: int) -> dict:
    """Interleaved step times of the three variants; the projection's time in the mask pass."""
    built = {v: train_step.build(spec, "dense" if v == "dense" else "projection", "cpu") for v in VARIANTS}
    data = train_step.batches(spec, "cpu")
    samples = {v: [] for v in VARIANTS}
    in_mask: list[float] = []
    for r in range(warmup + steps):
        for v in VARIANTS[r % 3:] + VARIANTS[: r % 3]:
            spent: list[float] = []
            mode = "off" if v.endswith("no grad mask") else "timed"
            with _grad_mask(mode, spent):
                ms = _step(*built[v], *data[r % len(data)])
            if r >= warmup:
                samples[v].append(ms)
                if v == "projection":
                    in_mask.append(sum(spent))
    out = {v: _common.summary(samples[v]) for v in VARIANTS}
    dense = out["dense"]["median_ms"]
    for v in VARIANTS:
        out[v]["ratio_to_dense"] = out[v]["median_ms"] / dense
    out["grad_mask_in_step"] = _common.summary(in_mask)
    return out


def time_passes(spec, rounds: int) -> dict:
    """Median time of one pass over all pruned shapes of ``spec``'s model, per way of masking."""
    gen = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(shape, generator=gen), torch.rand(shape, generator=gen) >= train_step.AMOUNT)
               for shape in train_step.prunable_shapes(spec)]
    samples = {name: [] for name in PASSES}
    for r in range(rounds + 1):
        for name, fn in PASSES.items():
            with _common.Timer("cpu") as t:
                for values, mask in tensors:
                    fn(values, mask)
            if r:  # the first round warms up
                samples[name].append(t.ms)
    return {name: _common.summary(s) for name, s in samples.items()}


def markdown(results: dict, env: dict) -> str:
    lines = [
        "# The projection backend's gradient mask on CPU, against one pass at the floor\n",
        "Step: median ms (ratio to dense in the same run). `in mask`: the projection step's time "
        "inside its gradient mask. Passes: median ms of one in-place pass over every pruned "
        "tensor's shape; `floor` is a scalar `mul_(1.0)`. `% of dense` = pass / dense step.\n",
        f"Other processes spinning during the run (`--busy`): {results['busy']}.\n",
        _common.env_markdown(env),
        "| model | dense ms | projection | no grad mask | in mask ms | signmask ms | 256K chunks ms "
        "| promoted ms | floor ms | floor % of dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results["models"].items():
        s, p = res["steps"], res["passes"]
        dense = s["dense"]["median_ms"]
        cells = [f"{dense:.1f}"]
        cells += [f"{s[v]['median_ms']:.1f} ({s[v]['ratio_to_dense']:.3f})" for v in VARIANTS[1:]]
        cells += [f"{s['grad_mask_in_step']['median_ms']:.2f}"]
        cells += [f"{p[k]['median_ms']:.2f}" for k in PASSES]
        cells += [f"{100 * p['scalar floor']['median_ms'] / dense:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="subset of the cpu preset's model names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of each pass")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy-looping processes beside the run, each in its own session")
    parser.add_argument("--out", default="grad_mask_cost_cpu")
    args = parser.parse_args()
    names = [s.name for s in train_step.PRESETS["cpu"]]
    unknown = sorted(set(args.models or ()) - set(names))
    if unknown:
        parser.error(f"unknown --models {unknown}; the cpu preset has {names}")
    env = _common.environment("cpu")
    results = {"environment": env, "amount": train_step.AMOUNT, "fused": True, "busy": args.busy,
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "models": {}}
    with _spinning(args.busy):
        run_models(args, results)
    md = markdown(results, env)
    paths = _common.write_results(args.out, results, md)
    print(md)
    print("wrote", *paths)


@contextlib.contextmanager
def _spinning(count: int):
    """``count`` busy-looping processes, each in its own session, for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                for _ in range(count)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def run_models(args, results: dict) -> None:
    for spec in train_step.PRESETS["cpu"]:
        if args.models and spec.name not in args.models:
            continue
        spec = train_step.configured(spec, "spec", fused=True)
        print(f"[{spec.name}]", flush=True)
        results["models"][spec.name] = {"optimizer": spec.optimizer,
                                        "steps": time_steps(spec, args.steps, args.warmup),
                                        "passes": time_passes(spec, args.rounds)}


if __name__ == "__main__":
    main()
