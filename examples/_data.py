"""Options, data, accuracy and results output shared by the examples (not part of what they show).

CIFAR-10 from an ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 HWC
images), or ``"synthetic"``: a seeded, learnable 10-class image task made on the spot, so nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from signmask import analysis

# The repository's shared data folder, if this checkout has one beside it.
DEFAULT_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz"


def base_parser(doc: str, *, out: str, lr: float, seed_help: str | None = None) -> argparse.ArgumentParser:
    """The options every example takes (described by the first line of ``doc``); an example adds
    its own, then fills the defaults left at None with :func:`fill_defaults`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    quick = os.environ.get("SIGNMASK_EXAMPLES_QUICK", "0") not in ("", "0")  # "0" is off
    p.add_argument("--quick", action="store_true", default=quick,
                   help="a seconds-long run on synthetic data (also: env SIGNMASK_EXAMPLES_QUICK=1)")
    p.add_argument("--data", default=None, help="CIFAR-10 .npz or 'synthetic' (default: CIFAR-10 if found)")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--sparsity", type=float, default=0.8, help="target fraction of pruned weights")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    return p


def fill_defaults(args, quick: dict, full: dict):
    """Fill the options left at None from ``quick`` (``--quick``) or ``full``, and pick the data:
    the shared CIFAR-10 when present (not for ``--quick``), else the synthetic task."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.data is None:
        args.data = str(DEFAULT_CIFAR) if DEFAULT_CIFAR.exists() and not args.quick else "synthetic"
    return args


def synthetic(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 10-class task: smooth class patterns, randomly scaled, shifted and noised."""
    patterns = F.interpolate(torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234)), size=size,
                             mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = patterns[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=g))
    shifts = torch.randint(-size // 5, size // 5 + 1, (n, 2), generator=g).tolist()
    x = torch.stack([torch.roll(img, s, dims=(1, 2)) for img, s in zip(x, shifts)])
    return x + torch.randn(x.shape, generator=g), y


def load_data(path: str, n_train: int, n_test: int, seed: int, size: int = 16) -> tuple[TensorDataset, TensorDataset]:
    """``n_train``/``n_test`` normalized images of CIFAR-10 (32x32, or averaged down to 16x16)
    or of the synthetic task, at ``size`` pixels."""
    if path == "synthetic":
        return TensorDataset(*synthetic(n_train, seed, size)), TensorDataset(*synthetic(n_test, seed + 1, size))
    arrays = np.load(path)
    g = torch.Generator().manual_seed(seed)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        index = torch.randperm(len(labels), generator=g)[:n].numpy()
        x = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float() / 255.0
        x = F.avg_pool2d(x, 32 // size) if size != 32 else x
        mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
        out.append(TensorDataset((x - mean) / std, torch.from_numpy(labels[index]).long()))
    return out[0], out[1]


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 test accuracy (``signmask.analysis.evaluate``: eval mode, no gradients, each module's
    train/eval flag restored afterwards)."""
    return analysis.evaluate(model, loader).accuracy


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to a temp file renamed over ``path``: an interrupted run
    leaves the old file whole."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"  # before any file exists: unserializable objects raise here
    # A name of its own (not a fixed ".tmp"): two runs writing to one folder cannot clash. Made
    # with os.open's 0o666, so the umask sets its mode as for any other file (mkstemp's is 0o600).
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
