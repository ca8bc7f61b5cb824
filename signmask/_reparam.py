"""The masked (and optionally sign-locked) reparametrization of one tensor, in prune's layout.

A pruned tensor ``weight`` of a module becomes, exactly as with ``torch.nn.utils.prune``:

- ``weight_orig``: the original Parameter (the same object, so optimizers keep working);
- ``weight_mask``: a bool buffer, True = kept (binary in prune's sense, 1 byte per weight);
- ``weight_sign``: only in sign-locked mode, a uint8 buffer with 1 bit per weight (1 = negative);
- a forward pre-hook, :class:`SignMaskHook`, that sets ``module.weight`` before every forward to
  ``weight_orig * weight_mask`` or, sign-locked, ``sign * |weight_orig| * weight_mask`` (computed
  as ``weight_orig`` times int8 factors, :func:`locked_factors`: a kept weight at exactly 0
  still gets a gradient).

The hook is a ``PruningContainer``, so stock ``prune.l1_unstructured`` stacked on top is added to
it (keeping sign locks), and ``prune.remove`` / ``prune.is_pruned`` work unchanged. A forward
post-hook, :class:`DetachWeight`, replaces ``module.weight`` by a detached alias after the
forward, so ``copy.deepcopy`` and pickling work after training steps (pytorch#37322).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as _prune

from . import _bits, _checks, _maskmul

# _backends imports this module; the attribute is looked up at call time, when both are loaded.
from . import _backends  # noqa: E402  isort: skip


def masked_weight(
    orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor | None = None
) -> torch.Tensor:
    """The effective weight: ``orig * mask``, or ``s * |orig| * mask`` with packed signs ``sign``."""
    if sign is None:
        return _maskmul.multiply(orig, mask)
    return _maskmul.multiply(orig, locked_factors(orig, mask, sign))


def locked_factors(orig: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The int8 factors ``f`` in {-1, 0, +1} with ``orig * f == s * |orig| * mask``: 0 where
    pruned, -1 where a kept weight's sign bit disagrees with its lock, else +1.

    A product with -1 flips the sign bit exactly, so the values are those of ``s * |orig|``, and
    the gradient of ``orig`` is ``f`` times the effective weight's: where ``orig`` is 0 it is
    the derivative of ``|orig|`` on the side of the zero's sign bit, not autograd's 0 for
    ``abs`` at 0, which would freeze a kept weight at exactly zero (a weight initialized to 0
    or to an identity) for good. It is also what the projection backend trains.
    """
    keep = _int8(mask)
    flip = _int8(torch.signbit(orig)).bitwise_xor_(_bits.sign_bits(sign, orig.shape))
    flip.bitwise_and_(keep)
    return keep - flip - flip


def _int8(t: torch.Tensor) -> torch.Tensor:
    # A bool tensor's int8 view; a copy where a view cannot be traced or compiled (as_int).
    t = _maskmul.as_int(t, torch.int8)
    return t if t.dtype == torch.int8 else t.to(torch.int8)


