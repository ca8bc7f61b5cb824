"""Which tensors of a model are pruned, and the canonical names tickets use for them."""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from torch.nn.utils import prune as _prune
from torch.nn.utils.spectral_norm import SpectralNorm

# _heads imports this module; its attributes are looked up at call time, when both are loaded.
from . import _heads  # noqa: E402  isort: skip
from ._checks import check_bool, check_eager_model, some
from ._target_checks import GATHER_FIRST, check_attached, check_local, check_unshadowed

# Wrappers whose prefixes are not part of a tensor's identity: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

FilterFn = Callable[[nn.Module, str], bool]


EXTRA_STATE = "_extra_state"  # nn.Module's state_dict key suffix for get_extra_state()


def canonical(name: str) -> str:
    """Strip leading wrapper prefixes (``module.``, ``_orig_mod.``) from a qualified name."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DataParallel/DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def has_tensor(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a Parameter, or one reparametrized as ``<name>_orig``.

    The old ``nn.utils.spectral_norm`` keeps its raw weight as ``<name>_orig`` too, and computes
    ``<name>`` from it in its own hook: that one is not a tensor signmask can take over.
    """
    if isinstance(module, torch.jit.ScriptModule):  # a scripted submodule: no conv/linear, no dict
        return False
    params = module._parameters
    if params.get(name) is not None:
        return True
    if params.get(name + "_orig") is None:
        return False
    return not any(
        isinstance(h, SpectralNorm) and h.name == name for h in module._forward_pre_hooks.values()
    )


def _computed(model: nn.Module, tensor: str = "weight") -> dict[str, nn.Module]:
    """Canonical module name -> conv/linear module whose ``tensor`` is no Parameter of its own
    (computed by ``nn.utils.parametrize``, ``weight_norm`` or ``spectral_norm``)."""
    return {
        canonical(fqn): m
        for fqn, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and not has_tensor(m, tensor)
    }


def same_name_error(key: str, first: str, second: str, owner: str | None) -> ValueError:
    """The error for two different tensors ``first`` and ``second`` both canonically ``key``;
    ``owner`` (an argument's name) says which model holds them where several are taken."""
    where = f"in {owner}, " if owner else ""
    return ValueError(
        f"{where}{first} and {second} are different tensors with the same name once "
        f"the wrapper prefixes {list(_WRAPPER_PREFIXES)} are stripped ({key!r}); signmask "
        "names tensors that way (tickets, DDP and compiled models): rename one of the modules"
    )


def _index_tensor(index: dict, fqn: str, module: nn.Module, tensor: str,
                  owner: str | None = None) -> None:
    """Add ``module.<tensor>`` to ``index`` under its canonical name as ``(module, tensor, fqn)``,
    refusing a second module there: a wrapper's own ``fc`` beside its ``module.fc`` would
    otherwise drop out of every verb silently. ``owner`` names the model in the error."""
    key = canonical(f"{fqn}.{tensor}" if fqn else tensor)
    other = index.setdefault(key, (module, tensor, fqn))
    if other[0] is not module:
        first, second = (f"{f}.{tensor}" if f else tensor for f in (other[2], fqn))
        raise same_name_error(key, first, second, owner)


def canonical_index(model: nn.Module, names_of: Callable[[nn.Module], Iterable[str]], *,
                    owner: str | None = None) -> dict[str, tuple[nn.Module, str]]:
    """Map the canonical name of every tensor ``names_of(module)`` names in a module of ``model``
    to ``(module, name)``: the one index builder, so every verb refuses name clashes alike.

    Raises:
        ValueError: two modules' tensors have the same canonical name (``owner``, the
            argument holding ``model``, is named in the message).
    """
    index: dict = {}
    for fqn, module in model.named_modules():
        for name in names_of(module):
            _index_tensor(index, fqn, module, name, owner)
    return {key: (module, name) for key, (module, name, _) in index.items()}


