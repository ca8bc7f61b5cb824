"""``signmask.apply``: its arguments, models it cannot serve (left untouched), the rollback, the classifier defaults."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import signmask
from signmask import _interpolate
from _util import assert_same, make_search, snapshot, tiny


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"method": "sgd"}, ValueError,
         "method='sgd' is not a known search method; valid: ['aws', 'imp', 'lrr', 'omp']"),
        ({"sparsity": 0.0}, ValueError, "sparsity must be a finite number in (0, 1), got 0.0"),
        ({"sparsity": 1.0}, ValueError, "sparsity must be a finite number in (0, 1), got 1.0"),
        ({"rate": 1.0}, ValueError, "rate must be a finite number in (0, 1), got 1.0"),
        ({"rate": 0.1, "rounds": 3}, ValueError, "pass rate= or rounds=, not both"),
        ({"method": "lrr", "rewind": "init"}, ValueError, "method='lrr' does not rewind weights"),
        ({"rewind": "2ep"}, ValueError, "counts epochs; pass steps_per_epoch="),
        ({"rewind": "soon"}, ValueError, "cannot read rewind point 'soon'"),
        ({"method": "omp", "rate": 0.2}, ValueError, "method='omp' prunes once"),
        ({"method": "omp", "rounds": 3}, ValueError, "rate=/rounds= do not apply (got rate=None, rounds=3)"),
        ({"include": 5}, TypeError, "include must be a glob string or a list of them, got 5"),
        ({"filter_fn": "conv*"}, TypeError, "filter_fn must be callable as filter_fn(module, name), got str 'conv*'"),
        ({"classifier": "no"}, TypeError, "classifier must be a bool or None, got str 'no'"),
        ({"seed": 2**64}, ValueError, "seed must be an int below 2**64, got 18446744073709551616"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0, got -1"),
        ({"include": "nothing*"}, ValueError, "include pattern 'nothing*' matches no conv/linear module"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
        ({"scheduler": object()}, TypeError, "scheduler must have state_dict()/load_state_dict()"),
        ({"scheduler": (torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), 1), 3)},
         TypeError, "got tuple: timm's create_scheduler_v2 returns (scheduler, num_epochs); pass its first item"),
        ({"scheduler": torch.optim.lr_scheduler.StepLR}, TypeError,
         "scheduler must be a scheduler object, got the class StepLR: pass StepLR(optimizer, ...)"),
        ({"steps_per_round": 0}, ValueError, "steps_per_round must be an int >= 1, got 0"),
        ({"steps_per_round": 1.5}, TypeError, "steps_per_round must be an int, got float 1.5"),
        ({"rewind": "500it", "steps_per_epoch": "abc"}, TypeError, "steps_per_epoch must be an int, got str 'abc'"),
        ({"rewind": "500it", "steps_per_epoch": -3}, ValueError, "steps_per_epoch must be an int >= 1, got -3"),
        ({"sparsity": 1e-6}, ValueError, "sparsity=1e-06 prunes no weight of 516 (rounded)"),
        ({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)}, ValueError,
         "optimizer trains none of the tensors to prune (['conv1.weight', 'conv2.weight', 'fc.weight'] ...)"),
    ],
)
def test_bad_input_leaves_model_untouched(kwargs, error, text):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    kwargs = {"method": "imp", "sparsity": 0.5, "optimizer": opt, **kwargs}
    with pytest.raises(error) as info:
        signmask.apply(model, progress=False, **kwargs)
    assert text in str(info.value)
    assert_same(before, snapshot(model))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_tensors_the_optimizer_does_not_train_are_named_in_a_warning():
    model = tiny()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("conv1")], lr=0.1)
    with pytest.warns(UserWarning, match=r"optimizer does not train \['conv1.weight'\] \(1 of the 3 tensors") as got:
        signmask.apply(model, "imp", 0.5, optimizer=opt, classifier=True, progress=False)
    assert [w.filename for w in got] == [__file__]  # points at the caller of apply()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tiny()
        signmask.apply(model, "imp", 0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


class _StatisticsOfOneName(nn.Module):
    """Two BatchNorms without affine parameters named alike once ``module.`` is stripped: only
    their running statistics collide, which a rewind used to restore for one of them."""

    def __init__(self):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
        self.add_module("1", nn.BatchNorm1d(4, affine=False))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(getattr(self, "1")(self.module(x)))


@pytest.mark.parametrize(
    "make, method, text",
    [
        (_mlp, "aws", "Sequential has none with affine parameters; .* use method='lrr'"),
        (lambda: signmask.prune(tiny(), 0.5), "imp", "already pruned; apply"),
        (_StatisticsOfOneName, "imp", r"in model, module.1.running_mean and 1.running_mean are different tensors"),
    ],
)
def test_models_apply_cannot_serve_are_left_untouched(make, method, text):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=text):
        signmask.apply(model, method, optimizer=opt)
    assert_same(before, snapshot(model))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("method", ["imp", "omp"])
def test_a_lazy_layer_outside_the_targets_is_named_when_the_search_snapshots_the_init(method):
    # IMP/OMP copy every weight at once to rewind to: torch's own error named no tensor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^2.weight is an uninitialized lazy parameter \(LazyLinear\); run one "
                                         rf"forward pass .* before apply\(method='{method}'\), which snapshots"):
        signmask.apply(model, method, 0.5, optimizer=opt, include="0", progress=False)
    assert not signmask._targets.pruned(model) and not opt._optimizer_step_pre_hooks
    signmask.apply(model, "lrr", 0.5, optimizer=opt, include="0", progress=False).close()  # no snapshot
    model = signmask.remove(model)
    model(torch.randn(1, 4))
    assert signmask.apply(model, method, 0.5, optimizer=opt, include="0", progress=False).round == 0


def test_failure_after_masks_rolls_back(monkeypatch):
    def refuse(model, alpha):
        raise ValueError("norm layer refused")

    monkeypatch.setattr(_interpolate, "attach", refuse)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="norm layer refused"):
        signmask.apply(model, "aws", optimizer=opt)
    assert_same(before, snapshot(model))
    assert not opt._optimizer_step_pre_hooks


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_apply_honours_classifier_false():
    model, _, _, _ = make_search("imp", classifier=False)
    assert hasattr(model.conv1, "weight_mask") and not hasattr(model.fc, "weight_mask")


@pytest.mark.parametrize("method", ["lrr", "aws"])
def test_lrr_and_aws_leave_the_classifier_dense_by_default(method):
    # R01 (aws classifier=True), R02 (lrr classifier=True)
    model, opt, _, search = make_search(method)
    assert hasattr(model.conv2, "weight_mask") and not hasattr(model.fc, "weight_mask")
    assert search.config.classifier is False


@pytest.mark.parametrize("method", [["imp"], None, 3])
def test_a_method_that_is_no_name_is_a_type_error_listing_the_valid_ones(method):
    # R04: an unhashable key failed inside the dict lookup; None and 3 were "unknown" names.
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(f"method must be a str, one of ['aws', 'imp', 'lrr', 'omp'], got {type(method).__name__} {method!r}")):
        signmask.apply(model, method, 0.5, optimizer=opt)
    assert_same(before, snapshot(model))


def test_a_failure_after_masks_unlinks_the_parents_reading_pruned_weights(monkeypatch):
    # MultiheadAttention reads out_proj.weight itself: the rollback must take its refresh
    # hooks off again, along with the masks.
    def refuse(model, alpha):
        raise ValueError("norm layer refused")

    monkeypatch.setattr(_interpolate, "attach", refuse)
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="norm layer refused"):
        signmask.apply(model, "aws", optimizer=opt)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["aws", "lrr", "imp"])
def test_a_search_set_up_under_inference_mode_runs_as_one_set_up_outside_it(method):
    # A setup function decorated with @torch.inference_mode() made AWS's alpha and norm inits
    # inference tensors, which the first round's alpha.fill_ refused outside it.
    def run(inference: bool) -> dict:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with torch.inference_mode(inference):
            search = signmask.apply(net, method, 0.5, optimizer=opt, rounds=2, progress=False)
        data = torch.Generator().manual_seed(1)
        for _ in search:
            for _ in range(2):
                opt.zero_grad()
                net(torch.randn(8, 8, generator=data)).pow(2).mean().backward()
                opt.step()
        return {k: v.clone() for k, v in net.state_dict().items()}

    outside, inside = run(False), run(True)
    assert outside.keys() == inside.keys()
    for k in outside:
        assert torch.equal(outside[k], inside[k]), k


@pytest.mark.parametrize("end", ["close", "finish"])
def test_an_optimizer_an_open_search_drives_is_refused_until_that_search_ends(end):
    # Two searches on one optimizer (two models of a sweep, two parts of one model) each counted
    # the other's steps and, after each of its rounds, restarted the other's momentum and
    # learning rates mid-round, silently (IMP failed only after round 0, on its rewind snapshot).
    first, second = tiny(0), tiny(1)
    opt = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.05, momentum=0.9)
    search = signmask.apply(first, "lrr", 0.5, optimizer=opt, rounds=1, progress=False)
    before, hooks = snapshot(second), dict(opt._optimizer_step_pre_hooks)
    with pytest.raises(ValueError, match=re.escape("optimizer already drives an open search ('lrr', round 0 of 2, on TinyNet)")):
        signmask.apply(second, "imp", 0.5, optimizer=opt, progress=False)
    assert_same(before, snapshot(second))
    assert opt._optimizer_step_pre_hooks == hooks
    if end == "close":
        search.close()
    else:
        for _ in search:
            opt.zero_grad()
            first(torch.randn(4, 3, 6, 6)).square().mean().backward()
            opt.step()
    assert len(signmask.apply(second, "imp", 0.5, optimizer=opt, rounds=1, progress=False)) == 2


def test_a_second_aws_search_on_interpolated_norms_names_them_and_the_way_out():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    first = signmask.apply(net, "aws", 0.5, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           include="0", progress=False)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"^the model's norm layers \['1'\] are already interpolated: "
                                         r"another AWS search is attached; call its close\(\) first"):
        signmask.apply(net, "aws", 0.5, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                       include="3", progress=False)
    assert_same(before, snapshot(net))
    first.close()
    signmask.apply(net, "aws", 0.5, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                   include="3", progress=False)  # the way out the message names


def test_a_second_aws_search_on_a_copy_still_interpolated_names_close_with_the_copy():
    # A copy made during a search keeps the interpolation after that search ends: the search's
    # close() alone does not take it off the copy, close(copy) does.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    first = signmask.apply(net, "aws", 0.5, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           include="0", progress=False)
    copied = copy.deepcopy(net)
    first.close()
    with pytest.raises(ValueError, match=re.escape("on a copy of that search's model (copy.deepcopy, an EMA), "
                                                   "call its close(copy)")):
        signmask.apply(copied, "aws", 0.5, optimizer=torch.optim.SGD(copied.parameters(), lr=0.1),
                       include="3", progress=False)
    first.close(copied)
    signmask.apply(copied, "aws", 0.5, optimizer=torch.optim.SGD(copied.parameters(), lr=0.1),
                   include="3", progress=False)


def test_an_optimizer_whose_step_runs_no_hooks_is_refused_and_its_base_is_searched():
    # timm's Lookahead skips Optimizer.__init__, so its step() never ran the search's hooks: every
    # round "took no optimizer step", an IMP rewind point was never reached, AWS drew no new `a`.
    from signmask._compat import import_timm

    import_timm()
    from timm.optim import Lookahead

    model = tiny(0)
    wrapper = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape("optimizer Lookahead skips torch.optim.Optimizer.__init__")):
        signmask.apply(model, "imp", 0.5, optimizer=wrapper, rewind="1it", progress=False)
    assert_same(before, snapshot(model))
    search = signmask.apply(model, "imp", 0.5, optimizer=wrapper._base_optimizer, rewind="1it",
                            rounds=1, progress=False)
    for _ in search:
        for _ in range(search.start_step, 2):  # IMP's round 1 trains on from the rewind step
            wrapper.zero_grad()
            model(torch.randn(4, 3, 6, 6)).square().mean().backward()
            wrapper.step()
    assert [h["steps"] for h in search.history] == [2, 1]


def test_a_wrapper_is_refused_after_a_zero_grad_hooked_its_class_step():
    # torch's zero_grad() patches the hooks into the class's step() on its first call, even for a
    # wrapper that skipped Optimizer.__init__: after any Lookahead's zero_grad(), apply() took a
    # Lookahead, and from round 1 on its scheduler set rates its base optimizer no longer read
    # (the restart gave the base new group dicts, the wrapper kept the old ones).
    from signmask._compat import import_timm

    import_timm()
    from timm.optim import Lookahead

    model = tiny(0)
    wrapper = Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    wrapper.zero_grad()
    assert getattr(Lookahead.step, "hooked", False)  # the class's step() runs hooks now
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape("optimizer Lookahead skips torch.optim.Optimizer.__init__")):
        signmask.apply(model, "lrr", 0.5, optimizer=wrapper, progress=False)
    assert_same(before, snapshot(model))
    assert not wrapper._optimizer_step_pre_hooks and not wrapper._optimizer_step_post_hooks


@pytest.mark.parametrize("method", ["aws", "imp"])
@pytest.mark.parametrize("hook", ["register_step_pre_hook", "register_step_post_hook"])
def test_a_failure_hooking_the_optimizer_leaves_model_and_optimizer_untouched(method, hook, monkeypatch):
    # Out of memory (or Ctrl-C) as the search hooked the optimizer: its first hook stayed on the
    # optimizer (refusing any later search), and AWS's norm interpolation on the model.
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)

    def fail(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(torch.optim.Optimizer, hook, fail)
    with pytest.raises(MemoryError, match="injected"):
        signmask.apply(model, method, 0.5, optimizer=opt, progress=False)
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    assert not _interpolate.interpolated(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    signmask.apply(model, method, 0.5, optimizer=opt, progress=False)  # not refused as driven


@pytest.mark.parametrize("method", ["aws", "imp"])
@pytest.mark.parametrize("after", ["prune_targets", "Search"])
def test_an_interrupt_between_the_steps_of_apply_leaves_model_and_optimizer_untouched(method, after, monkeypatch):
    # A Ctrl-C as the all-ones masks were installed, before apply's try, left them on the
    # model (refusing any later search as pruned); one after the search was built (as
    # inference_mode(False) exits) left its hooks on the optimizer, whose next step() raised.
    from signmask import _apply, _prune

    owner = _prune if after == "prune_targets" else _apply
    real = getattr(owner, after)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    monkeypatch.setattr(owner, after, interrupted)
    with pytest.raises(KeyboardInterrupt):
        signmask.apply(model, method, 0.5, optimizer=opt, progress=False)
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    assert not _interpolate.interpolated(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    signmask.apply(model, method, 0.5, optimizer=opt, progress=False)  # not refused as pruned or driven


def _timm_scheduler(opt):
    from signmask._compat import import_timm

    import_timm()
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(opt, t_initial=4)


def _lookahead_scheduler(opt):
    from signmask._compat import import_timm

    import_timm()
    from timm.optim import Lookahead

    return torch.optim.lr_scheduler.StepLR(Lookahead(opt), 1)  # the wrapper shares opt's param_groups


_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt), torch.optim.lr_scheduler.StepLR(opt, 1)], [2]),
    "ChainedScheduler": lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(opt), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]),
    "timm": _timm_scheduler,
    "Lookahead": _lookahead_scheduler,
}


@pytest.mark.parametrize("kind", sorted(_SCHEDULERS))
def test_a_scheduler_built_on_another_optimizer_is_refused_before_the_model_is_touched(kind):
    # It was accepted: each round restarted a schedule that set no learning rate the search trains with.
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stranger = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = _SCHEDULERS[kind](stranger)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^scheduler \w+ drives another optimizer \((Lookahead|SGD)\) than "
                                         r"optimizer= \(SGD\), sharing no parameter with it: .* build the "
                                         "scheduler on the optimizer passed as optimizer=$"):
        signmask.apply(model, "lrr", 0.5, optimizer=opt, scheduler=sched, progress=False)
    assert_same(before, snapshot(model))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("kind", sorted(_SCHEDULERS))
@pytest.mark.parametrize("owner", ["optimizer", "same parameters"])
def test_a_scheduler_on_the_optimizer_or_its_parameters_is_accepted(kind, owner):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Another optimizer object over the very parameters (a second optimizer, or a wrapper
    # holding its own groups) may be how the user's loop is built: not refused.
    driven = opt if owner == "optimizer" else torch.optim.Adam(model.parameters(), lr=0.1)
    search = signmask.apply(model, "lrr", 0.5, optimizer=opt, scheduler=_SCHEDULERS[kind](driven), progress=False)
    assert search.scheduler is not None
    search.close()
