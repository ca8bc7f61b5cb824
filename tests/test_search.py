"""``signmask.apply``: IMP, LRR, AWS and OMP around a plain training loop.

Oracles: masks recomputed here in float64 from the weights the round ended with, weight copies
taken by the test's own optimizer hook, torch's own optimizer and scheduler state, an
uninterrupted run for every resume, and a hook-free float64 loop written from the README for
whole searches.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import re
from fractions import Fraction
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.nn.utils import prune as torch_prune
from hypothesis import example, given, settings
from hypothesis import strategies as st

import signmask
from signmask import _interpolate, _maskmul, _recipes
from _util import (TINY_NORMS, assert_same, effective_weights, in_threads, kept, make_search, since_timm, snapshot,
                   timm_plateau, tiny)

STEPS = 4


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)


def train(model, opt, search, sched=None, steps=STEPS):
    """The user's loop for one round; resumable from ``search.round_step``."""
    for _ in range(search.round_step, steps):
        x, y = batch(search.step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def masks(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("_mask", "_init"))}


def expected_masks(model, old, kept):
    """Global magnitude selection recomputed in float64 over the surviving weights."""
    sd = model.state_dict()
    scores = {k: sd[k[: -len("_mask")] + "_orig"].double().abs() for k in old}
    alive = torch.cat([scores[k][old[k]] for k in old])
    threshold = alive.sort(descending=True).values[kept - 1]
    return {k: old[k] & (scores[k] >= threshold) for k in old}


@pytest.mark.parametrize("method", ["imp", "lrr", "aws", "omp"])
def test_each_round_prunes_the_smallest_survivors(method):
    model, opt, sched, search = make_search(method, classifier=True)
    total = sum(m.numel() for m in masks(model).values())
    assert all(m.all() for m in masks(model).values())  # all-ones masks from the start
    kept = []
    for r in range(len(search)):
        assert search.start_round() == r
        train(model, opt, search, sched)
        if r < len(search) - 1:
            want = expected_masks(model, masks(model), search.kept_schedule[r])
        search.finish_round()
        if r < len(search) - 1:
            got = masks(model)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), f"round {r}"
            kept.append(sum(int(m.sum()) for m in got.values()))
    assert kept == search.kept_schedule
    assert kept[-1] == round(total * 0.4)
    assert search.ticket.kept == kept[-1]
    assert [h["sparsity"] for h in search.history] == [0.0] + [1 - k / total for k in kept]
    assert len(search) == 1 + (1 if method == "omp" else 5)  # 0.8 ** 4 = 0.41 > 0.4


def test_break_leaves_the_round_open():
    model, opt, sched, search = make_search("lrr")
    for r in search:
        train(model, opt, search, sched)
        break
    assert search.in_round and search.round == 0 and not search.done
    for r in search:  # iterating again picks up the open round
        assert r == 0
        break


def test_imp_rewinds_to_init_and_restarts_optimizer_and_schedule():
    model, opt, sched, search = make_search("imp")
    init = weights(model)
    lr0 = opt.param_groups[0]["lr"]
    for r in search:
        assert opt.state_dict()["state"] == {}
        assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == lr0
        now = weights(model)
        assert all(torch.equal(now[k], init[k]) for k in init), f"round {r} did not start from init"
        train(model, opt, search, sched)
        assert opt.state_dict()["state"] != {} and sched.last_epoch == STEPS


