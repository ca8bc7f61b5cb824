"""The projection backend's arithmetic: a pruned tensor, its gradient and its optimizer state
kept on their mask (and locked signs) in place.

:func:`project` masks ``weight_orig`` (reflecting sign-locked weights onto their signs) and the
per-weight optimizer state; :func:`reflect` is its cheap form after a zero-preserving step;
:func:`mask_grad` masks a gradient; the stamps tell whether a tensor is still projected. The
backend and the hooks that run these at the right moments are in ``_projection``, whose
docstring says when the projection is exact.
"""

from __future__ import annotations

import torch

from . import _bits, _maskmul, _reparam, _undo

# Optimizer class -> state keys that are odd in the gradient (negated under a reflection).
ZERO_PRESERVING: dict[str, tuple[str, ...]] = {
    "SGD": ("momentum_buffer",),
    "Adam": ("exp_avg",),
    "AdamW": ("exp_avg",),
    "NAdam": ("exp_avg",),
    "RAdam": ("exp_avg",),
    "Adamax": ("exp_avg",),
    "Adagrad": (),
    "Adadelta": (),
    "RMSprop": ("momentum_buffer", "grad_avg"),
    "Rprop": ("prev",),
}


REFUSED: dict[str, str] = {
    "LBFGS": "its line search and curvature pairs mix all entries",
    "SparseAdam": "it needs sparse gradients",
    "Adafactor": "its factored second moments mix the entries of a row and a column",
    "Muon": "its orthogonalized updates mix all entries of a matrix",
}


def known(optimizer: torch.optim.Optimizer) -> bool:
    cls = type(optimizer)
    return cls.__module__.startswith("torch.optim") and cls.__name__ in ZERO_PRESERVING


def _per_weight(value, param) -> bool:
    """Whether an optimizer state entry holds one value per weight of ``param`` (not a step
    counter, a factored statistic, or None)."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _state_products(state: dict, param, mask, factor, odd: tuple[str, ...], odd_only: bool) -> list:
    """The ``(tensor, factor)`` products that project ``param``'s optimizer ``state``: the
    entries odd in the gradient by a locked tensor's ``factor``, the others by its mask."""
    out = []
    for key, value in state.items():
        if not _per_weight(value, param):
            continue
        if key in odd and factor is not None:
            out.append((value, factor))
        elif not odd_only:
            out.append((value, mask))
    return out


def stamp(orig, mask, sign) -> tuple:
    # data_ptr: ``orig.data = t`` (vector_to_parameters) swaps the storage, not the version.
    return (orig._version, orig.data_ptr(), *mask_stamp(mask, sign))


def mask_stamp(mask, sign) -> tuple:
    # The identity too: stock prune stacked on top registers a new mask tensor at version 0.
    return (id(mask), mask._version) + ((None,) if sign is None else (id(sign), sign._version))


def tensors(module, name):
    buffers = module._buffers
    orig = module._parameters.get(name + "_orig")
    if orig is None:  # parametrized since set_backend (weight_norm on weight_orig)
        raise RuntimeError(
            f"{type(module).__name__}.{name}_orig is no longer a Parameter (a parametrization "
            f"such as weight_norm was put on it after set_backend(..., 'projection')), but the "
            f"projection backend masks it in place around each optimizer step; undo it, "
            f"set_backend(model, 'torch'), then parametrize {name}_orig again"
        )
    return orig, buffers[name + "_mask"], buffers.get(name + "_sign")