class SignMaskHook(_prune.PruningContainer):
    """Forward pre-hook computing a masked, optionally sign-locked, tensor (see module docs)."""

    def __init__(self, name: str, *methods: _prune.BasePruningMethod) -> None:
        self._tensor_name = name
        self._pruning_methods = ()
        for method in methods:
            method._tensor_name = name
            self.add_pruning_method(method)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        # Stock stacking (prune.l1_unstructured on top) lands here; prune's combiner casts the
        # mask to the weight's dtype, which would cost 4 bytes per weight again.
        # Stock then sets module.<name> = apply_mask(module) with grad on: a non-leaf that
        # copy.deepcopy refuses until a forward's DetachWeight. The flag detaches that one.
        self._stacked = True
        return super().compute_mask(t, default_mask) == 1

    # Not stacked until compute_mask says so. Read and set as an attribute, never through
    # __dict__: torch 2.11's dynamo cannot trace ``__dict__.pop`` in a fullgraph forward.
    _stacked = False

    # Key of the signmask._backends backend computing this tensor; set_backend() changes it.
    backend = "torch"
    # Per-process wiring, never copied: the projection backend's stamps, its optimizer (weakly)
    # and the Parameter it keeps projected, and the stock-stacking flag (see compute_mask).
    _TRANSIENT = ("_projected", "_state_masks", "_optimizer", "_param", "_reflected", "_loaded", "_stacked")

    def __getstate__(self) -> dict:
        # A deepcopy or pickle carries none of the projection backend's gradient and optimizer
        # hooks (they hang on the original's tensors and optimizer). Its weights are projected,
        # so the torch path computes the same weights and masks the gradients itself.
        state = dict(self.__dict__)
        if state.get("backend") == "projection":
            state["backend"] = "torch"
        for key in self._TRANSIENT:
            state.pop(key, None)
        return state

    def __call__(self, module: nn.Module, inputs) -> None:
        # prune's setattr, minus nn.Module.__setattr__'s checks: <name> is neither a parameter
        # nor a buffer here, unless one was assigned since (the check below). This runs before
        # every forward of every pruned tensor.
        name = self._tensor_name
        if name in module._parameters:
            raise RuntimeError(
                f"{type(module).__name__}.{name} was assigned a new Parameter after "
                f"pruning (torch.nn.utils.fusion.fuse_conv_bn_eval and module surgery do), which "
                f"the pruning of {name}_orig would hide; make the pruning permanent before: "
                f"signmask.remove(model), or torch.nn.utils.prune.remove(module, {name!r})"
            )
        self.unstack()
        stash_outside(module, name)
        try:
            module.__dict__[name] = self.apply_mask(module, own_forward=True)
        except KeyError:  # not checked before: this runs at every forward
            if name + "_mask" in module._buffers:
                raise
            raise RuntimeError(f"{type(module).__name__} holds a pruning hook of {name!r} but "
                               f"{_checks.moved_hook(name)}") from None

    def unstack(self) -> bool:
        """Clear compute_mask's flag (a forward's weight keeps its graph); whether it was set."""
        if self._stacked:  # written only when set: a compiled forward just guards on it
            self._stacked = False
            return True
        return False

    def apply_mask(self, module: nn.Module, *, own_forward: bool = False,
                   values: torch.Tensor | None = None) -> torch.Tensor:
        """The effective tensor. ``own_forward``: for ``module``'s own forward, the consumer
        whose dtype a backend may write directly (autocast's); else in ``<name>_orig``'s dtype.
        ``values``: computed from these instead of ``<name>_orig`` (a rewind, before it writes
        them)."""
        if self.unstack():
            with torch.no_grad():
                return self.apply_mask(module, own_forward=own_forward, values=values)
        name, buffers = self._tensor_name, module._buffers
        orig, mask = module._parameters.get(name + "_orig"), buffers[name + "_mask"]
        if values is not None:
            orig = values
        elif orig is None:  # parametrized since (weight_norm on weight_orig): computed, as stock reads it
            if name + "_orig" not in getattr(module, "parametrizations", {}):
                raise RuntimeError(_hooked_orig(module, name))
            orig = getattr(module, name + "_orig")
        sign = buffers.get(name + "_sign")
        if self.backend == "torch":
            return masked_weight(orig, mask, sign)
        # set_backend validated the key; a function-level import here cost microseconds per forward.
        return _backends.BACKENDS[self.backend].weight(self, module, orig, mask, sign, own_forward)

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent: ``weight`` becomes a plain Parameter holding the effective
        values (the same Parameter object as ``weight_orig``, at its old position); buffers and
        hooks are dropped."""
        name = self._tensor_name
        with torch.no_grad():
            weight = self.apply_mask(module)
        from ._projection import forget

        forget(module, name)  # the projection backend's gradient and optimizer hooks, if any
        module._parameters[name + "_orig"].data = weight.data
        restore(module, name, ("_mask", "_sign"))

    def __repr__(self) -> str:
        methods = ", ".join(repr(m) for m in self._pruning_methods)
        return f"SignMaskHook({self._tensor_name!r}, [{methods}])"


class DetachWeight:
    """Forward post-hook: keep ``module.<name>`` as a detached alias between forwards.

    After a grad-enabled forward the effective weight is a non-leaf tensor, which
    ``copy.deepcopy`` refuses (pytorch#37322). Autograd keeps its own reference, so detaching the
    attribute changes nothing for backward; but a penalty written on ``module.<name>`` after the
    forward gets no gradient: write it on ``<name>_orig * <name>_mask`` (see README).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, inputs, output) -> None:
        detach_weight(module, self.name)

    def __repr__(self) -> str:
        return f"DetachWeight({self.name!r})"


def add_detach(module: nn.Module, name: str) -> None:
    """Register :class:`DetachWeight` for ``module.<name>``, run even when the forward raises:
    a forward that fails after the pre-hook (inputs of the wrong dtype) would otherwise leave
    a non-leaf weight behind, and ``copy.deepcopy`` refusing it until the next forward."""
    register_always_called(module, DetachWeight(name))


