"""IMP with rewinding, added to a plain PyTorch training loop in five lines.

The training code below is ordinary PyTorch: a small BatchNorm CNN, SGD with momentum and weight
decay, a cosine LR schedule stepped once per epoch. The five lines marked ``# signmask`` turn it
into iterative magnitude pruning with rewinding (Frankle et al.; open_lth's recipe):

- round 0 trains the dense network;
- after each round, 20% of the remaining conv/linear weights are pruned (global magnitude, the
  classifier included), the weights are rewound to their values after epoch 1 (``rewind="1ep"``),
  and the optimizer (momentum) and the LR schedule are restarted from that same point;
- the last round trains at the target sparsity (reached exactly), and its signed mask
  ``sign(theta_T * M_T)`` is saved as ``ticket.safetensors``.

The epoch loop starts at the LR schedule's epoch (``range(sched.last_epoch, epochs)``), as a
resumable loop does: after a rewind to epoch 1 it trains the remaining epochs, like open_lth.

Data: CIFAR-10 from an ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8
HWC images), a subset averaged down to 16x16 to be quick on a CPU; ``--data synthetic`` (the
default when no such file is found, and with ``--quick``) is a seeded 10-class image task made
on the spot, so nothing is downloaded.

Run (from the repository root):
    python examples/imp_rewind_plain_loop.py --quick          # seconds, synthetic data
    python examples/imp_rewind_plain_loop.py                  # a few minutes on a CPU
    python examples/imp_rewind_plain_loop.py --data cifar10.npz --out runs/imp
Outputs in ``--out``: ``ticket.safetensors`` (inspect it with ``python -m signmask inspect``)
and ``results.json`` (per round: sparsity, optimizer steps, train loss, test accuracy).
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

def make_model(width: int) -> nn.Module:
    """A small BatchNorm CNN for 16x16 RGB images and 10 classes."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer) -> float:
    model.train()
    total = 0.0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += loss.item() * len(y)
    return total / len(loader.dataset)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__, out="out/imp_rewind", lr=0.1)
    p.add_argument("--epochs", type=int, default=None, help="epochs per round")
    p.add_argument("--width", type=int, default=None)
    args = p.parse_args(argv)
    fill_defaults(
        args,
        quick=dict(epochs=2, width=8, batch_size=32, n_train=512, n_test=256),
        full=dict(epochs=5, width=32, batch_size=128, n_train=5000, n_test=2000),
    )
    if args.epochs < 2:  # rounds after the first train from the rewind point, epoch 1, on
        p.error(f"--epochs must be >= 2 with the rewind to epoch 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args.data, args.n_train, args.n_test, args.seed)
    loader = DataLoader(train_set, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, 512)
    print(f"data: {args.data} ({len(train_set)} train / {len(test_set)} test images)")

    model = make_model(args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    search = signmask.apply(model, "imp", args.sparsity, optimizer=opt, scheduler=sched,  # signmask
                            rewind="1ep", steps_per_epoch=len(loader))
    for _ in search:  # signmask
        for epoch in range(sched.last_epoch, args.epochs):  # starts where the LR schedule stands
            loss = train_epoch(model, loader, opt)
            sched.step()
        acc = accuracy(model, test_loader)
        # Reported, not printed: the round's log line shows it (a print would land on the round's bar).
        search.report(loss=loss, acc=acc)  # signmask
    search.save(out / "ticket.safetensors")  # signmask

    results = {"args": vars(args), "rounds": search.history}  # signmask
    write_json(out / "results.json", results)
    print(f"saved {out / 'ticket.safetensors'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
