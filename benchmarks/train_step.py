"""Training-step time and peak memory: dense vs ``torch.nn.utils.prune`` vs signmask backends.

One step = ``zero_grad`` + forward + loss + backward + ``optimizer.step()``, at 90% global
magnitude sparsity over every conv/linear weight (classifier included, the same selection for
stock prune and signmask). All variants of a model are built from the same initialization and
timed in ONE process, interleaved round by round (the order rotates each round), so drift hits
them alike; medians after warm-up rounds are reported as ratios to dense.

Peak memory per variant: ``resident`` (unique tensors held between steps: parameters, buffers,
masks, the effective weights the hooks leave on the modules, gradients, optimizer state) plus
``step_extra`` (peak bytes above the level at the start of one step: activations and
temporaries). On CUDA from ``torch.cuda.max_memory_allocated``; on CPU each variant runs in its
own process and ``step_extra`` is the rise of the peak RSS (see ``_common``).

Usage::

    python benchmarks/train_step.py --preset gpu       # H100/H200: bf16 autocast, full sizes
    python benchmarks/train_step.py --preset cpu       # this machine: small sizes, fp32
    python benchmarks/train_step.py --preset dry       # CPU, tiny models, Triton interpreted:
                                                       # exercises every GPU-preset code path
    python benchmarks/train_step.py --preset cpu --fused --compile   # every model torch.compile'd

``--compile [BACKEND]`` wraps each variant's model in ``torch.compile`` (default mode, inductor
unless another backend is named) after pruning and the backend's set-up; the optimizer step stays
eager. Compilation happens in the first round, a warm-up round; the ratios are to the dense model
compiled the same way. Dynamo's recompile limit is raised (every variant of a model compiles the
same ``forward`` anew) and made an error, so no variant runs eagerly after hitting it unnoticed;
each variant's graphs and graph breaks are counted from ``torch._dynamo.utils.counters``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from typing import Callable

if "--preset" in sys.argv and sys.argv[sys.argv.index("--preset") + 1] == "dry":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import signmask  # noqa: E402
from signmask import _backends, _maskmul, _targets  # noqa: E402

AMOUNT = 0.9
# Per model, every variant compiles the same forward anew (dynamo's default limit is 8 entries
# per code object, the GPU preset has 8 variants); the caches are reset between models.
RECOMPILE_LIMIT = 64


@dataclasses.dataclass
class Spec:
    """One benchmarked model: how to build it, its batch and its optimizer."""

    name: str
    build: Callable[[], nn.Module]
    batch: int
    input_shape: tuple[int, ...]
    optimizer: str = "adamw"
    channels_last: bool = False
    classes: int = 1000
    fused: bool = False  # the optimizer's fused implementation (torch >= 2.4 on CPU and CUDA)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: _common.import_timm().create_model(name, pretrained=False, **kwargs)


def _mlp(width: int, depth: int, classes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        return nn.Sequential(*layers, nn.Linear(width, classes))

    return build


PRESETS: dict[str, list[Spec]] = {
    "gpu": [
        Spec("resnet50", _timm("resnet50"), 128, (3, 224, 224), "sgd", channels_last=True),
        Spec("vit_base_patch16_224", _timm("vit_base_patch16_224"), 64, (3, 224, 224)),
        Spec("convnext_tiny", _timm("convnext_tiny"), 128, (3, 224, 224), channels_last=True),
        Spec("vit_base_patch16_224@b8", _timm("vit_base_patch16_224"), 8, (3, 224, 224)),
        Spec("mlp4096x4@b8", _mlp(4096, 4, 1000), 8, (4096,)),
    ],
    "cpu": [
        Spec("resnet50@64px", _timm("resnet50"), 8, (3, 64, 64), "sgd"),
        Spec("vit_base_patch16@64px", _timm("vit_base_patch16_224", img_size=64), 4, (3, 64, 64)),
        Spec("convnext_tiny@64px", _timm("convnext_tiny"), 8, (3, 64, 64)),
        Spec("mlp2048x3@b8", _mlp(2048, 3, 1000), 8, (2048,)),
    ],
    "dry": [  # tiny stand-ins of the same families: the interpreter is ~1e5x slower than a GPU
        Spec("resnet50-tiny", _timm("resnet50", channels=(4, 8, 16, 32), stem_width=8,
                                    num_classes=10), 2, (3, 32, 32), "sgd", True, 10),
        Spec("vit-tiny", _timm("vit_base_patch16_224", img_size=32, embed_dim=32, depth=2,
                               num_heads=2, num_classes=10), 2, (3, 32, 32), classes=10),
        Spec("convnext-tiny", _timm("convnext_tiny", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                                    num_classes=10), 2, (3, 32, 32), channels_last=True,
             classes=10),
        Spec("mlp", _mlp(64, 2, 10), 4, (64,), classes=10),
    ],
}

VARIANTS: dict[str, dict] = {
    "dense": {},
    "prune": {"stock": True},
    "torch": {"backend": "torch"},
    "torch-locked": {"backend": "torch", "signs": "locked"},
    "triton": {"backend": "triton"},
    "triton-locked": {"backend": "triton", "signs": "locked"},
    "projection": {"backend": "projection"},
    "projection-locked": {"backend": "projection", "signs": "locked"},
}


def make_optimizer(kind: str, params, fused: bool = False) -> torch.optim.Optimizer:
    extra = {"fused": True} if fused else {}
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-5, **extra)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **extra)


def build(spec: Spec, variant: str, device: str,
          compile_backend: str | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model of ``spec`` (seed 0) pruned as ``variant`` wants, with its optimizer; wrapped in
    ``torch.compile(backend=compile_backend)`` when one is given (compiled at its first call)."""
    torch.manual_seed(0)
    model = spec.build().to(device)
    cfg = VARIANTS[variant]
    if cfg.get("stock"):
        targets = _targets.select(model)
        torch_prune.global_unstructured(
            list(targets.values()), pruning_method=torch_prune.L1Unstructured, amount=AMOUNT
        )
    elif "backend" in cfg:
        signmask.prune(model, AMOUNT, signs=cfg.get("signs"))
    # After pruning: stock global_unstructured cannot flatten channels_last weights (view(-1)).
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), spec.fused)
    if "backend" in cfg:
        _backends.set_backend(model, cfg["backend"], optimizer=optimizer)
    if compile_backend:  # the optimizer holds the same Parameters: the wrapper shares them
        model = torch.compile(model, backend=compile_backend)
    return model, optimizer


