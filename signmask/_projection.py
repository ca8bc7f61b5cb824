"""The ``"projection"`` backend: masks applied in place instead of a reparametrization.

``weight_orig`` itself is kept masked (and sign-locked), so the forward uses it as is: the hook
only aliases ``module.weight`` to it, no kernel runs. The invariant is kept by:

1. at :func:`signmask.set_backend`: ``weight_orig`` and every per-weight optimizer state tensor
   are masked (sign-locked tensors are reflected onto their locked signs, see below);
2. every backward: ``weight_orig.grad`` is masked in place as soon as it is accumulated (a
   post-accumulate-grad hook), so gradient clipping sees the reparametrization's gradients; a
   gradient assigned to ``.grad`` instead (``torch.autograd.grad``) is masked before the step;
3. after every ``optimizer.step()``: sign-locked weights that crossed zero are reflected back (on
   CPU only those, at their indices: ``_projection_ops.reflect``); for optimizers not known to be
   zero-preserving, weights and state are masked again.

**When it is exact.** For elementwise optimizers and a fixed mask it gives the same effective
weights as the reparametrization, bitwise: alive entries see the same values and gradients, and
pruned entries stay exactly 0 because torch's elementwise optimizers (SGD, Adam, AdamW, NAdam,
RAdam, Adamax, Adagrad, Adadelta, RMSprop, Rprop) leave an entry at 0 when its weight, gradient
and state are 0. Sign-locked tensors: ``w = s * |o|`` trains like ``o`` up to a reflection; when
a weight crosses zero it is mirrored back and its first-moment state (``momentum_buffer``,
``exp_avg``, ``grad_avg``, ``prev``) is negated, which keeps the trajectories equal (the second
moments are even in the gradient). One exception: a locked kept weight that a step lands on
exactly 0.0 (rare but in 16-bit weights): the torch path's ``weight_orig`` turns +0.0 from
either side, changing its frame without reflecting its momentum, so the two part. Refused: ``LBFGS``, ``SparseAdam``, ``Adafactor`` (factored
second moments) and ``Muon`` (orthogonalized updates), whose updates mix entries. Other optimizer
classes (subclasses included) get a warning and the full re-projection after each step; an
optimizer without ``Optimizer``'s hook registries (timm's ``Lookahead``) is refused. Whatever
reads a whole parameter's norm (LAMB/LARS trust ratios, adaptive gradient clipping) sees the
pruned entries as 0 here (the masked network's norm) and as their last values on the torch
path: there the backends differ.

Unlike the reparametrization, the values of pruned entries of ``weight_orig`` are lost (zeroed).
A mask changed later (``signmask.prune`` again, stock prune stacked on top) or weights edited in
place are re-projected on the next eager forward, detected through the tensors' identities and
version counters (``torch.compile``d forwards skip that check); ``load_state_dict`` projects at
once. A sign-locked checkpoint of the torch path reflects its weights on loading, and the
momentum of the optimizer state loaded with it (before or after) where they were reflected.
``torch.func`` transforms and ``functional_call``'s stand-in tensors take the torch path.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from . import _projection_ops as ops
from . import _checks, _optimizer_checks, _reparam
from ._backends import Backend, Targets, register_backend


class MaskGrad:
    """Post-accumulate-grad hook: mask ``weight_orig.grad`` in place (before any clipping)."""

    def __init__(self, module, name: str) -> None:
        # The module weakly: torch keeps post-accumulate-grad hooks where the garbage collector
        # cannot see them, so module -> Parameter -> this hook -> module would be a cycle never
        # collected, and every model dropped while on this backend would keep its tensors.
        self.module, self.name = weakref.ref(module), name

    def __call__(self, param: torch.Tensor) -> None:
        module = self.module()
        if module is None:  # the module is gone, the Parameter lives on elsewhere
            return
        hook = _reparam.find_hook(module, self.name)[1]
        if getattr(hook, "backend", None) == "projection" and param.grad is not None:
            ops.mask_grad(param.grad, module._buffers[self.name + "_mask"])


class _OptimizerHook:
    """A hook this backend puts on an optimizer, serving the pruned tensors ``targets``."""

    def __init__(self, targets: Targets) -> None:
        # The modules weakly: these hooks live on the optimizer, which may outlive the model (a
        # trainer keeping it, a model dropped and rebuilt); strongly, every module dropped would
        # live on with its masks, signs and stamps as long as the optimizer, and be projected at
        # every step. A module gone is left alone, as MaskGrad does.
        self._refs = [(weakref.ref(module), name) for module, name in targets.values()]

    @property
    def targets(self) -> list[tuple]:
        """The ``(module, name)`` pairs served whose module is still alive."""
        return [(module, name) for ref, name in self._refs if (module := ref()) is not None]

    def keep(self, leaving: set) -> bool:
        """Stop serving the pairs ``leaving`` (``(id(module), name)``) and the modules gone;
        whether any pair is left."""
        self._refs = [(ref, name) for ref, name in self._refs
                      if (module := ref()) is not None and (id(module), name) not in leaving]
        return bool(self._refs)


class ProjectStale(_OptimizerHook):
    """Optimizer step pre-hook: project the tensors edited since their last projection (in
    place, or ``.data`` swapped) that no forward has re-projected yet, so that
    :class:`ProjectStep` can trust the state it finds."""

    def __call__(self, optimizer, args, kwargs) -> None:
        for module, name in self.targets:
            hook = _reparam.find_hook(module, name)[1]
            if getattr(hook, "backend", None) != "projection":
                continue
            orig, mask, sign = ops.tensors(module, name)
            if getattr(hook, "_projected", None) != ops.stamp(orig, mask, sign):
                ops.project(module, name, optimizer, grad=True)  # masks the gradient too
            elif orig.grad is not None and not getattr(orig.grad, "_signmask_masked", False):
                ops.mask_grad(orig.grad, mask)  # assigned, not accumulated by a backward


class ProjectStep(_OptimizerHook):
    """Optimizer step post-hook re-establishing the projection of the tensors it serves."""

    def __init__(self, targets: Targets, full: bool) -> None:
        super().__init__(targets)
        self.full = full

    def __call__(self, optimizer, args, kwargs) -> None:
        for module, name in self.targets:
            hook = _reparam.find_hook(module, name)[1]
            if getattr(hook, "backend", None) != "projection":
                continue
            hook.__dict__.pop("_reflected", None)  # a state loaded after a step is another's
            hook.__dict__.pop("_loaded", None)
            orig, mask, sign = ops.tensors(module, name)
            # A mask changed since the state was last masked (signmask.prune again): the
            # forward re-projected the weights, but stale momentum just moved new zeros.
            if self.full or getattr(hook, "_state_masks", None) != ops.mask_stamp(mask, sign):
                ops.project(module, name, optimizer)
            elif sign is not None:
                if orig.device.type == "cpu":
                    ops.reflect(module, name, optimizer)
                else:
                    ops.project(module, name, optimizer, odd_only=True)
            else:  # zero-preserving update: still projected, nothing to do
                hook._projected = ops.stamp(orig, mask, sign)


class StateLoaded(_OptimizerHook):
    """Optimizer ``load_state_dict`` post-hook: the loaded state (a checkpoint of another
    backend, with momentum at pruned entries) is masked at the next step, not trusted."""

    def __call__(self, optimizer) -> None:
        for module, name in self.targets:
            hook = _reparam.find_hook(module, name)[1]
            if hook is None:
                continue
            hook.__dict__.pop("_state_masks", None)
            # Kept, not popped: the same state loaded again needs the same reflection.
            ops.flip_state(optimizer, ops.tensors(module, name)[0], hook.__dict__.get("_reflected"))


def unhook_optimizer(optimizer: torch.optim.Optimizer, targets: Targets) -> None:
    """Stop the hooks of this backend on ``optimizer`` (:class:`ProjectStale`,
    :class:`ProjectStep`, :class:`StateLoaded`) serving ``targets``; the other tensors they serve
    (the rest of a model whose submodule changes backend) keep them. Hooks left serving nothing
    (their modules gone too) are removed."""
    leaving = {(id(m), n) for m, n in targets.values()}
    tables = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_load_state_dict_post_hooks")
    for table in tables:
        hooks = getattr(optimizer, table, {})
        for key, fn in list(hooks.items()):
            if isinstance(fn, _OptimizerHook) and not fn.keep(leaving):
                del hooks[key]


def optimizers(targets: Targets, optimizer=None) -> list:
    """The optimizers whose hooks :func:`signmask.set_backend` may change for ``targets``:
    ``optimizer`` (if any) and those their hooks were projected for (still alive)."""
    found = {} if optimizer is None else {id(optimizer): optimizer}
    for module, name in targets.values():
        ref = getattr(_reparam.find_hook(module, name)[1], "__dict__", {}).get("_optimizer")
        remembered = ref() if ref is not None else None
        if remembered is not None:
            found.setdefault(id(remembered), remembered)
    return list(found.values())


def forget(module, name: str) -> None:
    """Detach ``module.<name>`` from this backend: drop its gradient hook, and its entries in the
    hooks of the optimizer it was projected for (remembered by :meth:`ProjectionBackend.attach`),
    so that ``signmask.remove`` or another backend leaves no hook behind, even without that
    optimizer at hand."""
    hook = _reparam.find_hook(module, name)[1]
    ref = hook.__dict__.pop("_optimizer", None) if hook is not None else None
    for key in _reparam.SignMaskHook._TRANSIENT if hook is not None else ():
        hook.__dict__.pop(key, None)
    optimizer = ref() if ref is not None else None
    if optimizer is not None:
        unhook_optimizer(optimizer, {name: (module, name)})
    unhook_grads(module._parameters[name + "_orig"])
    _unhook_module(module, name)


def unhook_grads(param: torch.Tensor) -> None:
    """Remove the :class:`MaskGrad` hooks of ``param`` (no-ops once it leaves this backend)."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    for key, fn in list(hooks.items()):
        if isinstance(fn, MaskGrad):
            del hooks[key]


