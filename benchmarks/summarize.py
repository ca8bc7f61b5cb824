"""Summarize ``benchmarks/results/*.json`` into ``benchmarks/results/SUMMARY.md``.

The README's performance section is copied from this file. Usage::

    python benchmarks/summarize.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from signmask._files import write_atomic  # noqa: E402

GOAL_STEP = {"cuda": 1.02, "cpu": 1.05}


def _load(stem: str) -> dict | None:
    path = _common.RESULTS / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_table(res: dict, title: str) -> list[str]:
    models = res["models"]
    # Every variant any model has, in order: a failed one is missing from that model only.
    variants = list(dict.fromkeys(k for m in models.values() for k in m["variants"]))
    device = "cuda" if res["preset"] == "gpu" else "cpu"
    env = res["environment"]
    where = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores)"
    lines = [f"### {title}: step time / dense ({where}, torch {env['torch']}, "
             f"autocast {res['autocast']}, median of {res['steps']} steps)\n",
             "| model | dense ms | " + " | ".join(v for v in variants if v != "dense") + " |",
             "|---|---:|" + "---:|" * (len(variants) - 1)]
    for name, m in models.items():
        v = m["variants"]
        cells = []
        for k in variants:
            if k == "dense":
                continue
            if k not in v or "dense" not in v:
                cells.append("failed" if k in m.get("errors", {}) else "-")
                continue
            ratio = v[k]["ratio_to_dense"]
            mark = "" if ratio <= GOAL_STEP[device] else " ✗"
            cells.append(f"{ratio:.3f}{mark}")
        fused = ", fused" if m["spec"].get("fused") else ""
        dense = f"{v['dense']['median_ms']:.1f}" if "dense" in v else "failed"
        lines.append(f"| {name} (b{m['spec']['batch']}, {m['spec']['optimizer']}{fused}) | "
                     f"{dense} | " + " | ".join(cells) + " |")
    if any("peak_mib" in x for m in models.values() for x in m["variants"].values()):
        lines += ["", "Peak memory, MiB (resident + one step's peak extra):\n",
                  "| model | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(
                str(m["variants"].get(k, {}).get("peak_mib", "-")) for k in variants) + " |")
    # Written model by model: a run stopped at a time limit says so (older files lack the key).
    cut = " The run stopped before its last model." if res.get("complete") is False else ""
    failed = [f"{name} {k}" for name, m in models.items() for k in m.get("errors", {})]
    cut += f" Failed (see the results file): {', '.join(failed)}." if failed else ""
    lines.append(f"\n(✗: above the {GOAL_STEP[device]}x goal. Command: `{env['command']}`){cut}\n")
    return lines


def prune_lines(res: dict) -> list[str]:
    sm, st = res["methods"]["signmask"], res["methods"]["stock"]
    free, locked = sm["storage_free"], sm["storage_locked"]
    return [
        f"### Global magnitude pruning, {sm['total']:,} weights of {res['model']} ({res['device']})\n",
        "| | signmask | torch.nn.utils.prune | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| time, median ms | {sm['median_ms']:.0f} | {st['median_ms']:.0f} | {res['time_ratio']:.3f} | <= 0.5 |",
        f"| peak extra memory, MiB | {sm['peak_extra_mib']} | {st['peak_extra_mib']} | "
        f"{res['peak_memory_ratio']:.3f} | <= 0.25 |",
        f"| mask bytes / weight on device | {free['mask_bytes_per_weight']:.3f} (locked: "
        f"{locked['mask_bytes_per_weight'] + locked['sign_bytes_per_weight']:.3f}) | "
        f"{st['storage_free']['mask_bytes_per_weight']:.3f} | | <= 1 |",
        f"| ticket file, bits / weight | {free.get('ticket_bits_per_weight', float('nan')):.3f} | | | <= 2 |",
        "",
        f"Identical masks: {sm['mask_sha256_16'] == st['mask_sha256_16']}. Memory: {res['memory_method']}. "
        f"Command: `{res['environment']['command']}`\n",
    ]


def hook_lines(res: dict) -> list[str]:
    setup, env = res["setup"], res["environment"]
    lines = [f"### Host cost per pruned layer, {setup['layers']} x Linear({setup['width']}, {setup['width']}), "
             f"batch {setup['batch']} ({setup['device']}, {setup.get('threads', '?')} thread)\n",
             "| variant | forward us/layer | fwd+bwd us/layer | step us/layer |", "|---|---:|---:|---:|"]
    for row in res["rows"]:
        cells = [f"{row[k]['us_per_layer_over_dense']:+.1f}" for k in ("forward", "fwd+bwd", "step")]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    cut = (f" Stopped after {res['rounds_done']} of {setup['rounds']} rounds."
           if res.get("complete") is False else "")
    lines.append(f"\n(over dense, medians. Command: `{env['command']}`){cut}\n")
    return lines


def grad_mask_lines(res: dict, stem: str) -> list[str]:
    busy = res.get("busy", 0)
    title = "the projection backend's gradient mask against one pass at the floor"
    lines = [f"### CPU: {title}" + (f", {busy} busy process(es) beside it" if busy else "") + "\n",
             "| model | projection x dense | without its grad mask | in mask ms | signmask pass ms "
             "| 256K chunks ms | floor pass ms | floor % of dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        steps, passes = r["steps"], r["passes"]
        dense, floor = steps["dense"]["median_ms"], passes["scalar floor"]["median_ms"]
        lines.append(f"| {name} | {steps['projection']['ratio_to_dense']:.3f} | "
                     f"{steps['projection, no grad mask']['ratio_to_dense']:.3f} | "
                     f"{steps['grad_mask_in_step']['median_ms']:.2f} | "
                     f"{passes['signmask']['median_ms']:.2f} | {passes['256K chunks']['median_ms']:.2f} | "
                     f"{floor:.2f} | {100 * floor / dense:.1f} |")
    lines.append(f"\n(Command: `{res['environment']['command']}`; details: {stem}.md)\n")
    return lines


def kernel_lines(res: dict) -> list[str]:
    records = res["kernels"]
    errors = [r for r in records if r.get("error")]
    over = [r for r in records if r.get("shared_bytes", 0) > res["shared_limit"]]
    runnable = [r for r in records if not r.get("error") and r not in over]
    spills = [r for r in runnable if r.get("stack_bytes")]
    return [f"### Triton kernels compiled for sm_{res['arch']} (triton {res['triton']}, no GPU needed)\n",
            f"{len(records)} compilations: {len(errors)} errors, {len(over)} over the shared-memory limit "
            f"(the autotuner skips those), {len(spills)} of the other {len(runnable)} spill. "
            f"Details: kernel_resources_sm{res['arch']}.md\n"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no stray flags
    lines = ["# Benchmark summary (generated by `python benchmarks/summarize.py`)\n"]
    for stem, title in (("train_step_gpu", "GPU training step"), ("train_step_cpu", "CPU training step"),
                        ("train_step_cpu_fused", "CPU training step, fused optimizers"),
                        ("train_step_cpu_sgd", "CPU training step, every model on SGD"),
                        ("train_step_cpu_fused_b1x", "CPU batch sweep, fused optimizers, preset batches"),
                        ("train_step_cpu_fused_b4x", "CPU batch sweep, fused optimizers, 4x the batches"),
                        ("train_step_cpu_fused_b16x", "CPU batch sweep, fused optimizers, 16x the batches"),
                        ("train_step_cpu_compiled", "CPU training step, torch.compile'd (inductor), fused "
                                                    "optimizers"),
                        ("train_step_cpu_compiled_eager", "CPU training step, eager, beside the compiled "
                                                          "run (same session, same threads)")):
        res = _load(stem)
        lines += train_table(res, title) if res else [f"### {title}: not measured yet\n"]
    for stem in ("global_prune_cuda", "global_prune_cpu"):
        res = _load(stem)
        if res and res.get("complete") is False:  # stopped at its limit after one method
            lines.append(f"### Global pruning ({res['device']}): partial run, "
                         f"{', '.join(res['methods'])} only\n")
        elif res:
            lines += prune_lines(res)
    for stem in ("hook_overhead_cuda", "hook_overhead_cpu"):
        res = _load(stem)
        if res:
            lines += hook_lines(res)
    for stem in ("grad_mask_cost_cpu", "grad_mask_cost_cpu_busy"):
        res = _load(stem)
        if res:
            lines += grad_mask_lines(res, stem)
    res = _load("kernel_resources_sm90")
    if res:
        lines += kernel_lines(res)
    res = _load("kernels_cuda")
    lines.append("### Kernels (GPU): see kernels_cuda.md\n" if res else "### Kernels (GPU): not measured yet\n")
    text = "\n".join(lines) + "\n"
    write_atomic(_common.RESULTS / "SUMMARY.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
