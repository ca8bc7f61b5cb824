"""Undo records: put a model's tables, aliases and hook attributes back after a call that
failed midway (an out-of-memory error at the k-th layer, Ctrl-C), so that every in-place
operation leaves the model as it was when it fails."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref

import torch
from torch import nn
from torch.nn.utils import prune as _prune

from . import _bits, _reparam

# A module's tables that installing, removing or linking a reparametrization edits.
_TABLES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
           "_forward_hooks", "_forward_hooks_always_called", "_load_state_dict_post_hooks")
# An optimizer's tables of hooks (the projection backend's, the search's).
_OPTIMIZER_TABLES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_load_state_dict_post_hooks")

# The record that values about to be overwritten in place are kept for (see Undo.saving): per
# thread, as each thread runs its own calls.
_ACTIVE: contextvars.ContextVar["Undo | None"] = contextvars.ContextVar("signmask_undo", default=None)


class Undo:
    """A shallow record of every module of ``model``, for :meth:`restore` to put back after a
    call that failed midway (an out-of-memory error at the k-th layer, Ctrl-C).

    It keeps the module's tables of parameters, buffers and hooks, its tensor attributes (the
    ``weight`` aliases, weakly: see :meth:`_record`) and the attributes of its pruning hooks
    (their history, backend): the same objects, never a copy of a tensor's values. Outside the
    model, it keeps the post-accumulate-grad hooks of its Parameters, and the hook tables and
    state dicts of ``optimizers`` (with the attributes of the hook objects there, which list the
    tensors they serve; each parameter's state dict shallowly, its tensors not copied). Values
    written in place are the caller's to undo, or, written while :meth:`saving`, kept by
    :func:`keep` just before.
    """

    def __init__(self, model: nn.Module, optimizers=()) -> None:
        # TorchScript submodules are never pruned, and their tables are C++ wrappers (no copy()
        # on torch 2.11).
        self._records = [(m, self._record(m)) for m in model.modules()
                         if not isinstance(m, torch.jit.ScriptModule)]
        self._grad_hooks = [(p, dict(p._post_accumulate_grad_hooks or {})) for p in model.parameters()]
        self._optimizers = [(opt, self._record_optimizer(opt)) for opt in optimizers]
        self._values: list[tuple] = []
        self._dead, self._outer, self._gone = False, None, []

    @staticmethod
    def _record(module: nn.Module) -> tuple:
        tables = {t: getattr(module, t).copy() for t in _TABLES if hasattr(module, t)}
        # An effective weight computed into memory of its own, weakly: one the call replaces is
        # then freed at once, as without the record (strongly, a pruning would hold every layer's
        # old one, 4 bytes per weight, to its end), and one gone by the restore is recomputed.
        # A view of a Parameter (the projection backend's) costs nothing: strongly. Any other
        # strongly too, as refresh() recomputes only a pruned tensor's: a norm layer's
        # interpolated weight (one value per channel), which a finished search's close() drops.
        owned = {_address(p) for p in module._parameters.values()} - {None}
        aliases = {k: weakref.ref(v) if _address(v) not in owned and _pruned(module, k) else v
                   for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)}
        hooks = [(h, dict(h.__dict__)) for h in module._forward_pre_hooks.values()
                 if isinstance(h, _prune.BasePruningMethod)]
        return tables, aliases, hooks

    @staticmethod
    def _record_optimizer(optimizer) -> tuple:
        tables = {t: getattr(optimizer, t).copy() for t in _OPTIMIZER_TABLES if hasattr(optimizer, t)}
        hooks = [(fn, dict(fn.__dict__)) for table in tables.values() for fn in table.values()
                 if not inspect.isroutine(fn) and hasattr(fn, "__dict__")]
        # Each parameter's state dict, shallowly: entries replaced by new tensors (a reflection
        # of loaded momentum) are put back; values written in place are kept by keep().
        states = [(p, s, dict(s)) for p, s in optimizer.state.items()]
        return tables, hooks, states

    @contextlib.contextmanager
    def saving(self, *, dead: bool = False):
        """Within it, :func:`keep` keeps in this record the values the call overwrites in place.
        On success they pass to the record of a call around this one, if any: a failure there
        must undo them too. They stay in this one as well: a Ctrl-C can surface as the block
        exits, or after it inside the caller's ``try``, whose :meth:`restore` must still find
        them (writing a record back twice, here and around, gives what once does).

        ``dead``: the call zeroes only entries that its masks leave pruned before and after
        (``set_backend``, ``remove``), values nothing reads: only the sign flips of locked
        weights are kept, so the success path copies nothing for free masks (keeping every
        zeroed entry would take about 4 bytes per pruned weight in host memory)."""
        self._dead, self._outer = dead, _ACTIVE.get()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
        outer = _ACTIVE.get()
        if outer is not None:
            outer._values += self._values

    def restore(self, *, refresh: bool = True) -> None:
        """Put every recorded table, alias and hook attribute back, then the values and sign
        bits kept (the only tensors it allocates: one tensor's at a time), then the
        effective weights freed since the record (the torch and triton backends': computed
        without side effects)."""
        if _ACTIVE.get() is self:  # a Ctrl-C between saving()'s set() and its try: no finally ran
            _ACTIVE.set(self._outer)  # else every later keep() in this thread would keep here
        self._gone = [g for module, record in self._records for g in _restore_module(module, *record)]
        for param, saved in self._grad_hooks:
            if param._post_accumulate_grad_hooks is not None:  # else none registered since
                _put_back(param._post_accumulate_grad_hooks, saved)
        for optimizer, record in self._optimizers:
            _restore_optimizer(optimizer, *record)
        with torch.no_grad():
            for entry in reversed(self._values):  # the oldest last: it wins
                _put_entry(*entry)
        self._values = []
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """Recompute the effective weights :meth:`restore` found freed, from the values as they
        are now: a caller that writes values back itself calls ``restore(refresh=False)``,
        writes them, then this."""
        for module, name in self._gone:
            _reparam.refresh(module, name)
        self._gone = []


def _put_back(live, saved) -> None:
    """Give the dict or set ``live`` the contents ``saved``, in place: hook handles, optimizers
    and tensors hold the object itself."""
    live.clear()
    live.update(saved)


def _restore_module(module: nn.Module, tables: dict, aliases: dict, hooks: list) -> list:
    """Put ``module``'s record back; the ``(module, name)`` of each alias freed since."""
    gone = []
    for table, saved in tables.items():
        _put_back(getattr(module, table), saved)
    for key in [k for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)]:
        if key not in aliases:
            del module.__dict__[key]
    for key, ref in aliases.items():
        value = ref() if isinstance(ref, weakref.ref) else ref
        if value is not None:
            module.__dict__[key] = value
        else:
            gone.append((module, key))
    for hook, state in hooks:
        _put_back(hook.__dict__, state)
    return gone


def _restore_optimizer(optimizer, tables: dict, hooks: list, states: list) -> None:
    """Put ``optimizer``'s record back: hook tables, hook objects' attributes, per-parameter
    state dicts (the same dict objects, shallowly)."""
    for table, saved in tables.items():
        _put_back(getattr(optimizer, table), saved)
    for hook, state in hooks:
        _put_back(hook.__dict__, state)
    had = {id(p) for p, _, _ in states}
    for p in [p for p in optimizer.state if id(p) not in had]:
        del optimizer.state[p]
    for p, state, items in states:
        optimizer.state[p] = state
        _put_back(state, items)


def _address(t: torch.Tensor | None) -> int | None:
    """Where ``t``'s memory starts (None for no tensor, or a lazy one, which has none yet)."""
    if t is None or nn.parameter.is_lazy(t):
        return None
    return t.untyped_storage().data_ptr()


def _pruned(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a pruned tensor's effective weight, which
    :func:`_reparam.refresh` recomputes."""
    return _reparam.find_hook(module, name)[1] is not None


def _put_entry(tensor, signs, positions, values, marks) -> None:
    """Write one record of :func:`keep` or :func:`keep_signs` back into ``tensor``: its sign
    bits, then its values (at the packed ``positions``, or all of them where None)."""
    if signs is not None:
        negative = _bits.sign_bits(signs.to(tensor.device), tensor.shape).view(torch.bool)
        bits = _bits.as_bits(tensor)
        top = torch.iinfo(bits.dtype).min  # the sign bit alone
        magnitude = bits & ~top
        bits.copy_(torch.where(negative, magnitude | top, magnitude))
    if values is not None and positions is None:
        tensor.copy_(values)
    elif values is not None:
        where = _bits.sign_bits(positions.to(tensor.device), tensor.shape).view(torch.bool)
        flat, where = _indexable(tensor, where)
        flat[where] = values.to(tensor.device)
    _put_back(tensor.__dict__, marks)


def keep(tensor: torch.Tensor, where: torch.Tensor) -> None:
    """Before ``tensor`` is overwritten in place at the bool positions ``where``: keep those
    entries in host memory for the active :meth:`Undo.saving` record to write back (nothing
    outside one). Only the entries written, and where packed 1 bit per weight: a copy of the
    whole tensor would take all its bytes in host memory, this takes them for the changed
    entries only (a whole copy where most are written: see :func:`_keep_values`), with one
    tensor's temporaries on its device."""
    undo = _ACTIVE.get()
    if undo is None:
        return
    with torch.no_grad():
        _keep_values(undo, [tensor], where)


def _keep_values(undo: Undo, tensors: list, where: torch.Tensor) -> bool:
    """Keep the entries of each of ``tensors`` (one shape) at ``where``: one packing of the
    positions, one search of them for all the contiguous ones. None there: only the tensors'
    marks. Most of them: a whole copy of each, as the entries and their positions would take
    over 3/4 of its memory, and a search of dense positions takes several times a copy's time.
    Returns whether whole copies were kept."""
    count, numel, size = int(torch.count_nonzero(where)), where.numel(), tensors[0].element_size()
    if count == 0:
        for tensor in tensors:
            undo._values.append((tensor, None, None, None, dict(tensor.__dict__)))
        return False
    if count * size + numel / 8 > 0.75 * numel * size:
        for tensor in tensors:
            _keep_whole(undo, tensor)
        return True
    packed, index = _bits.pack_signs(where).cpu(), None
    for tensor in tensors:
        if tensor.is_contiguous():  # row-major, as the packing
            if index is None:
                index = where.reshape(-1).nonzero().squeeze(1)
            values = tensor.view(-1).index_select(0, index)
        else:
            values = tensor[where]  # row-major too
        undo._values.append((tensor, None, packed, values.cpu(), dict(tensor.__dict__)))
    return False


def keep_signs(tensor: torch.Tensor) -> None:
    """Before ``tensor``'s entries take new sign bits (negated or not), their magnitudes
    unchanged except at entries written otherwise and kept by :func:`keep` (or dead, see
    ``Undo.saving(dead=)``): keep its sign bits, 1 bit per weight, for the active
    :meth:`Undo.saving` record to set back. Setting them twice gives what setting them once
    does, so a failure anywhere in or between the writes leaves nothing negated twice (a record
    of the positions negated would: a failure before the write, or inside a chunked multiply,
    would negate them back over the unchanged ones)."""
    undo = _ACTIVE.get()
    if undo is None:
        return
    with torch.no_grad():
        _keep_signs(undo, tensor)


def _keep_signs(undo: Undo, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():  # complex: two sign bits; integers: no sign bit alone
        _keep_whole(undo, tensor)
        return
    undo._values.append((tensor, _bits.pack_signs(torch.signbit(tensor)).cpu(), None, None,
                         dict(tensor.__dict__)))


def _keep_whole(undo: Undo, tensor: torch.Tensor) -> None:
    undo._values.append((tensor, None, None, tensor.detach().to("cpu", copy=True), dict(tensor.__dict__)))


def _indexable(tensor: torch.Tensor, where: torch.Tensor) -> tuple:
    """``tensor`` and the bool ``where`` (its shape) to index it with, both flat where ``tensor``
    is contiguous: torch turns a bool index of n dims into n int64 index tensors, 8 bytes per
    entry each, and a flat one took half the time of a 4-d one on ResNet-50's conv weights.
    Both orders are row-major, so either way gives the same entries in the same order."""
    if tensor.is_contiguous():
        return tensor.view(-1), where.reshape(-1)
    return tensor, where


def keep_products(pairs) -> None:
    """Before each ``tensor`` of the ``(tensor, factor)`` ``pairs`` takes the values of ``tensor
    * factor`` (a mask, bool or float, or int8 factors in {-1, 0, +1}), in place or by a new
    ``.data``: keep what changes, all before the first is written.

    A float tensor times int8 factors keeps its sign bits (:func:`keep_signs`: a -1 changes
    the sign bit alone) and, but for a ``dead`` record, its entries that a 0 turns from nonzero
    to zero; times a bool mask, those entries only. Pairs with the same factor object (a
    weight, its gradient and its optimizer state under one mask) share one search of them: the
    union of their nonzero entries at the factor's zeros, where values that stay 0 are kept
    too (a search per tensor cost more than these). Other tensors keep, for int8 factors, the
    entries where it is -1, or 0 over an entry not already a zero (a real zero times 0 keeps
    its sign bit; a complex one may not, and is kept); for a float mask (stock prune's),
    wherever it is not 1."""
    undo = _ACTIVE.get()
    if undo is None:
        return
    shared = {}
    with torch.no_grad():
        for tensor, factor in pairs:
            signed, real = factor.dtype == torch.int8, tensor.is_floating_point()
            if undo._dead:
                if signed and real:
                    _keep_signs(undo, tensor)
                elif signed:  # only the -1s of a complex or integer tensor
                    _keep_values(undo, [tensor], factor < 0)
                continue
            if factor.dtype not in (torch.bool, torch.int8):
                where = factor != 1
            elif real:
                shared.setdefault(id(factor), (factor, []))[1].append(tensor)
                continue
            else:
                where = ~factor if factor.dtype == torch.bool else factor == 0
                if not tensor.is_complex():
                    where &= tensor != 0
                if signed:
                    where |= factor < 0
            _keep_values(undo, [tensor], where)
        for factor, tensors in shared.values():
            where = functools.reduce(torch.logical_or, [t != 0 for t in tensors[1:]], tensors[0] != 0)
            where &= ~factor if factor.dtype == torch.bool else factor == 0  # NaN != 0: kept
            if not _keep_values(undo, tensors, where) and factor.dtype == torch.int8:
                for tensor in tensors:  # a whole copy has them
                    _keep_signs(undo, tensor)
