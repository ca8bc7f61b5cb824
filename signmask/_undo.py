"""Undo records: put a model's tables, aliases and hook attributes back after a call that
failed midway (an out-of-memory error at the k-th layer, Ctrl-C), so that every in-place
operation leaves the model as it was when it fails."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as _prune


# A module's tables that installing, removing or linking a reparametrization edits.
_TABLES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
           "_forward_hooks", "_forward_hooks_always_called", "_load_state_dict_post_hooks")


class Undo:
    """A shallow record of every module of ``model``, for :meth:`restore` to put back after a
    call that failed midway (an out-of-memory error at the k-th layer, Ctrl-C).

    It keeps the module's tables of parameters, buffers and hooks, its tensor attributes (the
    ``weight`` aliases) and the attributes of its pruning hooks (their history, backend): the
    same objects, never a copy of a tensor's values. Values written in place (a mask's
    ``copy_``) are the caller's to undo.
    """

    def __init__(self, model: nn.Module) -> None:
        # TorchScript submodules are never pruned, and their tables are C++ wrappers (no copy()
        # on torch 2.11).
        self._records = [(m, self._record(m)) for m in model.modules()
                         if not isinstance(m, torch.jit.ScriptModule)]

    @staticmethod
    def _record(module: nn.Module) -> tuple:
        tables = {t: getattr(module, t).copy() for t in _TABLES if hasattr(module, t)}
        aliases = {k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)}
        hooks = [(h, dict(h.__dict__)) for h in module._forward_pre_hooks.values()
                 if isinstance(h, _prune.BasePruningMethod)]
        return tables, aliases, hooks

    def restore(self) -> None:
        """Put every recorded table, alias and hook attribute back, allocating no tensor."""
        for module, (tables, aliases, hooks) in self._records:
            for table, saved in tables.items():
                live = getattr(module, table)  # the same object: hook handles hold it weakly
                live.clear()
                live.update(saved)
            for key in [k for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)]:
                if key not in aliases:
                    del module.__dict__[key]
            module.__dict__.update(aliases)
            for hook, state in hooks:
                hook.__dict__.clear()
                hook.__dict__.update(state)
