"""``transfer``: put a ticket's signed mask onto a new random initialization."""

from __future__ import annotations

import os

import torch
from torch import nn

from . import _checks, _heads, _interpolate, _io, _methods, _parents, _reparam, _target_checks, _targets, _ties, _undo
from ._extract import architecture, layer_count
from ._ticket import Ticket

_MODES = ("init", "locked", "keep")


def resolve(ticket: Ticket | str | os.PathLike, caller: str = "transfer") -> Ticket:
    """``ticket`` checked, or loaded from its path; ``TypeError`` naming ``caller`` otherwise."""
    if isinstance(ticket, Ticket):
        return ticket._checked()
    if isinstance(ticket, (str, os.PathLike)):
        return _io.load(ticket)
    raise TypeError(f"{caller}() takes a Ticket or a path as ticket, got {type(ticket).__name__}")


def check_same_architecture(ticket: Ticket, model: nn.Module) -> None:
    """Refuse a model of another architecture than the ticket's, or a deeper one.

    A ticket without a recorded architecture matches any model. Shared with
    :func:`signmask.analysis.random_prune`, so both refuse the same models the same way.
    """
    want = ticket.metadata.get("architecture")
    if want is None:
        return
    have = architecture(model)
    if want != have:
        raise ValueError(
            f"ticket was made for architecture {want!r}, the model is {have!r} "
            "(pass check_architecture=False to skip this check)"
        )
    # One-sided, and heads aside: a model with fewer layers misses ticket tensors (refused by
    # name later) or is the same backbone without its head; one with more layers outside its
    # head than the ticket's model had in all is a deeper network of the same name.
    layers = ticket.metadata.get("layers", "")  # tickets before 2026-12-07 do not record it
    if not (layers.isascii() and layers.isdigit()):  # "²" is a digit that int() refuses
        return
    body = layer_count(model) - len(_heads.find_heads(model)[0])
    if body > int(layers):
        raise ValueError(
            f"ticket was made for a {want} with {layers} conv/linear layers, the model has "
            f"{body} outside its classifier head (a deeper one?) (pass check_architecture=False "
            "to skip this check)"
        )


def match_tensors(ticket: Ticket, model: nn.Module, names: dict[str, dict[str, torch.Tensor]]) -> list:
    """Match every ticket tensor to a model tensor; raise before anything is changed."""
    index = {}
    for suffix in ("weight", "bias"):
        index.update(_targets.tensor_index(model, suffix))
    unknown = sorted(k for group in names.values() for k in group if k not in index)
    if unknown:
        raise ValueError(
            f"ticket tensors {_checks.some(unknown, 5)} ({len(unknown)} in all) "
            f"are not in {architecture(model)}; its tensors look like {sorted(index)[:3]}"
        )
    plan = []
    for role, group in names.items():
        for key, signed in group.items():
            module, name = index[key]
            target = _reparam.original(module, name)
            _targets.check_initialized(key, module, target, "transferring a ticket onto it")
            if tuple(target.shape) != tuple(signed.shape):
                raise ValueError(
                    f"ticket tensor {key!r} has shape {tuple(signed.shape)}, the model's has "
                    f"{tuple(target.shape)}{_skip_hint(role, key, ticket)}"
                )
            if role == "mask":
                if _reparam.find_hook(module, name)[1] is not None:
                    raise ValueError(
                        f"{key} is already pruned; a ticket goes onto an unpruned model "
                        "(a fresh init), so that its mask is not mixed with another"
                    )
                if name != "weight" or not isinstance(module, _targets.PRUNABLE_TYPES):
                    raise ValueError(
                        f"ticket masks {key!r}, which is not a conv/linear weight (the model's is "
                        f"the {name} of a {type(module).__name__})"
                    )
                _target_checks.check_names_free(key, module, name)
            if role == "sign" and _reparam.find_hook(module, name)[1] is not None:
                raise ValueError(
                    f"the ticket's dense sign {key!r} is for an unpruned tensor, and the model's "
                    "is pruned; a ticket goes onto an unpruned model (a fresh init)"
                )
            if role == "norm" and not _interpolate.is_norm(module):
                raise ValueError(
                    f"ticket norm tensor {key!r} is, in the model, a tensor of "
                    f"{type(module).__name__}, not of a norm layer"
                )
            plan.append((role, key, module, name, target, signed))
    _target_checks.check_local({key: (m, n) for _, key, m, n, _, _ in plan})
    _ties.check_untied({key: (m, n) for role, key, m, n, _, _ in plan if role == "mask"}, model,
                       remedy="untie them before the transfer")
    return plan


def _skip_hint(role: str, key: str, ticket: Ticket) -> str:
    """How to leave out a dense sign that does not fit: a new head of another number of classes
    (fine-tuning) is the usual cause, and its signs are optional."""
    if role != "sign":
        return ""
    flag = "biases" if key.endswith(".bias") and key[: -len("bias")] + "weight" in ticket.masks else "dense"
    return f" (a new head? pass {flag}=False to leave the ticket's dense {key!r} sign out)"


def _wanted(key: str, ticket: Ticket, biases: bool, dense: bool) -> bool:
    """Whether ``transfer`` writes the ticket's dense sign ``key``: a bias with ``biases`` (and
    ``dense`` too when its layer is one of the unpruned ones), a weight with ``dense``."""
    if not key.endswith(".bias"):
        return dense
    return biases and (dense or key[: -len("bias")] + "weight" in ticket.masks)