def batches(spec: Spec, device: str, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):  # random data, never zeros (zeros can run faster than real data)
        x = torch.randn(spec.batch, *spec.input_shape, generator=gen).to(device)
        if spec.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(device)))
    return out


def train_step(model, optimizer, x, y, amp_dtype) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the unique storages a variant holds between steps."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for module in model.modules():  # effective weights the hooks leave as plain attributes
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        tensors += _common.hook_tensors(module)  # stock prune's flat mask
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += list(_maskmul._buffers.values())  # the CPU multiply's float buffer, kept between steps
    return _common.unique_bytes(tensors)


def prunable_shapes(spec: Spec) -> list[torch.Size]:
    """Shapes of the weights the pruned variants prune (every conv/linear weight, as
    ``_targets.select`` picks them for ``signmask.prune`` and the stock variant), read from a
    model built on the meta device (no storage, nothing to initialize; ``select`` itself
    refuses meta tensors)."""
    with torch.device("meta"):
        model = spec.build()
    return [getattr(module, name).shape for module, name in _targets.tensor_index(model).values()
            if isinstance(module, _targets.PRUNABLE_TYPES)]


def prunable_weights(spec: Spec) -> int:
    """How many weights the pruned variants prune (see :func:`prunable_shapes`); counted on a
    CPU build where a model cannot be built on the meta device (older timm's drop-path rates
    call ``.item()``)."""
    try:
        return sum(shape.numel() for shape in prunable_shapes(spec))
    except (RuntimeError, NotImplementedError):
        model = spec.build()
        return sum(getattr(m, n).numel() for m, n in _targets.tensor_index(model).values()
                   if isinstance(m, _targets.PRUNABLE_TYPES))