def tensor_index(model: nn.Module, tensor: str = "weight", *,
                 owner: str | None = None) -> dict[str, tuple[nn.Module, str]]:
    """Return canonical ``"<module fqn>.<tensor>"`` -> (module, tensor) for every module owning it."""
    return canonical_index(model, lambda m: (tensor,) if has_tensor(m, tensor) else (), owner=owner)


def layer_weights(model: nn.Module, *, owner: str | None = None) -> dict[str, tuple[nn.Module, str]]:
    """Return canonical name -> (module, ``"weight"``) for every conv/linear weight, pruned or not."""
    return {key: pair for key, pair in tensor_index(model, owner=owner).items()
            if isinstance(pair[0], PRUNABLE_TYPES)}


def canonical_tensors(named: Iterable[tuple[str, torch.Tensor]], *,
                      owner: str | None = None) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor for qualified ``(name, tensor)`` pairs (``named_parameters()``).

    Raises:
        ValueError: two different tensors have the same canonical name, as in
            :func:`_index_tensor` (keeping the first would leave the other out unseen).
    """
    out: dict = {}
    qualified: dict = {}
    for name, t in named:
        key = canonical(name)
        if out.setdefault(key, t) is not t:
            raise same_name_error(key, qualified[key], name, owner)
        qualified.setdefault(key, name)
    return out


# nn.MultiheadAttention's raw projection weights: in_proj_weight, or the three separate ones
# it makes instead when built with kdim/vdim unlike embed_dim.
_RAW_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _warn_raw_projections(model: nn.Module, inc, exc) -> None:
    """Warn of ``nn.MultiheadAttention`` layers in scope: their q/k/v projection is a raw
    Parameter (``in_proj_weight``, or ``q/k/v_proj_weight`` with ``kdim``/``vdim``), which is
    not pruned; only their ``out_proj`` is (torchvision's ViT, ``nn.Transformer``). Each layer
    is named with the Parameters it really has."""
    raw = sorted(
        (n, [p for p in _RAW_PROJECTIONS if has_tensor(m, p)])
        for n, m in ((canonical(n), m) for n, m in model.named_modules()
                     if isinstance(m, nn.MultiheadAttention))
        if _in_patterns(n, inc, exc)
    )
    raw = [(n, params) for n, params in raw if params]
    if raw:
        layers = ", ".join(f"{n!r} ({', '.join(params)})" for n, params in raw[:3])
        warnings.warn(
            f"{len(raw)} nn.MultiheadAttention layer(s) keep their q/k/v projection in raw "
            f"Parameters, which signmask does not prune; only their out_proj (an nn.Linear) "
            f"is: {layers}{' ...' if len(raw) > 3 else ''}",
            UserWarning,
            stacklevel=4,
        )


def check_initialized(key: str, module: nn.Module, tensor, doing: str) -> None:
    """Refuse ``tensor`` (``module``'s ``key``) while it is an uninitialized lazy parameter or
    buffer (an ``nn.LazyLinear`` before its first forward): it has no shape or values yet, and
    torch's own error when one is read names no tensor. ``doing`` ends the message."""
    if nn.parameter.is_lazy(tensor):
        kind = "buffer" if isinstance(tensor, nn.parameter.UninitializedBuffer) else "parameter"
        raise ValueError(
            f"{key} is an uninitialized lazy {kind} ({type(module).__name__}); run one forward "
            f"pass to give it a shape before {doing}"
        )


def _in_patterns(names: str | Sequence[str], inc: Sequence[str] | None, exc: Sequence[str] | None) -> bool:
    """Whether a module's name (or one of its ``names``) matches ``include=`` (when given) and
    none matches ``exclude=``."""
    names = (names,) if isinstance(names, str) else names
    return ((inc is None or any(_matches(n, inc) for n in names))
            and not (exc and any(_matches(n, exc) for n in names)))


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """id of each module of ``model`` -> its canonical names, the first first (a module
    registered twice has two), as :func:`layer_weights` names them (a wrapped root's is "")."""
    names: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(canonical(f"{fqn}.weight").rpartition(".")[0])
    return names


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def _as_patterns(arg: str | Iterable[str] | None, what: str) -> list[str] | None:
    if arg is None:
        return None
    try:
        patterns = [arg] if isinstance(arg, str) else list(arg)
    except TypeError:  # not iterable
        patterns = [arg]
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a glob string or a list of them, got {arg!r}")
    return patterns


def select(
    model: nn.Module,
    *,
    classifier: bool = True,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, tuple[nn.Module, str]]:
    """Return the ``.weight`` tensors to prune: every conv and linear layer, filtered.

    Globs match the canonical module name (``"layer1.0.conv1"``, ``"blocks.*.attn.qkv"``); a
    module registered under two names is matched by either (and named by its first).
    Biases, norm parameters, embeddings and other raw Parameters are never selected.

    Conv/linear modules whose weight is computed rather than a Parameter (``parametrize``,
    ``weight_norm``, ``spectral_norm``) are skipped with a warning.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or is a TorchScript one),
            ``include``/``exclude`` is not a glob or a list of them, ``filter_fn`` is not callable,
            ``classifier`` is not a bool.
        ValueError: an ``include``/``exclude`` pattern matches no conv/linear module, a chosen
            weight is an uninitialized lazy parameter or a pruned one assigned a new Parameter
            since, or nothing is left to prune.
    """
    check_eager_model(model, "model")
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    _check_filter_fn(filter_fn)
    check_bool(classifier, "classifier")
    heads, guess = (set(), None) if classifier else _heads.find_heads(model)
    # By module name, which the globs match: "<name>.weight" less its tensor ("" at the root).
    layers = {key.rpartition(".")[0]: (key, module, tensor)
              for key, (module, tensor) in layer_weights(model).items()}
    # A module registered twice is one layer under its first name, but a glob may name it by
    # either: matching the first only, exclude="*.fc" pruned an fc known first by another name.
    names = _module_names(model)
    aliases = {fqn: names[id(module)] for fqn, (_, module, _) in layers.items()}
    computed = _computed(model)
    _check_patterns(inc, exc, [n for a in aliases.values() for n in a], computed)
    _warn_computed(computed, inc, exc)
    _warn_raw_projections(model, inc, exc)

    def in_scope(module: nn.Module, fqn: str) -> bool:
        return _in_patterns(aliases[fqn], inc, exc) and (filter_fn is None or bool(filter_fn(module, fqn)))

    chosen = {}
    for fqn, (key, module, tensor) in layers.items():
        if id(module) in heads:
            if guess == fqn and in_scope(module, fqn):  # a guessed head the scope would prune
                _heads.warn_guessed_head(model, fqn)
        elif in_scope(module, fqn):
            check_initialized(key, module, module._parameters.get(tensor), "pruning")
            chosen[key] = (module, tensor)
    if not chosen:
        raise ValueError(
            f"nothing to prune in {type(model).__name__}: no conv/linear weight is left after "
            f"classifier={classifier}, include={inc}, exclude={exc}, filter_fn={filter_fn}"
        )
    check_local(chosen)
    check_unshadowed(chosen)
    return chosen


def _check_filter_fn(filter_fn) -> None:
    if filter_fn is None:
        return
    if not callable(filter_fn):
        raise TypeError(
            f"filter_fn must be callable as filter_fn(module, name), got "
            f"{type(filter_fn).__name__} {filter_fn!r}"
        )
    # One taking other arguments (filter_fn(module)) would fail inside the selection, in a
    # Python error that names neither filter_fn nor its signature. Not follow_wrapped: a
    # decorator's (*args) wrapper takes the two arguments whatever it wraps.
    try:
        signature = inspect.signature(filter_fn, follow_wrapped=False)
    except Exception:  # noqa: BLE001 -- the call tells: no signature to read (some builtins), or
        return  # annotations that fail to evaluate (3.14 evaluates them; TYPE_CHECKING-only names)
    try:
        signature.bind(None, "")
    except TypeError:
        name = getattr(filter_fn, "__qualname__", type(filter_fn).__name__)
        raise TypeError(
            f"filter_fn must be callable as filter_fn(module, name), got {name}{signature}"
        ) from None


def _check_patterns(inc: list[str] | None, exc: list[str] | None, layers: Iterable[str],
                    computed: dict[str, nn.Module]) -> None:
    """Refuse a glob that matches none of the module names ``layers``: a typo would otherwise
    change what is pruned silently. One matching only ``computed`` weights is refused for
    ``include`` (they cannot be pruned) and allowed for ``exclude`` (it silences the warning)."""
    for patterns, what in ((inc, "include"), (exc, "exclude")):
        for p in patterns or ():
            if any(fnmatch.fnmatchcase(n, p) for n in layers):
                continue
            hit = sorted(n for n in computed if fnmatch.fnmatchcase(n, p))
            if hit and what == "exclude":
                continue
            if hit:
                raise ValueError(
                    f"{what} pattern {p!r} matches only conv/linear modules whose weight is "
                    f"computed, not a Parameter ({hit[:3]}: parametrize, weight_norm or "
                    "spectral_norm); signmask cannot prune those"
                )
            raise ValueError(
                f"{what} pattern {p!r} matches no conv/linear module; module names look like "
                f"{sorted(layers)[:3]}"
            )


def _warn_computed(computed: dict[str, nn.Module], inc, exc) -> None:
    """Warn of the conv/linear modules in scope whose weight is computed: they are skipped."""
    skipped = sorted(n for n in computed if _in_patterns(n, inc, exc))
    if skipped:
        warnings.warn(
            f"signmask skips {len(skipped)} conv/linear module(s) whose weight is computed, not a "
            f"Parameter (parametrize, weight_norm, spectral_norm): {skipped[:5]}",
            UserWarning,
            stacklevel=4,
        )


def check_copies(copies: tuple, targets: dict[str, tuple[nn.Module, str]]) -> None:
    """Refuse, before anything is taken off, a copy passed to ``Search.close`` that is no module,
    or that holds none of the search's masks: made before apply(). timm's ``ModelEmaV3`` pairs
    its tensors with the model's by position, so such an EMA averaged other tensors than it
    holds, or (``exclude_buffers=True``, a model without buffers) ``weight_orig`` into a dense
    copy, silently."""
    for i, copy in enumerate(copies, start=1):
        if not isinstance(copy, nn.Module):
            raise TypeError(f"close() takes copies of the model (nn.Module), got {type(copy).__name__}")
        if targets and not targets.keys() & pruned(copy).keys():
            raise ValueError(
                f"close(): copy {i} ({type(copy).__name__}) holds none of the search's masks: it "
                f"was made before apply() (or its pruning was made permanent), so it is no copy of "
                f"the searched model (none of {some(sorted(targets))} is pruned in it); an EMA "
                "made before apply() pairs its tensors with the pruned model's by position and "
                "averages the wrong ones: make it after apply() (ModelEmaV3(model) again there; "
                "under DDP, of the model inside: ModelEmaV3(timm.utils.unwrap_model(model)))"
            )


def require_pruned(model: nn.Module, missing: str,
                   fix: str = GATHER_FIRST) -> dict[str, tuple[nn.Module, str]]:
    """Return :func:`pruned` ``model``'s tensors, refusing a model with none (``missing`` ends
    that message: what the caller cannot do) or one :func:`check_local` refuses (``fix``)."""
    found = pruned(model)
    if not found:
        raise ValueError(f"nothing in {type(model).__name__} is pruned; {missing}")
    check_attached(found)
    check_local(found, fix)
    return found


def pruned(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Return canonical name -> (module, tensor) for every tensor carrying a pruning hook."""
    return canonical_index(model, _hooked_names)


def _hooked_names(module: nn.Module) -> list[str]:
    return [h._tensor_name for h in module._forward_pre_hooks.values()
            if isinstance(h, _prune.BasePruningMethod)]
