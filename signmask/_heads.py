"""Which conv/linear modules form a model's classifier head (``classifier=False`` leaves them dense)."""

from __future__ import annotations

import warnings

from torch import nn

# _targets imports this module; its attributes are looked up at call time, when both are loaded.
from . import _targets


def find_heads(model: nn.Module) -> tuple[set[int], str | None]:
    """ids of the conv/linear modules forming the classifier head, and the canonical name of
    that head where it is a guess: the last conv of a model without ``nn.Linear``.

    Uses timm's ``get_classifier()`` (one module or a tuple, as in distilled DeiT), then
    ``pretrained_cfg["classifier"]`` (or the nearest parent of a module it names that is gone; a
    model with none of them, or a timm ``features_only`` backbone, whose config has no such
    entry, has no head), then the last ``nn.Linear`` registered in the model, then (SqueezeNet's
    1x1-conv head) its last conv.
    """
    heads: list[nn.Module] = []
    guess = None
    root = _targets.unwrap(model)
    getter = getattr(root, "get_classifier", None)
    if callable(getter):
        try:
            found = getter()
        except Exception:  # noqa: BLE001 -- timm's efficientvit with num_classes=0 raises
            found = None
        heads = list(found) if isinstance(found, (tuple, list)) else [found] if found else []
    if not heads:
        cfg = getattr(root, "pretrained_cfg", None) or {}
        names = cfg.get("classifier")
        names = [names] if isinstance(names, str) else list(names or ())
        heads = [h for n in names if (h := _named_head(root, n)) is not None]
        if (names or ("architecture" in cfg and "classifier" not in cfg)) and not heads:
            # timm says the model has no head: it names one the model no longer has, or, for a
            # features_only backbone (FeatureListNet...), drops the entry. The fallbacks would
            # take a body layer.
            return set(), None
    if not heads:
        linears = [m for m in root.modules() if isinstance(m, nn.Linear)]
        heads = linears[-1:]
    if not heads:
        convs = [(n, m) for n, m in root.named_modules() if isinstance(m, _targets.PRUNABLE_TYPES)]
        if convs:
            guess, heads = _targets.canonical(convs[-1][0]), [convs[-1][1]]
    ids = set()
    for head in heads:
        if isinstance(head, nn.Module):
            ids.update(id(m) for m in head.modules() if isinstance(m, _targets.PRUNABLE_TYPES))
    return ids, guess


def _named_head(root: nn.Module, name: str) -> nn.Module | None:
    """The module timm's config names as the head, or its nearest parent below ``root`` where it
    is gone: ``head.linear`` is ``head`` where that was replaced by one's own ``nn.Linear``, or by
    ``nn.Identity`` (``num_classes=0``, where ``get_classifier()`` raises): no head then."""
    parts = name.split(".")
    while parts:
        try:
            return root.get_submodule(".".join(parts))
        except AttributeError:
            parts.pop()
    return None


def warn_guessed_head(model: nn.Module, fqn: str) -> None:
    """Warn that the last conv ``fqn`` is left dense as a head that :func:`find_heads` guessed."""
    warnings.warn(
        f"classifier=False: {type(_targets.unwrap(model)).__name__} has no timm "
        f"get_classifier() and no nn.Linear, so its last conv, {fqn!r}, is taken as "
        "the classifier head and left dense; if that is wrong, pass classifier=True "
        "with exclude=",
        UserWarning,
        stacklevel=4,
    )
