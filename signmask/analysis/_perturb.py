"""Perturbations at the rewind point (Frankle et al. 2020, the early phase of training).

:func:`perturb` rewrites the conv/linear weights of a model that holds the weights of rewind
step k, in place, by one registered kind (listed in its docstring; Frankle's figure 6 shuffles
by sign both within the layer and within each filter, hence the two ``shuffle_same_sign``
kinds; ``noise``'s init std is the unbiased std of the tensor's init values, of its kept
entries where the init holds zeros at every pruned one: a transferred ticket's).

In a pruned model only kept weights take part (permutations move kept values among kept
positions) and pruned entries of ``<name>_orig`` are left as they were, so the pruned weights
stay 0 and the mask is unchanged. Add kinds with :func:`register_perturbation`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import _bits, _methods, _reparam
from .._checks import check_key, check_model, check_real, check_seed
from ._common import kept_mask, weights


@dataclasses.dataclass(frozen=True)
class PerturbationInput:
    """What a perturbation receives for one tensor.

    Args:
        name: canonical tensor name.
        weight: the tensor's current values (the rewind point; a copy, free to modify).
        keep: bool, True where the weight is kept (all True for a dense tensor).
        init: its init values (same shape and device) or None when the kind needs none; the
            ``init`` model's own tensor where device and dtype match: read it, never write it.
        generator: a CPU ``torch.Generator`` seeded for this tensor, None for deterministic kinds.
        sigma_n: the ``noise`` scale, if given.
        filter_dim: the output-channel axis (1 for ConvTranspose, else 0).
        groups: the layer's ``groups`` (1 for Linear). A grouped ConvTranspose's weight is
            ``(in, out / groups, *kernel)``: output channel ``g * out / groups + j`` is
            ``weight[g * in / groups : (g + 1) * in / groups, j]``, not ``weight[:, j]``.
    """

    name: str
    weight: torch.Tensor
    keep: torch.Tensor
    init: torch.Tensor | None
    generator: torch.Generator | None
    sigma_n: float | None
    filter_dim: int
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A registered kind: ``fn(layer) -> new values`` (only kept entries are used).

    Made by :func:`register_perturbation`; ``PERTURBATIONS`` maps each name to one.

    Args:
        name: the kind's key for :func:`perturb`.
        fn: ``fn(layer: PerturbationInput) -> Tensor`` of the weight's shape.
        needs_init, random, needs_sigma: whether :func:`perturb` requires ``init=``, ``seed=``
            (and passes a seeded generator) or ``sigma_n=``.

    Example:
        >>> from signmask import analysis
        >>> spec = analysis.PERTURBATIONS["noise"]
        >>> spec.needs_init, spec.random, spec.needs_sigma
        (True, True, True)
    """

    name: str
    fn: Callable[[PerturbationInput], torch.Tensor]
    needs_init: bool
    random: bool
    needs_sigma: bool


PERTURBATIONS: dict[str, Perturbation] = {}


