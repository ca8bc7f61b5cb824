"""FSDP2 (``fully_shard``) in one gloo process: what works before sharding, what is refused after.

Prints one JSON object; ``tests/test_prune.py`` runs this in a subprocess so the process group
never touches the test process.
"""

import json
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import signmask


def make(prune_first: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if prune_first:
        signmask.prune(model, 0.5)
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    return model


def state(model: nn.Module) -> dict:
    full = {}
    for k, v in model.state_dict().items():
        full[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return full


def unchanged(before: dict, model: nn.Module) -> bool:
    after = state(model)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def main() -> None:
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    out = {}
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    oracle = signmask.prune(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 0.5)
    out["pruned_then_sharded_equal"] = torch.equal(make(True)(x), oracle(x))
    ticket = signmask.extract(oracle)
    # The way out of a sharded model: a full state dict into an unsharded one.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(make(True), options=StateDictOptions(full_state_dict=True))
    torch.manual_seed(1)
    gathered = signmask.load_state_dict(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), full)
    masks = signmask.extract(gathered).masks
    out["gathered_ticket_equal"] = masks.keys() == ticket.masks.keys() and all(
        torch.equal(masks[k], ticket.masks[k]) for k in masks
    )
    calls = {
        "prune": lambda m: signmask.prune(m, 0.5),
        "apply": lambda m: signmask.apply(
            m, "lrr", 0.5, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), progress=False
        ),
        "transfer": lambda m: signmask.transfer(ticket, m, check_architecture=False),
        "set_backend": lambda m: signmask.set_backend(
            m, "projection", optimizer=torch.optim.SGD(m.parameters(), lr=0.1)
        ),
        "extract": signmask.extract,
        "remove": signmask.remove,
        "load_state_dict": lambda m: signmask.load_state_dict(m, oracle.state_dict()),
    }
    for name, call in calls.items():
        model = make(name in ("set_backend", "extract", "remove", "load_state_dict"))
        before = state(model)
        try:
            call(model)
            out[name] = "no error"
        except ValueError as e:
            grad_hooks = sum(bool(getattr(p, "_post_accumulate_grad_hooks", None)) for p in model.parameters())
            out[name] = {"error": str(e), "unchanged": unchanged(before, model), "grad_hooks": grad_hooks}
    dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