def project(module, name, optimizer=None, *, odd_only: bool = False, grad: bool = False, hook=None):
    """Project ``module.<name>_orig`` (and its optimizer state) onto its mask and signs.

    ``odd_only``: after a zero-preserving step only sign reflections can be due, so only the
    state odd in the gradient is touched (the rest is still 0 at pruned entries).
    ``grad``: reflect ``.grad`` too (before a step, it is odd in the gradient like momentum).
    ``hook``: the tensor's pruning hook, when the caller has it (stock prune stacking on top
    computes the weight while the hook is off the module).

    Returns the int8 factor applied to a sign-locked tensor (-1 where reflected), else None.
    """
    if hook is None:  # not ``or``: a PruningContainer defines __len__
        hook = _reparam.find_hook(module, name)[1]
    orig, mask, sign = tensors(module, name)
    with torch.no_grad():
        # Locked: the torch path's factor (_reparam.locked_factors), so orig takes the values of
        # the effective weight; the same factor reflects (and masks) the state odd in the gradient.
        factor = None if sign is None else _reparam.locked_factors(orig, mask, sign)
        products = [(orig, mask if factor is None else factor)]
        masked_grad = grad and orig.grad is not None
        if masked_grad:  # reflected with the weights, masked in any case
            products.append((orig.grad, products[0][1]))
        if optimizer is not None:
            odd = ZERO_PRESERVING.get(type(optimizer).__name__, ())
            products += _state_products(optimizer.state.get(orig, {}), orig, mask, factor, odd, odd_only)
        # Inside a call that must leave the model untouched if it fails (_undo.Undo.saving), what
        # changes is kept first: for all at once, as weight, gradient and state share the factor.
        _undo.keep_products(products)
        for t, f in products:
            _maskmul.mul_(t, f)
        if masked_grad:
            orig.grad._signmask_masked = True  # see mask_grad
        if optimizer is not None and not odd_only:  # the state now follows these masks
            hook._state_masks = mask_stamp(mask, sign)
    hook._projected = stamp(orig, mask, sign)
    return factor


def reflect(module, name, optimizer) -> None:
    """Mirror back the kept weights of a sign-locked tensor that crossed zero in the last step.

    Only after a zero-preserving optimizer's step, whose pruned entries are still 0: then the
    full :func:`project` changes just the kept weights whose sign bit disagrees with the lock
    (and their state odd in the gradient), by negation. Doing only that, at their indices, gives
    the same bits for a few byte-wide passes instead of two float passes per tensor. CPU only:
    ``nonzero`` would make a CUDA step wait for the device.
    """
    hook = _reparam.find_hook(module, name)[1]
    orig, mask, sign = tensors(module, name)
    with torch.no_grad():
        negative = _bits.sign_bits(sign, orig.shape).view(torch.bool)
        where = torch.nonzero((torch.signbit(orig) != negative) & mask, as_tuple=True)
        if where[0].numel():
            state = optimizer.state.get(orig, {})
            odd = [state.get(k) for k in ZERO_PRESERVING[type(optimizer).__name__]]
            for t in [orig, *(v for v in odd if _per_weight(v, orig))]:
                t.index_put_(where, -t[where])
    hook._projected = stamp(orig, mask, sign)


def mask_grad(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply ``grad`` in place by ``factor`` (the mask, or a locked tensor's signed one) and
    mark the tensor as masked. A mark on the tensor, not its id or address: a gradient assigned
    to ``.grad`` (torch.autograd.grad, per-sample or DP pipelines) is a new object, though it
    may reuse a freed one's id and memory. In-place scaling (clipping) keeps zeros zero; values
    written into a masked gradient in place (noise added to ``.grad``) are not masked again."""
    _maskmul.mul_(grad, factor)  # in training hooks, never inside an undo record
    grad._signmask_masked = True


def flip_state(optimizer, orig, where: torch.Tensor | None) -> None:
    """Negate ``orig``'s optimizer state odd in the gradient at the packed positions ``where``
    (a second call undoes the first)."""
    if where is None or optimizer is None:
        return
    flip = 1 - 2 * _bits.sign_bits(where, orig.shape).view(torch.int8)
    state = optimizer.state.get(orig, {})
    with torch.no_grad():
        for key in ZERO_PRESERVING.get(type(optimizer).__name__, ()):
            if _per_weight(state.get(key), orig):
                # Not in place: a loaded state shares tensors with the caller's checkpoint.
                state[key] = _maskmul.mul(state[key], flip)


def remember_reflection(hook, factor, *, loaded: bool = False) -> torch.Tensor | None:
    """Remember where a sign-locked tensor's weights were just reflected (``factor < 0``), for
    the state of the same run loaded next (``_projection.StateLoaded``); cleared by the next step.
    ``loaded``: a checkpoint's values replaced the weights, so the reflections made at ``attach``
    go, but earlier loads' stay (its reflected copy loaded again reflects nothing more).
    Returns the packed positions reflected before and not now, which the state still needs.
    """
    if factor is None:
        return None
    now = factor < 0
    before = hook.__dict__.get("_reflected") if hook.__dict__.get("_loaded") else None
    extra = None
    if before is not None:
        earlier = _bits.sign_bits(before, now.shape).view(torch.bool)
        extra = _bits.pack_signs(earlier & ~now)
        now |= earlier
    hook._reflected, hook._loaded = _bits.pack_signs(now), loaded
    return extra
