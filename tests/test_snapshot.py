"""Rewind snapshots: which state_dict entries are weights."""

import pytest
import torch

import signmask
from signmask import _interpolate, _snapshot
from _util import tiny


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
