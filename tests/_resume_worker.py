"""A training process for the resume test: an AWS search that checkpoints after every step.

Run as ``python _resume_worker.py DIR [--resume] [--delay S]``; it writes ``DIR/ckpt.pt``
(atomically) and at the end ``DIR/ticket.safetensors``. The batch of each step is a function of
the step alone, so a resumed process sees the same data as an uninterrupted one.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import signmask  # noqa: E402
from _util import tiny  # noqa: E402

STEPS = 5


def batch(step: int):
    g = torch.Generator().manual_seed(7000 + step)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def checkpoint(path: str, **states) -> None:
    tmp = path + ".tmp"
    torch.save({k: v.state_dict() for k, v in states.items()}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    search = signmask.apply(model, "aws", 0.6, optimizer=opt, scheduler=sched, rate=0.3, seed=3, progress=False)
    path = os.path.join(args.dir, "ckpt.pt")
    if args.resume:
        # weights_only: a search's state is plain tensors, numbers and strings.
        ck = torch.load(path, weights_only=True)
        search.load_state_dict(ck["search"])
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
    for _ in search:
        while search.round_step < STEPS:
            x, y = batch(search.step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            checkpoint(path, model=model, opt=opt, sched=sched, search=search)
            print(f"ckpt {search.round} {search.round_step}", flush=True)
            time.sleep(args.delay)
    search.save(os.path.join(args.dir, "ticket.safetensors"))


if __name__ == "__main__":
    main()
