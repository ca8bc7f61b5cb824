"""Importing timm where PyPI's CUDA torchvision meets a CPU torch.

PyPI's torchvision wheels are CUDA builds; beside the CPU torch their C extension cannot load,
and ``import torchvision`` (so ``import timm``) fails with ``operator torchvision::nms does not
exist``. Only in that case, declaring the two op schemas torchvision registers unconditionally
lets it import; everything timm and the transforms need runs in Python.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_MISSING_OP = "operator torchvision::nms does not exist"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES = []  # keeps the Library object alive; the schemas go when it is collected


def _forget(prefixes: tuple[str, ...]) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
        del sys.modules[name]


def import_timm() -> ModuleType:
    """Import and return ``timm``, declaring torchvision's op schemas only if its extension fails."""
    try:
        return importlib.import_module("timm")
    except RuntimeError as e:
        if _MISSING_OP not in str(e):
            raise
    import torch

    _forget(("timm", "torchvision"))
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBRARIES.append(lib)
    return importlib.import_module("timm")