@pytest.mark.parametrize("rewind, spe, at", [("3it", None, 3), ("1ep", 2, 2), ("1ep1it", 2, 3)])
def test_imp_rewinds_to_step_k(rewind, spe, at):
    model, opt, sched, search = make_search("imp", rewind=rewind, steps_per_epoch=spe)
    seen = {}

    def record(optimizer, args, kwargs):
        if search.step == at:  # the search's own post-hook ran first
            seen["weights"] = weights(model)

    handle = opt.register_step_post_hook(record)
    lrs = []
    for r in search:
        assert search.start_step == (at if r > 0 else 0)
        if r > 0:
            now = weights(model)
            assert all(torch.equal(now[k], seen["weights"][k]) for k in now)
            lrs.append(opt.param_groups[0]["lr"])
            assert sched.last_epoch == at and opt.state_dict()["state"] == {}
        train(model, opt, search, sched, steps=STEPS if r == 0 else STEPS - at)
    handle.remove()
    # StepLR(2, 0.5) stepped after every optimizer step: the lr the loop had after step k.
    assert lrs == [0.05 * 0.5 ** (at // 2)] * (len(search) - 1)


def test_lrr_keeps_weights_and_resets_momentum():
    model, opt, sched, search = make_search("lrr")
    for r in search:
        if r > 0:
            now = weights(model)
            assert all(torch.equal(now[k], before[k]) for k in before)
            assert opt.state_dict()["state"] == {} and sched.last_epoch == 0
        train(model, opt, search, sched)
        before = weights(model)


def test_a_numpy_rewind_step_keeps_the_state_loadable_with_weights_only():
    model, opt, sched, search = make_search("imp", rewind=np.int64(3))
    assert type(search.config.rewind) is int and search.config.rewind == 3
    for _ in search:
        train(model, opt, search, sched)
        buf = io.BytesIO()
        torch.save(search.state_dict(), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)  # raised UnpicklingError for numpy's int64
        break


def test_rewind_later_than_training_is_refused_without_loss():
    model, opt, sched, search = make_search("imp", rewind="10it")
    search.start_round()
    train(model, opt, search, sched)
    before = snapshot(model)
    with pytest.raises(ValueError, match="rewind point '10it' is step 10, but round 0 trained only 4"):
        search.finish_round()
    assert_same(before, snapshot(model))
    assert search.in_round and search.round == 0
    train(model, opt, search, sched, steps=10)
    search.finish_round()
    assert search.round == 1


def test_rounds_out_of_order():
    model, opt, sched, search = make_search("lrr", sparsity=0.36)
    with pytest.raises(RuntimeError, match="round 0 has not started; call start_round"):
        search.finish_round()
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) called while the search is between rounds"):
        opt.step()
    with pytest.raises(RuntimeError, match="the ticket exists after the last round"):
        search.ticket
    search.start_round()
    with pytest.raises(RuntimeError, match="round 0 is already running"):
        search.start_round()
    for _ in search:
        train(model, opt, search, sched)
    for call in (search.start_round, search.finish_round):
        with pytest.raises(RuntimeError, match="the search is done"):
            call()
    # The search's hooks came off with it: the optimizer trains on as plain torch.
    before = model.fc.bias.detach().clone()
    opt.step()
    assert not torch.equal(model.fc.bias, before)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_search_whose_masks_were_removed_says_so():
    model, opt, sched, search = make_search("lrr", sparsity=0.36)
    rounds = iter(search)
    next(rounds)
    train(model, opt, search, sched)
    signmask.remove(model.conv1)  # mid-search: the next pruning cannot count its weights
    with pytest.raises(RuntimeError, match=r"^the search: conv1.weight is no longer pruned \(signmask.remove"):
        next(rounds)
    model, opt, sched, search = make_search("lrr", sparsity=0.36)
    for _ in search:
        train(model, opt, search, sched)
    ticket = search.ticket
    signmask.remove(model)  # after the search: its ticket stays, its live masks are gone
    assert search.ticket is ticket
    for what, read in (("sparsity", lambda: search.sparsity), ("state_dict()", search.state_dict)):
        with pytest.raises(RuntimeError, match=rf"^{re.escape(what)}: conv1.weight is no longer pruned"):
            read()


def test_ticket_is_signed_mask_with_metadata(tmp_path):
    model, opt, sched, search = make_search("imp", rate=0.5, rewind="2it")
    for _ in search:
        train(model, opt, search, sched)
    ticket = search.ticket
    sd = model.state_dict()
    for key, signed in ticket.masks.items():
        w, m = sd[key + "_orig"], sd[key + "_mask"]
        assert torch.equal(signed, (torch.sign(w) * m).to(torch.int8))
    assert {k: ticket.metadata[k] for k in ("method", "rounds", "rate", "rewind", "target_sparsity")} == {
        "method": "imp", "rounds": "2", "rate": "0.5", "rewind": "2it", "target_sparsity": "0.6",
    }
    path = search.save(tmp_path / "t.safetensors")
    assert signmask.load(path) == ticket


def test_aws_ticket_records_the_trained_norm_parameters_not_the_interpolated_ones():
    model, opt, sched, search = make_search("aws", sparsity=0.36)
    for _ in search:
        train(model, opt, search, sched)
        if not search.done:
            seen = model.bn1.weight.detach().clone()  # the last forward's interpolated value
    ticket = search.ticket
    assert sorted(ticket.norms) == ["bn1.bias", "bn1.weight", "bn2.bias", "bn2.weight"]
    assert all(torch.equal(ticket.norms[k], model.get_parameter(k)) for k in ticket.norms)
    assert not torch.equal(ticket.norms["bn1.weight"], seen)
    fresh = signmask.transfer(ticket, tiny(1), norms=True)
    assert torch.equal(fresh.bn2.bias, model.bn2.bias)


def test_aws_interpolates_norms_during_search_only():
    model, opt, sched, search = make_search("aws", sparsity=0.36)
    init_gamma = model.bn1.weight_init.clone()
    used = []
    for r in search:
        for _ in range(3):
            x, y = batch(search.step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            a = search._alpha.clone()
            used.append(float(a))
            assert torch.equal(model.bn1.weight, torch.lerp(model.bn1.weight_orig.detach(), init_gamma, a))
            opt.step()
        model.eval()
        model(x)
        assert torch.equal(model.bn1.weight, model.bn1.weight_orig)
        model.train()
    # One draw at each round's start and one after every step; the last step's draw goes unused.
    g = torch.Generator().manual_seed(0)
    draws = [float(torch.rand((), generator=g)) for _ in range(3 * 4)]
    assert used == [draws[r * 4 + i] for r in range(3) for i in range(3)]
    assert not _interpolate.interpolated(model)
    assert "bn1.weight" in model.state_dict() and "bn1.weight_init" not in model.state_dict()


def test_aws_draws_the_same_alphas_whatever_the_default_dtype():
    # One seed names one sequence of draws: a search resumed in a process that set float64 as
    # its default dtype (torch.rand draws other numbers in float64) must go on as it started.
    g = torch.Generator().manual_seed(0)
    draws = [float(torch.rand((), generator=g, dtype=torch.float32)) for _ in range(2)]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, opt, sched, search = make_search("aws", sparsity=0.36)
        search.start_round()
        first = float(search._alpha)
        x, y = batch(0)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert [first, float(search._alpha)] == draws
        search.close()
    finally:
        torch.set_default_dtype(before)


def test_a_checkpoint_between_rounds_resumes_at_the_next_rounds_first_step():
    # The explicit API's natural checkpoint is right after finish_round(): round and start_step
    # name the next round then, so round_step must be its 0 steps, not the last round's.
    model, opt, sched, search = make_search("imp", rewind="2it")
    search.start_round()
    train(model, opt, search, sched)
    search.finish_round()
    assert (search.round, search.in_round, search.start_step, search.round_step) == (1, False, 2, 0)
    fresh = make_search("imp", seed=5, rewind="2it")[3]
    fresh.load_state_dict(search.state_dict())
    assert (fresh.round, fresh.start_step, fresh.round_step) == (1, 2, 0)
    fresh.start_round()
    assert fresh.round_step == 0


@pytest.mark.parametrize("key, value, message", [
    ("generator", torch.zeros(3, dtype=torch.uint8), "state\\['generator'\\] should be a torch.Generator state"),
    ("history", 3, "state\\['history'\\] should be a list of dicts"),
    ("round", None, "state\\['round'\\] should be an int >= 0"),
    ("step", -1, "state\\['step'\\] should be an int >= 0, found int -1"),
    ("round_start_step", True, "state\\['round_start_step'\\] should be an int >= 0, found bool"),
    ("in_round", 1, "state\\['in_round'\\] should be a bool"),
    ("restart", None, "state\\['restart'\\] should be the optimizer and scheduler snapshot"),
    ("alpha", 1.5, "state\\['alpha'\\] should be a float in \\[0, 1\\]"),
    ("masks", "2.0", "state\\['masks'\\]\\['conv1.weight'\\] is not a 0/1 mask"),
])
def test_a_malformed_search_state_is_refused_before_anything_changes(key, value, message):
    # The masks and counters were loaded, then the generator (or history...) raised.
    model, opt, sched, search = make_search("aws")
    for _ in search:
        train(model, opt, search, sched)
        if search.round == 1:
            break
    search.finish_round()
    state = search.state_dict()
    if key == "masks":
        state["masks"] = {k: v.float() * 2 for k, v in state["masks"].items()}
    else:
        state[key] = value
    fresh_model, _, _, fresh = make_search("aws", seed=3)
    before = snapshot(fresh_model)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert_same(before, snapshot(fresh_model))
    assert (fresh.round, fresh.step, fresh.history) == (0, 0, [])


def run_to_end(method, checkpoint_at=None, **kw):
    """Train a full search; with ``checkpoint_at``, resume from a state saved at that step in a
    fresh model, optimizer, scheduler and search (as a new process would)."""
    model, opt, sched, search = make_search(method, **kw)
    saved = None
    for _ in search:
        for _ in range(search.round_step, STEPS):
            if search.step == checkpoint_at and saved is None:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "search": search.state_dict()}, buf)
                saved = buf.getvalue()
            train(model, opt, search, sched, steps=search.round_step + 1)
    if saved is None:
        return search.ticket, search.history, None
    ck = torch.load(io.BytesIO(saved), weights_only=False)
    model, opt, sched, search = make_search(method, seed=99, **kw)  # another init: all must come from ck
    search.load_state_dict(ck["search"])
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    for _ in search:
        train(model, opt, search, sched)
    return search.ticket, search.history, ck


@settings(max_examples=8, deadline=None)
# Mid-round checkpoints after the rewind point: they catch a resume that forgets where the round
# started or that the restart schedule was already captured (random draws may miss both).
@example(method="imp", at=5)
@example(method="aws", at=6)
@given(method=st.sampled_from(["imp", "aws"]), at=st.integers(0, 5 * STEPS - 1))
def test_resume_from_any_step_is_bit_identical(method, at):
    kw = {"rewind": "2it"} if method == "imp" else {}
    ticket, history, _ = run_to_end(method, **kw)
    resumed, resumed_history, ck = run_to_end(method, checkpoint_at=at, **kw)
    assert ck is not None
    assert resumed == ticket
    assert resumed_history == history


@pytest.mark.parametrize("method, kw", [("imp", {"rewind": "2it"}), ("lrr", {}), ("aws", {}), ("omp", {"rewind": "init"})])
def test_a_search_draws_nothing_from_the_global_rngs(tmp_path, method, kw):
    # AWS's coefficients come from the search's own generator: the user's data order, dropout
    # and augmentation draw the same numbers with or without a search around the loop.
    import random

    import numpy as np

    fresh = tiny(1)
    model, opt, sched, search = make_search(method, **kw)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for _ in search:
        train(model, opt, search, sched)
    signmask.transfer(signmask.load(search.save(tmp_path / "t.safetensors")), fresh, norms=True)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