def register_always_called(module: nn.Module, hook) -> None:
    """``module.register_forward_hook(hook, always_call=True)`` under the smallest negative key
    free there (torch's are never negative): the same in every model built alike. Dynamo guards
    nn.Module's lookup of each key in ``_forward_hooks_always_called``, and torch's keys count
    handles process-wide: each new model recompiled the class's forward, eager past the limit."""
    handle, key = module.register_forward_hook(hook, always_call=True), -1
    while key in module._forward_hooks:
        key -= 1
    module._forward_hooks[key] = module._forward_hooks.pop(handle.id)  # still the last one
    module._forward_hooks_always_called[key] = module._forward_hooks_always_called.pop(handle.id)


def drop_detach(module: nn.Module, names) -> None:
    """Unregister the :class:`DetachWeight` hooks of ``names`` on ``module``."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, DetachWeight) and hook.name in names:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)


_OUTSIDE = "_signmask_outside"  # module.__dict__ key: aliases set aside during a torch.func transform


def _exporting() -> bool:
    """Whether ``torch.export`` traces this forward in Python (non-strict, its default). Not
    under dynamo: torch 2.11's folds ``is_exporting()`` to True inside any ``torch.compile``, and
    the stash's dict writes would break every compiled graph there."""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def stash_outside(module: nn.Module, name: str) -> None:
    """Before a pre-hook sets ``module.<name>`` under a ``torch.func`` transform (``grad``,
    ``vmap``) or ``torch.export``: set the current alias aside, for :func:`detach_weight` to put
    back. The weight such a forward computes is a wrapper that dies with the transform (export
    puts the attributes back itself, but warns of each one it finds assigned)."""
    if torch._C._are_functorch_transforms_active() or _exporting():
        module.__dict__.setdefault(_OUTSIDE, {})[name] = module.__dict__.get(name)


def detach_weight(module: nn.Module, name: str) -> None:
    """Replace ``module.<name>`` by a detached alias if a grad-enabled forward computed it; under
    a ``torch.func`` transform or ``torch.export``, by the alias :func:`stash_outside` set aside."""
    weight = module.__dict__.get(name)
    if weight is None:
        return
    if torch._C._are_functorch_transforms_active() or _exporting():  # with or without grad
        aside = module.__dict__.get(_OUTSIDE, {})
        outside = aside.pop(name, None)
        if not aside:
            module.__dict__.pop(_OUTSIDE, None)
        module.__dict__[name] = outside if outside is not None else weight.detach()
        return
    # Under no_grad (evaluation) there is nothing to detach.
    if not weight.requires_grad or torch.jit.is_tracing():  # jit.trace would record a detach
        return
    module.__dict__[name] = weight.detach()


def rename(params: dict, old: str, new: str) -> None:
    """Rename a key of a module's ``_parameters`` in place, keeping its position (so the order of
    ``parameters()`` and ``state_dict()`` does not change)."""
    items = list(params.items())
    params.clear()
    params.update((new if k == old else k, v) for k, v in items)


def find_hook(module: nn.Module, name: str) -> tuple[int | None, _prune.BasePruningMethod | None]:
    """The pruning pre-hook (ours or stock) acting on ``module.<name>``, with its key."""
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _prune.BasePruningMethod) and hook._tensor_name == name:
            return key, hook
    return None, None


def methods(hook: _prune.BasePruningMethod | None) -> list[_prune.BasePruningMethod]:
    """The pruning history of a hook: a container's methods, a lone stock method, or none."""
    if hook is None:
        return []
    return list(hook) if isinstance(hook, _prune.PruningContainer) else [hook]


def is_sign_locked(module: nn.Module, name: str) -> bool:
    return name + "_sign" in module._buffers


