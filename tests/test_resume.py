"""Checking a saved search state before anything of it is applied (signmask/_resume.py)."""

import io
import re

import pytest
import torch

import signmask
from signmask import _resume
from _util import assert_each_fault_leaves_it_untouched, make_search, outside, timm_plateau, tiny


def _state(method="aws", scheduler=None):
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = None if scheduler is None else scheduler(opt)
    search = signmask.apply(model, method, 0.5, optimizer=opt, scheduler=sched, progress=False)
    return search, search.state_dict()


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1)


def _timm_plateau(opt):
    return timm_plateau(opt, patience_t=1)


def test_a_state_as_saved_passes_and_a_running_search_has_no_ticket():
    search, state = _state()
    assert _resume.check_state(state, search._generator.get_state(), True) is None


@pytest.mark.parametrize("key, value, message", [
    ("alpha", 1.5, "state['alpha'] should be a float in [0, 1], found float 1.5"),
    ("step", True, "state['step'] should be an int >= 0, found bool True"),
    ("generator", torch.zeros(3), "state['generator'] should be a torch.Generator state"),
    ("history", [1], "state['history'] should be a list of dicts"),
])
def test_each_entry_is_checked_by_kind(key, value, message):
    search, state = _state()
    state[key] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _resume.check_state(state, search._generator.get_state(), True)


def test_a_mask_that_is_not_binary_is_refused_with_its_values():
    search, state = _state()
    state["masks"] = {k: v.float() * 2 for k, v in state["masks"].items()}
    with pytest.raises(ValueError, match=r"state\['masks'\]\['conv1.weight'\] is not a 0/1 mask: it holds \[2.0\]"):
        _resume.check_state(state, search._generator.get_state(), True)


def test_a_finished_state_whose_ticket_holds_bad_values_names_the_ticket():
    # The Ticket's own ValueError (a mask value of 2) is named as state['ticket']'s, as its TypeErrors are.
    search, state = _state()
    state.update(done=True, ticket={"masks": {"conv1.weight": torch.tensor([2, 0])}})
    with pytest.raises(ValueError, match=r"cannot resume: state\['ticket'\] is not a ticket: mask "
                                         r"'conv1.weight' holds values outside \{-1, 0, \+1\}: found \[2\]"):
        _resume.check_state(state, search._generator.get_state(), True)


def test_a_corrupted_generator_state_is_refused_before_anything_changes():
    # Of the right dtype and size, its bytes no mt19937 state: torch's RuntimeError came after
    # the masks and counters were loaded, leaving the search half-resumed.
    search, state = _state()
    before = {k: v.clone() for k, v in search.model.state_dict().items()}
    state["generator"] = torch.full_like(state["generator"], 255)
    state["masks"] = {k: torch.zeros_like(v) for k, v in state["masks"].items()}
    state["step"] = 7
    with pytest.raises(ValueError, match=r"cannot resume: state\['generator'\] is not a valid torch.Generator state"):
        search.load_state_dict(state)
    after = search.model.state_dict()
    assert search.step == 0 and all(torch.equal(v, after[k]) for k, v in before.items())


def test_alpha_is_not_checked_where_nothing_is_interpolated():
    search, state = _state("lrr")
    state["alpha"] = None
    assert _resume.check_state(state, search._generator.get_state(), False) is None


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("config"), "the search state has no ['config']"),
    (lambda state: state.update(masks=[1]), "state['masks'] should be a dict, found list"),
    (lambda state: state["masks"].update({"conv1.weight": [1]}),
     "state['masks']['conv1.weight'] should be a tensor, found list"),
])
def test_a_state_missing_entries_is_refused_by_name_and_changes_nothing(edit, message):
    search, state = _state()
    before = {k: v.clone() for k, v in search.model.state_dict().items()}
    edit(state)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        search.load_state_dict(state)
    after = search.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and search.round == 0