def test_resume_refuses_another_model_or_config():
    _, _, _, search = make_search("aws")
    state = search.state_dict()
    model = tiny(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = signmask.apply(model, "aws", 0.6, optimizer=opt, progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="masked other tensors than this model has"):
        other.load_state_dict(state)
    assert_same(before, snapshot(model))
    _, _, _, other = make_search("aws", sparsity=0.7)
    with pytest.raises(ValueError, match="saved search has sparsity=0.6, this one sparsity=0.7"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a signmask search state"):
        other.load_state_dict({"round": 3})


def test_timm_optimizer_scheduler_and_ema():
    from signmask._compat import import_timm

    timm = import_timm()
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    opt = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched, epochs = create_scheduler_v2(opt, "cosine", num_epochs=3, warmup_epochs=1, warmup_lr=0.01)
    search = signmask.apply(model, "aws", 0.5, optimizer=opt, scheduler=sched, progress=False)
    ema = ModelEmaV3(model, decay=0.9)  # a deepcopy of the masked, interpolated model
    start = (opt.param_groups[0]["lr"], sched.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    for r in search:
        assert opt.param_groups[0]["lr"] == start[0] and sched.state_dict() == start[1]
        for epoch in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update(model, step=search.step)
            sched.step(epoch + 1)
        assert opt.param_groups[0]["lr"] != start[0]
    assert search.ticket.sparsity == pytest.approx(0.5, abs=1e-6)
    # EMA holds the masks as buffers (copied from the model) and averages the weights behind them.
    ema_masks = {k: v for k, v in ema.module.state_dict().items() if k.endswith("_mask")}
    assert ema_masks.keys() == masks(model).keys()
    assert all(torch.equal(ema_masks[k], v) for k, v in masks(model).items())
    # The EMA copy carries the norm interpolation until the search's close() is given it.
    assert _interpolate.interpolated(ema.module) and not _interpolate.interpolated(model)
    search.close(ema.module)
    assert not _interpolate.interpolated(ema.module)
    assert list(ema.module.state_dict()) == list(model.state_dict())
    ema.update(model, step=search.step)


@pytest.mark.parametrize("method", ["aws", "lrr"])
def test_close_refuses_an_ema_made_before_apply_and_takes_one_made_after(method):
    # timm's ModelEmaV3 pairs its tensors with the model's by position. One made before apply()
    # (timm's train.py makes it before the scheduler apply() takes) has no masks: its update fails
    # inside timm, or, with exclude_buffers=True on a model without buffers (LayerNorm only, a
    # ViT), averages weight_orig into a dense copy, silently. close() is where signmask sees the
    # copy: it took it as a copy of the search's model and removed the hooks; now it refuses it by
    # name, removing nothing. The recipe, the EMA made again after apply(), follows the search.
    from signmask._compat import import_timm

    import_timm()
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    early = ModelEmaV3(net, decay=0.5, exclude_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    search = signmask.apply(net, method, 0.5, optimizer=opt, rounds=1, classifier=True, progress=False)
    late = ModelEmaV3(net, decay=0.5, exclude_buffers=True)  # the recipe: made (again) after apply()
    made_before = re.escape("close(): copy 2 (Sequential) holds none of the search's masks: it was made before apply()")
    for r in search:
        for step in range(2):
            opt.zero_grad()
            net(torch.randn(3, 4)).square().mean().backward()
            opt.step()
            late.update(net, step=search.step)
        if r == 0:
            with pytest.raises(ValueError, match=made_before):
                search.close(late.module, early.module)
            assert opt._optimizer_step_pre_hooks and search.in_round  # nothing came off
            assert _interpolate.interpolated(late.module).keys() == _interpolate.interpolated(net).keys()
    with pytest.raises(ValueError, match=made_before):
        search.close(late.module, early.module)
    search.close(late.module)
    assert not _interpolate.interpolated(late.module)
    assert list(late.module.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        late.module(torch.randn(3, 4))
    for i in (0, 3):
        layer = late.module[i]
        assert torch.equal(layer.weight_mask, net[i].weight_mask)
        assert not layer.weight[~layer.weight_mask].any()  # the average of the pruned network


@since_timm("1.0.13", "timm.layers.set_reentrant_ckpt")
@pytest.mark.parametrize("reentrant", [False, True])
def test_grad_checkpointing_finds_the_same_ticket(reentrant):
    # timm's set_grad_checkpointing: the backward recomputes every stage, running the pruning
    # and norm-interpolation hooks again with the round's alpha. Every gradient, and so the
    # ticket (masks, signs, trained norms), equals the run without checkpointing, bitwise.
    from signmask._compat import import_timm

    timm = import_timm()
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    def run(checkpointed):
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
        model.set_grad_checkpointing(checkpointed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        search = signmask.apply(model, "aws", 0.75, optimizer=opt, rounds=2, progress=False)
        gen = torch.Generator().manual_seed(0)
        grads = []
        for r in search:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(2, 3, 32, 32, generator=gen)).square().mean().backward()
                grads += [p.grad.clone() for p in model.parameters()]
                opt.step()
        return search.ticket, grads

    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        (a, grads_a), (b, grads_b) = run(False), run(True)
    finally:
        set_reentrant_ckpt(before)
    assert len(grads_a) == len(grads_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    for field in ("masks", "signs", "norms"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.kept == round(a.numel * 0.25) and len(a.norms) > 0


@pytest.mark.parametrize("method", ["imp", "aws"])
def test_compiled_model_follows_masks_and_alpha(method):
    model, opt, sched, search = make_search(method, sparsity=0.36)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager = []
    for r in search:
        x, y = batch(search.step)
        opt.zero_grad()
        out = compiled(x)
        with torch.no_grad():
            eager.append(torch.allclose(out, model(x), atol=1e-6))  # same masks, same a
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert eager == [True] * len(search)
    assert search.ticket.kept == round(search.ticket.numel * 0.64)


def _compiled_rounds(model, opt, sched, rounds, counter):
    """The user's loop around ``torch.compile(model)``: two training steps and an evaluation per
    round; the number of graphs compiled so far after each round."""
    compiled = torch.compile(model, backend=counter)
    frames = []
    for r in rounds:
        for _ in range(2):
            x, y = batch(len(frames))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            compiled(x)
        model.train()
        frames.append(counter.frame_count)
    return frames


def _compiled_search(method, backend, counter, seed=0):
    model, opt, sched, search = make_search(method, sparsity=0.5, seed=seed, rounds=3)
    if backend == "projection":
        signmask.set_backend(model, "projection", optimizer=opt)
    return _compiled_rounds(model, opt, sched, search, counter)


@pytest.mark.parametrize("backend", ["torch", "projection"])
@pytest.mark.parametrize("method", ["imp", "lrr", "aws"])
def test_a_compiled_search_compiles_in_its_first_round_only(method, backend):
    # New masks, rewinds, restarts and AWS's a are values, never guarded attributes: no round
    # after the first recompiles, and no round breaks the graph. Oracle: the dense model in
    # the same loop (a training graph and an evaluation graph).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    frames = _compiled_search(method, backend, counter)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    dense = tiny(0)
    opt = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    want = _compiled_rounds(dense, opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), range(4), CompileCounter())
    torch._dynamo.reset()
    assert breaks == {}
    assert len(frames) == 4 and frames == want


@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_compiled_searches_on_models_built_alike_share_their_graphs(backend):
    # A seed sweep: each seed's model recompiled the class's forward (hook keys, see
    # _reparam.register_always_called; projection's id() of its Parameter), and past dynamo's
    # recompile limit (8) ran it eagerly.
    torch._dynamo.reset()
    counter = CompileCounter()
    first = _compiled_search("aws", backend, counter, seed=0)[-1]
    for seed in (1, 2):
        _compiled_search("aws", backend, counter, seed=seed)
    torch._dynamo.reset()
    assert counter.frame_count == first


def test_close_abandons_the_search():
    model, opt, sched, search = make_search("aws")
    search.start_round()
    train(model, opt, search, sched)
    search.close()
    assert not _interpolate.interpolated(model) and "bn1.weight" in dict(model.named_parameters())
    assert all(m.all() for m in masks(model).values())  # masks stay installed
    train(model, opt, search, sched, steps=search.round_step + 1)  # the optimizer is plain again
    with pytest.raises(RuntimeError, match=r"start_round\(\): the search was closed"):
        search.start_round()


def test_iterating_a_search_closed_mid_round_raises_before_the_loop_body():
    model, opt, sched, search = make_search("lrr")
    search.start_round()
    search.close()
    with pytest.raises(RuntimeError, match=r"iterating\(\): the search was closed"):
        next(iter(search))


def test_a_parameter_group_added_mid_search_is_refused_before_pruning():
    model, opt, sched, search = make_search("imp")
    search.start_round()
    train(model, opt, search, sched)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    before, round_ = masks(model), search.round
    with pytest.raises(ValueError, match=r"parameter groups changed during the search \(sizes \[\d+\] when it started, \[\d+, 1\] now\)"):
        search.finish_round()
    assert all(torch.equal(before[k], v) for k, v in masks(model).items())
    assert (search.round, search.in_round) == (round_, True)


@pytest.mark.parametrize("method", ["lrr", "aws"])
@pytest.mark.parametrize("last", [False, True])
def test_a_searched_module_replaced_mid_search_is_refused_before_pruning(method, last):
    # reset_classifier() replaces the head: the search went on pruning the old one, and the
    # ticket missed the new one's mask, silently (IMP's rewind snapshot caught it by key only).
    model, opt, sched, search = make_search(method, rounds=1, classifier=True)
    if last:
        search.start_round()
        train(model, opt, search, sched)
        search.finish_round()
    search.start_round()
    train(model, opt, search, sched)
    old, model.fc = model.fc, nn.Linear(6, 5)
    opt.param_groups[0]["params"][-2:] = list(model.fc.parameters())  # the user trains the new head
    before, round_ = snapshot(model), search.round
    with pytest.raises(ValueError, match=r"^the module holding \['fc.weight'\] was replaced or removed during"):
        search.finish_round()
    assert_same(before, snapshot(model))
    assert (search.round, search.in_round) == (round_, True)
    model.fc = old  # put back, the search goes on
    opt.param_groups[0]["params"][-2:] = list(old.parameters())
    for _ in search:
        train(model, opt, search, sched)
    assert search.ticket.sparsity == pytest.approx(0.6, abs=0.01) and "fc.weight" in search.ticket.masks


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_rewind_reprojects_the_projection_backend_without_a_forward(signs):
    # A compiled forward skips the projection's version check: the rewind must re-project.
    model, opt, sched, search = make_search("imp")
    if signs:
        signmask.prune(model, 0.0, signs="locked")
    signmask.set_backend(model, "projection", optimizer=opt)
    search.start_round()
    train(model, opt, search, sched)
    search.finish_round()  # prunes, then writes the unmasked init back into weight_orig
    for key, (module, name) in signmask._targets.pruned(model).items():
        orig, keep = module._parameters[name + "_orig"], module._buffers[name + "_mask"]
        assert torch.equal(orig[~keep], torch.zeros_like(orig[~keep])), key
        assert torch.equal(module.__dict__[name], orig)


def test_progress_log_line_per_round_on_rank0_only(capsys, monkeypatch):
    model, opt, sched, search = make_search("lrr", sparsity=0.36, progress=True, steps_per_round=STEPS)
    for r in search:
        train(model, opt, search, sched)
        search.report(acc=0.25 * (r + 1))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("lrr round")]
    total = sum(m.numel() for m in masks(model).values())
    sparsities = [0.0] + [1 - k / total for k in search.kept_schedule]
    assert lines == [
        f"lrr round {r}: sparsity {s:.2%}, 4 steps acc={0.25 * (r + 1):.4g}" for r, s in enumerate(sparsities)
    ]
    assert lines[0] == "lrr round 0: sparsity 0.00%, 4 steps acc=0.25"
    assert [h["acc"] for h in search.history] == [0.25, 0.5, 0.75]
    # Another rank prints nothing.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: None)
    model, opt, sched, search = make_search("lrr", sparsity=0.36, progress=True)
    for r in search:
        train(model, opt, search, sched)
    captured = capsys.readouterr()
    assert "round" not in captured.out + captured.err


def test_report_and_close_refuse_bad_arguments():
    model, opt, sched, search = make_search("lrr")
    search.start_round()
    with pytest.raises(TypeError, match="report\\(\\): metric 'acc' must be a real number or a one-element real tensor, got str 'high'"):
        search.report(acc="high")
    assert "acc" not in search.history[-1]
    with pytest.raises(ValueError, match=r"report\(\): \['round', 'steps'\] are the search's own records"):
        search.report(round=99, steps=7, acc=0.5)
    assert search.history[-1] == {"round": 0, "sparsity": 0.0}
    with pytest.raises(TypeError, match="close\\(\\) takes copies of the model \\(nn.Module\\), got dict"):
        search.close({})
    assert search.in_round and opt._optimizer_step_post_hooks  # nothing came off
    with pytest.warns(UserWarning, match="round 0 took no optimizer step"):
        search.finish_round()
    with pytest.raises(RuntimeError, match=r"report\(\): no round is running"):
        search.report(acc=0.5)  # round 0's log line is out already
    assert "acc" not in search.history[0]


def test_a_round_without_steps_warns_at_the_loop_naming_the_optimizer_given_to_apply():
    """A loop stepping an optimizer apply() never saw is warned about, at the loop's own line, with
    no rewind point a search without one does not have; the last round's warning names the ticket."""
    model, opt, sched, search = make_search("lrr", rounds=1)
    other = torch.optim.SGD(model.parameters(), lr=0.05)  # the loop steps another optimizer
    with pytest.warns(UserWarning, match="took no optimizer step") as got:
        for r in search:
            train(model, other, search)
    texts = [str(w.message) for w in got]
    assert [w.filename for w in got] == [__file__] * 2  # the loop, not signmask's source
    assert all("SGD, the optimizer given to apply()" in t and "pass that one to apply()" in t for t in texts)
    assert not any("rewind" in t for t in texts)
    assert "pruning ranks untrained weights" in texts[0] and "ticket" in texts[1]
    model, opt, sched, search = make_search("imp", rewind="2it", rounds=1)
    search.start_round()
    train(model, opt, search, steps=3)
    search.finish_round()
    search.start_round()  # a loop resuming at the rewind step (2) that ends there takes no step
    with pytest.warns(UserWarning, match=r"round 1 .*the rewind point \(step 2\)") as got:
        search.finish_round()
    assert [w.filename for w in got] == [__file__]


def test_rates_a_scheduler_made_after_apply_moved_warn_once_at_the_first_step():
    # A warm-up scheduler made after apply() (not given to it) set round 0's first rate; each
    # restart returned to the rate apply() saw, so rounds 1 on silently began 10x higher, with no
    # warm-up. Warned once, at the loop's line; made before apply() and passed, it is not.
    def run(late):
        torch.manual_seed(0)
        net = tiny()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = None if late else torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2)
        search = signmask.apply(net, "lrr", 0.5, optimizer=opt, scheduler=sched, rounds=2, progress=False)
        if late:
            sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2)
        firsts = []
        for _ in search:
            firsts.append(opt.param_groups[0]["lr"])
            train(net, opt, search, sched, steps=2)
        return firsts

    with pytest.warns(UserWarning, match="learning rates moved between apply") as got:
        firsts = run(late=True)
    assert firsts == pytest.approx([0.01, 0.1, 0.1])
    moved = [w for w in got if "learning rates moved" in str(w.message)]
    assert len(moved) == 1 and moved[0].filename == __file__
    assert "([0.1] at apply(), [0.01] now)" in str(moved[0].message)
    assert "make the scheduler before apply() and pass it (scheduler=)" in str(moved[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(late=False) == pytest.approx([0.01, 0.01, 0.01])


def test_rates_the_given_scheduler_moved_before_the_first_step_do_not_warn():
    # A scheduler given to apply() and stepped before the round's first optimizer step (a loop
    # stepping it at the top of each epoch) moved the rates, but every restart replays that: the
    # rounds begin alike, and a warning would be a false alarm.
    torch.manual_seed(0)
    net = tiny()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2)
    search = signmask.apply(net, "lrr", 0.5, optimizer=opt, scheduler=sched, rounds=2, progress=False)
    firsts = []
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in search:
            sched.step()
            firsts.append(opt.param_groups[0]["lr"])
            train(net, opt, search, steps=2)
    assert firsts == pytest.approx([0.055, 0.055, 0.055])
    assert not [w for w in got if "learning rates moved" in str(w.message)]


@pytest.mark.parametrize("wrap", ["Lookahead", "lookahead_sgd"])
def test_rates_moved_warn_at_the_loop_line_under_timm_lookahead(wrap):
    # timm's Lookahead steps the optimizer given to apply() from its own step(): the warning
    # pointed into timm's lookahead.py, not at the loop's `lookahead.step()`. The late scheduler
    # is made on the Lookahead, so torch's scheduler wrapper sits around timm's frame too.
    from signmask._compat import import_timm

    import_timm()  # after signmask: the frames skipped are those of the modules imported when it warns
    from timm.optim import Lookahead, create_optimizer_v2

    torch.manual_seed(0)
    net = tiny()
    if wrap == "Lookahead":
        lookahead = Lookahead(torch.optim.SGD(net.parameters(), lr=0.1), k=2)
    else:
        lookahead = create_optimizer_v2(net, "lookahead_sgd", lr=0.1, weight_decay=0.0)
    base = lookahead._base_optimizer
    search = signmask.apply(net, "lrr", 0.5, optimizer=base, rounds=1, progress=False)
    sched = torch.optim.lr_scheduler.LinearLR(lookahead, 0.1, total_iters=2)
    with pytest.warns(UserWarning, match="learning rates moved between apply") as got:
        for _ in search:
            train(net, lookahead, search, sched, steps=2)
    moved = [w for w in got if "learning rates moved" in str(w.message)]
    assert len(moved) == 1
    lines, first = inspect.getsourcelines(train)
    step_line = first + next(i for i, line in enumerate(lines) if "opt.step()" in line)
    assert (moved[0].filename, moved[0].lineno) == (__file__, step_line)


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")
def test_rates_moved_beside_a_timm_plateau_scheduler_warn():
    # The restart snapshot of timm's PlateauLRScheduler holds more than its state_dict (the
    # plateau counts): compared with its bare state_dict, it looked stepped, and the warning
    # never came for rates something else moved.
    torch.manual_seed(0)
    net = tiny()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = timm_plateau(opt, decay_rate=0.5, patience_t=0, mode="min")
    search = signmask.apply(net, "lrr", 0.5, optimizer=opt, scheduler=sched, rounds=1, progress=False)
    for group in opt.param_groups:
        group["lr"] = 0.02  # set by hand after apply: not restarted
    with pytest.warns(UserWarning, match=r"learning rates moved between apply\(\) and the first"):
        for _ in search:
            train(net, opt, search, steps=1)


def test_a_skipped_computed_weight_warns_once_at_apply_and_not_each_round():
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.utils.spectral_norm(torch.nn.Linear(108, 8)), torch.nn.BatchNorm1d(8),
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 5),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="computed") as caught:
        search = signmask.apply(model, "lrr", 0.6, optimizer=opt, rounds=2, progress=False)
        for _ in search:
            train(model, opt, search)
    assert sum("computed" in str(w.message) for w in caught) == 1
    assert search.done and not hasattr(model[1], "weight_mask")
    assert int(model[3].weight_mask.sum()) < 64  # the search did prune


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def _step(model, opt, n=1):
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()


def test_a_search_state_dict_is_a_snapshot_not_a_view_of_the_masks():
    model, opt, _, search = make_search("imp")
    search.start_round()
    _step(model, opt, 2)
    state = search.state_dict()
    before = {k: v.clone() for k, v in state["masks"].items()}
    search.finish_round()  # prunes
    assert all(torch.equal(state["masks"][k], before[k]) for k in before)


def test_a_search_resumed_mid_round_uses_the_saved_interpolation_coefficient():
    model, opt, _, search = make_search("aws")
    search.start_round()
    torch.manual_seed(1)
    _step(model, opt, 3)
    state, weights = search.state_dict(), model.state_dict()
    x = torch.randn(4, 3, 6, 6)
    want = model(x)
    model2, _, _, search2 = make_search("aws", seed=99)
    search2.load_state_dict(state)
    model2.load_state_dict(weights)
    assert torch.equal(model2(x), want)


def test_len_of_a_search_counts_only_the_steps_that_prune():
    lin = nn.Linear(2, 5)  # 10 weights: 10 * 0.95 ** i repeats counts, steps are dropped
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    search = signmask.apply(lin, "imp", 0.5, optimizer=opt, rate=0.05, progress=False)
    assert len(search) == 6  # kept [9, 8, 7, 6, 5]
    for _ in search:
        opt.zero_grad()
        lin(torch.randn(3, 2)).sum().backward()
        opt.step()
    assert search.ticket.sparsity == 0.5


def test_report_refuses_bools_and_the_sparsity_record():
    # S02 (bool accepted as a number), S16 ("sparsity" not protected)
    model, opt, _, search = make_search("lrr")
    search.start_round()
    with pytest.raises(TypeError, match="metric 'ok' must be a real number or a one-element real tensor, got bool True"):
        search.report(ok=True)
    with pytest.raises(ValueError, match=r"\['sparsity'\] are the search's own records"):
        search.report(sparsity=0.5)
    assert search.history[-1] == {"round": 0, "sparsity": 0.0}


def test_report_takes_one_element_tensors_as_their_numbers_and_refuses_others_keeping_none():
    model, opt, _, search = make_search("lrr")
    search.start_round()
    w = torch.tensor(3.0, requires_grad=True)
    loss = w * 0.5  # a loss as it comes out of a step: 0-d, with a graph
    search.report(loss=loss, acc=torch.tensor([0.25], dtype=torch.float64), n=torch.tensor(7))
    h = search.history[-1]
    assert h == {"round": 0, "sparsity": 0.0, "loss": 1.5, "acc": 0.25, "n": 7.0}
    assert [type(h[k]) for k in ("loss", "acc", "n")] == [float, float, float]
    for bad, shown in ((torch.ones(2), r"a tensor of shape \(2,\) and dtype torch.float32"),
                       (torch.tensor(True), "a tensor of shape \\(\\) and dtype torch.bool"),
                       (torch.tensor(1 + 2j), "a tensor of shape \\(\\) and dtype torch.complex64")):
        with pytest.raises(TypeError, match=f"metric 'bad' must be a real number or a one-element real tensor, got {shown}"):
            search.report(ok=0.5, bad=bad)
    assert "ok" not in search.history[-1]  # nothing kept from a refused call


def test_report_stores_plain_floats_so_the_history_is_json():
    # S03: numpy / Fraction metrics are stored as float
    model, opt, _, search = make_search("lrr")
    search.start_round()
    search.report(acc=np.float32(0.5), loss=Fraction(1, 4), n=3)
    h = search.history[-1]
    assert [type(h[k]) for k in ("acc", "loss", "n")] == [float, float, float]
    assert json.loads(json.dumps(search.history))[-1] == {"round": 0, "sparsity": 0.0, "acc": 0.5, "loss": 0.25, "n": 3.0}


def test_a_parameter_group_added_in_the_last_round_does_not_block_the_ticket():
    # S04: the restart check applies only before a pruning step, not after the last round
    model, opt, _, search = make_search("lrr", rounds=1)
    search.start_round()
    _step(model, opt)
    search.finish_round()
    search.start_round()
    _step(model, opt)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    search.finish_round()
    assert search.done and search.ticket.sparsity == pytest.approx(0.6, abs=0.01)


def test_search_state_dict_history_is_a_copy():
    # S07: a state taken mid-round must not change with later reports
    model, opt, _, search = make_search("lrr")
    search.start_round()
    _step(model, opt)
    state = search.state_dict()
    search.report(acc=0.5)
    assert state["history"] == [{"round": 0, "sparsity": 0.0}]


def test_load_state_dict_does_not_alias_the_callers_history():
    # S08: loading then reporting must leave the loaded state as it was
    model, opt, _, search = make_search("lrr")
    search.start_round()
    _step(model, opt)
    state = search.state_dict()
    model2, opt2, _, search2 = make_search("lrr")
    search2.load_state_dict(state)
    search2.report(acc=0.5)
    assert state["history"] == [{"round": 0, "sparsity": 0.0}]
    assert search2.history[-1]["acc"] == 0.5


def test_a_search_resumed_mid_round_reopens_its_progress_bar_at_the_round_step(capsys):
    # S10 (bar not reopened after load_state_dict: no log line), S11 (bar restarts at 0)
    model, opt, _, search = make_search("lrr", steps_per_round=4)
    search.start_round()
    _step(model, opt, 3)
    state = search.state_dict()
    model2, opt2, _, search2 = make_search("lrr", progress=True, steps_per_round=4)
    search2.load_state_dict(state)
    assert search2._bar.bar is not None and search2._bar.bar.n == 3
    _step(model2, opt2)
    search2.finish_round()
    assert "lrr round 0: sparsity 0.00%, 4 steps" in capsys.readouterr().out


def test_progress_bar_advances_once_per_optimizer_step():
    # S13: the bar is updated after every step
    model, opt, _, search = make_search("lrr", progress=True, steps_per_round=5)
    search.start_round()
    _step(model, opt, 3)
    assert search._bar.bar.n == 3
    search.close()


@pytest.mark.parametrize("progress, rank, counts", [(False, 0, 1), (True, 1, 1), (True, 0, 2)])
def test_a_round_without_a_bar_counts_its_masks_once(monkeypatch, progress, rank, counts):
    # The bar's description reads the sparsity (every mask counted, a device sync per tensor on
    # CUDA): only where a bar is shown, as before the bar had a class of its own.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    model, opt, _, search = make_search("lrr", progress=progress)
    kept = []
    real = type(search)._kept
    monkeypatch.setattr(type(search), "_kept", lambda self: kept.append(1) or real(self))
    search.start_round()  # the history records the sparsity; a bar's description reads it again
    assert len(kept) == counts
    search.close()


def test_a_round_of_one_step_does_not_warn():
    # S12: only a round without any optimizer step warns
    model, opt, _, search = make_search("lrr")
    search.start_round()
    _step(model, opt, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.finish_round()


def test_a_ddp_rank_takes_rank_0s_masks_and_its_weights_follow_before_a_forward(monkeypatch):
    # One process standing in for rank 1: the broadcast delivers rank 0's (different) masks.
    def broadcast(tensor, src):
        tensor.copy_((torch.arange(tensor.numel()) % 3 == 0).view_as(tensor))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    model, opt, _, search = make_search("lrr")
    search.start_round()
    _step(model, opt, 2)
    search.finish_round()
    for layer in (model.conv1, model.conv2):
        rank0 = (torch.arange(layer.weight_mask.numel()) % 3 == 0).view_as(layer.weight_mask)
        assert torch.equal(layer.weight_mask, rank0)
        assert torch.equal(layer.weight, layer.weight_orig * rank0)


def test_a_rewind_to_round_0s_last_step_restarts_from_the_schedule_after_it():
    # The per-step scheduler steps after round 0's last optimizer step: only finish_round sees it.
    model, opt, sched, search = make_search("imp", rewind=f"{STEPS}it")
    search.start_round()
    train(model, opt, search, sched)
    search.finish_round()
    assert (sched.last_epoch, opt.param_groups[0]["lr"]) == (STEPS, 0.05 * 0.5 ** (STEPS // 2))


def test_omp_rewinds_to_init_and_prunes_the_classifier_by_default():
    model, opt, sched, search = make_search("omp")
    init = weights(model)
    search.start_round()
    train(model, opt, search, sched)
    search.finish_round()
    now = weights(model)
    assert all(torch.equal(now[k], init[k]) for k in init)
    assert hasattr(model.fc, "weight_mask") and search.config.classifier is True


def test_a_recipe_needs_a_non_empty_string_name():
    for name in ("", None, 3):
        with pytest.raises(ValueError, match="a recipe needs a non-empty str name"):
            _recipes.Recipe(name, rewind=None)


@pytest.mark.parametrize("edit", ["extra key", "reshaped"])
def test_a_saved_rewind_snapshot_that_does_not_fit_the_model_is_refused_untouched(edit):
    model, opt, sched, search = make_search("imp")
    state = search.state_dict()
    rewind = dict(state["rewind_weights"])
    if edit == "extra key":
        rewind["conv3.weight"] = torch.zeros(1)
    else:
        rewind["bn1.weight"] = torch.zeros(7)
    state["rewind_weights"] = rewind
    fresh_model, _, _, fresh = make_search("imp", seed=3)
    before = snapshot(fresh_model)
    with pytest.raises(ValueError, match="the saved rewind snapshot does not match the model"):
        fresh.load_state_dict(state)
    assert_same(before, snapshot(fresh_model))
    assert (fresh.round, fresh.step, fresh.history) == (0, 0, [])


def test_resuming_a_finished_search_releases_the_optimizer_and_the_norms():
    model, opt, sched, search = make_search("aws", rounds=1)
    for _ in search:
        train(model, opt, search, sched)
    model2, opt2, _, search2 = make_search("aws", seed=3, rounds=1)
    search2.load_state_dict(search.state_dict())
    assert search2.done and search2.ticket == search.ticket
    assert not _interpolate.interpolated(model2)
    _step(model2, opt2)  # fine-tuning on after the search: its step hooks are gone


def test_a_round_without_steps_warns_on_rank_0_only(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: None)
    model, opt, _, search = make_search("lrr")
    search.start_round()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.finish_round()


def test_the_ticket_records_the_search_seed_and_empty_rate_and_rewind_for_lrr():
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    search = signmask.apply(model, "lrr", 0.6, optimizer=opt, seed=7, rounds=1, progress=False)
    for _ in search:
        train(model, opt, search)
    meta = search.ticket.metadata
    assert (meta["seed"], meta["rate"], meta["rewind"], meta["rounds"]) == ("7", "", "", "1")


def _imp_with_averaging(backend, ema):
    """An IMP search (rewind to step 2, masks shrinking each round) with an AveragedModel made
    after apply, updated after every step; the averages the test computes from the effective
    weights (a dense network's), by swa_utils' own averaging functions."""
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    search = signmask.apply(model, "imp", 0.6, optimizer=opt, rewind="2it", progress=False)
    if backend == "projection":
        signmask.set_backend(model, backend, optimizer=opt)
    swa = torch.optim.swa_utils
    fn = swa.get_ema_multi_avg_fn(0.8) if ema else None
    avg = swa.AveragedModel(model, multi_avg_fn=fn)  # SWA: its default, tensor by tensor on CPU
    gen = torch.Generator().manual_seed(3)
    dense = None
    for _ in search:
        for _ in range(4):
            x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            avg.update_parameters(model)
            now = effective_weights(model)
            if dense is None:
                dense = [w.clone() for w in now]
            elif ema:  # swa_utils' own functions, on the dense network's weights
                fn(dense, now, None)
            else:
                for d, w in zip(dense, now):
                    d.copy_(swa.get_swa_avg_fn()(d, w, avg.n_averaged - 1))
    swa.update_bn([torch.randn(8, 3, 6, 6, generator=gen)], avg)
    return search, avg, dense


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_an_averaged_model_follows_the_search_masks_and_averages_the_masked_weights(backend, ema):
    # swa_utils.AveragedModel (use_buffers=False, its default) copies the masks from the model at
    # each update: through every round's pruning and rewind its network is the average of the
    # weights under the search's current mask, and its ticket has the search's masks.
    search, avg, dense = _imp_with_averaging(backend, ema)
    masks = [m.weight_mask for m in avg.module.modules() if hasattr(m, "weight_mask")]
    for got, want, mask in zip(effective_weights(avg.module), dense, masks):
        assert torch.equal(got, want * mask)
    ticket = signmask.extract(avg)  # AveragedModel's "module." prefix is stripped, as DDP's
    assert ticket.masks.keys() == search.ticket.masks.keys()
    for key, signed in ticket.masks.items():
        assert torch.equal(signed != 0, search.ticket.masks[key] != 0)


def _imp_with_a_grad_scaler(backend, skip):
    """An IMP search rewinding to step 2 under a CPU GradScaler; in round 0's second iteration
    an inf gradient makes the scaler skip the step (``skip``), or the loop takes none."""
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    search = signmask.apply(model, "imp", 0.6, optimizer=opt, rewind="2it", progress=False)
    if backend == "projection":
        signmask.set_backend(model, backend, optimizer=opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1000)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(5)]
    steps = []
    for r in search:
        for i, (x, y) in enumerate(data[search.start_step:] if r else data):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if (r, i) == (0, 1):
                if not skip:
                    continue
                model.fc.bias.grad = torch.full_like(model.fc.bias.grad, float("inf"))
            scaler.step(opt)
            scaler.update(16.0)  # the scale the run without the skip keeps
        steps.append((search.step, search.start_step))
    return search.ticket, effective_weights(model), steps


@pytest.mark.parametrize("backend", ["torch", "projection"])
def test_a_step_the_grad_scaler_skips_is_no_step_of_the_search(backend):
    # README: steps are counted through the optimizer's hooks, so a step GradScaler skips for inf
    # gradients is not counted and the rewind to step k takes the k-th update. The oracle: the
    # same loop taking no step there (the forward ran in both: the same BatchNorm statistics).
    ticket, weights, steps = _imp_with_a_grad_scaler(backend, skip=True)
    want_ticket, want_weights, want_steps = _imp_with_a_grad_scaler(backend, skip=False)
    assert steps == want_steps and steps[0] == (4, 0)
    assert ticket.masks.keys() == want_ticket.masks.keys()
    assert all(torch.equal(ticket.masks[k], want_ticket.masks[k]) for k in ticket.masks)
    assert all(torch.equal(a, b) for a, b in zip(weights, want_weights))


def test_searches_run_in_threads_at_once_match_the_same_searches_one_after_the_other(monkeypatch):
    # A sweep with one search per thread (a thread pool over seeds): each search's step hooks,
    # AWS generator and interpolation, rewinds and restarts must be its own, and the masked
    # products share only the process's kept buffers (here every tensor goes through them).
    monkeypatch.setattr(_maskmul, "SMALL", 7)
    monkeypatch.setattr(_maskmul, "CHUNK", 7)

    def setup(method, seed, backend):
        model = tiny(seed)  # in the main thread: the init draws from the global generator
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
        gen = torch.Generator().manual_seed(seed)
        batches = [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(STEPS)]

        def search():
            rewind = {"rewind": "1it"} if method == "imp" else {}
            found = signmask.apply(model, method, 0.6, optimizer=opt, scheduler=sched, seed=seed, progress=False, **rewind)
            signmask.set_backend(model, backend, optimizer=opt)
            for _ in found:
                for x, y in batches:
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    sched.step()
            return found.ticket, {k: v.clone() for k, v in model.state_dict().items()}

        return search

    configs = [("aws", 0, "torch"), ("imp", 1, "projection"), ("aws", 2, "projection"), ("lrr", 3, "torch")]
    alone = [setup(*c)() for c in configs]
    together = in_threads([setup(*c) for c in configs])
    for (ticket, state), (ticket2, state2) in zip(alone, together):
        for mine, theirs in ((ticket.masks, ticket2.masks), (ticket.signs, ticket2.signs), (ticket.norms, ticket2.norms), (state, state2)):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)



def test_an_imp_rewind_restores_reduce_on_plateaus_patience_count_at_the_rewind_step():
    # After step 2 one epoch is bad (the count the rewind must restore); round 0 ends with none,
    # so a kept count would reduce one step late. Oracle: one run of a fresh optimizer and
    # scheduler on the same metrics, read from the rewind step on.
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97]

    def fresh():
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "max", factor=0.5, patience=1)

    def lrs(opt, sched, start):
        seen = []
        for t in range(start, len(metrics)):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step(metrics[t])
        return seen

    model = tiny(0)
    oracle = lrs(*fresh(), 0)
    opt, sched = fresh()
    search = signmask.apply(model, "imp", 0.5, optimizer=opt, scheduler=sched, rewind="2it", rounds=1,
                            progress=False)
    rounds = [lrs(opt, sched, search.start_step) for _ in search]
    assert oracle == [0.1, 0.1, 0.1, 0.05, 0.05]
    assert rounds == [oracle, oracle[2:]]


def _double_tiny():
    """TinyNet in float64, its norms off the constants 1 and 0: AWS pulls them to these values."""
    model = tiny(0).double()
    with torch.no_grad():
        for key in TINY_NORMS:
            model.get_parameter(key).uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(key)))
    return model