def variants_for(device: str, wanted: list[str] | None) -> list[str]:
    names = [v for v in VARIANTS if device == "cuda" or not v.startswith("triton")]
    if os.environ.get("TRITON_INTERPRET") == "1":  # dry run: the Triton path through the interpreter
        names = list(VARIANTS)
    return [v for v in names if wanted is None or v in wanted]


def time_model(spec: Spec, variants: list[str], device: str, args, errors: dict) -> dict:
    """Interleaved timing of all variants of ``spec`` in this process. A variant that raises
    (building, stepping or measuring) is recorded in ``errors`` and left out from then on: one
    failing backend must not cost the others' numbers in a single GPU lease. Under
    ``args.compile`` each variant also gets its dynamo counts (graphs, graph breaks, ops captured,
    graphs compiled in timed rounds) and its first step's time in seconds (compilation)."""
    if args.compile:
        torch._dynamo.reset()  # this model's variants start from empty caches
    built = {}
    for v in variants:
        try:
            built[v] = build(spec, v, device, args.compile)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            errors[v] = f"build: {e!r}"
    data = batches(spec, device)
    samples: dict[str, list[float]] = {v: [] for v in built}
    first_loss = {}
    compiled: dict[str, Counter] = {v: Counter() for v in built}
    for r in range(args.warmup + args.steps):
        alive = list(built)
        for v in alive[r % len(alive):] + alive[: r % len(alive)] if alive else []:
            model, opt = built[v]
            x, y = data[r % len(data)]
            before = _common.dynamo_counts() if args.compile else None
            try:
                with _common.Timer(device) as t:
                    loss = train_step(model, opt, x, y, args.amp_dtype)
            except Exception as e:  # noqa: BLE001 - a failed compilation lands here too
                errors[v] = f"step {r}: {e!r}"
                del built[v], samples[v]
                continue
            if before is not None:
                delta = _common.dynamo_counts() - before
                compiled[v] += delta
                if r >= args.warmup:  # a recompilation inside the timed rounds
                    compiled[v]["graphs_in_timed_rounds"] += delta["graphs"]
            if r == 0:
                first_loss[v] = float(loss)
                if args.compile:
                    compiled[v]["first_step_s"] = round(t.ms / 1e3, 2)
            if r >= args.warmup:
                samples[v].append(t.ms)
    out = {v: {**_common.summary(samples[v]), "first_loss": first_loss[v]} for v in built}
    if args.compile:
        for v in out:
            out[v]["compile"] = {k: compiled[v][k] for k in (
                "graphs", "graph_breaks", "ops_captured", "graphs_in_timed_rounds", "first_step_s")}
            try:  # after the timed rounds: a forward of the same input, no step
                out[v]["compile"]["graphs_run"] = _common.graphs_run(built[v][0], data[0][0], args.amp_dtype)
            except Exception as e:  # noqa: BLE001
                errors[v] = f"graphs_run: {e!r}"
    if device == "cuda" or args.preset == "dry":  # in-process, as on the GPU
        for v in list(out):
            try:
                out[v].update(measure_memory(*built[v], data[0], device, args.amp_dtype))
            except Exception as e:  # noqa: BLE001
                errors[v] = f"memory: {e!r}"
    return out


