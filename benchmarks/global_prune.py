"""Global magnitude pruning of a ~25M-weight model: signmask vs ``prune.global_unstructured``.

Both prune 90% of every conv/linear weight of timm ``resnet50`` (25.5M prunable weights, the
same selection) by global L1 magnitude. Each method runs in its own process: the model is built,
then the peak extra memory of the first pruning is measured (see ``_common``: peak RSS above
the level at entry on CPU, ``max_memory_allocated`` on CUDA), then the pruning time is the
median over fresh models. Also records the storage of the result: mask (+ sign) bytes per
weight on the device, and the ticket file size in bits per weight.

Usage::

    python benchmarks/global_prune.py --device cpu
    python benchmarks/global_prune.py --device cuda
    python benchmarks/global_prune.py --device cpu --model resnet18 --repeats 2   # quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import signmask  # noqa: E402
from signmask import _targets  # noqa: E402

AMOUNT = 0.9
METHODS = ("signmask", "stock")


def build(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _common.import_timm().create_model(name, pretrained=False).to(device)


def prune_once(model: torch.nn.Module, method: str) -> None:
    if method == "signmask":
        signmask.prune(model, AMOUNT)
    else:
        targets = list(_targets.select(model).values())
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=AMOUNT)


def mask_digest(model: torch.nn.Module) -> tuple[str, int, int]:
    """sha256 of all keep-masks (as bool, in module order), kept and total counts."""
    h, kept, total = hashlib.sha256(), 0, 0
    for module, name in _targets.pruned(model).values():
        keep = (getattr(module, name + "_mask") != 0).cpu().contiguous()
        h.update(keep.numpy().tobytes())
        kept, total = kept + int(keep.sum()), total + keep.numel()
    return h.hexdigest()[:16], kept, total


def storage(model: torch.nn.Module, ticket: bool = True) -> dict:
    """Bytes per weight of the masks (and signs) on the device, and of the ticket file."""
    pruned = list(_targets.pruned(model).values())
    weights = sum(getattr(m, n + "_mask").numel() for m, n in pruned)
    # The buffers and whatever the hooks hold besides (stock: a flat fp32 mask, 4 B per weight).
    masks = [getattr(m, n + "_mask") for m, n in pruned]
    modules = {id(m): m for m, _ in pruned}.values()
    mask_bytes = _common.unique_bytes(masks + [t for m in modules for t in _common.hook_tensors(m)])
    sign_bytes = sum(m._buffers[n + "_sign"].nbytes for m, n in pruned if n + "_sign" in m._buffers)
    out = {"weights": weights, "mask_bytes_per_weight": mask_bytes / weights,
           "sign_bytes_per_weight": sign_bytes / weights}
    if ticket:
        with tempfile.TemporaryDirectory() as tmp:
            path = signmask.save(signmask.extract(model), os.path.join(tmp, "t.safetensors"))
            out["ticket_bits_per_weight"] = os.path.getsize(path) * 8 / weights
    return out


def child(method: str, model_name: str, device: str, repeats: int) -> dict:
    model = build(model_name, device)
    with _common.PeakMemory(device) as mem:
        prune_once(model, method)
    result = {"peak_extra_mib": _common.mib(mem.peak), "retained_extra_mib": _common.mib(mem.retained)}
    result["mask_sha256_16"], result["kept"], result["total"] = mask_digest(model)
    if method == "signmask":
        result["storage_free"] = storage(model)
        locked = build(model_name, device)
        signmask.prune(locked, AMOUNT, signs="locked")
        result["storage_locked"] = storage(locked)
        del locked
    else:
        result["storage_free"] = storage(model, ticket=False)
    times = []
    for _ in range(repeats):
        del model
        model = build(model_name, device)
        with _common.Timer(device) as t:
            prune_once(model, method)
        times.append(t.ms)
    result.update(_common.summary(times))
    return result


def markdown(res: dict, env: dict) -> str:
    sm, st = res["methods"]["signmask"], res["methods"]["stock"]
    lines = [
        f"# Global magnitude pruning, {AMOUNT:.0%} of {sm['total']:,} weights ({res['model']}, {res['device']})\n",
        _common.env_markdown(env),
        "| method | median ms | p10-p90 ms | peak extra MiB | retained extra MiB | masks sha256/16 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in res["methods"].items():
        lines.append(f"| {name} | {r['median_ms']:.0f} | {r['p10_ms']:.0f}-{r['p90_ms']:.0f} | "
                     f"{r['peak_extra_mib']} | {r['retained_extra_mib']} | `{r['mask_sha256_16']}` |")
    lines += [
        "",
        f"- time ratio signmask / stock: **{res['time_ratio']:.3f}** (goal <= 0.5)",
        f"- peak extra memory ratio: **{res['peak_memory_ratio']:.3f}** (goal <= 0.25)",
        f"- identical masks: {sm['mask_sha256_16'] == st['mask_sha256_16']}",
        f"- mask bytes per weight: signmask {sm['storage_free']['mask_bytes_per_weight']:.3f}, "
        f"sign-locked {sm['storage_locked']['mask_bytes_per_weight'] + sm['storage_locked']['sign_bytes_per_weight']:.3f} "
        f"(goal <= 1), stock {st['storage_free']['mask_bytes_per_weight']:.3f}",
    ]
    if "ticket_bits_per_weight" in sm["storage_free"]:
        lines.append(f"- ticket file: {sm['storage_free']['ticket_bits_per_weight']:.4f} bits per weight (goal <= 2)")
    lines.append(f"- memory: {res['memory_method']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.device, args.repeats)))
        return
    env = _common.environment(args.device)
    res = {"environment": env, "model": args.model, "device": args.device, "amount": AMOUNT,
           "memory_method": ("CUDA max_memory_allocated above the level at entry"
                             if args.device == "cuda" else
                             "peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS at entry, "
                             "one process per method, MALLOC_MMAP_THRESHOLD_=131072"),
           "methods": {}}
    for method in METHODS:
        cmd = [os.path.abspath(__file__), "--child", method, "--model", args.model,
               "--device", args.device, "--repeats", str(args.repeats)]
        res["methods"][method] = _common.run_child(cmd)
        r = res["methods"][method]
        print(f"{method:9s} {r['median_ms']:8.0f} ms  peak extra {r['peak_extra_mib']} MiB", flush=True)
        if len(res["methods"]) < len(METHODS):  # a run stopped at a time limit keeps this one
            partial = f"# Global pruning: partial run ({', '.join(res['methods'])} only)\n\n" \
                + _common.env_markdown(env)
            _common.write_results(args.out or f"global_prune_{args.device}", {**res, "complete": False}, partial)
    sm, st = res["methods"]["signmask"], res["methods"]["stock"]
    res["time_ratio"] = sm["median_ms"] / st["median_ms"]
    res["peak_memory_ratio"] = sm["peak_extra_mib"] / st["peak_extra_mib"]
    env["loadavg_at_end"] = list(os.getloadavg())
    paths = _common.write_results(args.out or f"global_prune_{args.device}", res, markdown(res, env))
    print(f"time ratio {res['time_ratio']:.3f}, peak memory ratio {res['peak_memory_ratio']:.3f}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
