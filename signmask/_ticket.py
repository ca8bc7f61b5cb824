"""``Ticket``: signed masks in {-1, 0, +1} with their metadata, validated on construction.

``extract`` makes one from a pruned model (``_extract``), ``save`` / ``load`` write and read it
as ``.safetensors`` (``_io``), ``transfer`` applies it to a new initialization (``_transfer``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

import torch

from . import _targets

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
        if not isinstance(key, str):  # str(1) would silently name a tensor "1"
            raise TypeError(f"{field} keys must be tensor names (str), got {key!r} ({type(key).__name__})")
        name = _targets.canonical(key)
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
            finite, a key is not a str, two keys name one tensor, a name appears in two dicts, or metadata is not
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
            raise ValueError("a ticket needs at least one masked tensor, got an empty masks mapping")
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