def measure_memory(model, opt, batch, device, amp_dtype) -> dict:
    train_step(model, opt, *batch, amp_dtype)  # state and grads exist
    with _common.PeakMemory(device) as mem:
        train_step(model, opt, *batch, amp_dtype)
    resident = resident_bytes(model, opt)
    return {"resident_mib": _common.mib(resident), "step_extra_mib": _common.mib(mem.peak),
            "peak_mib": _common.mib(resident + mem.peak)}


def configured(spec: Spec, optimizer: str, fused: bool, batch_scale: int = 1) -> Spec:
    """``spec`` with the command line's optimizer (unless ``"spec"``), fused flag and batch scale."""
    return dataclasses.replace(spec, fused=fused, batch=spec.batch * batch_scale,
                               optimizer=spec.optimizer if optimizer == "spec" else optimizer)


def child(model_name: str, variant: str, preset: str, amp: bool, optimizer: str, fused: bool,
          batch_scale: int, compile_backend: str | None = None) -> dict:
    """Memory of one variant in a fresh process (CPU): see ``_common``. A compiled variant
    compiles in the first of ``measure_memory``'s two steps, before the measured one."""
    spec = next(s for s in PRESETS[preset] if s.name == model_name)
    spec = configured(spec, optimizer, fused, batch_scale)
    if compile_backend:
        _common.configure_dynamo(RECOMPILE_LIMIT)
    model, opt = build(spec, variant, "cpu", compile_backend)
    data = batches(spec, "cpu", 1)
    return measure_memory(model, opt, data[0], "cpu", torch.bfloat16 if amp else None)