def _plain_search(method, rewind_k, sparsity, aws_seed=0):
    """The float64 oracle of a whole search, written from the README and the papers alone: a
    plain TinyNet (no hooks) trained through ``functional_call`` with ``w * mask`` weights and,
    for AWS, norm parameters ``a * init + (1 - a) * trained`` (one ``a`` drawn at each round's
    start and after every step); global magnitude pruning of the alive weights to
    ``round(N * 0.8 ** i)`` (the last to ``round(N * (1 - sparsity))``); IMP/OMP load the whole
    state_dict of step ``rewind_k``; every round restarts the optimizer and the StepLR schedule
    (from step ``rewind_k`` where there is one). Returns per round the state_dict the round ended
    with and the masks after its pruning, and the final model and masks."""
    model = _double_tiny()
    heads = method in ("imp", "omp")  # the classifier's default
    targets = [n for n in ("conv1.weight", "conv2.weight", "fc.weight") if heads or n != "fc.weight"]
    total = sum(model.get_parameter(t).numel() for t in targets)
    final = round(total * (1 - sparsity))
    steps = [] if method == "omp" else [round(total * 0.8**i) for i in range(1, 99) if 0.8**i > 1 - sparsity]
    kept = sorted(set(steps + [final]), reverse=True)  # a count rounding repeats is dropped
    masks = {t: torch.ones_like(model.get_parameter(t), dtype=torch.bool) for t in targets}
    init = {k: model.get_parameter(k).detach().clone() for k in TINY_NORMS}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    restart = (copy.deepcopy(opt.state_dict()["param_groups"]), sched.state_dict())
    rewind = copy.deepcopy(model.state_dict()) if rewind_k == 0 else None
    gen, rounds, step = torch.Generator().manual_seed(aws_seed), [], 0
    for r in range(len(kept) + 1):
        start = rewind_k if r and rewind_k else 0
        a = float(torch.rand((), generator=gen))
        for i in range(start, STEPS):
            params = dict(model.named_parameters())
            params.update({t: params[t] * masks[t] for t in targets})
            if method == "aws":
                params.update({k: a * init[k] + (1 - a) * params[k] for k in init})
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(torch.func.functional_call(model, params, (x.double(),)), y).backward()
            opt.step()
            sched.step()
            a, step = float(torch.rand((), generator=gen)), step + 1
            if step == rewind_k:
                rewind = copy.deepcopy(model.state_dict())
                restart = (copy.deepcopy(opt.state_dict()["param_groups"]), sched.state_dict())
        ended = copy.deepcopy(model.state_dict())
        if r < len(kept):
            alive = torch.cat([model.get_parameter(t).detach().abs()[masks[t]] for t in targets])
            threshold = alive.sort(descending=True).values[kept[r] - 1]
            masks = {t: masks[t] & (model.get_parameter(t).detach().abs() >= threshold) for t in targets}
            if rewind is not None:
                model.load_state_dict(rewind)
            opt.load_state_dict({"state": {}, "param_groups": copy.deepcopy(restart[0])})
            sched.load_state_dict(restart[1])
        rounds.append((ended, dict(masks)))
    return rounds, model, masks, total


