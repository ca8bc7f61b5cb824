"""Weight correlation R_p between two networks (Liu et al. 2021).

``R_p = sum_l |T_p(a_l) & T_p(b_l)| / sum_l k_l``, where ``T_p(w_l)`` is the set of the
``k_l = round(p * N_l)`` largest-magnitude entries of layer ``l``'s weight. Liu et al. divide by
``p * sum_l N_l``; the two agree whenever every ``p * N_l`` is an integer, and dividing by the
counts actually taken makes ``R_p`` of a network with itself exactly 1 and ``R_p <= 1`` always.
Two unrelated networks give ``R_p ~ p`` (the hypergeometric mean ``k_l / N_l`` per layer);
``R_p > p`` means their large weights sit in the same places.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .. import _reparam
from .._select import prefix_end
from .._checks import check_model, check_real
from ._common import same_names, tensor_names, weights


def top_k_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` largest-magnitude entries of ``weight`` (a bool tensor of its shape).

    Ties in ``|w|`` are broken by position: the lower flat (row-major) index ranks first, so
    the selection is deterministic; ``-0.0`` and ``0.0`` tie.

    Args:
        weight: any tensor (finite values).
        k: how many entries to mark, ``0 <= k <= weight.numel()``.

    Returns:
        A bool tensor with exactly ``k`` True entries.

    Example:
        >>> import torch
        >>> top_k_mask(torch.tensor([1.0, -3.0, 3.0, 0.5]), 2).tolist()
        [False, True, True, False]
    """
    flat = weight.detach().reshape(-1).abs()
    if k == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    # The k-th largest |w| and a positional cut among the entries equal to it: the marks of a
    # stable descending sort, without sorting (an argsort holds ~25 bytes per entry).
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    marked = flat > threshold
    tie = flat == threshold
    del flat
    tie[prefix_end(tie, k - int(marked.count_nonzero())) :] = False  # the threshold: >= 1 tie
    return marked.logical_or_(tie).view(weight.shape)


@dataclasses.dataclass(frozen=True)
class Correlation:
    """R_p of two networks, per layer and overall.

    Args:
        p: the fraction in (0, 1].
        numel: tensor name -> its number of weights ``N_l``.
        kept: name -> ``k_l = round(p * N_l)`` (Python's round, half to even).
        shared: name -> ``|T_p(a_l) & T_p(b_l)|``.

    Attributes:
        layers: name -> ``shared / kept`` (NaN for a layer with ``kept == 0``).
        overall: ``sum(shared) / sum(kept)``, in [0, 1].

    Raises:
        ValueError: the maps have different names, ``kept`` is not ``round(p * numel)``,
            ``shared`` is outside ``[0, kept]``, or no layer keeps any weight.

    Example:
        >>> from signmask.analysis import Correlation
        >>> c = Correlation(0.5, {"w": 4}, {"w": 2}, {"w": 1})
        >>> c.overall, c.layers
        (0.5, {'w': 0.5})
    """

    p: float
    numel: Mapping[str, int]
    kept: Mapping[str, int]
    shared: Mapping[str, int]
    layers: Mapping[str, float] = dataclasses.field(init=False)
    overall: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        p = check_real(self.p, "p", low=0.0, high=1.0, low_open=True)
        numel, kept, shared = dict(self.numel), dict(self.kept), dict(self.shared)
        same_names(numel, kept, "numel", "kept")
        same_names(numel, shared, "numel", "shared")
        for name, n in numel.items():
            if kept[name] != round(p * n):
                raise ValueError(
                    f"kept[{name!r}] = {kept[name]}, expected round({p} * {n}) = {round(p * n)}"
                )
            if not 0 <= shared[name] <= kept[name]:
                raise ValueError(f"shared[{name!r}] = {shared[name]} is outside [0, {kept[name]}]")
        if sum(kept.values()) == 0:
            raise ValueError(f"p={p} keeps no weight in any layer (largest layer: "
                             f"{max(numel.values(), default=0)} weights)")
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "shared", shared)
        layers = {k: shared[k] / kept[k] if kept[k] else math.nan for k in numel}
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "overall", sum(shared.values()) / sum(kept.values()))


def weight_correlation(model_a: nn.Module, model_b: nn.Module, p: float, *,
                       names: Iterable[str] | None = None) -> Correlation:
    """Compute the weight correlation R_p of two networks of the same architecture.

    Every conv/linear weight (or the tensors ``names`` lists) is compared; a pruned tensor is
    read from its ``<name>_orig`` Parameter (the raw trained values, masks ignored), which is
    what Liu et al. compare: dense trajectories. Its pruned entries hold what the history left
    there (the torch path: the values of the moment they were pruned; the projection backend and
    ``transfer``: zeros), so R_p of sparse networks depends on it: compare copies made dense
    with the masks applied (``signmask.remove``) to rank the weights the networks compute with.
    Each layer
    keeps its ``k_l = round(p * N_l)`` largest ``|w|``, ties broken by the lower flat
    (row-major) index, ``-0.0`` and ``0.0`` tied. ``R_p`` = shared top entries / ``sum_l k_l``:
    Liu et al. divide by ``p * sum_l N_l``, the same whenever every ``p * N_l`` is an integer;
    the counts actually taken make ``R_p`` of a network with itself exactly 1. Unrelated
    networks give ``R_p ~ p``; ``R_p > p`` means their large weights sit in the same places.

    Args:
        model_a, model_b: the two networks.
        p: the fraction of largest weights per layer, in (0, 1].
        names: canonical tensor names to compare (default: all conv/linear weights).

    Returns:
        A :class:`Correlation`; ``.overall`` is R_p.

    Raises:
        TypeError: a model is not an ``nn.Module`` or ``p`` not a number.
        ValueError: ``p`` outside (0, 1], tensor names or shapes differ, a weight holds NaN or
            inf, or no layer keeps a weight at this ``p``.

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> net = torch.nn.Linear(10, 10)
        >>> analysis.weight_correlation(net, net, 0.1).overall
        1.0
    """
    check_model(model_a, "model_a")
    check_model(model_b, "model_b")
    p = check_real(p, "p", low=0.0, high=1.0, low_open=True)
    names = tensor_names(names)  # a generator would be empty for model_b
    found_a, found_b = weights(model_a, names, arg="model_a"), weights(model_b, names, arg="model_b")
    same_names(found_a, found_b, "model_a's weights", "model_b's weights")
    pairs = {}
    for key, (module, name) in found_a.items():
        wa = _reparam.original(module, name).detach()
        wb = _reparam.original(*found_b[key]).detach()
        if wa.shape != wb.shape:
            raise ValueError(
                f"{key!r} has shape {tuple(wa.shape)} in model_a, {tuple(wb.shape)} in model_b"
            )
        for w, which in ((wa, "model_a"), (wb, "model_b")):
            if not torch.isfinite(w).all():
                raise ValueError(f"{key!r} of {which} holds NaN or inf; cannot rank it")
        pairs[key] = (wa, wb)
    numel, kept, shared = {}, {}, {}
    for key, (wa, wb) in pairs.items():
        numel[key] = wa.numel()
        kept[key] = round(p * wa.numel())
        both = top_k_mask(wa, kept[key]) & top_k_mask(wb, kept[key]).to(wa.device)
        shared[key] = int(both.sum())
    return Correlation(p, numel, kept, shared)
