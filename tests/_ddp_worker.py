"""One rank of the DDP test, launched by torchrun: an AWS search on a DDP-wrapped model.

Each rank trains on its own data. With ``--perturb`` every rank but 0 nudges its weights before
each pruning, so only signmask's broadcast can keep the masks equal. Writes ``DIR/rank<N>.pt``.
With ``--ema`` it then runs timm's ``train.py`` order on a fresh model (optimizer, DDP, scheduler,
``apply``, ``ModelEmaV3`` of the model inside DDP, ``ema.update`` after each step, ``close`` of
the EMA) and writes ``DIR/ema<N>.pt``: the EMA's start, the model after each step, the EMA at the end.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import signmask  # noqa: E402
from signmask import _reparam, _targets  # noqa: E402
from _util import tiny  # noqa: E402


def stale(model) -> int:
    """Pruned tensors whose ``module.weight`` differs from what their hook computes now."""
    with torch.no_grad():
        return sum(not torch.equal(m.__dict__[n], _reparam.find_hook(m, n)[1].apply_mask(m))
                   for m, n in _targets.pruned(model).values())


def timm_order(rank: int) -> dict:
    """The README's timm loop (section "The layout is fixed up front"), in train.py's order."""
    from signmask import _interpolate
    from signmask._compat import import_timm

    import_timm()
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, unwrap_model

    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model = torch.nn.parallel.DistributedDataParallel(model)
    sched, _ = create_scheduler_v2(opt, sched="step", num_epochs=2, decay_epochs=1, decay_rate=0.5)
    search = signmask.apply(model, "aws", 0.5, optimizer=opt, scheduler=sched, rounds=1, seed=5,
                            progress=False)
    ema = ModelEmaV3(unwrap_model(model), decay=0.5)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    steps = []
    for _ in search:
        for _ in range(3):
            g = torch.Generator().manual_seed(100 * rank + search.step)
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update(model)
            steps.append({k: v.clone() for k, v in model.module.state_dict().items()})
        sched.step(1)  # one epoch a round; each round counts its epochs from 0 (README)
    interpolated = bool(_interpolate.interpolated(ema.module))
    search.close(ema.module)
    return {"start": start, "steps": steps, "ema": ema.module.state_dict(),
            "interpolated": [interpolated, bool(_interpolate.interpolated(ema.module))],
            "norms_are_parameters": all(isinstance(m.weight, torch.nn.Parameter)
                                        for m in ema.module.modules() if _interpolate.is_norm(m))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--perturb", action="store_true")
    parser.add_argument("--ema", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(tiny(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    search = signmask.apply(model, "aws", 0.6, optimizer=opt, rate=0.3, seed=11, progress=rank == 0)
    alphas, masks, stales = [], [], []
    for _ in search:
        # Before any forward: DDP's buffer broadcast at the next forward would hide a divergence.
        masks.append({k: v.clone() for k, v in model.module.state_dict().items() if k.endswith("_mask")})
        stales.append(stale(model))  # the broadcast mask in module.weight too, not just the buffer
        for _ in range(3):
            g = torch.Generator().manual_seed(100 * rank + search.step)
            x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            alphas.append(float(search._alpha))
            opt.step()
        if args.perturb and rank > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())
    torch.save({"alphas": alphas, "masks": masks, "stale": stales, "ticket": search.ticket.masks},
               os.path.join(args.dir, f"rank{rank}.pt"))
    if args.ema:
        torch.save(timm_order(rank), os.path.join(args.dir, f"ema{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
