"""``extract``: the signed mask ``sign(theta * M)`` of a pruned model, as a :class:`Ticket`,
with the metadata a transfer checks (architecture, depth, library versions)."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import sys
from typing import Mapping

import torch
from torch import nn

from . import _checks, _interpolate, _reparam, _target_checks, _targets
from ._ticket import Ticket
from ._version import __version__


def architecture(model: nn.Module) -> str:
    """timm's ``pretrained_cfg["architecture"]`` where present, else the model's class name."""
    root = _targets.unwrap(model)
    cfg = getattr(root, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(root).__name__)


def layer_count(model: nn.Module) -> int:
    """The number of conv/linear weights in ``model``, pruned or not: recorded beside the
    architecture, whose name alone (a class name outside timm: ``ResNet``) does not tell a
    torchvision resnet18 from a resnet34."""
    return len(_targets.layer_weights(model))


def library_versions() -> str:
    """JSON of the versions of the libraries a ticket was made with (timm only if imported).

    safetensors, a dependency, is always named, from its installed metadata: read from
    ``sys.modules`` it appeared only after a ``save`` or ``load``, and two extracts of one model
    differed. timm is never imported here (signmask does not need it).
    """
    versions = {"signmask": __version__, "torch": torch.__version__}
    timm = sys.modules.get("timm")
    if timm is not None:
        versions["timm"] = str(getattr(timm, "__version__", "unknown"))
    versions["safetensors"] = _installed_version("safetensors")
    return json.dumps(versions, sort_keys=True)


@functools.lru_cache(maxsize=None)
def _installed_version(dist: str) -> str:
    # Cached: the lookup scans sys.path, and the installed version does not change in a process.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # vendored without its metadata
        return "unknown"


def _kept_signs(key: str, module: nn.Module, name: str) -> torch.Tensor:
    """Signed mask of one pruned tensor: the sign bit of the effective weight where kept.

    Using the sign bit (not ``torch.sign``) keeps a kept weight that is exactly +-0.0 in the
    mask, so the ticket's sparsity always equals the model's.
    """
    weight = _reparam.effective(module, name)
    _check_real(key, weight)
    keep = _reparam.current_mask(module, name)
    _checks.check_finite(key, weight, keep)
    # 1 - 2 * signbit in int8, in place: torch.where(..., -1, 1) would be int64.
    signed = torch.signbit(weight).to(torch.int8).mul_(-2).add_(1)
    del weight
    return signed.mul_(keep).to("cpu")


def _check_real(key: str, values: torch.Tensor) -> None:
    if values.is_complex():
        raise TypeError(f"{key} is {values.dtype}: a ticket records signs, and a complex weight has none")


def _dense_signs(key: str, values: torch.Tensor) -> torch.Tensor:
    _check_real(key, values)
    _checks.check_finite(key, values)
    return torch.sign(values.detach()).to("cpu", torch.int8)


def extract(
    model: nn.Module,
    *,
    biases: bool = False,
    dense: bool = False,
    norms: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Ticket:
    """Extract the signed masks of a pruned model: ``sign(theta * M)`` per pruned tensor.

    Args:
        model: a model pruned by signmask or by ``torch.nn.utils.prune``.
        biases: also record the signs of the biases (dense) of the layers recorded: the pruned
            ones and, with ``dense``, the unpruned ones. A bias that is no Parameter (a buffer,
            or computed by ``nn.utils.parametrize``) is left out, as ``transfer`` writes none.
        dense: also record the signs of conv/linear weights that are not pruned (the classifier
            when it was kept dense), as the AWS reference code transfers them.
        norms: also record the trained affine parameters of every norm layer (BatchNorm,
            LayerNorm, GroupNorm, timm's norms; their running statistics are not recorded),
            which ``transfer`` then copies onto the new init. Under AWS's interpolation these
            are the trained values (``weight_orig``), not the interpolated ones.
        metadata: extra strings stored in the ticket (method, rounds...); they override the
            recorded ``method``, ``architecture``, ``model_class``, ``layers`` and ``versions``.

    Returns:
        A :class:`Ticket`: the signed masks, the dense signs asked for, the norm parameters
        with ``norms``, and metadata (``method``, ``architecture``, ``model_class``, ``layers``,
        ``versions``, then ``metadata``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is a TorchScript one), a flag is not a
            bool, ``metadata`` is not a mapping; a weight (or bias) to record is complex.
        ValueError: nothing in ``model`` is pruned, or something other than a conv/linear weight
            is (a bias or an embedding, by stock prune); a kept (or recorded dense) weight is
            NaN or infinite; a layer to record is lazy and has no shape yet; a pruned weight is
            on the meta device or sharded (a DTensor), or was assigned a new Parameter since;
            a pruning hook was moved onto a module without its mask (``torch.ao.quantization``'s
            ``fuse_modules`` and ``convert`` do); a stock mask holds values other than 0 and
            1 (``custom_from_mask`` takes any; the forward uses every non-zero one).
            ``metadata`` that is not ``str -> str`` or uses a reserved key raises as
            :class:`Ticket` does.

    Example:
        >>> import torch, signmask
        >>> net = signmask.prune(torch.nn.Linear(8, 8), 0.75)
        >>> signmask.extract(net).sparsity
        0.75
    """
    _checks.check_eager_model(model, "model")
    for flag, arg in ((biases, "biases"), (dense, "dense"), (norms, "norms")):
        _checks.check_bool(flag, arg)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__} {metadata!r}")
    found = _targets.require_pruned(model, "prune it before extract()")
    _target_checks.check_unshadowed(found)
    odd = [k for k, (m, n) in found.items() if n != "weight" or not isinstance(m, _targets.PRUNABLE_TYPES)]
    if odd:
        raise ValueError(
            f"{odd[:3]} {'is' if len(odd) == 1 else 'are'} pruned (by torch.nn.utils.prune), but a "
            "ticket holds conv/linear weights only (transfer() takes no others); make that pruning "
            "permanent first: torch.nn.utils.prune.remove(module, name)"
        )
    for key, (m, n) in found.items():
        _checks.check_binary(key, m._buffers[n + "_mask"], "a ticket holds binary masks")
    masks = {key: _kept_signs(key, m, n) for key, (m, n) in found.items()}
    signs, layers = {}, dict(found)
    if dense:
        for key, (module, name) in _targets.layer_weights(model).items():
            if key not in masks:
                _targets.check_initialized(key, module, getattr(module, name), "extracting its signs")
                signs[key] = _dense_signs(key, getattr(module, name))
                layers[key] = (module, name)
    if biases:
        for key, (module, name) in layers.items():
            # transfer's rule: a bias that is no Parameter (a buffer, a parametrization's
            # output) is not a tensor it can write, and a ticket must transfer onto its own
            # architecture.
            if _targets.has_tensor(module, "bias"):
                signs[key[: -len(name)] + "bias"] = _dense_signs(key[: -len(name)] + "bias", module.bias)
    recorded = _norm_params(model) if norms else {}
    methods = []
    for module, name in found.values():
        for method in _reparam.methods(_reparam.find_hook(module, name)[1]):
            label = getattr(method, "NAME", type(method).__name__)
            if label not in methods:
                methods.append(label)
    meta = {
        "method": "+".join(methods),
        "architecture": architecture(model),
        "model_class": type(_targets.unwrap(model)).__qualname__,
        "layers": str(layer_count(model)),
        "versions": library_versions(),
    }
    meta.update(metadata or {})
    return Ticket(masks, signs, meta, recorded)


def _norm_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trained affine parameters of ``model``'s norm layers, by canonical name."""
    index = _targets.canonical_index(model, _affine_names)
    for key, (m, n) in index.items():
        _targets.check_initialized(key, m, _reparam.original(m, n), "extracting its norms")
    return {key: _reparam.original(m, n).detach().to("cpu", copy=True) for key, (m, n) in index.items()}


def _affine_names(module: nn.Module) -> list[str]:
    if not _interpolate.is_norm(module):
        return []
    return [name for name in ("weight", "bias") if _targets.has_tensor(module, name)]
