"""Rewind snapshots: which state_dict entries are weights."""

import copy

import pytest
import torch

import signmask
from signmask import _interpolate, _snapshot
from _util import timm_plateau, tiny


class Scaled(torch.nn.Module):
    """A user's own tensors whose names end like signmask's buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny()
        self.scale_init = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("seen_mask", torch.zeros(3))
        self.register_buffer("flip_sign", torch.ones(3))

    def forward(self, x):
        return self.net(x) * self.scale_init.mean()


def test_live_weights_leave_out_exactly_the_reparametrization_buffers():
    model = Scaled()
    signmask.prune(model, 0.5, signs="locked")
    _interpolate.attach(model, torch.zeros(()))
    keys = set(_snapshot.live_weights(model))
    sd = model.state_dict()
    ours = {
        "net.bn1.weight_init", "net.bn1.bias_init", "net.bn2.weight_init", "net.bn2.bias_init",
        "net.conv1.weight_mask", "net.conv2.weight_mask", "net.fc.weight_mask",
        "net.conv1.weight_sign", "net.conv2.weight_sign", "net.fc.weight_sign",
    }
    assert ours <= sd.keys() and {"scale_init", "seen_mask", "flip_sign"} <= keys
    assert keys == {signmask._targets.canonical(k) for k in sd if k not in ours}



def test_imp_rewinds_a_model_with_extra_state_and_leaves_that_state_alone():
    # get_extra_state() returns any object, a fresh one per call: no tensor to copy into. It
    # used to be snapshotted as a weight (AttributeError: 'dict' object has no attribute 'detach').
    class Counting(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

        def get_extra_state(self):
            return {"calls": self.calls}

        def set_extra_state(self, state):
            self.calls = state["calls"]

    for rewind, at in (("init", 0), ("2it", 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(Counting(4, 4), torch.nn.Linear(4, 2))
        assert "0._extra_state" in model.state_dict()
        assert "0._extra_state" not in _snapshot.live_weights(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        search = signmask.apply(model, "imp", 0.5, optimizer=opt, rate=0.5, rewind=rewind,
                                classifier=True, progress=False)
        seen = {}
        for _ in search:
            if search.round == 1:
                break
            for step in range(4):
                if step == at:
                    seen = {k: v.clone() for k, v in _snapshot.live_weights(model).items()}
                opt.zero_grad()
                model(torch.ones(2, 4)).sum().backward()
                opt.step()
        live = _snapshot.live_weights(model)
        assert live.keys() == seen.keys()
        assert all(torch.equal(live[k], seen[k]) for k in live)  # rewound exactly
        assert model[0].calls == 4  # its extra state went on counting: not rewound


def test_a_restart_keeps_the_keys_a_scheduler_made_after_apply_added_to_the_groups():
    # SWALR made after apply (beside the AveragedModel, as EMA copies are) adds swa_lr to the
    # groups; each round's restart loaded the groups of apply's time and its next step raised a
    # bare KeyError: 'swa_lr'.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    search = signmask.apply(net, "lrr", 0.5, optimizer=opt, rounds=2, progress=False)
    swa = torch.optim.swa_utils.AveragedModel(net)
    swalr = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=3)
    lrs = []
    for _ in search:
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(2):
            opt.zero_grad()
            net(torch.randn(5, 4)).sum().backward()
            opt.step()
            swa.update_parameters(net)
            swalr.step()
    assert search.done and opt.param_groups[0]["swa_lr"] == 0.01
    assert lrs[1:] == [0.1, 0.1]  # each restart still returns to apply's learning rate


def _lrs_per_round(opt, sched, search, net, steps=3):
    """Each round's learning rates (every group, before each step and after the last)."""
    rounds = []
    for _ in search:
        lrs = []
        for _ in range(steps):
            lrs.append([float(g["lr"]) for g in opt.param_groups])
            opt.zero_grad()
            net(torch.ones(2, 4)).sum().backward()
            opt.step()
            sched.step()
        lrs.append([float(g["lr"]) for g in opt.param_groups])
        rounds.append(lrs)
    return rounds


# torch's check that the optimizer stepped first cannot see through the wrapper's step.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_restart_refills_the_group_dicts_a_wrapper_holds_so_its_scheduler_still_drives_the_optimizer():
    # timm's Lookahead shares its base optimizer's param_groups list; the search drives the base
    # (Lookahead runs no step hooks) and the scheduler the wrapper. The restart's load_state_dict
    # gave the base a new list: from round 1 on the scheduler set rates the base never read.
    from signmask._compat import import_timm

    import_timm()
    from timm.optim import Lookahead

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    wrapper = Lookahead(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), k=2)
    sched = torch.optim.lr_scheduler.StepLR(wrapper, 1, 0.5)
    search = signmask.apply(net, "lrr", 0.5, optimizer=wrapper._base_optimizer, scheduler=sched,
                            rounds=2, progress=False)
    base = wrapper._base_optimizer
    rounds = _lrs_per_round(base, sched, search, net)
    assert rounds[0] == [[0.1], [0.05], [0.025], [0.0125]]
    assert rounds[1] == rounds[0] and rounds[2] == rounds[0]  # each round restarts the schedule
    assert wrapper.param_groups is base.param_groups