@pytest.mark.parametrize("method, scheduler, edit, message", [
    # were AttributeError: 'list' object has no attribute 'keys' / 'str' object has no attribute 'shape'
    ("imp", None, lambda state: state.update(rewind_weights=[1, 2]),
     "state['rewind_weights'] should be None or a dict of tensors, found list [1, 2]"),
    ("imp", None, lambda state: state["rewind_weights"].update({"conv1.weight_orig": "x"}),
     "state['rewind_weights']['conv1.weight_orig'] should be a tensor, found str"),
    # read when the round ends: were a TypeError after the round had trained
    ("aws", None, lambda state: state["restart"].update(param_groups=[1]),
     "state['restart'] should be the optimizer and scheduler snapshot (param_groups: a list of dicts "
     "with 'params'), found dict {'param_groups': [1], 'scheduler': None}"),
    ("aws", _step_lr, lambda state: state["restart"].update(scheduler="x"),
     "state['restart'] should be the optimizer and scheduler snapshot (param_groups: a list of dicts "
     "with 'params'; scheduler: None or a dict), found dict {'param_groups': "),
    # were a KeyError / TypeError when the round ended
    ("lrr", _timm_plateau, lambda state: state["restart"]["scheduler"].update(signmask_plateau={"restore_lr": None}),
     "state['restart']['scheduler']['signmask_plateau'] should be a dict with 'lr_scheduler' (a dict) and "
     "'restore_lr' (None or a list), found dict {'restore_lr': None}"),
    ("lrr", _timm_plateau, lambda state: state["restart"]["scheduler"].update(signmask_plateau=[1]),
     "state['restart']['scheduler']['signmask_plateau'] should be a dict with 'lr_scheduler' (a dict) and "
     "'restore_lr' (None or a list), found list [1]"),
])
@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated")
def test_a_rewind_or_restart_snapshot_of_the_wrong_kind_is_refused_before_any_change(method, scheduler, edit,
                                                                                    message):
    search, state = _state(method, scheduler)
    before = {k: v.clone() for k, v in search.model.state_dict().items()}
    edit(state)
    with pytest.raises(ValueError, match="^cannot resume: " + re.escape(message)):
        search.load_state_dict(state)
    after = search.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and search.round == 0


class _TupleScheduler:
    """A duck-typed scheduler (state_dict()/load_state_dict()) whose state is no dict."""

    def __init__(self, opt):
        self.opt, self.steps, self.loaded = opt, 0, []

    def step(self):
        self.steps += 1

    def state_dict(self):
        return (self.steps, self.opt.param_groups[0]["lr"])

    def load_state_dict(self, state):
        self.loaded.append(state)
        self.steps = state[0]


