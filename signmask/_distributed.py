"""What a search does under ``torch.distributed``: one rank prints, every rank prunes alike."""

from __future__ import annotations

import torch
from torch import nn

from . import _reparam


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank0() -> bool:
    """Whether this process prints (and warns) for the search: rank 0, or no process group."""
    return not _initialized() or torch.distributed.get_rank() == 0


def broadcast_masks(targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Make every rank hold rank 0's masks (ranks computing different masks is a known DDP bug)."""
    if not _initialized():
        return
    for module, name in targets.values():
        mask = module._buffers[name + "_mask"]
        as_bytes = mask.to(torch.uint8)
        torch.distributed.broadcast(as_bytes, src=0)
        mask.copy_(as_bytes.bool())
        _reparam.refresh(module, name)  # module.<name> read before the next forward sees it
