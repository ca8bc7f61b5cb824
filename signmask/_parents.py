"""Pruned weights that a parent module reads directly, without calling the child's forward.

The pruning pre-hook sets ``child.weight`` when the child's own forward runs. Some parents
skip that forward and read the attribute themselves: ``nn.MultiheadAttention`` passes
``self.out_proj.weight`` to its functional forward, timm's BEiT, EVA and Swin-V2 attention
call ``F.linear(x, self.qkv.weight, ...)`` (when their qkv bias is split). Left alone, such a
weight is the tensor of the child's last forward (or of the moment the mask was installed): it
gets no gradient and ignores later masks and steps, silently, as with stock
``torch.nn.utils.prune``.

:func:`link` finds those reads in the source of each parent's ``forward`` and of the methods it
calls on ``self`` (a ``self.<path>.<name>`` expression naming a pruned tensor below it), and
gives the parent a forward pre-hook that recomputes them (:class:`RefreshChildren`) and a
post-hook that makes them copyable again. Methods are read as every class of the MRO defines
them (an override calling ``super().forward`` reads what its base reads). Reads of a tensor's
metadata (``.shape``) need no fresh weight, except ``.dtype`` and ``.device``, which ``.to()``
changes on ``weight_orig`` but not on the weight the last forward left. Reads that the source does not spell out that way (through
``getattr``, or a function that takes the module) are not found. Where the parent reads the
tensor only in a branch it does not take, the weight is computed twice per forward: once more
than needed, never stale.
"""

from __future__ import annotations

import inspect
import re
import weakref

from torch import nn

from . import _reparam

# self.<dotted chain>, e.g. self.out_proj.weight, self.attn.qkv.weight.shape
_CHAIN = re.compile(r"\bself((?:\.[A-Za-z_]\w*)+)")
# self.<method>(...), a call that may lead to a helper reading a child's weight
_CALL = re.compile(r"\bself\.([A-Za-z_]\w*)\s*\(")

# Attributes that read a tensor's metadata, not its values: `self.proj.weight.shape` needs no
# fresh weight. But `module.to()` converts Parameters and buffers, not the weight a forward
# left behind: reads of these (timm's XCiT casts its input to `token_projection.weight.dtype`
# before calling it) need one as much as value reads do.
_METADATA = frozenset({"dtype", "device", "shape", "size", "ndim", "dim", "numel", "is_cuda",
                       "requires_grad", "layout", "is_floating_point", "element_size"})
_CHANGED_BY_TO = frozenset({"dtype", "device", "is_cuda", "is_floating_point", "element_size"})

# Forwards whose direct reads sit on a fast path that torch skips while any submodule has hooks,
# as a pruned one always does: linking them would only compute their weights twice.
_FAST_PATH_ONLY = (nn.TransformerEncoderLayer.forward,)


def _sources(cls: type) -> list[str]:
    """The source of ``cls.forward`` and of the methods of ``cls`` it calls (``self._attn(x)``),
    transitively: a helper may read the child's weight for it. Each method as every class of
    the MRO defines it: an override calling ``super().forward(...)`` reads what its base reads
    (a base not called costs a second computation of the weight, never a stale one)."""
    sources, todo, seen = [], ["forward"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for klass in cls.__mro__:
            fn = klass.__dict__.get(name)
            if klass is nn.Module or not inspect.isfunction(fn) or fn in _FAST_PATH_ONLY:
                continue  # builtins, properties, submodules; a fast path's reads (see above)
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):  # classes defined in a REPL
                continue
            sources.append(source)
            todo.extend(_CALL.findall(source))
    return sources


# _reads per class, held weakly: classes are also made at run time, one per instance for
# torch.fx's GraphModule (symbolic_trace, feature extractors) or inside a function, and a cache
# holding them strongly (an lru_cache) kept each one pruned, with its methods and their
# globals, for the life of the process.
_READS: "weakref.WeakKeyDictionary[type, frozenset[str]]" = weakref.WeakKeyDictionary()