@pytest.mark.parametrize("method, rewind, rewind_k, sparsity", [
    ("lrr", "default", None, 0.6), ("aws", "default", None, 0.6), ("imp", "init", 0, 0.6),
    ("imp", "3it", 3, 0.6), ("omp", 2, 2, 0.9),
])
def test_a_search_trains_and_prunes_as_a_plain_float64_loop_does(method, rewind, rewind_k, sparsity):
    # Every round of apply() against an independent loop on a hook-free network: the masks after
    # each pruning exactly, the weights each round ends with up to float64 rounding (the masked
    # products, AWS's interpolated norms and their gradients, rewinds, optimizer and schedule
    # restarts), and the ticket: sign(theta_T * M_T), bias and dense head signs, trained norms.
    rounds, plain, plain_masks, total = _plain_search(method, rewind_k, sparsity)
    model = _double_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    search = signmask.apply(model, method, sparsity, optimizer=opt, scheduler=sched, rewind=rewind,
                            progress=False)
    assert len(search) == len(rounds)
    for r in search:
        assert search.start_step == ((rewind_k or 0) if r else 0)
        if r:  # the masks of the pruning after the last round, and its exact sparsity
            want_masks = rounds[r - 1][1]
            assert all(torch.equal(model.get_buffer(k + "_mask"), m) for k, m in want_masks.items()), r
            kept = sum(int(m.sum()) for m in want_masks.values())
            assert search.history[-1]["sparsity"] == search.sparsity == 1 - kept / total
        for i in range(search.start_step, STEPS):
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            opt.step()
            sched.step()
        sd, before = model.state_dict(), rounds[r - 1][1] if r else {}
        for key, value in rounds[r][0].items():
            got = sd.get(key, sd.get(key + "_orig"))
            if key + "_mask" in sd:  # the network trained under the masks the round started with
                got, value = got * sd[key + "_mask"], value * before.get(key, True)
            assert torch.allclose(got, value, rtol=0, atol=1e-12), f"round {r}: {key}"
    ticket, final = search.ticket, plain.state_dict()
    sign = {k: (1 - 2 * torch.signbit(v).to(torch.int8)) for k, v in final.items()}  # README: the sign bit
    assert ticket.masks.keys() == plain_masks.keys()
    for key, mask in plain_masks.items():
        assert torch.equal(ticket.masks[key], sign[key] * mask), key
    heads = [] if "fc.weight" in plain_masks else ["fc.weight"]
    assert sorted(ticket.signs) == sorted(["conv2.bias", "fc.bias"] + heads)
    for key, signs in ticket.signs.items():
        assert torch.equal(signs, sign[key]), key
    assert ticket.norms.keys() == set(TINY_NORMS)
    for key in TINY_NORMS:
        assert torch.allclose(ticket.norms[key], final[key], rtol=0, atol=1e-12), key


