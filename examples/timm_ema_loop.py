"""An AWS (or LRR) search inside a timm training loop with a model EMA.

The training code is built from timm's own pieces: a ``resnet10t`` (``pretrained=False``, narrowed
to be quick on a CPU), ``timm.optim.create_optimizer_v2`` (SGD, no weight decay on norms and
biases), ``timm.scheduler.create_scheduler_v2`` (warm-up + cosine, stepped per epoch) and
``timm.utils.ModelEmaV3``. The five lines marked ``# signmask`` make it a lottery search: after
each round the search prunes 35% of the remaining conv weights (the classifier stays dense), resets
the optimizer's momentum and puts the learning rate back where the schedule started, and the
loop's ``range(num_epochs)`` runs the schedule again from epoch 0. With ``--method aws`` (default)
every BatchNorm is interpolated with its init during training, as in "Find A Winning Sign".

The EMA copy is made AFTER ``signmask.apply``: apply installs every mask up front (all ones at
first), so the model's parameters and buffers keep one layout for the whole search and the EMA,
which pairs the model's and its own state_dict entries in order, stays aligned (an EMA made before
apply() fails at its first update). It copies the masks (bool buffers) at each update, so it
always averages the currently pruned network. With AWS, the search removes the norm interpolation
from the model when it ends, but the EMA copy keeps its own (``bn.weight_orig``/``bn.weight_init``)
until ``search.close(ema.module)`` removes it too: then the EMA evaluates the plain trained norms
and its state_dict has the model's layout again.

Run (from the repository root):
    python examples/timm_ema_loop.py --quick              # seconds, synthetic data
    python examples/timm_ema_loop.py                      # a few minutes on a CPU (CIFAR-10 if found)
    python examples/timm_ema_loop.py --method lrr --data cifar10.npz
Outputs in ``--out``: ``ticket.safetensors`` and ``results.json`` (per round: sparsity, steps,
train loss, accuracy of the model and of its EMA). ``--data`` takes a CIFAR-10 ``.npz`` with ``x_train``,
``y_train``, ``x_test``, ``y_test`` (uint8 HWC); ``synthetic`` is a seeded 10-class task, no download.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import signmask
from _data import accuracy, base_parser, fill_defaults, load_data, write_json  # shared helpers, beside them
from signmask._compat import import_timm

def train_one_epoch(model: nn.Module, ema, loader: DataLoader, opt: torch.optim.Optimizer,
                    step: int) -> tuple[float, int]:
    """One epoch; the EMA follows every optimizer step. Returns the mean loss and the global step."""
    model.train()
    total = 0.0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        step += 1
        ema.update(model, step=step)
        total += loss.item() * len(y)
    return total / len(loader.dataset), step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__, out="out/timm_ema", lr=0.05)
    p.add_argument("--method", default="aws", choices=("aws", "lrr"))
    p.add_argument("--rate", type=float, default=None, help="fraction of remaining weights pruned per round")
    p.add_argument("--epochs", type=int, default=None, help="epochs per round (warm-up included)")
    p.add_argument("--ema-decay", type=float, default=None)
    args = p.parse_args(argv)
    return fill_defaults(
        args,
        quick=dict(rate=0.5, epochs=2, ema_decay=0.9, batch_size=32, channels=(8, 16, 32, 64), n_train=256,
                   n_test=128),
        full=dict(rate=0.35, epochs=4, ema_decay=0.99, batch_size=128, channels=(16, 32, 64, 128), n_train=4000,
                  n_test=2000),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    timm = import_timm()  # plain `import timm` fails where a CUDA torchvision sits beside a CPU torch
    import timm.optim, timm.scheduler, timm.utils  # noqa: E401 (its submodules, now that timm imports)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args.data, args.n_train, args.n_test, args.seed, size=32)
    loader = DataLoader(train_set, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, 512)
    print(f"data: {args.data} ({len(train_set)} train / {len(test_set)} test images)")

    # zero_init_last=False: every BN gamma starts at 1, the init AWS interpolates towards (the
    # paper's setting); timm would start each block's last gamma at 0.
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, channels=args.channels,
                              stem_width=args.channels[0], zero_init_last=False)
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=args.lr, weight_decay=5e-4, momentum=0.9)
    sched, num_epochs = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=args.epochs, warmup_epochs=1,
                                                           warmup_lr=args.lr / 10, min_lr=args.lr / 100)
    search = signmask.apply(model, args.method, args.sparsity, optimizer=opt, scheduler=sched, rate=args.rate)  # signmask
    ema = timm.utils.ModelEmaV3(model, decay=args.ema_decay, use_warmup=True)  # a copy: made after apply()
    step = 0
    for _ in search:  # signmask
        for epoch in range(num_epochs):
            loss, step = train_one_epoch(model, ema, loader, opt, step)
            sched.step(epoch + 1)
        acc, ema_acc = accuracy(model, test_loader), accuracy(ema.module, test_loader)
        # Reported, not printed: the round's log line shows it (a print would land on the round's bar).
        search.report(loss=loss, acc=acc, ema_acc=ema_acc)  # signmask
    search.save(out / "ticket.safetensors")  # signmask
    search.close(ema.module)  # signmask: the EMA copy drops AWS's norm interpolation too
    rounds = search.history

    results = {"args": {**vars(args), "channels": list(args.channels)}, "rounds": rounds}
    write_json(out / "results.json", results)
    print(f"saved {out / 'ticket.safetensors'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
