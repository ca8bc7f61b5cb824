"""``prune`` and ``remove``: the model-level pruning front."""

from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import prune as _prune

from . import _checks, _methods, _parents, _projection, _reparam, _target_checks, _targets, _ties, _undo

_SCOPES = ("global", "layer")
_SIGN_MODES = ("free", "locked")


def check_prunable(key: str, module: nn.Module, name: str, *, signs: str | None) -> None:
    """Refuse a tensor whose current pruning state or dtype conflicts with the request."""
    _target_checks.check_names_free(key, module, name)
    _target_checks.check_dtype(key, _reparam.original(module, name), locked=signs == "locked")
    _, hook = _reparam.find_hook(module, name)
    if hook is None:
        return
    if not isinstance(hook, _reparam.SignMaskHook):
        mask = module._buffers[name + "_mask"]
        if not _checks.is_binary(mask):
            raise ValueError(
                f"{key}: its existing prune mask is not binary (0/1 expected, found values "
                f"{_checks.odd_values(mask)}); cannot add to it"
            )
    if signs == "free" and _reparam.is_sign_locked(module, name):
        raise ValueError(
            f"{key} is sign-locked; pruning it again with signs='free' conflicts "
            "(pass signs=None to keep the lock, or signmask.remove() first)"
        )


def prune(
    model: nn.Module,
    amount: float | int,
    *,
    method: str = "magnitude",
    scope: str = "global",
    signs: str | None = None,
    classifier: bool = True,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: _targets.FilterFn | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Prune the fraction ``amount`` of the still-unpruned conv/linear weights, in place.

    Repeated calls prune a fraction of the REMAINING weights, like stacked ``torch.nn.utils.prune``
    calls. Exactly ``round(amount * alive)`` weights are pruned (Python's ``round``, half to even,
    as in ``torch.nn.utils.prune``); ties are broken by position, so the result is deterministic.
    As in ``torch.nn.utils.prune``, an int ``amount`` is a number of weights, not a fraction.

    Args:
        model: any ``nn.Module`` (a timm model, a compiled or DDP-wrapped one).
        amount: fraction in [0, 1] of the remaining weights to prune (a float), or how many of
            them (an int; per tensor with ``scope="layer"``).
        method: a registered ranking method: ``"magnitude"`` (L1) or ``"random"``.
        scope: ``"global"`` ranks all selected tensors together; ``"layer"`` each on its own.
        signs: ``"locked"`` freezes the current sign of every kept weight
            (``w = s * |w_orig| * mask``); ``"free"`` refuses sign-locked tensors; ``None``
            keeps each tensor's mode (new tensors are free).
        classifier: also prune the classifier head (open_lth does in ResNets; AWS does not).
        include: globs of module names to consider (default: all conv/linear).
        exclude: globs of module names to skip.
        filter_fn: ``filter_fn(module, name) -> bool``; False skips the module.
        seed: seed of ``method="random"``, whose draws come from a generator of its own. Without
            one, the seed is drawn from torch's global generator (one draw, as stock prune's
            ``random_unstructured`` draws from it too), so ``torch.manual_seed`` fixes it.

    Returns:
        ``model``, pruned in prune's layout (``weight_orig``, bool ``weight_mask``).

    Raises:
        TypeError: ``model`` not a module (or a TorchScript one), ``amount`` not a number, or an
            option of the wrong type (``classifier``, ``include``/``exclude``, ``filter_fn``,
            ``seed``); a weight of an 8-bit float dtype, or a complex one with ``signs="locked"``.
        ValueError: ``amount`` outside [0, 1] (a float) or above the weights left (an int),
            unknown method/scope/signs, ``seed`` for a method without one or outside
            [0, 2**64), nothing to prune, tied weights, a conflicting earlier pruning, NaN or
            infinite weights to rank (``"magnitude"``) or to keep with ``signs="locked"``, a
            pruned weight assigned a new Parameter since, or a weight on the meta device or
            sharded (a DTensor).
        The model is left untouched in every case.

    Example:
        >>> import torch, signmask
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
        >>> net = signmask.prune(net, 0.5)
        >>> int(net[0].weight_mask.sum() + net[1].weight_mask.sum())
        60
    """
    amount = _methods.check_amount(amount)
    method_cls = _methods.get_method(method)
    _checks.check_key(scope, _SCOPES, "scope", "scope")
    if signs is not None:
        _checks.check_key(signs, _SIGN_MODES, "signs", "sign mode")
    if seed is not None and "seed" not in inspect.signature(method_cls).parameters:
        raise ValueError(f"seed= is not an option of method={method!r}: it is deterministic")
    ranker = method_cls(amount) if seed is None else method_cls(amount, seed=seed)
    targets = _targets.select(
        model, classifier=classifier, include=include, exclude=exclude, filter_fn=filter_fn
    )
    return prune_targets(model, targets, ranker, scope=scope, signs=signs)


def prune_targets(
    model: nn.Module,
    targets: dict[str, tuple[nn.Module, str]],
    ranker: _methods.RankedPruning,
    *,
    scope: str = "global",
    signs: str | None = None,
    flips_out: list | None = None,
) -> nn.Module:
    """Prune ``targets`` (from ``_targets.select(model)``) with ``ranker``: ``prune``'s core,
    for callers that already selected (``apply``, the search), so selection warns once.

    ``flips_out``: a list that takes, as they are written, what :func:`unflip` needs to turn
    the masks written in place back (the search undoes a pruning whose round fails after it);
    the tables and values go to the caller's :meth:`_undo.Undo.saving` record."""
    _ties.check_untied(targets, model)
    for key, (module, name) in targets.items():
        check_prunable(key, module, name, signs=signs)
    names = list(targets)
    weights = [_reparam.original(m, n) for m, n in targets.values()]
    masks = []
    for (m, n), w in zip(targets.values(), weights):
        current = _reparam.current_mask(m, n)
        masks.append(torch.ones_like(w, dtype=torch.bool) if current is None else current)
    if scope == "global":
        new_masks = list(ranker.compute_masks(weights, masks, names))
    else:
        new_masks = [
            ranker.compute_masks([w], [m], [k], index_offset=i)[0]
            for i, (w, m, k) in enumerate(zip(weights, masks, names))
        ]
    del masks  # the all-ones masks of tensors pruned for the first time: 1 byte per weight
    if signs == "locked":
        # Checked before any change. A diverged weight's sign bit means nothing, and its lock
        # would outlive it; the magnitude ranking refuses one, but amount=0 and method="random"
        # rank nothing.
        for key, (module, name), keep in zip(names, targets.values(), new_masks):
            if not _reparam.is_sign_locked(module, name):
                _checks.check_finite(key, _reparam.original(module, name).detach(), keep)
    # Valid input cannot fail below, but torch can (out of memory at the k-th layer) and so can
    # Ctrl-C: the layers before would stay pruned. The record and the flips put them back, and
    # the record the entries of weights, gradients and optimizer state that the projection
    # backend zeroes at once for the new masks (see _projection_ops.project).
    # The caller's flips_out takes each flip as it is made, not after the try: a Ctrl-C between
    # the two would leave the masks written and the caller unable to turn them back.
    undo, flips = _undo.Undo(model), [] if flips_out is None else flips_out
    try:
        with undo.saving():
            with torch.no_grad():
                for i, (module, name) in enumerate(targets.values()):
                    keep, new_masks[i] = new_masks[i], None  # installed (copied): freed at the next one
                    negative = None
                    if signs == "locked" and not _reparam.is_sign_locked(module, name):
                        # From the live Parameter: module.<name> is only refreshed by a forward.
                        negative = torch.signbit(_reparam.original(module, name))
                    flips.append(_flip(module, name, keep))
                    _reparam.install(module, name, keep, ranker, negative=negative)
            _parents.link(model)
    except BaseException:
        unflip(flips)
        flips.clear()  # turned back: the caller's unflip() must not turn them again
        undo.restore()
        raise
    return model