def test_a_search_with_a_scheduler_whose_state_is_no_dict_resumes():
    # apply() takes any scheduler with state_dict()/load_state_dict(); the restart snapshot holds
    # what its state_dict() gave, and the state the search wrote must load back (it was refused:
    # "scheduler: None or a dict").
    def make():
        model = tiny(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = _TupleScheduler(opt)
        search = signmask.apply(model, "lrr", 0.5, optimizer=opt, scheduler=sched, rounds=2, progress=False)
        return model, opt, sched, search

    model, opt, sched, search = make()
    search.start_round()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    buffer = io.BytesIO()
    torch.save(search.state_dict(), buffer)
    buffer.seek(0)
    model2, opt2, sched2, search2 = make()
    search2.load_state_dict(torch.load(buffer, weights_only=True))
    search2.finish_round()  # restarts the schedule from the snapshot taken at apply()
    assert search2.round == 1 and sched2.loaded == [(0, 0.1)] and sched2.steps == 0


def test_a_state_of_a_newer_version_says_to_upgrade():
    # it said "not a signmask search state"
    search, state = _state()
    state["version"] = _resume.STATE_VERSION + 1
    with pytest.raises(ValueError, match=f"^the search state is of version {_resume.STATE_VERSION + 1}, saved by a "
                       f"newer signmask; this one resumes version {_resume.STATE_VERSION}: upgrade signmask"):
        search.load_state_dict(state)
    with pytest.raises(ValueError, match=r"^not a signmask search state \(version 1 expected, found '2'\)$"):
        search.load_state_dict({**state, "version": "2"})
    with pytest.raises(ValueError, match=r"^not a signmask search state \(version 1 expected, found True\)$"):
        search.load_state_dict({**state, "version": True})  # == 1, but no version number
    assert search.round == 0 and not search.done


def test_a_state_whose_rewind_snapshot_holds_extra_state_still_resumes():
    # Searches saved before 2026-12-07 kept a module's tensor extra state in their rewind
    # snapshot; it is no weight now, and such a state must still load.
    class WithExtra(torch.nn.Linear):
        def get_extra_state(self):
            return torch.zeros(1)

        def set_extra_state(self, state):
            pass

    def start():
        torch.manual_seed(0)
        model = torch.nn.Sequential(WithExtra(4, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, signmask.apply(model, "imp", 0.5, optimizer=opt, classifier=True,
                                     progress=False)

    _, search = start()
    state = search.state_dict()
    old = {**state, "rewind_weights": {**state["rewind_weights"], "0._extra_state": torch.zeros(1)}}
    model, resumed = start()
    resumed.load_state_dict(old)
    assert "0._extra_state" in old["rewind_weights"]  # the caller's dict is not edited
    assert resumed._rewind_weights.keys() == state["rewind_weights"].keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to load a state onto")
@pytest.mark.parametrize("method", ["aws", "imp"])
def test_a_state_loaded_onto_the_gpu_resumes_a_cpu_search(method):
    # torch.load(..., map_location="cuda") puts the CPU generator's state on the GPU, which
    # Generator.set_state refused with a bare TypeError (RNG state must be a torch.ByteTensor).
    def run(steps: int, state=None):
        torch.manual_seed(0)
        model = tiny(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        search = signmask.apply(model, method, 0.5, optimizer=opt, rounds=2, progress=False)
        if state is not None:
            search.load_state_dict(state)
        data = torch.Generator().manual_seed(search.step)
        for _ in search:
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(4, 3, 8, 8, generator=data)).sum().backward()
                opt.step()
            if state is None and search.round == 1:
                buffer = io.BytesIO()
                torch.save(search.state_dict(), buffer)
                buffer.seek(0)
                return torch.load(buffer, map_location="cuda", weights_only=False), model
        return search.ticket, model

    state, _ = run(3)
    assert state["generator"].is_cuda
    ticket, model = run(3, state)
    assert ticket.sparsity == 0.5 and all(m.device.type == "cpu" for m in model.state_dict().values())


def _searched(method, finished=0, started=False, backend="torch"):
    """A TinyNet search (one pruning, two rounds) on ``backend``, ``finished`` rounds run one
    step each (2: done), and the next one ``started`` and stepped once; the model, the search
    and the optimizer."""
    model, opt, _, search = make_search(method, 0.5, rounds=1)
    if backend == "projection":
        signmask.set_backend(model, "projection", optimizer=opt)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for finish in [True] * finished + [False] * started:
        search.start_round()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if finish:
            search.finish_round()
    return model, search, opt


@pytest.mark.parametrize("method, finished, backend", [
    ("aws", 1, "torch"), ("aws", 2, "torch"), ("imp", 1, "projection"), ("lrr", 2, "projection"),
])
def test_a_failure_at_any_torch_call_leaves_the_search_and_model_untouched(method, finished, backend):
    # The masks were written one at a time, then the counters: an out-of-memory error (or
    # Ctrl-C) midway left some masks and counters loaded, and a finished state's close() half
    # done.
    state = _searched(method, finished, started=finished < 2)[1].state_dict()

    def rest(model, search, opt):
        return [outside(model, opt), search.state_dict(), len(search._hooks)]

    assert_each_fault_leaves_it_untouched(
        lambda: _searched(method, backend=backend), lambda m, search, opt: search.load_state_dict(state), rest=rest
    )


@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_the_loaded_masks_give_the_weights_at_once(backend):
    # module.weight kept the old masks until the next forward (signmask.load_state_dict
    # recomputes it at once): a read, or a compiled forward, saw the dense weights.
    state = _searched("lrr", 1, started=True)[1].state_dict()
    model, search, _ = _searched("lrr", backend=backend)
    search.load_state_dict(state)
    for module in (model.conv1, model.conv2):
        assert not module.weight_mask.all()
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


def test_an_interrupt_after_closing_leaves_the_norm_layers_weights():
    # Loading a finished state closes the search, which drops each norm layer's interpolated
    # weight; a Ctrl-C after that left bn.weight unreadable (AttributeError) until a forward:
    # the record held it weakly, and only recomputes pruned tensors.
    state = _searched("aws", 2)[1].state_dict()
    model, search, _ = _searched("aws", 0)
    before = {n: getattr(model, n).weight.clone() for n in ("bn1", "bn2")}

    def interrupt(search):
        raise KeyboardInterrupt

    search._bar.close_round = interrupt  # the last thing close() does
    with pytest.raises(KeyboardInterrupt):
        search.load_state_dict(state)
    for name, weight in before.items():
        assert torch.equal(getattr(model, name).weight, weight)
