"""Prune a timm ResNet, save its signed mask, transfer it to a new init, and check it arrived.

Run: python examples/prune_save_transfer.py [--arch resnet18] [--out ticket.safetensors]
Then: python -m signmask inspect ticket.safetensors
"""

import argparse

import torch

import signmask
from signmask._compat import import_timm  # plain `import timm` where torchvision loads


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--out", default="ticket.safetensors")
    args = parser.parse_args(argv)
    timm = import_timm()

    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, num_classes=10)
    signmask.prune(model, args.sparsity, classifier=False)  # global magnitude, in place
    ticket = signmask.extract(model, dense=True)            # sign(theta * M) per pruned tensor
    signmask.save(ticket, args.out)
    print(f"saved {ticket} to {args.out}")

    torch.manual_seed(1)
    fresh = timm.create_model(args.arch, pretrained=False, num_classes=10)
    signmask.transfer(args.out, fresh)                      # |theta_new| * s, mask installed
    same = all(torch.equal(signmask.extract(fresh).masks[k], v) for k, v in ticket.masks.items())
    print(f"new init carries the ticket's signed mask: {same}")
    print(f"inspect it with: python -m signmask inspect {args.out}")
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)  # a failed check fails the run