def _in_round(method, finished, backend="torch", **kw):
    """A TinyNet search (one pruning) on ``backend`` with ``finished`` rounds run two steps each,
    and the next one started and stepped twice (with its scheduler); all four."""
    model, opt, sched, search = make_search(method, 0.5, rounds=1, **kw)
    if backend == "projection":
        signmask.set_backend(model, "projection", optimizer=opt)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for finish in [True] * finished + [False]:
        search.start_round()
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            sched.step()
        search.report(loss=1.0)
        if finish:
            search.finish_round()
    return model, search, opt, sched


@pytest.mark.parametrize("method, finished, backend, kw", [
    ("imp", 0, "torch", {}), ("imp", 0, "torch", {"rewind": "1it"}), ("aws", 0, "torch", {}),
    ("aws", 1, "torch", {}), ("lrr", 0, "projection", {}),
])
def test_a_failure_at_any_torch_call_leaves_the_round_unfinished_and_everything_as_it_was(method, finished, backend, kw):
    # A failure after the pruning (out of memory, Ctrl-C) left the round pruned but not rewound,
    # or rewound with the optimizer's momentum and the scheduler not restarted, its record
    # holding its steps: a second call pruned again.
    from _util import assert_each_fault_leaves_it_untouched, outside

    def rest(model, search, opt, sched):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        return [outside(model, opt), search.state_dict(), len(search._hooks), groups, sched.state_dict(),
                opt.state is search.optimizer.state]

    assert_each_fault_leaves_it_untouched(lambda: _in_round(method, finished, backend, **kw),
                                          lambda model, search, opt, sched: search.finish_round(), rest=rest)