def transfer(
    ticket: Ticket | str | os.PathLike,
    model: nn.Module,
    *,
    signs: str = "init",
    biases: bool = True,
    dense: bool = True,
    norms: bool = False,
    check_architecture: bool = True,
) -> nn.Module:
    """Apply a ticket to a new random init of the same architecture, in place.

    Kept weights become ``|theta_new| * s``, pruned weights 0, and the binary mask is installed
    as with :func:`signmask.prune`. Norm layers keep their fresh init unless ``norms`` is set.
    The defaults follow the AWS reference code's ``sign_transfer``: signs of the masked weights,
    of biases and of a dense classifier, and no norm parameters.

    Args:
        ticket: a :class:`Ticket` or the path of a saved one.
        model: an unpruned model (ticket names are matched ignoring ``module.``/``_orig_mod.``).
        signs: ``"init"`` writes the signs once (training may flip them, as in AWS);
            ``"locked"`` also keeps them through training (``w = s * |w_orig| * mask``);
            ``"keep"`` installs only the binary mask and keeps the new init's own values and
            signs (the "random reinit" baseline of the sanity checks).
        biases: apply the ticket's dense bias signs, if it has any (ignored by ``"keep"``); those
            of unpruned layers only with ``dense`` as well.
        dense: apply the ticket's dense weight signs (an unpruned classifier), if any (ignored by
            ``"keep"``, which neither writes nor shape-checks them).
        norms: also copy the ticket's trained norm parameters (recorded by a search, or by
            ``extract(norms=True)``) onto the model's norm layers, as they are; their running
            statistics stay the model's own. This is the reference code's ``winit_only``: the
            new init supplies the conv/linear weights only. With ``"keep"`` it gives the
            control "binary mask + trained norms" (the new init's own signs).
        check_architecture: refuse a ticket whose recorded architecture differs from the model's.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is a TorchScript one (whatever
            ``check_architecture`` says), ``ticket`` is neither a Ticket nor a path, a flag is not a
            bool, or a masked weight is an 8-bit float, or a weight to get a sign is complex
            (``signs="keep"`` writes no sign, and accepts one).
        ValueError: unknown ``signs``, another architecture, ticket tensors missing from the model,
            a shape mismatch, an already-pruned tensor, a lazy layer with no shape yet, ``norms``
            with a ticket that has none, a ticket norm tensor that is not a norm layer's in
            the model, a ticket mask on a tensor that is not a conv/linear weight, a masked
            weight tied to another tensor (a shared Parameter, or one on the same memory), or
            a weight on the meta device or sharded (a DTensor). Nothing is changed then, nor
            where torch fails midway (out of memory): a copy in host memory of the tensors it
            writes puts them back.
        FileNotFoundError: ``ticket`` is the path of no file (and ``load``'s errors for a
            file that is no valid ticket).

    Example:
        >>> import torch, signmask
        >>> torch.manual_seed(0) and None
        >>> ticket = signmask.extract(signmask.prune(torch.nn.Linear(6, 6), 0.5))
        >>> new = signmask.transfer(ticket, torch.nn.Linear(6, 6))
        >>> bool((signmask.extract(new).masks["weight"] == ticket.masks["weight"]).all())
        True
    """
    _checks.check_key(signs, _MODES, "signs", "sign mode")
    _checks.check_eager_model(model, "model")  # before reading a ticket file
    for flag, arg in ((biases, "biases"), (dense, "dense"), (norms, "norms"),
                      (check_architecture, "check_architecture")):
        _checks.check_bool(flag, arg)
    ticket = resolve(ticket)
    if check_architecture:
        check_same_architecture(ticket, model)
    if norms and not ticket.norms:
        raise ValueError(
            "norms=True, but the ticket recorded no norm parameters (a search records them; "
            "signmask.extract does with norms=True)"
        )
    groups = {"mask": ticket.masks, "norm": dict(ticket.norms) if norms else {}}
    if signs != "keep":  # "keep" writes no sign, so a bias or dense head need not even match
        groups["sign"] = {k: v for k, v in ticket.signs.items() if _wanted(k, ticket, biases, dense)}
    plan = match_tensors(ticket, model, groups)
    for role, key, _, _, target, _ in plan:
        if role != "norm" and signs != "keep" and target.is_complex():
            raise TypeError(
                f"{key} is {target.dtype}: a complex weight has no sign to transfer (|w| * s "
                "would drop its phase); signs='keep' installs the mask alone"
            )
        if role == "mask":
            _target_checks.check_dtype(key, target, locked=signs == "locked")
    # Valid input cannot fail below, but torch can (out of memory at the k-th tensor), and so can
    # Ctrl-C: the values written (copies in host memory, as load_state_dict keeps) and the
    # masks installed before it are put back.
    undo = _undo.Undo(model)
    with torch.no_grad():
        saved = [(target, target.detach().to("cpu", copy=True)) for role, _, _, _, target, _ in plan
                 if role == "norm" or signs != "keep"]
    try:
        with torch.no_grad():
            for role, key, module, name, target, signed in plan:
                if role == "norm":
                    target.copy_(signed)  # the trained values themselves, not a sign
                elif signs != "keep":
                    signed = signed.to(device=target.device, dtype=target.dtype)
                    # where, not a product: an inf or NaN of the init at a pruned entry is 0 too
                    target.copy_(torch.where(signed != 0, target.abs() * signed, 0))
                if role == "mask":
                    keep = signed.to(target.device) != 0
                    negative = (signed < 0).to(target.device) if signs == "locked" else None
                    _reparam.install(module, name, keep, _methods.FromSignedMask(signed), negative=negative)
        _parents.link(model)
    except BaseException:
        undo.restore(refresh=False)
        with torch.no_grad():
            for target, values in saved:
                target.copy_(values)
        undo.refresh()
        raise
    return model