def test_a_restart_keeps_a_tensor_learning_rate_the_same_tensor():
    # torch's schedulers fill a tensor LR in place (a compiled or CUDA-graphed step reads it);
    # the restart put a copy in the group instead.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    groups = [{"params": net[0].parameters(), "lr": torch.tensor(0.1)},
              {"params": net[2].parameters(), "lr": torch.tensor(0.01)}]
    opt = torch.optim.Adam(groups, fused=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    tensors = [g["lr"] for g in opt.param_groups]
    search = signmask.apply(net, "lrr", 0.5, optimizer=opt, scheduler=sched, rounds=2, progress=False)
    rounds = _lrs_per_round(opt, sched, search, net)
    f32 = [[float(torch.tensor(lr)) for lr in lrs] for lrs in ([0.1, 0.01], [0.05, 0.005])]
    assert rounds[0][:2] == f32
    assert rounds[1] == rounds[0] and rounds[2] == rounds[0]
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, tensors))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_rewind_of_a_model_cast_after_apply_gives_each_weight_the_dtype_and_values_a_forward_uses(dtype):
    # The rewound module.<name> was computed from the float32 snapshot: float32, unrounded, beside
    # a float64 or bfloat16 <name>_orig, until the next forward (and a device mismatch on every
    # round end for a model moved to the GPU after apply).
    from _util import make_search

    model, opt, _, search = make_search("imp", 0.5, rounds=1)
    model.to(dtype)
    search.start_round()
    opt.zero_grad()
    model(torch.randn(4, 3, 6, 6, dtype=dtype)).square().mean().backward()
    opt.step()
    search.finish_round()
    for module, name in signmask._targets.pruned(model).values():
        rewound = module.__dict__[name]
        assert rewound.dtype == dtype
        assert torch.equal(rewound, signmask._reparam.effective(module, name))


def _plateau(kind, opt):
    """A plateau schedule with a patience and a cooldown (timm's also with warmup and noise)."""
    if kind == "torch":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "max", factor=0.5, patience=1, cooldown=1)
    return timm_plateau(opt, decay_rate=0.5, patience_t=1, cooldown_t=1, mode="max", warmup_t=1,
                        warmup_lr_init=0.01, noise_range_t=2, noise_seed=3)


def _plateau_run(kind, opt, sched, first_epoch, metrics):
    """The plateau state at the start, then the learning rates and plateau state after each epoch
    (one optimizer step, then the scheduler on that epoch's metric)."""
    inner = getattr(sched, "lr_scheduler", sched)  # timm's wraps torch's

    def state():
        return (copy.deepcopy(inner.state_dict()), getattr(sched, "restore_lr", None),
                [g["lr"] for g in opt.param_groups])

    seen = [state()]
    for epoch in range(first_epoch, len(metrics)):
        opt.step()
        if kind == "torch":
            sched.step(metrics[epoch])
        else:
            sched.step(epoch + 1, metrics[epoch])
        seen.append(state())
    return seen


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated")
@pytest.mark.parametrize("method", ["lrr", "imp"])
@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_a_restart_resets_a_plateau_schedule_as_a_freshly_built_one(kind, method):
    # timm's PlateauLRScheduler saves only best and last_epoch in its state_dict: each round went
    # on with the last round's patience and cooldown counts (an LR cut epochs early) and its
    # noise's restore_lr (written over the restarted LR at the round's first epoch after warmup).
    # Oracle: a fresh optimizer and scheduler on the same metrics, read from the restart epoch on.
    metrics = [1.0, 1.2, 1.1, 1.0, 0.9, 1.3, 1.2, 1.1]
    model = tiny(0)

    def fresh():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, _plateau(kind, opt)

    oracle = _plateau_run(kind, *fresh(), 0, metrics)
    assert len({lrs[0] for _, _, lrs in oracle}) >= 3  # the schedule cuts the LR, twice
    opt, sched = fresh()
    rewind = {"rewind": "2it"} if method == "imp" else {}
    search = signmask.apply(model, method, 0.5, optimizer=opt, scheduler=sched, rounds=2, progress=False, **rewind)
    rounds = [_plateau_run(kind, opt, sched, search.start_step, metrics) for _ in search]
    assert rounds[0] == oracle
    assert rounds[1] == rounds[2] == oracle[search.start_step:]