class Reproject:
    """Module ``load_state_dict`` post-hook: project the loaded values at once. An eager forward
    would notice them (version counters), a ``torch.compile``d one would not."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module, incompatible_keys) -> None:
        hook = _reparam.find_hook(module, self.name)[1]
        if getattr(hook, "backend", None) == "projection":
            ref = hook.__dict__.get("_optimizer")
            optimizer = ref() if ref is not None else None
            orig = module._parameters[self.name + "_orig"]
            # The state was reflected with the weights these values replace: undone first, then
            # reflected where these were (a state loaded before them goes with them).
            ops.flip_state(optimizer, orig, hook.__dict__.get("_reflected"))
            factor = ops.project(module, self.name, optimizer, grad=optimizer is not None)
            ops.flip_state(optimizer, orig, ops.remember_reflection(hook, factor, loaded=True))


def _unhook_module(module, name: str) -> None:
    hooks = module._load_state_dict_post_hooks
    for key, fn in list(hooks.items()):
        if isinstance(fn, Reproject) and fn.name == name:
            del hooks[key]


def _hook_grads(targets: Targets) -> None:
    for module, name in targets.values():
        orig = module._parameters[name + "_orig"]
        existing = getattr(orig, "_post_accumulate_grad_hooks", None) or {}
        if not any(isinstance(fn, MaskGrad) for fn in existing.values()):
            orig.register_post_accumulate_grad_hook(MaskGrad(module, name))
        _unhook_module(module, name)
        module.register_load_state_dict_post_hook(Reproject(name))


@register_backend("projection")
class ProjectionBackend(Backend):
    """Masks applied in place after each step; the forward reuses ``weight_orig`` as is."""

    def check(self, targets, optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                "backend='projection' needs optimizer=, the torch.optim.Optimizer training the "
                f"model, got {type(optimizer).__name__}"
            )
        hooks = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                 "_optimizer_load_state_dict_post_hooks")
        if not all(isinstance(getattr(optimizer, h, None), dict) for h in hooks):
            # Checked before anything is masked: attach() would fail halfway otherwise.
            raise ValueError(
                f"backend='projection' hooks into the optimizer's steps and state loading, but "
                f"{type(optimizer).__name__} lacks torch.optim.Optimizer's hook registries (it "
                "skips Optimizer.__init__, as wrappers such as timm's Lookahead do); use "
                "backend='auto', 'torch' or 'triton'"
            )
        why = ops.REFUSED.get(type(optimizer).__name__)
        if why is not None:
            raise ValueError(
                f"backend='projection' is not exact with {type(optimizer).__name__}: {why}; "
                "use backend='auto', 'torch' or 'triton'"
            )
        for key, (module, name) in targets.items():
            if not module._parameters[name + "_orig"].requires_grad:
                raise ValueError(
                    f"backend='projection' masks {key}'s gradient as it accumulates, but it does "
                    "not require grad (frozen); set_backend before freezing it, or use "
                    "backend='torch'"
                )
        outside = _optimizer_checks.untrained(targets, optimizer)
        if outside:
            raise ValueError(
                f"backend='projection' re-projects after the steps of the optimizer given, but it "
                f"does not train {_checks.some(outside)}; set the "
                "backend per submodule, each with the optimizer training it"
            )
        _optimizer_checks.warn_vanishing_eps(targets, optimizer, stacklevel=3)
        if not ops.known(optimizer):
            warnings.warn(
                f"backend='projection' with {type(optimizer).__name__}: signmask knows it exact "
                f"only for elementwise optimizers ({', '.join(ops.ZERO_PRESERVING)}); weights and "
                "state are re-masked after every step, but updates that read a whole "
                "parameter's norm (LAMB, LARS) see its pruned entries as 0 here and as their "
                "last values on the torch path, and state odd in the gradient under sign locks "
                "is not reflected: results will differ from the torch path",
                UserWarning,
                stacklevel=3,
            )

    def attach(self, targets, optimizer):
        for module, name in targets.values():
            forget(module, name)  # its hooks on the optimizer it had, if another
        unhook_optimizer(optimizer, targets)
        _hook_grads(targets)
        for module, name in targets.values():
            hook = _reparam.find_hook(module, name)[1]
            ops.remember_reflection(hook, ops.project(module, name, optimizer))
            # Weakly: remove() and other backends unhook it without being handed the optimizer.
            hook._optimizer = weakref.ref(optimizer)
            # Strongly, as the module holds it: torch.utils.swap_tensors (.to(), load_state_dict
            # under torch.__future__.set_swap_module_params_on_conversion) refuses weakref'd
            # tensors, and dynamo guards an id() by the Parameter's own id, so that each new
            # model recompiled the class's forward (up to dynamo's recompile limit, 8).
            hook._param = module._parameters[name + "_orig"]
        optimizer.register_step_pre_hook(ProjectStale(targets))
        optimizer.register_step_post_hook(ProjectStep(targets, full=not ops.known(optimizer)))
        optimizer.register_load_state_dict_post_hook(StateLoaded(targets))

    def weight(self, hook, module, orig, mask, sign, own_forward):
        if hook.__dict__.get("_param") is not orig or torch._C._are_functorch_transforms_active():
            # Not the Parameter this backend keeps projected: torch.func.functional_call's
            # stand-ins (never to be masked in place), or vmap/grad. The torch path serves them.
            return _reparam.masked_weight(orig, mask, sign)
        # Version counters cannot be traced; compiled forwards trust the step hook (and
        # install(), which runs eagerly) to have projected.
        compiling = torch.compiler.is_compiling()
        if not compiling and getattr(hook, "_projected", None) != ops.stamp(orig, mask, sign):
            # With the optimizer it was projected for where its state can be due: a new mask
            # (signmask.prune between backward and step), or sign-locked weights to reflect
            # with their momentum (a torch-path checkpoint loaded since). Weights edited in place
            # under an unchanged free mask need no state pass.
            ref = hook.__dict__.get("_optimizer")
            same_mask = hook.__dict__.get("_state_masks") == ops.mask_stamp(mask, sign)
            optimizer = None if ref is None or (sign is None and same_mask) else ref()
            ops.project(module, hook._tensor_name, optimizer, grad=optimizer is not None,
                    odd_only=same_mask, hook=hook)
        # An alias, not the Parameter itself: setattr of a Parameter would register ``weight``.
        # Without grad a detached one: a view made under no_grad breaks deepcopy once its base
        # is edited in place (a rewind, a loaded checkpoint) before the next forward; jit.trace
        # checks its trace without grad, and needs the same op both times.
        traced = torch.jit.is_tracing()
        return orig.view_as(orig) if torch.is_grad_enabled() or traced else orig.detach()
