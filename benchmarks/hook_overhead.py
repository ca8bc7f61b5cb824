"""Host cost per pruned tensor: a deep stack of small Linear layers, where Python overhead rules.

With small weights a training step is bound by what the host does per layer (hooks, dispatch,
kernel launches), not by the arithmetic: on a GPU this is the weight-bound regime (batch 8,
small layers), where a per-forward hook can cost more than the layer itself. Here ``--layers``
``Linear(width, width)`` layers at batch ``--batch`` run forward (no grad), forward+backward,
and a full SGD step; every variant in the same process, interleaved round by round, medians
after warm-up. The ``us/layer`` column is the extra host time per pruned layer over dense.

Variants: dense; stock ``prune.l1_unstructured`` (float mask, its pre-hook); signmask
``torch`` (free and sign-locked); ``projection`` (free and sign-locked: no per-forward work);
and ``triton`` on CUDA.

Usage::

    python benchmarks/hook_overhead.py                 # CPU, 1 thread
    python benchmarks/hook_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import signmask  # noqa: E402

PHASES = ("forward", "fwd+bwd", "step")
AMOUNT = 0.9


def build(variant: str, layers: int, width: int, device: str):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if variant == "stock":
        for layer in model:
            torch_prune.l1_unstructured(layer, "weight", AMOUNT)
    elif variant != "dense":
        backend, _, locked = variant.partition("-")
        signmask.prune(model, AMOUNT, scope="layer", signs="locked" if locked else None)
        signmask.set_backend(model, backend, optimizer=optimizer)
    return model, optimizer


def phases(model, optimizer, x):
    def forward():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        model(x).sum().backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()

    return dict(zip(PHASES, (forward, fwd_bwd, step)))


def measure(variants: list[str], args, report=None) -> dict:
    """Medians (in us, despite the keys) per (variant, phase); ``report(stats, rounds)`` after
    every timed round, so that a run stopped at a time limit keeps what it measured."""
    x = torch.randn(args.batch, args.width, device=args.device)
    runs = {v: phases(*build(v, args.layers, args.width, args.device), x) for v in variants}
    samples = {(v, p): [] for v in variants for p in PHASES}
    stats = {}
    for round_ in range(args.warmup + args.rounds):
        # interleaved, in a rotating order: drift on the host and order effects hit all alike
        for v in variants[round_ % len(variants):] + variants[: round_ % len(variants)]:
            for p, fn in runs[v].items():
                with _common.Timer(args.device) as t:
                    for _ in range(args.inner):
                        fn()
                if round_ >= args.warmup:
                    samples[(v, p)].append(t.ms * 1e3 / args.inner)
        if round_ >= args.warmup:
            stats = {key: _common.summary(s) for key, s in samples.items()}
            if report is not None:
                report(stats, round_ + 1 - args.warmup)
    return stats


def table(stats: dict, variants: list[str], layers: int) -> tuple[list[dict], str]:
    rows, lines = [], [
        "| variant | " + " | ".join(f"{p} us (p10-p90) | {p} us/layer" for p in PHASES) + " |",
        "|---|" + "---:|---:|" * len(PHASES),
    ]
    for v in variants:
        row = {"variant": v}
        cells = []
        for p in PHASES:
            st, dense = stats[(v, p)], stats[("dense", p)]["median_ms"]
            us = st["median_ms"]
            row[p] = {"us": round(us, 2), "p10_us": round(st["p10_ms"], 2),
                      "p90_us": round(st["p90_ms"], 2), "n": st["n"],
                      "us_per_layer_over_dense": round((us - dense) / layers, 2),
                      "ratio_to_dense": round(us / dense, 3)}
            cells.append(f"{us:.1f} ({st['p10_ms']:.0f}-{st['p90_ms']:.0f}) | "
                         f"{(us - dense) / layers:+.2f}")
        rows.append(row)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["dense", "stock", "torch", "torch-locked", "projection", "projection-locked"]
    if args.device == "cuda":
        variants[2:2] = ["triton", "triton-locked"]
    env = _common.environment(args.device)
    env["signmask_from"] = os.path.dirname(signmask.__file__)
    keys = ("device", "threads", "layers", "width", "batch", "rounds", "warmup", "inner")
    setup = {k: getattr(args, k) for k in keys} | {"amount": AMOUNT}
    stem = args.out or f"hook_overhead_{args.device}"

    def write(stats: dict, rounds: int) -> tuple:
        rows, md = table(stats, variants, args.layers)
        header = (f"# Host cost per pruned layer: {args.layers} x Linear({args.width}, {args.width}), "
                  f"batch {args.batch}, {AMOUNT:.0%} sparse ({args.device})\n\n{_common.env_markdown(env)}\n"
                  f"Medians of {rounds} rounds x {args.inner} calls after {args.warmup} warm-up "
                  "rounds; us/layer = (variant - dense) / layers.\n\n")
        result = {"environment": env, "setup": setup, "rows": rows, "rounds_done": rounds,
                  "complete": rounds == args.rounds}
        return md, _common.write_results(stem, result, header + md)

    md, paths = write(measure(variants, args, report=write), args.rounds)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
