"""Tickets: signed masks in {-1, 0, +1}, extracted from a pruned model, saved as .safetensors."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import sys
from typing import Mapping

import torch
from torch import nn

from . import _checks, _interpolate, _reparam, _targets
from ._version import __version__

RESERVED_KEYS = (
    "format", "format_version", "sparsity", "manifest", "manifest_sha256", "metadata_sha256",
)


def _check_dense(name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} {name!r} must be a tensor, got {type(t).__name__}")
    if t.is_meta or t.layout != torch.strided:
        found = "a meta tensor (no values)" if t.is_meta else f"layout {t.layout}"
        raise TypeError(f"{what} {name!r} must be a dense tensor with values, got {found}")


def _check_signed(name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    _check_dense(name, t, what)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} {name!r} must be an integer tensor in {{-1, 0, +1}}, got {t.dtype}")
    if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        t = t.to(torch.int64)  # uint16/32/64 lack comparison kernels on CPU
    # Not t != -1: an unsigned 255 would compare equal to -1 and pass as a negative sign.
    bad = (t > 1) | (t < -1) if t.dtype.is_signed else t > 1
    if bad.any():
        found = sorted({int(v) for v in t[bad].unique()[:5].tolist()})
        raise ValueError(f"{what} {name!r} holds values outside {{-1, 0, +1}}: found {found}")
    return t.detach().to("cpu", torch.int8).contiguous()


def _check_norm(name: str, t: torch.Tensor) -> torch.Tensor:
    _check_dense(name, t, "norm tensor")
    if not t.is_floating_point():
        raise TypeError(f"norm tensor {name!r} must be a floating-point tensor, got {t.dtype}")
    # Through float32: the float8 types have no isfinite kernel, and every value fits.
    if not bool(torch.isfinite(t.float()).all()):
        raise ValueError(f"norm tensor {name!r} holds NaN or infinite values (a diverged run?)")
    # A copy: a norm handed over as a model's live Parameter would otherwise follow its training.
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _named(tensors, field: str, check) -> dict[str, torch.Tensor]:
    """``tensors`` checked, keyed by canonical name (without ``module.``/``_orig_mod.``, as
    ``extract`` names them): two keys naming one tensor are refused."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{field} must be a mapping of tensor names to tensors, got {type(tensors).__name__}")
    out, given = {}, {}
    for key, value in tensors.items():
        name = _targets.canonical(str(key))
        if name in out:
            raise ValueError(f"{field} keys {given[name]!r} and {key!r} name the same tensor {name!r}")
        out[name], given[name] = check(key, value), key
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Ticket:
    """A lottery ticket: per pruned tensor, a signed mask in {-1, 0, +1} (0 = pruned).

    Args:
        masks: canonical tensor name (``"layer1.0.conv1.weight"``) -> signed mask.
        signs: name -> dense signs to transfer without a mask (biases, an unpruned classifier).
        metadata: free-form strings (method, architecture, versions...).
        norms: name -> trained affine parameter of a norm layer (``"bn1.weight"``), kept as
            its float values: the "signed mask and normalization parameters" that Find A
            Winning Sign shows carry an LRR solution's basin (see ``extract(norms=True)``).

    Names are canonical: ``module.`` and ``_orig_mod.`` prefixes are stripped, as
    :func:`extract` strips them.

    Raises:
        TypeError / ValueError: a field is not a mapping, a mask or sign tensor is not integer
            or holds values outside {-1, 0, +1}, a norm tensor is not floating point or not
            finite, two keys name one tensor, a name appears in two dicts, or metadata is not
            ``str -> str`` or uses a reserved key.

    Example:
        >>> import torch, signmask
        >>> t = signmask.Ticket({"fc.weight": torch.tensor([[1, 0], [-1, 0]])})
        >>> t.sparsity, t.kept
        (0.5, 2)
    """

    masks: Mapping[str, torch.Tensor]
    signs: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    norms: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        masks = _named(self.masks, "masks", lambda k, v: _check_signed(k, v, "mask"))
        signs = _named(self.signs, "signs", lambda k, v: _check_signed(k, v, "sign tensor"))
        norms = _named(self.norms, "norms", _check_norm)
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of str to str, got {type(self.metadata).__name__}")
        groups = {"masks": masks, "dense signs": signs, "norms": norms}
        for (a, names_a), (b, names_b) in itertools.combinations(groups.items(), 2):
            both = sorted(set(names_a) & set(names_b))
            if both:
                raise ValueError(f"tensors {both} appear both as {a} and as {b}")
        if not masks:
            raise ValueError("a ticket needs at least one masked tensor")
        meta = dict(self.metadata)
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"ticket metadata must map str to str, got {k!r}: {v!r}")
        reserved = sorted(set(meta) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"metadata keys {reserved} are reserved for the file format")
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "signs", signs)
        object.__setattr__(self, "metadata", meta)
        object.__setattr__(self, "norms", norms)

    @property
    def numel(self) -> int:
        """Number of weights under a mask."""
        return sum(m.numel() for m in self.masks.values())

    @property
    def kept(self) -> int:
        """Number of kept (non-zero) weights."""
        return sum(int(m.count_nonzero()) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of masked weights that are pruned (0.0 when the masks hold no weights)."""
        return fraction_pruned(self.kept, self.numel)

    def layer_sparsity(self) -> dict[str, float]:
        """Return each masked tensor's fraction of pruned weights (0.0 for an empty tensor).

        Example:
            >>> import torch, signmask
            >>> t = signmask.Ticket({"a": torch.tensor([1, 0]), "b": torch.tensor([-1, 1])})
            >>> t.layer_sparsity()
            {'a': 0.5, 'b': 0.0}
        """
        return {k: fraction_pruned(int(m.count_nonzero()), m.numel()) for k, m in self.masks.items()}

    def _checked(self) -> "Ticket":
        """This ticket validated again, as the constructor does: its dicts stay editable after
        construction, and ``save``/``transfer`` must not write what ``load`` would refuse."""
        return Ticket(self.masks, self.signs, self.metadata, self.norms)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ticket):
            return NotImplemented
        return (
            self.metadata == other.metadata
            and _same(self.masks, other.masks)
            and _same(self.signs, other.signs)
            and _same(self.norms, other.norms)
        )

    def __repr__(self) -> str:
        return (
            f"Ticket({len(self.masks)} masked tensors, {self.numel} weights, "
            f"sparsity={self.sparsity:.4f}, {len(self.signs)} dense sign tensors"
            + (f", {len(self.norms)} norm tensors)" if self.norms else ")")
        )


def fraction_pruned(kept: int, numel: int) -> float:
    """The fraction of ``numel`` weights not kept: 0.0 when there are none (nothing is pruned)."""
    return 1.0 - kept / numel if numel else 0.0


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    # dtype too: torch.equal calls a bf16 and an fp32 norm with the same values equal.
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


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


def _check_finite(key: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(values)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        raise ValueError(
            f"{key} holds {int(bad.sum())} NaN or infinite {'kept ' if where is not None else ''}"
            "weights (a diverged run?); their signs mean nothing"
        )


def _kept_signs(key: str, module: nn.Module, name: str) -> torch.Tensor:
    """Signed mask of one pruned tensor: the sign bit of the effective weight where kept.

    Using the sign bit (not ``torch.sign``) keeps a kept weight that is exactly +-0.0 in the
    mask, so the ticket's sparsity always equals the model's.
    """
    weight = _reparam.effective(module, name)
    keep = _reparam.current_mask(module, name)
    _check_finite(key, weight, keep)
    # 1 - 2 * signbit in int8, in place: torch.where(..., -1, 1) would be int64.
    signed = torch.signbit(weight).to(torch.int8).mul_(-2).add_(1)
    del weight
    return signed.mul_(keep).to("cpu")


def _dense_signs(key: str, values: torch.Tensor) -> torch.Tensor:
    _check_finite(key, values)
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
        TypeError: ``model`` is not an ``nn.Module``, a flag is not a bool, ``metadata`` is not
            a mapping.
        ValueError: nothing in ``model`` is pruned, or something other than a conv/linear weight
            is (a bias or an embedding, by stock prune); a kept (or recorded dense) weight is
            NaN or infinite; a layer to record is lazy and has no shape yet; a pruned weight is
            on the meta device or sharded (a DTensor). ``metadata`` that is not ``str -> str``
            or uses a reserved key raises as :class:`Ticket` does.

    Example:
        >>> import torch, signmask
        >>> net = signmask.prune(torch.nn.Linear(8, 8), 0.75)
        >>> signmask.extract(net).sparsity
        0.75
    """
    _checks.check_model(model, "model")
    for flag, arg in ((biases, "biases"), (dense, "dense"), (norms, "norms")):
        _checks.check_bool(flag, arg)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__} {metadata!r}")
    found = _targets.require_pruned(model, "prune it before extract()")
    odd = [k for k, (m, n) in found.items() if n != "weight" or not isinstance(m, _targets.PRUNABLE_TYPES)]
    if odd:
        raise ValueError(
            f"{odd[:3]} {'is' if len(odd) == 1 else 'are'} pruned (by torch.nn.utils.prune), but a "
            "ticket holds conv/linear weights only (transfer() takes no others); make that pruning "
            "permanent first: torch.nn.utils.prune.remove(module, name)"
        )
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