def current_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The bool keep-mask of ``module.<name>``, or None when it is not pruned.

    A bool mask (signmask's) is returned as it is, not copied: callers must not write to it.
    A float mask (stock prune's) is compared, giving a new tensor.
    """
    mask = module._buffers.get(name + "_mask")
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 1


def original(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable Parameter behind ``module.<name>``, pruned or not."""
    params = module._parameters
    if name + "_orig" in params:
        return params[name + "_orig"]
    if name in params:
        return params[name]
    if name + "_orig" in getattr(module, "parametrizations", {}):  # weight_norm on weight_orig
        raise ValueError(
            f"{type(module).__name__}.{name}_orig is computed by a parametrization, not a "
            f"Parameter: undo it first (torch.nn.utils.parametrize.remove_parametrizations"
            f"(module, {name + '_orig'!r}))"
        )
    if name + "_orig" in module.__dict__:  # weight_norm's or spectral_norm's hook sets it
        raise ValueError(_hooked_orig(module, name))
    raise KeyError(name)


def _hooked_orig(module: nn.Module, name: str) -> str:
    # torch.nn.utils.weight_norm / spectral_norm (hook-based) on <name>_orig: their pre-hook
    # computes it after the pruning hook has read it, so each forward would use the previous
    # forward's tensor (and the second backward fail); stock prune reads it just as late.
    orig = name + "_orig"
    return (
        f"{type(module).__name__}.{orig} is no Parameter but a tensor that a forward pre-hook "
        f"computes (torch.nn.utils.weight_norm or spectral_norm on it), after the pruning hook "
        f"has read it: the pruned {name} would lag a forward behind. Undo it "
        f"(torch.nn.utils.remove_weight_norm(module, {orig!r}) or remove_spectral_norm) and use "
        f"torch.nn.utils.parametrizations.weight_norm / spectral_norm(module, {orig!r}) instead"
    )


def install(
    module: nn.Module,
    name: str,
    keep: torch.Tensor,
    method: _prune.BasePruningMethod,
    *,
    negative: torch.Tensor | None = None,
) -> None:
    """Set the keep-mask of ``module.<name>`` to ``keep`` (bool), reparametrizing it if needed.

    ``negative`` (bool, same shape) sign-locks the tensor: True entries are forced negative.
    Callers validate everything first; this function does not fail halfway on valid input.
    """
    # Normal tensors even under torch.inference_mode (a decorated loader or evaluation function
    # may prune, transfer or load): an inference-tensor mask or sign buffer could never be written
    # in place outside it again (the next pruning round, load_state_dict, the projection stamps).
    with torch.inference_mode(False):
        _install(module, name, keep, method, negative)


def _install(module, name, keep, method, negative) -> None:
    # History records must not pin per-weight tensors (deepcopy/pickle would copy them).
    method = method.spent() if hasattr(method, "spent") else method
    key, hook = find_hook(module, name)
    if hook is None:
        rename(module._parameters, name, name + "_orig")
        module.register_buffer(name + "_mask", keep.clone())
        module.register_forward_pre_hook(SignMaskHook(name, method))
        add_detach(module, name)
    elif isinstance(hook, SignMaskHook):
        module._buffers[name + "_mask"].copy_(keep)
        method._tensor_name = name
        hook.add_pruning_method(method)
    else:
        # A stock prune hook: adopt its history and convert its float mask to bool.
        del module._forward_pre_hooks[key]
        module._buffers[name + "_mask"] = keep.clone()
        module.register_forward_pre_hook(SignMaskHook(name, *methods(hook), method))
        add_detach(module, name)
    if negative is not None:
        module._buffers[name + "_sign"] = _bits.pack_signs(negative)
    refresh(module, name)


def effective(module: nn.Module, name: str) -> torch.Tensor:
    """Return the ``module.<name>`` the forward uses (masked and sign-locked for a pruned
    tensor), detached."""
    _, hook = find_hook(module, name)
    with torch.no_grad():
        value = getattr(module, name) if hook is None else hook.apply_mask(module)
    return value.detach()


def refresh(module: nn.Module, name: str) -> None:
    """Recompute ``module.<name>`` of a pruned tensor after its mask, signs, backend or
    ``<name>_orig`` changed outside a forward (the next forward would, but a compiled one or a
    read of ``module.<name>`` before it must not see the old value)."""
    if find_hook(module, name)[1] is not None:
        setattr(module, name, effective(module, name))


def uninstall(module: nn.Module, name: str) -> None:
    """Undo :func:`install` on an untouched tensor: restore the Parameter, drop buffers and hooks.

    Unlike ``remove`` this does not write the mask into the weights (used to roll back).
    """
    key, _ = find_hook(module, name)
    if key is not None:
        del module._forward_pre_hooks[key]
    restore(module, name, ("_mask", "_sign"))


def restore(module: nn.Module, name: str, buffers: tuple[str, ...]) -> None:
    """Undo a reparametrization of ``module.<name>``, all but its pre-hook (the caller's): drop
    its :class:`DetachWeight` hook, its alias and its ``<name><suffix>`` ``buffers``, and give
    ``<name>_orig`` its name back (the same Parameter, at its old position)."""
    drop_detach(module, (name,))
    module.__dict__.pop(name, None)
    for suffix in buffers:
        module._buffers.pop(name + suffix, None)
    if name + "_orig" in module._parameters:
        rename(module._parameters, name + "_orig", name)