def unflip(flips: list) -> None:
    """Turn the masks :func:`prune_targets` wrote in place back (see :func:`_flip`)."""
    with torch.no_grad():
        for mask, version, flip in filter(None, flips):
            if mask._version != version:  # written: turn it back
                mask.bitwise_xor_(flip)


def _flip(module: nn.Module, name: str, keep: torch.Tensor) -> tuple | None:
    """For a mask that installing ``keep`` overwrites in place (signmask's own, kept in place for
    optimizers, DDP and compiled graphs holding it): the mask, its version counter and ``keep ^
    mask``, which XORed into either gives the other. The flips of all layers take no more memory
    than the new masks did; None for a mask replaced by a new tensor (the record restores it)."""
    if not isinstance(_reparam.find_hook(module, name)[1], _reparam.SignMaskHook):
        return None
    mask = module._buffers[name + "_mask"]
    return mask, mask._version, keep ^ mask


def remove(model: nn.Module) -> nn.Module:
    """Make all pruning of ``model`` permanent, like ``prune.remove`` on every pruned tensor.

    Each ``weight`` becomes a plain Parameter (the same object as ``weight_orig``) holding the
    effective values ``orig * mask``, as stock prune's: zeros where pruned (NaN where a diverged
    run left a NaN or inf there, as in the forward), locked signs applied. A ``weight`` assigned
    a new Parameter since pruning (``fuse_conv_bn_eval``, module surgery) keeps that Parameter,
    and the hidden ``weight_orig`` and mask are dropped.

    Args:
        model: a model pruned by signmask or by ``torch.nn.utils.prune``.

    Returns:
        ``model``, with no pruned tensor left.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.
        ValueError: nothing in ``model`` is pruned, a pruned weight is on the meta device
            or sharded (a DTensor; gather it first), or a pruning hook was moved onto a module
            without its mask (``torch.ao.quantization``'s ``fuse_modules`` and ``convert`` do:
            remove before them). Nothing is changed then. Where torch fails midway (out of
            memory) or on Ctrl-C, the model is left pruned as it was, computing and training as
            before; only the pruned entries of the ``weight_orig`` it reached (values nothing
            reads under the masks) may be 0.

    Example:
        >>> import torch, signmask
        >>> net = signmask.prune(torch.nn.Linear(4, 4), 0.25)
        >>> net = signmask.remove(net)
        >>> int((net.weight == 0).sum()), hasattr(net, "weight_mask")
        (4, False)
    """
    _checks.check_eager_model(model, "model")
    targets = _targets.require_pruned(model, "nothing to remove")
    # Valid input cannot fail below, but torch can (out of memory at the k-th tensor) and so can
    # Ctrl-C: the tensors before would be permanent. The record puts back the tables and hooks,
    # and the sign bits of the locked weights a tensor's removal reflects (kept in host memory
    # just before). The pruned entries it zeroes stay 0 (dead=True): nothing reads them under the
    # masks put back, and keeping them would copy about 4 bytes per pruned weight every call.
    # Normal tensors even under torch.inference_mode (an export or evaluation function may
    # remove): each Parameter takes the values computed here (or the record's, put back), and
    # inference tensors could never be saved for a backward or updated in place outside it.
    with torch.inference_mode(False):
        undo = _undo.Undo(model, optimizers=_projection.optimizers(targets))
        try:
            with undo.saving(dead=True):
                for module, name in targets.values():
                    _keep_masked(module, name)
                    _prune.remove(module, name)
                _parents.link(model)
        except BaseException:
            undo.restore()  # the entries go back into each Parameter's new storage
            raise
    return model


def _keep_masked(module: nn.Module, name: str) -> None:
    """For :func:`remove`'s undo: keep the entries of ``<name>_orig`` that making it permanent
    changes and that are read (see ``Undo.saving(dead=)``): the sign bits of locked weights,
    which its signs reflect (1 bit per weight: their magnitudes stay), and kept weights a stock
    mask scales (``custom_from_mask`` takes any values)."""
    orig = module._parameters.get(name + "_orig")
    if orig is None:  # parametrized since (remove() refuses it)
        return
    mask, sign = module._buffers[name + "_mask"], module._buffers.get(name + "_sign")
    with torch.no_grad():
        if sign is not None:  # kept entries negated (magnitudes unchanged), pruned ones dead
            _undo.keep_signs(orig)
        elif mask.dtype != torch.bool:
            scaled = (mask != 0) & (mask != 1)
            if bool(scaled.any()):
                _undo.keep(orig, scaled)