def register_perturbation(name: str, *, needs_init: bool = False, random: bool = False,
                          needs_sigma: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn(layer: PerturbationInput) -> Tensor`` as the perturbation kind ``name``.

    Args:
        name: the kind's key for :func:`perturb`.
        needs_init: :func:`perturb` then requires ``init=``.
        random: :func:`perturb` then requires ``seed=`` and passes a seeded generator.
        needs_sigma: :func:`perturb` then requires ``sigma_n=``.

    Returns:
        A decorator that registers ``fn`` (replacing a kind of the same name) and returns it
        unchanged.

    Raises:
        TypeError: ``name`` is not a non-empty str, or the decorator is applied to no callable
            (the registry is then unchanged).

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> @analysis.register_perturbation("zero_kept")
        ... def _zero(layer):
        ...     return torch.zeros_like(layer.weight)
        >>> "zero_kept" in analysis.PERTURBATIONS
        True
        >>> del analysis.PERTURBATIONS["zero_kept"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")

    def deco(fn: Callable[[PerturbationInput], torch.Tensor]) -> Callable:
        if not callable(fn):  # before registering: it would replace a working kind of that name
            raise TypeError(f"register_perturbation({name!r}) must decorate a callable "
                            f"fn(layer) -> Tensor, got {type(fn).__name__}")
        PERTURBATIONS[name] = Perturbation(name, fn, bool(needs_init), bool(random), bool(needs_sigma))
        return fn

    return deco


def get_perturbation(kind: str) -> Perturbation:
    """Look up a kind; an unknown one raises ``ValueError`` (no str: ``TypeError``) listing the
    valid kinds."""
    return PERTURBATIONS[check_key(kind, PERTURBATIONS, "kind", "perturbation kind")]


def _permute_rows(values: torch.Tensor, keep: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shuffle the kept entries of each row of a 2-D tensor among the row's kept positions."""
    keys = torch.rand(values.shape, generator=gen, dtype=torch.float64).to(values.device)
    keys = torch.where(keep, keys, 2.0)  # kept entries first, in random order
    source = torch.argsort(keys, dim=1, stable=True)
    target = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept positions in order
    return values.clone().scatter_(1, target, torch.gather(values, 1, source))


@register_perturbation("rewind")
def _rewind(layer: PerturbationInput) -> torch.Tensor:
    return layer.weight


@register_perturbation("init", needs_init=True)
def _init(layer: PerturbationInput) -> torch.Tensor:
    return layer.init


@register_perturbation("init_signs", needs_init=True)
def _init_signs(layer: PerturbationInput) -> torch.Tensor:
    return torch.copysign(layer.weight.abs(), layer.init)


@register_perturbation("init_magnitudes", needs_init=True)
def _init_magnitudes(layer: PerturbationInput) -> torch.Tensor:
    return torch.copysign(layer.init.abs(), layer.weight)


def _shuffle(layer: PerturbationInput, *, per_filter: bool, same_sign: bool) -> torch.Tensor:
    """Shuffle the kept weights among the kept positions of the whole tensor or of each output
    channel; with ``same_sign`` positive ones only among positive positions, negative ones
    among negative ones (Frankle et al. 2020, figures 5 and 6)."""
    shape = layer.weight.shape
    if per_filter:
        out, keep = (_filters(t, layer) for t in (layer.weight, layer.keep))
    else:
        out, keep = layer.weight.reshape(1, -1), layer.keep.reshape(1, -1)
    for side in (out > 0, out < 0) if same_sign else (keep,):
        out = _permute_rows(out, keep & side, layer.generator)
    return _unfilter(out, shape, layer) if per_filter else out.reshape(shape)


def _filters(t: torch.Tensor, layer: PerturbationInput) -> torch.Tensor:
    """``t`` (of the weight's shape) as one row per output channel (see ``groups``)."""
    if layer.filter_dim == 0:
        return t.reshape(t.shape[0], -1)
    i, j, g = t.shape[0], t.shape[1], layer.groups
    return t.reshape(g, i // g, j, -1).transpose(1, 2).reshape(g * j, -1)


def _unfilter(rows: torch.Tensor, shape: torch.Size, layer: PerturbationInput) -> torch.Tensor:
    """The inverse of :func:`_filters`."""
    if layer.filter_dim == 0:
        return rows.reshape(shape)
    i, j, g = shape[0], shape[1], layer.groups
    return rows.reshape(g, j, i // g, -1).transpose(1, 2).reshape(shape)


@register_perturbation("permute_layer", random=True)
def _permute_layer(layer: PerturbationInput) -> torch.Tensor:
    return _shuffle(layer, per_filter=False, same_sign=False)


@register_perturbation("permute_filter", random=True)
def _permute_filter(layer: PerturbationInput) -> torch.Tensor:
    return _shuffle(layer, per_filter=True, same_sign=False)


@register_perturbation("shuffle_same_sign", random=True)
def _shuffle_same_sign(layer: PerturbationInput) -> torch.Tensor:
    return _shuffle(layer, per_filter=False, same_sign=True)


@register_perturbation("shuffle_same_sign_filter", random=True)
def _shuffle_same_sign_filter(layer: PerturbationInput) -> torch.Tensor:
    return _shuffle(layer, per_filter=True, same_sign=True)


@register_perturbation("noise", needs_init=True, random=True, needs_sigma=True)
def _noise(layer: PerturbationInput) -> torch.Tensor:
    values = layer.init
    if not layer.keep.all() and not values[~layer.keep].any():
        # Zeros at every pruned entry (a transferred ticket, the projection backend) carry no
        # init values: they would shrink sigma by ~sqrt(density). The kept ones are a sample of
        # the init distribution there (a transfer's mask does not depend on the new values).
        values = values[layer.keep]
    sigma = float(values.double().std()) if values.numel() > 1 else 0.0
    draw = torch.randn(layer.weight.shape, generator=layer.generator, dtype=torch.float64)
    return layer.weight + (layer.sigma_n * sigma * draw).to(layer.weight.device, layer.weight.dtype)


def _init_values(init: nn.Module | Mapping[str, torch.Tensor] | None, kind: str,
                 keys: Iterable[str]) -> dict[str, torch.Tensor]:
    if init is None:
        raise ValueError(f"kind={kind!r} needs init= (the weights at step 0)")
    if isinstance(init, nn.Module):
        found = weights(init, list(keys), arg="init")
        return {k: _reparam.original(m, n).detach() for k, (m, n) in found.items()}
    if isinstance(init, Mapping):
        missing = [k for k in keys if k not in init]
        if missing:
            raise ValueError(f"init has no tensor {missing[:5]}; it needs the canonical weight names")
        return {k: init[k] for k in keys}
    raise TypeError(f"init must be an nn.Module or a name -> tensor mapping, got {type(init).__name__}")


def _check_init(key: str, ref: object, param: torch.Tensor) -> torch.Tensor:
    if not isinstance(ref, torch.Tensor):  # a wrong kind: TypeError, as for init itself
        raise TypeError(f"init {key!r} must be a tensor of shape {tuple(param.shape)}, got "
                        f"{type(ref).__name__}")
    if tuple(ref.shape) != tuple(param.shape):
        raise ValueError(f"init {key!r} is {tuple(ref.shape)}, the model's tensor has shape {tuple(param.shape)}")
    return ref.detach().to(param.device, param.dtype)


def _inputs(spec: Perturbation, targets: Mapping[str, tuple[nn.Module, str]],
            inits: Mapping[str, torch.Tensor] | None, seed: int | None,
            sigma_n: float | None, order: Mapping[str, int]) -> list[PerturbationInput]:
    """One validated :class:`PerturbationInput` per tensor; raise before anything is changed.

    ``order`` gives each tensor's index in model order, which seeds its generator."""
    out = []
    for key, (module, name) in targets.items():
        index = order[key]
        if _reparam.is_sign_locked(module, name):
            raise ValueError(f"{key} is sign-locked; perturb() needs tensors with free signs")
        param = _reparam.original(module, name)
        ref = None if inits is None else _check_init(key, inits[key], param)
        keep = kept_mask(key, module, name)
        # A copy: kept_mask may return the live buffer, and a perturbation may write to it.
        keep = torch.ones_like(param, dtype=torch.bool) if keep is None else keep.clone()
        gen = torch.Generator().manual_seed(_methods.tensor_seed(seed, index)) if spec.random else None
        filter_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        out.append(PerturbationInput(key, param.detach().clone(), keep, ref, gen, sigma_n, filter_dim,
                                     getattr(module, "groups", 1)))
    return out


def perturb(
    model: nn.Module,
    kind: str,
    *,
    init: nn.Module | Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    sigma_n: float | None = None,
    names: Iterable[str] | None = None,
) -> nn.Module:
    """Perturb the conv/linear weights of ``model`` (at the rewind point), in place.

    Kinds: ``"rewind"`` (signs and magnitudes from k, no change: the control); ``"init"`` (both
    from init); ``"init_signs"`` (signs from init, magnitudes from k); ``"init_magnitudes"``
    (magnitudes from init, signs from k); ``"permute_layer"`` (shuffled within each tensor);
    ``"permute_filter"`` (within each output channel: dim 0, dim 1 of ConvTranspose);
    ``"shuffle_same_sign"`` (positive weights among positive positions, negative among negative,
    zeros stay) and ``"shuffle_same_sign_filter"`` (the same within each output channel);
    ``"noise"`` (plus Gaussian noise of std ``sigma_n`` times the tensor's init std: of all its
    init values, or of the kept ones where every pruned one is 0, as after a transfer). In a
    pruned model only kept weights take part, so the mask and the pruned zeros are unchanged.
    Arguments a kind does not use are ignored, so one call fits a loop over all kinds. Tensor
    ``i`` (in model order, among all its conv/linear weights, whatever ``names`` lists) draws
    from a CPU generator seeded with ``seed + 7919 * i`` (mod 2**64), so a seed gives a tensor
    the same result on every device and with any ``names``.

    Args:
        model: the model holding the rewind-point weights (pruned or dense, not sign-locked).
        kind: a key of ``PERTURBATIONS``.
        init: the init weights (a model, whose ``_orig`` values are read, or canonical name ->
            tensor); needed by ``init*`` kinds and ``noise``.
        seed: int in [0, 2**64); needed by random kinds.
        sigma_n: noise std in units of each tensor's init std (``noise`` only), >= 0.
        names: canonical tensor names to perturb (default: all conv/linear weights).

    Returns:
        ``model``.

    Raises:
        TypeError / ValueError: unknown kind (valid ones listed), a missing required argument,
            init values that are no tensors or of mismatched shapes, a sign-locked tensor, or
            a stock prune mask holding values other than 0 and 1 (``custom_from_mask`` takes
            any). ``model`` is then untouched.

    Example:
        >>> import torch
        >>> from signmask import analysis
        >>> net = torch.nn.Linear(3, 2)
        >>> before = sorted(net.weight.flatten().tolist())
        >>> _ = analysis.perturb(net, "permute_layer", seed=0)
        >>> sorted(net.weight.flatten().tolist()) == before
        True
    """
    check_model(model, "model")
    spec = get_perturbation(kind)
    targets = weights(model, names)
    # seeds follow model order, so a tensor's draw does not depend on which names are listed
    order = {key: i for i, key in enumerate(weights(model))}
    if spec.random:
        if seed is None:
            raise ValueError(f"kind={kind!r} is random: pass seed=")
        seed = check_seed(seed)
    if spec.needs_sigma:
        if sigma_n is None:
            raise ValueError(f"kind={kind!r} needs sigma_n= (the noise std in units of the init std)")
        sigma_n = check_real(sigma_n, "sigma_n", low=0.0)
    inits = _init_values(init, kind, targets) if spec.needs_init else None
    layers = _inputs(spec, targets, inits, seed, sigma_n, order)
    new = [spec.fn(layer) for layer in layers]  # everything computed before anything is written
    for layer, values in zip(layers, new):
        if not isinstance(values, torch.Tensor) or values.shape != layer.weight.shape:
            raise ValueError(
                f"perturbation {kind!r} returned {type(values).__name__} "
                f"{tuple(getattr(values, 'shape', ()))} for {layer.name}, "
                f"expected {tuple(layer.weight.shape)}"
            )
    _write(list(targets.values()), layers, new)
    return model


def _write(targets: list[tuple[nn.Module, str]], layers: list[PerturbationInput],
           new: list[torch.Tensor]) -> None:
    """Write each tensor's kept entries of ``new``. Valid input cannot fail here, but torch can
    (out of memory at the k-th tensor), and so can Ctrl-C: the tensors written before it are
    put back from ``layer.weight``, the copy :func:`_inputs` made, where the kind left it as it
    was bit for bit (no second copy of the model then), else from a copy in host memory."""
    params = [_reparam.original(module, name) for module, name in targets]
    with torch.no_grad():
        saved = [layer.weight if _bits.same_bits(layer.weight, param) else param.detach().to("cpu", copy=True)
                 for param, layer in zip(params, layers)]
    written = 0
    try:
        with torch.no_grad():
            for (module, name), param, layer, values in zip(targets, params, layers, new):
                written += 1  # before the write: a failure inside copy_ may have written part
                # param, not layer.weight: that copy is the kind's to modify in place
                param.copy_(torch.where(layer.keep, values.to(param.device, param.dtype), param))
                _reparam.refresh(module, name)
    except BaseException:
        with torch.no_grad():
            for (module, name), param, old in list(zip(targets, params, saved))[:written]:
                param.copy_(old)
                _reparam.refresh(module, name)
        raise