@pytest.mark.parametrize("method", ["aws", "imp"])
def test_a_failure_at_any_torch_call_leaves_the_next_round_unstarted(method):
    # The round was marked running before its record's sparsity was read and AWS's `a` drawn:
    # a failure there (out of memory, Ctrl-C) left it running, and start_round() refused.
    from _util import assert_each_fault_leaves_it_untouched, outside

    def between():
        model, search, opt, sched = _in_round(method, 0)
        search.finish_round()
        return model, search, opt, sched

    def rest(model, search, opt, sched):
        return [outside(model, opt), search.state_dict(), len(search._hooks), sched.state_dict()]

    assert_each_fault_leaves_it_untouched(between, lambda model, search, opt, sched: search.start_round(), rest=rest)


def test_a_ctrl_c_right_after_the_pruning_leaves_the_masks_as_they_were():
    # The pruning handed its masks' flips to the round end only after its try: a Ctrl-C between
    # the two left the masks pruned, the round running, and a second call pruned again.
    import inspect
    import sys

    from signmask import _prune

    lines, first = inspect.getsourcelines(_prune.prune_targets)
    after_try = first + max(i for i, line in enumerate(lines) if line.strip() == "raise") + 1
    code = _prune.prune_targets.__code__

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno >= after_try:
                raise KeyboardInterrupt
            return local
        return local

    model, search, opt, sched = _in_round("imp", 0)
    masks = {k: b.clone() for k, b in model.named_buffers() if k.endswith("_mask")}
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            search.finish_round()
    finally:
        sys.settrace(None)
    assert search.in_round and search.round == 0
    assert all(torch.equal(b, masks[k]) for k, b in model.named_buffers() if k.endswith("_mask"))
    search.finish_round()
    clean = _in_round("imp", 0)
    clean[1].finish_round()
    assert search.state_dict()["history"] == clean[1].state_dict()["history"]
    assert all(torch.equal(b, dict(clean[0].named_buffers())[k]) for k, b in model.named_buffers())