def _reads(cls: type) -> frozenset[str]:
    """``"<child path>.<tensor>"`` attributes that ``cls.forward`` (or a method it calls) reads
    through ``self`` (cached per class)."""
    reads = _READS.get(cls)
    if reads is None:
        reads = _READS[cls] = _find_reads(cls)
    return reads


def _find_reads(cls: type) -> frozenset[str]:
    if getattr(cls, "forward", None) in _FAST_PATH_ONLY:
        return frozenset()
    reads = set()
    for source in _sources(cls):
        for chain in _CHAIN.findall(source):  # ".a.b.c" -> "a.b", "a.b.c": any may be a tensor
            parts = chain[1:].split(".")
            # Up to the first metadata attribute, which the prefix before it only describes;
            # with it where `.to()` changes what it says.
            meta = next((i for i, part in enumerate(parts) if part in _METADATA), None)
            last = len(parts) if meta is None else meta - (parts[meta] not in _CHANGED_BY_TO)
            reads.update(".".join(parts[:n]) for n in range(2, last + 1))
    return frozenset(reads)


def _resolve(parent: nn.Module, path: str):
    """``(child, tensor name, pruning hook)`` when ``parent.<path>`` names a pruned tensor of a
    submodule, else None. Resolved from the parent itself, so a child shared with another
    parent is found from both."""
    child_path, _, name = path.rpartition(".")
    try:
        child = parent.get_submodule(child_path)
    except AttributeError:  # not a submodule: a plain attribute, a method, a parameter's attribute
        return None
    hook = _reparam.find_hook(child, name)[1]
    return None if hook is None else (child, name, hook)


class RefreshChildren:
    """Forward pre-hook of a parent: recompute the pruned tensors it reads directly."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths

    def _owners(self, module: nn.Module):
        # Still pruned (by signmask or stock prune) and still there since the link.
        return filter(None, (_resolve(module, path) for path in self.paths))

    def __call__(self, module: nn.Module, inputs) -> None:
        for child, name, hook in self._owners(module):
            _reparam.stash_outside(child, name)
            if isinstance(hook, _reparam.SignMaskHook):
                # The parent consumes it, maybe outside autocast: in weight_orig's dtype.
                hook.unstack()
                child.__dict__[name] = hook.apply_mask(child)
            else:
                hook(child, inputs)

    def __repr__(self) -> str:
        return f"RefreshChildren({list(self.paths)})"


class DetachChildren(RefreshChildren):
    """Forward post-hook of a parent: detach what :class:`RefreshChildren` computed (deepcopy)."""

    def __call__(self, module: nn.Module, inputs, output) -> None:
        for child, name, _ in self._owners(module):
            _reparam.detach_weight(child, name)

    def __repr__(self) -> str:
        return f"DetachChildren({list(self.paths)})"


def _linked(module: nn.Module) -> list[tuple[str, ...]]:
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    return [h.paths for h in hooks if isinstance(h, RefreshChildren)]


def _unlink(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, RefreshChildren)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def link(model: nn.Module) -> None:
    """Give every parent of ``model`` that reads pruned tensors directly the hooks above, and
    take them off parents that no longer read any (after ``remove``). Idempotent.

    Only parents inside ``model`` are seen: prune the model that holds the parent, not the child
    alone (``signmask.prune(mha.out_proj, ...)`` cannot know the ``MultiheadAttention`` above it).
    """
    for parent in model.modules():
        paths = tuple(sorted(p for p in _reads(type(parent)) if _resolve(parent, p) is not None))
        if _linked(parent) == ([paths, paths] if paths else []):
            continue  # unchanged: new hook objects would make torch.compile recompile
        _unlink(parent)
        if paths:
            parent.register_forward_pre_hook(RefreshChildren(paths))
            _reparam.register_always_called(parent, DetachChildren(paths))  # see add_detach