def markdown(results: dict, env: dict, args) -> str:
    compiled = f", torch.compile ({args.compile})" if args.compile else ""
    lines = [
        f"# Training step at {AMOUNT:.0%} sparsity ({args.preset} preset{compiled})\n",
        "Median step time (ms) and ratio to dense; peak memory = resident + step extra (MiB).\n",
        _common.env_markdown(env),
    ]
    if args.compile:
        lines.append("Every variant, dense included, compiled (default mode, the optimizer step "
                     "eager). Graphs and graph breaks: dynamo's counts for the variant over the whole run; "
                     "graphs run: compiled graphs in the autograd graph of one forward after the "
                     "timed rounds (0 if it ran eagerly); first s: the first step (compilation).\n")
    for model, res in results["models"].items():
        spec = res["spec"]
        fused = ", fused" if spec.get("fused") else ""
        lines.append(f"\n## {model} (batch {spec['batch']}, input {spec['input_shape']}, "
                     f"{spec['optimizer']}{fused}, {spec['weights']:,} prunable weights)\n")
        extra = " graphs | breaks | graphs run | first s |" if args.compile else ""
        lines.append("| variant | median ms | p10-p90 ms | x dense | peak MiB | resident MiB | "
                     "step extra MiB |" + extra)
        lines.append("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (4 if args.compile else 0))
        for v, r in res["variants"].items():
            c = r.get("compile")
            lines.append(
                f"| {v} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | "
                f"{r['ratio_to_dense']:.3f} | {r.get('peak_mib', '-')} | {r.get('resident_mib', '-')} | "
                f"{r.get('step_extra_mib', '-')} |"
                + (f" {c['graphs']} | {c['graph_breaks']} | {c.get('graphs_run', '-')} | "
                   f"{c['first_step_s']} |" if c else "")
            )
        for what, message in res.get("errors", {}).items():
            lines.append(f"\n**{what} failed:** `{message}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", nargs="*", help="subset of the preset's model names")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 30 GPU, 20 CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--optimizer", choices=("spec", "sgd", "adamw"), default="spec",
                        help="override every model's optimizer (default: each model's own)")
    parser.add_argument("--fused", action="store_true",
                        help="every optimizer in its fused implementation (fused=True)")
    parser.add_argument("--batch-scale", type=int, default=1, metavar="K",
                        help="multiply every model's batch by K (the per-step mask work stays the "
                             "same, so its share of the step shrinks)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile every variant's model (default mode; backend inductor "
                             "unless named, e.g. aot_eager); ratios are to the dense model compiled "
                             "alike; the first round (a warm-up round) compiles")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory processes")
    parser.add_argument("--out", default=None, help="results file stem under benchmarks/results/")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.preset == "gpu" else "cpu"
    amp = args.preset in ("gpu", "dry")  # dry run follows the GPU recipe: bf16 autocast
    if args.child:
        print(json.dumps(child(*args.child, args.preset, amp, args.optimizer, args.fused,
                               args.batch_scale, args.compile)))
        return
    if args.batch_scale < 1:
        parser.error(f"--batch-scale must be a positive integer, got {args.batch_scale}")
    if args.compile and args.warmup == 0:
        parser.error("--compile needs --warmup of at least 1: the first round compiles")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--preset gpu needs CUDA")
    args.amp_dtype = torch.bfloat16 if amp else None
    args.steps = args.steps or {"gpu": 30, "cpu": 20, "dry": 2}[args.preset]
    args.warmup = args.warmup if args.warmup is not None else {"gpu": 5, "cpu": 2, "dry": 1}[args.preset]
    if args.compile:
        _common.configure_dynamo(RECOMPILE_LIMIT)
    env = _common.environment(device)
    specs = [configured(s, args.optimizer, args.fused, args.batch_scale)
             for s in PRESETS[args.preset] if not args.models or s.name in args.models]
    variants = variants_for(device, args.variants)
    results = {"environment": env, "amount": AMOUNT, "preset": args.preset,
               "autocast": str(args.amp_dtype), "steps": args.steps, "warmup": args.warmup,
               "auto_backend_resolves_to": _backends.AutoBackend.resolve(torch.zeros(1, device=device)),
               "models": {}}
    if args.compile:  # only then: files of eager runs keep their keys
        results["compile"] = {"backend": args.compile, "mode": "default",
                              "recompile_limit": RECOMPILE_LIMIT}
    for spec in specs:
        print(f"[{spec.name}] timing {variants}", flush=True)
        errors: dict[str, str] = {}
        try:
            res = time_model(spec, variants, device, args, errors)
        except Exception as e:  # noqa: BLE001 - the next models still get measured
            res, errors["model"] = {}, repr(e)
        for what, message in errors.items():
            print(f"  {what} FAILED: {message}", flush=True)
        if args.preset == "cpu" and not args.no_memory:
            for v in res:
                cmd = [os.path.abspath(__file__), "--preset", args.preset, "--optimizer",
                       args.optimizer, "--batch-scale", str(args.batch_scale),
                       "--child", spec.name, v] + ["--fused"] * args.fused
                cmd += ["--compile", args.compile] if args.compile else []
                res[v].update(_common.run_child(cmd))
        dense = res["dense"]["median_ms"] if "dense" in res else float("nan")
        for v in res:
            res[v]["ratio_to_dense"] = res[v]["median_ms"] / dense
            c = res[v].get("compile")
            graphs = (f"  {c['graphs']} graphs, {c['graph_breaks']} breaks, "
                      f"{c.get('graphs_run')} run" if c else "")
            print(f"  {v:18s} {res[v]['median_ms']:9.2f} ms  x{res[v]['ratio_to_dense']:.3f}{graphs}",
                  flush=True)
        weights = prunable_weights(spec)
        results["models"][spec.name] = {
            "spec": {"batch": spec.batch, "input_shape": list(spec.input_shape),
                     "optimizer": spec.optimizer, "fused": spec.fused,
                     "channels_last": spec.channels_last,
                     "weights": weights},
            "variants": res,
            "errors": errors,
        }
        # After every model: a run stopped at a time limit (gpu_session.py) keeps what it did.
        env["loadavg_at_end"] = list(os.getloadavg())
        results["complete"] = spec is specs[-1]
        stem = args.out or f"train_step_{args.preset}"
        paths = _common.write_results(stem, results, markdown(results, env, args))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