def test_a_ctrl_c_during_the_rewinds_write_completes_the_round_end(monkeypatch):
    # A Ctrl-C during the rewind's one long copy surfaces as it returns: the weights are
    # rewound then. Rolling the round back would leave them rewound with the round still
    # running, and calling finish_round again would prune the rewound weights (another ticket,
    # silently). The round end is complete instead: the search goes on as if uninterrupted.
    copy = torch._foreach_copy_

    def copy_then_interrupt(*args, **kwargs):
        copy(*args, **kwargs)
        raise KeyboardInterrupt

    def run(interrupt):
        model, opt, sched, search = make_search("imp", rewind="2it")
        while not search.done:
            r = search.start_round()
            train(model, opt, search, sched)
            if r == 1 and interrupt:
                monkeypatch.setattr(torch, "_foreach_copy_", copy_then_interrupt)
                with pytest.raises(KeyboardInterrupt):
                    search.finish_round()
                monkeypatch.setattr(torch, "_foreach_copy_", copy)
                assert (search.round, search.in_round) == (2, False)
            else:
                search.finish_round()
        return search.ticket, search.history

    assert run(True) == run(False)


def test_the_log_line_counts_one_step_in_the_singular():
    from signmask._progress import log_line

    record = {"round": 1, "sparsity": 0.2, "steps": 1, "acc": 0.5}
    assert log_line("lrr", record) == "lrr round 1: sparsity 20.00%, 1 step acc=0.5"
    assert log_line("lrr", {**record, "steps": 2}) == "lrr round 1: sparsity 20.00%, 2 steps acc=0.5"


class _TwoParts(nn.Module):
    """A conv backbone (BatchNorm) and an MLP head (LayerNorm), each with two prunable tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.backbone(x))


def _two_parts_run(method, searched):
    """Two parts trained together by two SGDs, one per part, for 2 prunings to 60% sparsity (IMP
    rewinding to step 2): by a search per part (``searched``), or by a plain loop with stock
    prune's float masks, each part pruned by global magnitude among its alive weights to
    ``round(N * 0.4 ** (i / 2))``, rewound from a state_dict copy, its SGD rebuilt."""
    torch.manual_seed(0)
    model = _TwoParts()
    parts = (model.backbone, model.head)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(4)]

    def sgds():
        return [torch.optim.SGD(p.parameters(), lr=0.05, momentum=0.9) for p in parts]

    def train(opts, start, stop=4):
        for x, y in batches[start:stop]:
            for opt in opts:
                opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for opt in opts:
                opt.step()

    opts = sgds()
    rewind = {"rewind": "2it"} if method == "imp" else {}
    if searched:
        searches = [signmask.apply(p, method, 0.6, optimizer=o, rounds=2, classifier=True, progress=False, **rewind)
                    for p, o in zip(parts, opts)]
        while not searches[0].done:  # a zip of the two would stop before the second's last round end
            for s in searches:
                s.start_round()
            train(opts, searches[0].start_step)
            for s in searches:
                s.finish_round()
        return model, searches
    layers = [[m for m in p.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] for p in parts]
    for m in sum(layers, []):
        torch_prune.identity(m, "weight")
    train(opts, 0, 2)
    saved = [{k: v for k, v in copy.deepcopy(p.state_dict()).items() if not k.endswith("_mask")} for p in parts]
    train(opts, 2)
    for i in (1, 2):
        for part, mods, state in zip(parts, layers, saved):
            masks = [m.weight_mask for m in mods]
            scores = torch.cat([torch.where(m.weight_mask.bool(), m.weight_orig.abs(), -1.0).flatten() for m in mods])
            keep = torch.zeros_like(scores)
            keep[scores.argsort(descending=True, stable=True)[:round(scores.numel() * 0.4 ** (i / 2))]] = 1
            with torch.no_grad():
                for mask, new in zip(masks, keep.split([m.numel() for m in masks])):
                    mask.copy_(new.view_as(mask))
            if method == "imp":
                part.load_state_dict(state, strict=False)
        opts = sgds()
        train(opts, 2 if method == "imp" else 0)
    return model, None


@pytest.mark.parametrize("method", ["lrr", "imp"])
def test_two_searches_on_disjoint_parts_each_prune_rewind_and_restart_their_own_part(method):
    # Documented use: a search per part of one model, each with an SGD over its part only, equals
    # a plain loop pruning, rewinding and restarting each part on its own, bitwise.
    model, searches = _two_parts_run(method, True)
    oracle, _ = _two_parts_run(method, False)
    got, want = model.state_dict(), oracle.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].to(want[k].dtype), want[k]) for k in got)
    for search, part in zip(searches, (model.backbone, model.head)):
        total = sum(m.weight_mask.numel() for m in part.modules() if hasattr(m, "weight_mask"))
        assert kept(part) == round(total * 0.4) and search.ticket.masks.keys() == {"0.weight", "3.weight"}


class _NormsNet(nn.Module):
    """A conv with BatchNorm2d, then a Linear with LayerNorm and a head: the AWS code's two norm
    types, at torch's default init (gamma 1, beta 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(torch.relu(self.ln(self.lin(x))))


def test_aws_a_is_the_aws_codes_alpha_in_its_own_formula_at_every_step():
    # README, "AWS's a": with norms at their default init, a search's training forward is the AWS
    # code's, gamma = alpha + (1 - alpha) * w and beta = (1 - alpha) * b on every BatchNorm2d and
    # LayerNorm, alpha being the search's a (drawn at the round's start and after every step, from
    # torch.Generator().manual_seed(seed)). Oracle: a hook-free float64 copy trained through
    # functional_call with those formulas, written out, not through lerp.
    torch.manual_seed(3)
    model = _NormsNet().double()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    search = signmask.apply(model, "aws", 0.5, optimizer=opt, rounds=1, seed=7, progress=False)
    gen = torch.Generator().manual_seed(7)
    for r in search:
        alpha = float(torch.rand((), generator=gen))
        for i in range(STEPS):
            x, y = batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            opt.step()
            if r:  # one pruning: round 1 trains under the masks the search installed
                continue
            params = dict(plain.named_parameters())
            for norm in ("bn", "ln"):
                w, b = params[norm + ".weight"], params[norm + ".bias"]
                params[norm + ".weight"], params[norm + ".bias"] = alpha + (1 - alpha) * w, (1 - alpha) * b
            plain_opt.zero_grad()
            nn.functional.cross_entropy(torch.func.functional_call(plain, params, (x.double(),)), y).backward()
            plain_opt.step()
            alpha = float(torch.rand((), generator=gen))
        if r == 0:  # the dense round, interpolated as the AWS code's warm-up is
            sd = model.state_dict()
            for key, value in plain.state_dict().items():
                got = sd.get(key, sd.get(key + "_orig"))
                assert torch.allclose(got, value, rtol=0, atol=1e-12), key
