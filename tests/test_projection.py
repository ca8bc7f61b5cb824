"""The projection backend against the torch path: bitwise the same weights through training, checkpoints, copies and hooks."""

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import signmask
from signmask import _backends, _bits, _projection, _projection_ops, _reparam
from _util import backends_of, bits_equal, conv_net, conv_net_batches, effective_weights, orig_grads, projection_hooks, pruned_conv_net


def _train(model, optimizer, batches, clip=None):
    history = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        history.append([g.clone() for g in orig_grads(model)])
        optimizer.step()
    return history


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-3),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.05, fused=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=1e-2, fused=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.05),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.05),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.05),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=1e-3),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.05),
}


def test_projection_compiles_fullgraph():
    model = pruned_conv_net("locked")
    _backends.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    (x, _), = conv_net_batches(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_projection_trains_like_the_reparametrization(opt, signs):
    ref, proj = pruned_conv_net(signs), pruned_conv_net(signs)
    ref_opt, proj_opt = OPTIMIZERS[opt](ref.parameters()), OPTIMIZERS[opt](proj.parameters())
    batches = conv_net_batches(6)
    # A few steps under the torch path first: projection must also take over live state.
    _train(ref, ref_opt, batches[:2], clip=1.0)
    _train(proj, proj_opt, batches[:2], clip=1.0)
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    ref_g = _train(ref, ref_opt, batches[2:], clip=1.0)
    proj_g = _train(proj, proj_opt, batches[2:], clip=1.0)
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)
    for step_a, step_b in zip(ref_g, proj_g):  # clipping saw the same (masked) gradients
        for a, b in zip(step_a, step_b):
            # Locked: projection trains o with w's sign, so its gradients may differ in sign.
            assert torch.equal(a.abs(), b.abs()) if signs else torch.equal(a, b)


def test_projection_locked_reflects_zero_crossings():
    # Large steps make many locked weights cross zero; the trajectories must still agree.
    ref, proj = pruned_conv_net("locked"), pruned_conv_net("locked")
    make = lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9)  # noqa: E731
    ref_opt, proj_opt = make(ref.parameters()), make(proj.parameters())
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    before = [_reparam.original(m, n).detach().clone() for m, n in signmask._targets.pruned(ref).values()]
    batches = conv_net_batches(4)
    _train(ref, ref_opt, batches)
    _train(proj, proj_opt, batches)
    after = [_reparam.original(m, n) for m, n in signmask._targets.pruned(ref).values()]
    crossed = sum(int((torch.signbit(a) != torch.signbit(b)).sum()) for a, b in zip(before, after))
    assert crossed > 0
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)


def test_projection_locked_index_reflection_equals_the_full_odd_state_pass(monkeypatch):
    # CPU reflects at the crossing indices; CUDA re-projects the weight and odd state in full.
    # Both must give the same bits (weights and Adam's first moments).
    runs = []
    for cuda_path in (False, True):
        if cuda_path:
            monkeypatch.setattr(_projection_ops, "reflect",
                                lambda m, n, opt: _projection_ops.project(m, n, opt, odd_only=True))
        model = pruned_conv_net("locked")
        opt = torch.optim.Adam(model.parameters(), lr=0.5)
        _backends.set_backend(model, "projection", optimizer=opt)
        _train(model, opt, conv_net_batches(5))
        origs = [_reparam.original(m, n) for m, n in signmask._targets.pruned(model).values()]
        runs.append([t.detach().clone() for t in origs] + [opt.state[o]["exp_avg"].clone() for o in origs])
    assert all(bits_equal(a, b) for a, b in zip(*runs))


def test_reflect_skips_state_entries_that_are_not_per_weight_tensors():
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    conv = model[0]
    opt.state[conv.weight_orig]["momentum_buffer"] = None  # as SGD without momentum may store
    with torch.no_grad():
        conv.weight_orig.neg_()  # every kept weight now disagrees with its lock
    _projection_ops.reflect(conv, "weight", opt)
    negative = _bits.sign_bits(conv.weight_sign, conv.weight_orig.shape).bool()
    kept = conv.weight_mask
    assert torch.equal(torch.signbit(conv.weight_orig)[kept], negative[kept])


def test_projection_forward_aliases_weight_orig():
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    (x, y), = conv_net_batches(1)
    nn.functional.cross_entropy(model(x), y).backward()
    for module, name in signmask._targets.pruned(model).values():
        orig, mask = _reparam.original(module, name), getattr(module, name + "_mask")
        assert getattr(module, name).data_ptr() == orig.data_ptr()
        assert not orig[~mask].any() and not orig.grad[~mask].any()
        assert name not in module._parameters  # the layout is unchanged
    assert set(model.state_dict()) == set(pruned_conv_net("locked").state_dict())


def test_projection_follows_new_masks_and_edits():
    model = pruned_conv_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _backends.set_backend(model, "projection", optimizer=opt)
    signmask.prune(model, 0.5)  # mask shrinks: weight_orig re-projected on install
    for module, name in signmask._targets.pruned(model).values():
        assert not _reparam.original(module, name)[~getattr(module, name + "_mask")].any()
    with torch.no_grad():
        model[0].weight_orig.fill_(1.0)  # an in-place edit is caught by the version counter
    (x, _), = conv_net_batches(1)
    model(x)
    assert torch.equal(model[0].weight_orig, model[0].weight_mask.float())


@pytest.mark.parametrize("signs", [None, "locked"])
@pytest.mark.parametrize("edit", ["data", "vector_to_parameters", "copy_"])
def test_projection_follows_swapped_storage_and_edits_between_backward_and_step(signs, edit):
    """``weight_orig.data = t`` leaves the version counter alone; an edit after the backward is
    stepped before any forward. Both must train exactly as the torch path does."""
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    batches = conv_net_batches(4)
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        _train(model, opt, batches[:1])
        x, y = batches[1]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        new = torch.linspace(-1, 1, model[0].weight_orig.numel()).view_as(model[0].weight_orig)
        if edit == "data":
            model[0].weight_orig.data = new.clone()
        elif edit == "vector_to_parameters":
            params = list(model.parameters())
            flat = nn.utils.parameters_to_vector(params)
            flat[: new.numel()] = new.flatten()  # the first parameter is conv 0's weight_orig
            nn.utils.vector_to_parameters(flat, params)
        else:
            with torch.no_grad():
                model[0].weight_orig.copy_(new)
        opt.step()  # no forward in between
        _train(model, opt, batches[2:])
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)
    assert not proj[0].weight_orig[~proj[0].weight_mask].any()


def _torch_and_projection(signs):
    """Two equal pruned nets with SGD+momentum: one on the torch path, one on projection."""
    pairs = []
    for backend in ("torch", "projection"):
        model = pruned_conv_net(signs)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        pairs.append((_backends.set_backend(model, backend, optimizer=opt), opt))
    return pairs


@pytest.mark.parametrize("signs", [None, "locked"])
def test_projection_trains_like_the_reparametrization_after_a_new_mask(signs):
    # Momentum built under the old mask must not move the newly pruned weights.
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    batches = conv_net_batches(5)
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        _train(model, opt, batches[:3])
        signmask.prune(model, 0.5)
        _train(model, opt, batches[3:])
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_copy_of_a_projection_model_trains_on_the_torch_path(signs):
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    batches = conv_net_batches(4)
    _train(ref, ref_opt, batches[:2])
    _train(proj, proj_opt, batches[:2])
    twins = [copy.deepcopy(ref), copy.deepcopy(proj), torch.load(_saved(proj), weights_only=False)]
    assert set(backends_of(twins[1]).values()) == {"torch"}
    assert set(backends_of(twins[2]).values()) == {"torch"}
    for twin in twins:  # the copies have no projection hooks: they must mask by themselves
        _train(twin, torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9), batches[2:])
    for a, b, c in zip(*map(effective_weights, twins)):
        assert torch.equal(a, b) and torch.equal(a, c)


def _equal_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(effective_weights(a), effective_weights(b)))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_projection_masks_gradients_assigned_to_grad(signs):
    # torch.autograd.grad then p.grad = g (meta-learning, per-sample or DP pipelines): no
    # backward accumulates into .grad, so only the step pre-hook can mask them.
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    for x, y in conv_net_batches(3):
        for model, opt in ((ref, ref_opt), (proj, proj_opt)):
            params = list(model.parameters())
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
            for param, grad in zip(params, grads):
                param.grad = grad
            opt.step()
    assert _equal_weights(ref, proj)
    assert all(not m.weight_orig[~m.weight_mask].any() for m in proj if hasattr(m, "weight_mask"))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_projection_follows_stock_prune_stacked_on_top(signs):
    # Stock prune registers a new mask tensor (version 0 again): its identity must count.
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    for model in (ref, proj):
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    assert _equal_weights(ref, proj)
    _train(ref, ref_opt, conv_net_batches(3))
    _train(proj, proj_opt, conv_net_batches(3))
    assert _equal_weights(ref, proj)


def _large_steps(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1.0, momentum=0.9)


def _locked_torch_checkpoint():
    """A sign-locked model trained 3 large steps on the torch path (kept ``weight_orig`` entries
    cross zero), its optimizer, the 3 batches left, and copies of both states."""
    ref = pruned_conv_net("locked")
    ref_opt = _large_steps(ref.parameters())
    batches = conv_net_batches(6)
    _train(ref, ref_opt, batches[:3])
    states = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())
    return ref, ref_opt, batches[3:], *states


def _crossed(model) -> int:
    """How many kept weight_orig entries disagree with their sign locks (set_backend reflects them)."""
    return sum(int(((torch.signbit(m.weight_orig) != _bits.sign_bits(m.weight_sign, m.weight_orig.shape).bool())
                    & m.weight_mask).sum()) for m in model if hasattr(m, "weight_mask"))


def _resume_under_projection(proj, proj_opt, checkpoint, model_first: bool) -> None:
    """set_backend(proj, "projection"), then load ``checkpoint`` (model, optimizer states) in
    the order given."""
    model_state, opt_state = checkpoint
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    if model_first:
        proj.load_state_dict(model_state)
        proj_opt.load_state_dict(opt_state)
    else:
        proj_opt.load_state_dict(opt_state)
        proj.load_state_dict(model_state)


@pytest.mark.parametrize("model_first", [True, False])
def test_projection_resumes_a_sign_locked_torch_checkpoint_loaded_after_set_backend(model_first):
    # Large steps: kept weight_orig entries cross zero on the torch path. Loading reflects them
    # onto their locks, and their momentum must be reflected with them, whichever loads first.
    ref, ref_opt, rest, model_state, opt_state = _locked_torch_checkpoint()
    assert _crossed(ref) > 0
    proj = pruned_conv_net("locked")
    proj_opt = _large_steps(proj.parameters())
    _resume_under_projection(proj, proj_opt, (model_state, opt_state), model_first)
    _train(ref, ref_opt, rest)
    _train(proj, proj_opt, rest)
    assert _equal_weights(ref, proj)


@pytest.mark.parametrize("model_first", [True, False])
def test_a_checkpoint_loaded_after_set_backend_drops_the_reflections_set_backend_made(model_first):
    # Rewinding: the run trained on past its checkpoint, switched to projection (reflecting the
    # weights of that moment), then loaded the checkpoint. Those reflections belong to weights
    # the checkpoint replaces: they reached its momentum too (0.28 off after 6 steps).
    ref, ref_opt, rest, model_state, opt_state = _locked_torch_checkpoint()
    proj, proj_opt = copy.deepcopy((ref, ref_opt))
    _train(proj, proj_opt, conv_net_batches(9)[6:])
    assert _crossed(proj) > 0
    _resume_under_projection(proj, proj_opt, (model_state, opt_state), model_first)
    _train(ref, ref_opt, rest)
    _train(proj, proj_opt, rest)
    assert _equal_weights(ref, proj)


def test_loading_the_same_optimizer_state_twice_reflects_it_once_and_leaves_it_alone():
    # load_state_dict keeps the caller's tensors where dtype and device match: the reflection
    # negated the checkpoint's own momentum in place, and a second load flipped it back.
    ref, ref_opt, rest, model_state, opt_state = _locked_torch_checkpoint()
    kept = copy.deepcopy(opt_state)
    proj = pruned_conv_net("locked")
    proj_opt = _large_steps(proj.parameters())
    _resume_under_projection(proj, proj_opt, (model_state, opt_state), model_first=True)
    proj_opt.load_state_dict(opt_state)
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(opt_state["state"].values(), kept["state"].values()))
    _train(ref, ref_opt, rest)
    _train(proj, proj_opt, rest)
    assert _equal_weights(ref, proj)


def test_a_projection_checkpoint_loads_its_momentum_unreflected():
    # Its weights are reflected already: loading it reflects nothing, whatever set_backend
    # reflected in the model it is loaded into.
    a = pruned_conv_net("locked")
    a_opt = _large_steps(a.parameters())
    _backends.set_backend(a, "projection", optimizer=a_opt)
    _train(a, a_opt, conv_net_batches(2))
    model_state, opt_state = copy.deepcopy(a.state_dict()), copy.deepcopy(a_opt.state_dict())
    b = pruned_conv_net("locked")
    with torch.no_grad():
        b[0].weight_orig.neg_()  # disagrees with its locks: set_backend reflects it
    assert _crossed(b) > 0
    b_opt = _large_steps(b.parameters())
    _backends.set_backend(b, "projection", optimizer=b_opt)
    b.load_state_dict(model_state)
    b_opt.load_state_dict(opt_state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(a_opt.state[pa]["momentum_buffer"], b_opt.state[pb]["momentum_buffer"])


@pytest.mark.parametrize("signs", [None, "locked"])
def test_pruning_again_between_backward_and_step_keeps_projection_exact(signs):
    # The forward-time re-projection masked the state, so the step hook trusted it, while the
    # gradient, masked under the old mask, moved the newly pruned weights for good.
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        (x, y), = conv_net_batches(1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        signmask.prune(model, 0.5)
        opt.step()
    assert _equal_weights(ref, proj)
    _train(ref, ref_opt, conv_net_batches(2))
    _train(proj, proj_opt, conv_net_batches(2))
    assert _equal_weights(ref, proj)
    assert all(not m.weight_orig[~m.weight_mask].any() for m in proj if hasattr(m, "weight_mask"))


def test_projection_keeps_tensors_swappable():
    # torch.utils.swap_tensors (.to() and load_state_dict under this future flag) refuses
    # tensors with weak references: the backend keeps none on weight_orig.
    model = pruned_conv_net("locked")
    _backends.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state = copy.deepcopy(model.state_dict())
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state)
        model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert model[0].weight_orig.dtype == torch.float64


def test_weights_edited_in_place_under_a_free_mask_need_no_state_pass(monkeypatch):
    model = pruned_conv_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _backends.set_backend(model, "projection", optimizer=opt)
    _train(model, opt, conv_net_batches(1))
    calls = []
    monkeypatch.setattr(_projection_ops, "_state_products", lambda *a, **k: calls.append(a) or [])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)  # decoupled decay by hand: the next forward re-masks the weights only
    model(conv_net_batches(1)[0][0])
    assert calls == []


def test_a_torch_path_checkpoint_loaded_then_projected_then_its_optimizer_loaded():
    # The natural resume order: model state, set_backend (which reflects the locked weights),
    # then the optimizer's state, whose momentum must be reflected where the weights were.
    ref, ref_opt, rest, model_state, opt_state = _locked_torch_checkpoint()
    proj = signmask.load_state_dict(conv_net(), model_state)
    proj_opt = _large_steps(proj.parameters())
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    proj_opt.load_state_dict(opt_state)
    _train(ref, ref_opt, rest)
    _train(proj, proj_opt, rest)
    assert _equal_weights(ref, proj)


def test_a_compiled_projection_model_sees_a_loaded_checkpoint_at_once():
    # Compiled forwards skip the version-counter check: loading must project by itself.
    ref = pruned_conv_net()
    with torch.no_grad():
        ref[0].weight_orig.add_(1.0)  # pruned entries nonzero in the checkpoint
    proj = pruned_conv_net()
    _backends.set_backend(proj, "projection", optimizer=torch.optim.SGD(proj.parameters(), lr=0.1))
    torch._dynamo.reset()
    compiled = torch.compile(proj, backend="aot_eager")
    (x, _), = conv_net_batches(1)
    compiled(x)
    proj.load_state_dict(ref.state_dict())
    assert torch.equal(compiled(x), ref(x))


def test_projection_serves_torch_func_like_the_torch_path():
    # functional_call's stand-in tensors must not be masked in place; func.grad must work.
    (ref, _), (proj, _) = _torch_and_projection(None)
    (x, y), = conv_net_batches(1)
    given = {k: v.detach().clone() for k, v in ref.named_parameters()}
    before = {k: v.clone() for k, v in given.items()}

    def loss(params, model):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    assert torch.equal(loss(given, proj), loss(given, ref))
    assert all(torch.equal(given[k], before[k]) for k in given)
    g_ref, g_proj = torch.func.grad(loss)(given, ref), torch.func.grad(loss)(given, proj)
    assert all(torch.equal(g_ref[k], g_proj[k]) for k in g_ref)


def test_compiled_projection_serves_functional_call_like_the_torch_path():
    # Under dynamo too, stand-in tensors are not the Parameter the backend keeps projected.
    (ref, _), (proj, _) = _torch_and_projection("locked")
    (x, _), = conv_net_batches(1)
    given = {k: v.detach().clone().add_(0.5) for k, v in ref.named_parameters()}  # pruned entries nonzero
    torch._dynamo.reset()
    call = torch.compile(lambda params: torch.func.functional_call(proj, params, (x,)),
                         backend="aot_eager", fullgraph=True)
    assert torch.equal(call(given), torch.func.functional_call(ref, given, (x,)))
    assert torch.equal(call(dict(proj.named_parameters())), ref(x))  # its own: projected
    torch._dynamo.reset()


@pytest.mark.parametrize("signs", [None, "locked"])
def test_compiled_projection_models_built_alike_share_their_graphs(signs):
    # The forward checked its Parameter by id(), which dynamo guards by that Parameter's own
    # id: each new model (a seed sweep) recompiled the class's forward, and past dynamo's
    # recompile limit (8) ran it eagerly. Oracle: the torch path, which shares them.
    def frames(backend):
        torch._dynamo.reset()
        counter = CompileCounter()
        for seed in range(3):
            model = pruned_conv_net(signs, seed=seed)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            _backends.set_backend(model, backend, optimizer=opt)
            compiled = torch.compile(model, backend=counter)
            (x, y), = conv_net_batches(1, seed=seed)
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            with torch.no_grad():
                compiled(x)
        torch._dynamo.reset()
        return counter.frame_count

    assert frames("projection") == frames("torch")


def test_projection_traces_with_the_trace_check():
    model = pruned_conv_net("locked")
    _backends.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    (x, _), = conv_net_batches(1)
    traced = torch.jit.trace(model, x)  # checks the trace by tracing again without grad
    assert torch.equal(traced(x), model(x))


def _saved(model) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_projection_model_pickles_and_switches_back():
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    _backends.set_backend(model, "projection", optimizer=opt)  # idempotent: one step hook
    hooks = [h for h in opt._optimizer_step_post_hooks.values() if isinstance(h, _projection.ProjectStep)]
    assert len(hooks) == 1
    _train(model, opt, conv_net_batches(2))
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    assert all(torch.equal(a, b) for a, b in zip(effective_weights(model), effective_weights(twin)))
    assert _mask_grad_hooks(model) == len(signmask._targets.pruned(model))
    _backends.set_backend(model, "torch", optimizer=opt)
    assert not any(isinstance(h, _projection.ProjectStep) for h in opt._optimizer_step_post_hooks.values())
    assert _mask_grad_hooks(model) == 0
    _train(model, opt, conv_net_batches(3)[2:])
    assert set(backends_of(model).values()) == {"torch"}
    ref = pruned_conv_net("locked")  # the torch path all along
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), conv_net_batches(3))
    assert all(torch.equal(w, e) for w, e in zip(effective_weights(model), effective_weights(ref)))


def test_a_submodule_leaving_projection_keeps_the_rest_of_the_model_projected():
    # Locked signs and large steps: the convs that stay on projection need their step hook to
    # reflect momentum at zero crossings, or they drift from the reparametrization.
    ref, proj = pruned_conv_net("locked"), pruned_conv_net("locked")
    make = lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9)  # noqa: E731
    ref_opt, proj_opt = make(ref.parameters()), make(proj.parameters())
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    batches = conv_net_batches(6)
    _train(ref, ref_opt, batches[:2])
    _train(proj, proj_opt, batches[:2])
    _backends.set_backend(proj[4], "torch", optimizer=proj_opt)
    served = {(id(m), n) for fn in projection_hooks(proj_opt) for m, n in fn.targets}
    assert served == {(id(proj[0]), "weight"), (id(proj[2]), "weight")}
    assert backends_of(proj) == {"0.weight": "projection", "2.weight": "projection", "4.weight": "torch"}
    _train(ref, ref_opt, batches[2:])
    _train(proj, proj_opt, batches[2:])
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("leave", ["remove", "torch", "another optimizer"])
def test_leaving_projection_unhooks_its_optimizer_without_being_given_it(leave):
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    assert len(projection_hooks(opt)) == 3
    _train(model, opt, conv_net_batches(1))
    if leave == "remove":
        signmask.remove(model)
    elif leave == "torch":
        _backends.set_backend(model, "torch")
    else:
        other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _backends.set_backend(model, "projection", optimizer=other)
        assert len(projection_hooks(other)) == 3
    assert projection_hooks(opt) == []
    assert _mask_grad_hooks(model) == (len(signmask._targets.pruned(model)) if leave == "another optimizer" else 0)


def _mask_grad_hooks(model) -> int:
    return sum(isinstance(fn, _projection.MaskGrad) for p in model.parameters()
               for fn in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("signs", [None, "locked"])
def test_projection_under_activation_checkpointing_trains_as_without_it(signs, reentrant):
    # The recomputing backward runs the pre-hook again (the stamps still match: no projection
    # during the backward) and accumulates the gradients from inside it: each is masked and
    # marked by MaskGrad as it lands. Bitwise the run without checkpointing, equal to the torch path.
    from torch.utils.checkpoint import checkpoint

    (ref, ref_opt), (plain, plain_opt) = _torch_and_projection(signs)
    (_, _), (ckpt, ckpt_opt) = _torch_and_projection(signs)
    for x, y in conv_net_batches(3):
        for model, opt in ((ref, ref_opt), (plain, plain_opt), (ckpt, ckpt_opt)):
            opt.zero_grad(set_to_none=True)
            if model is ckpt:
                h = checkpoint(model[:2], x.clone().requires_grad_(reentrant), use_reentrant=reentrant)
                out = checkpoint(model[2:], h, use_reentrant=reentrant)
            else:
                out = model(x)
            nn.functional.cross_entropy(out, y).backward()
        assert all(g._signmask_masked for g in orig_grads(ckpt))
        assert all(bits_equal(a, b) for a, b in zip(orig_grads(plain), orig_grads(ckpt)))
        for opt in (ref_opt, plain_opt, ckpt_opt):
            opt.step()
        assert all(bits_equal(a, b) for a, b in zip(effective_weights(plain), effective_weights(ckpt)))
        assert all(torch.equal(a, b) for a, b in zip(effective_weights(ref), effective_weights(ckpt)))
    assert _mask_grad_hooks(ckpt) == 3 and len(projection_hooks(ckpt_opt)) == 3


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_model_dropped_on_projection_is_freed(signs):
    # Its MaskGrad hooks sit on its Parameters, where the garbage collector cannot follow them:
    # holding their module strongly made every such model (weights, masks, grads) live forever.
    model = pruned_conv_net(signs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    _train(model, opt, conv_net_batches(1))
    refs = [weakref.ref(t) for t in (model, *model.modules(), *model.parameters(), *model.buffers())]
    del model, opt
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_a_gradient_reaching_a_weight_whose_module_is_gone_is_left_alone():
    # MaskGrad holds its module weakly: once the module is freed, a backward through its
    # weight_orig (kept elsewhere) finds no mask to apply and leaves the gradient as computed.
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    orig = model[0].weight_orig
    assert _mask_grad_hooks(model) == 3
    module = weakref.ref(model[0])
    del model, opt
    gc.collect()
    assert module() is None
    scale = torch.arange(1.0, orig.numel() + 1).view(orig.shape)
    (orig * scale).sum().backward()
    assert torch.equal(orig.grad, scale) and not hasattr(orig.grad, "_signmask_masked")


def test_a_model_dropped_while_its_optimizer_lives_on_is_freed():
    # The step and state-loading hooks sit on the optimizer, which may outlive the model: holding
    # their modules strongly kept every pruned module (masks, signs) alive with it, projected at
    # every step. They hold them weakly, skip those gone and go at the next unhooking.
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    _train(model, opt, conv_net_batches(1))
    refs = [weakref.ref(m) for m in model.modules()] + [weakref.ref(b) for b in model.buffers()]
    del model
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()  # its hooks serve nothing now, and do nothing
    assert all(fn.targets == [] for fn in projection_hooks(opt))
    other = pruned_conv_net(None)  # the same optimizer's next set_backend sweeps them away
    opt.add_param_group({"params": list(other.parameters())})
    _backends.set_backend(other, "projection", optimizer=opt)
    assert {len(fn.targets) for fn in projection_hooks(opt)} == {3}


@pytest.mark.parametrize("signs", [None, "locked"])
def test_remove_after_projection_leaves_plain_parameters(signs):
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection(signs)
    batches = conv_net_batches(4)
    masks = [m.weight_mask.clone() for m in proj if hasattr(m, "weight_mask")]
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        _train(model, opt, batches[:2])
        signmask.remove(model)
    assert _mask_grad_hooks(proj) == 0
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):  # dense training from here on
        _train(model, opt, batches[2:])
    if signs is None:  # locked: the torch path's momentum is of weight_orig, not the weight
        for a, b in zip(ref.parameters(), proj.parameters()):
            assert torch.equal(a, b)
    weights = [m.weight for m in proj if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [bool(w[~m].ne(0).any()) for w, m in zip(weights, masks)] == [True] * len(masks)


def test_projection_warns_for_unknown_optimizers_and_stays_exact():
    class MySGD(torch.optim.SGD):
        pass

    ref, proj = pruned_conv_net(), pruned_conv_net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    proj_opt = MySGD(proj.parameters(), lr=0.2, momentum=0.9)
    with pytest.warns(UserWarning, match="MySGD"):
        _backends.set_backend(proj, "projection", optimizer=proj_opt)
    batches = conv_net_batches(3)
    _train(ref, ref_opt, batches)
    _train(proj, proj_opt, batches)
    assert all(torch.equal(a, b) for a, b in zip(effective_weights(ref), effective_weights(proj)))
    for module, name in signmask._targets.pruned(proj).values():  # state re-masked each step
        buf = proj_opt.state[_reparam.original(module, name)]["momentum_buffer"]
        assert not buf[~getattr(module, name + "_mask")].any()


def test_known_optimizers_raise_no_warning():
    model = pruned_conv_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backends.set_backend(model, "projection", optimizer=torch.optim.AdamW(model.parameters()))


def test_projection_refuses_frozen_tensors_and_foreign_optimizers_before_any_change():
    model = pruned_conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model[0].weight_orig.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="masks 0.weight's gradient .* does not require grad"):
        _backends.set_backend(model, "projection", optimizer=opt)
    model[0].weight_orig.requires_grad_(True)
    other = torch.optim.SGD(model[4].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not train \['0.weight', '2.weight'\]"):
        _backends.set_backend(model, "projection", optimizer=other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(backends_of(model).values()) == {"torch"}
    assert not model[0].weight_orig._post_accumulate_grad_hooks


def test_projection_refuses_an_optimizer_wrapper_without_hooks_before_any_change():
    # timm's Lookahead skips Optimizer.__init__: no state-loading hook registry. attach() used
    # to mask weight_orig and hook gradients before it failed on that, with an AttributeError.
    from signmask._compat import import_timm

    import_timm()  # first: it makes timm importable where torchvision's ops fail to load
    from timm.optim import Lookahead

    model = pruned_conv_net()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Lookahead lacks torch.optim.Optimizer's hook regis"):
        _backends.set_backend(model, "projection", optimizer=opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(backends_of(model).values()) == {"torch"}
    assert not model[0].weight_orig._post_accumulate_grad_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_projection_model_deepcopies_after_in_place_edits():
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    with torch.no_grad():
        model[0].weight_orig.add_(1.0)  # as a loaded checkpoint or a rewind would
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_projection_masks_optimizer_state_loaded_after_set_backend(signs):
    # A checkpoint of a torch-backend run: momentum is non-zero at pruned entries.
    ref = pruned_conv_net(signs)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, weight_decay=0.1)
    batches = conv_net_batches(5)
    _train(ref, ref_opt, batches[:2])
    model = pruned_conv_net(signs)
    model.load_state_dict(ref.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.1)
    _backends.set_backend(model, "projection", optimizer=opt)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # resumed after set_backend
    _train(ref, ref_opt, batches[2:])
    _train(model, opt, batches[2:])
    for a, b in zip(effective_weights(ref), effective_weights(model)):
        assert torch.equal(a, b)


# ---------------------------------- behaviour pinned by mutation testing (each test kills a mutant)


def test_unknown_optimizer_weights_are_reprojected_after_each_step():
    class Shift(torch.optim.Optimizer):  # moves every entry: not zero-preserving
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.1)

    torch.manual_seed(0)
    lin = signmask.prune(nn.Linear(4, 4), 0.5)
    opt = Shift(lin.parameters())
    with pytest.warns(UserWarning, match="Shift"):
        signmask.set_backend(lin, "projection", optimizer=opt)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert (lin.weight_orig[~lin.weight_mask] == 0).all()


def test_projection_reflects_momentum_of_locked_weights_edited_in_place_after_a_step():
    # The edit flips kept weights against their locks; the next forward reflects them, and must
    # reflect their momentum too (with the optimizer it was projected for), as the torch path's
    # |o| does implicitly.
    (ref, ref_opt), (proj, proj_opt) = _torch_and_projection("locked")
    batches = conv_net_batches(4)
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        _train(model, opt, batches[:2])
        with torch.no_grad():
            w = model[0].weight_orig
            w.copy_(torch.linspace(-1, 1, w.numel()).view_as(w))  # after step(), before a forward
        _train(model, opt, batches[2:])
    assert _equal_weights(ref, proj)


def test_a_user_optimizer_class_named_like_a_torch_one_is_not_trusted():
    class SGD(torch.optim.SGD):  # not torch.optim's SGD: its step moves every entry
        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.01)

    model = pruned_conv_net()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"backend='projection' with SGD: signmask knows it exact only"):
        _backends.set_backend(model, "projection", optimizer=opt)
    _train(model, opt, conv_net_batches(2))
    for module, name in signmask._targets.pruned(model).values():  # fully re-projected
        assert not _reparam.original(module, name)[~getattr(module, name + "_mask")].any()


def test_projection_resumes_a_sign_locked_torch_checkpoint_loaded_twice_before_its_optimizer():
    # The second load (of the already reflected values) reflects nothing more; the reflections
    # of the first must still reach the momentum loaded after both.
    ref, ref_opt, rest, model_state, opt_state = _locked_torch_checkpoint()
    proj = pruned_conv_net("locked")
    proj_opt = _large_steps(proj.parameters())
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    proj.load_state_dict(model_state)
    proj.load_state_dict(copy.deepcopy(proj.state_dict()))
    proj_opt.load_state_dict(opt_state)
    _train(ref, ref_opt, rest)
    _train(proj, proj_opt, rest)
    assert _equal_weights(ref, proj)


@pytest.mark.parametrize("leave", ["remove", "torch"])
def test_leaving_projection_removes_its_load_state_dict_hooks_from_the_modules(leave):
    # forget() must leave no Reproject post-hook behind on the pruned modules.
    model = pruned_conv_net()
    _backends.set_backend(model, "projection", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    reprojects = lambda: sum(isinstance(fn, _projection.Reproject)  # noqa: E731
                             for m in model for fn in m._load_state_dict_post_hooks.values())
    assert reprojects() == len(signmask._targets.pruned(model))
    if leave == "remove":
        signmask.remove(model)
    else:
        _backends.set_backend(model, "torch")
    assert reprojects() == 0


def test_a_locked_torch_checkpoint_loaded_between_backward_and_step_reflects_the_gradient():
    # Loading reflects the weights that crossed zero; the pending gradient must be reflected
    # with them, or the step moves them the wrong way (plain SGD: the torch path's trajectory).
    _, _, rest, model_state, _ = _locked_torch_checkpoint()
    ref, proj = pruned_conv_net("locked"), pruned_conv_net("locked")
    ref_opt, proj_opt = torch.optim.SGD(ref.parameters(), lr=1.0), torch.optim.SGD(proj.parameters(), lr=1.0)
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    (x, y), = rest[:1]
    for model, opt in ((ref, ref_opt), (proj, proj_opt)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        model.load_state_dict(model_state)
        opt.step()
    assert _equal_weights(ref, proj)


def test_reloading_its_own_optimizer_state_after_a_step_changes_nothing():
    # The reflections of a torch checkpoint loaded before set_backend concern only the optimizer
    # state of that checkpoint: after a step, a state loaded (here its own) must not be reflected.
    _, _, rest, model_state, _ = _locked_torch_checkpoint()
    models = [signmask.load_state_dict(conv_net(), model_state) for _ in range(2)]
    opts = [_large_steps(m.parameters()) for m in models]
    for model, opt in zip(models, opts):
        _backends.set_backend(model, "projection", optimizer=opt)
        _train(model, opt, rest[:1])
    opts[1].load_state_dict(copy.deepcopy(opts[1].state_dict()))
    for model, opt in zip(models, opts):
        _train(model, opt, rest[1:])
    assert _equal_weights(*models)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_projection_trains_locked_weights_at_zero_like_the_torch_path(opt):
    # ConViT initializes attention's v to the identity: half the kept weights are exact zeros.
    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
        with torch.no_grad():
            net[0].weight.copy_(torch.eye(6))
            net[0].weight[1, 2] = -0.0
        return signmask.prune(net, 0.5, scope="layer", signs="locked")

    ref, proj = model(), model()
    kept_zeros = ref[0].weight_mask & (ref[0].weight_orig == 0)
    assert kept_zeros.sum() >= 6
    ref_opt, proj_opt = OPTIMIZERS[opt](ref.parameters()), OPTIMIZERS[opt](proj.parameters())
    _backends.set_backend(proj, "projection", optimizer=proj_opt)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(4)]
    for m, o in ((ref, ref_opt), (proj, proj_opt)):
        for x, y in batches:
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(effective_weights(ref), effective_weights(proj)):
        assert torch.equal(a, b)
    assert effective_weights(ref)[0][kept_zeros].ne(0).all()  # the kept zeros trained


@pytest.mark.parametrize("ema", [False, True])
def test_an_averaged_model_of_sign_locked_weights_averages_the_effective_weights(ema):
    # README: under projection a locked weight_orig holds the effective weights, so averaging it
    # (swa_utils.AveragedModel) averages the weights themselves, bitwise as swa_utils' own
    # functions on a dense network holding them (on the torch path weight_orig can sit across zero).
    swa = torch.optim.swa_utils
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    fn = swa.get_ema_multi_avg_fn(0.8) if ema else None
    avg, dense = swa.AveragedModel(model, multi_avg_fn=fn), None
    for x, y in conv_net_batches(6):
        _train(model, opt, [(x, y)])
        avg.update_parameters(model)
        now = effective_weights(model)
        if dense is None:
            dense = [w.clone() for w in now]
        elif ema:
            fn(dense, now, None)
        else:
            for d, w in zip(dense, now):
                d.copy_(swa.get_swa_avg_fn()(d, w, avg.n_averaged - 1))
    assert all(torch.equal(a, b) for a, b in zip(effective_weights(avg.module), dense))


@pytest.mark.parametrize("signs", [None, "locked"])
def test_a_parametrization_put_on_weight_orig_after_projection_is_refused_at_the_step(signs):
    # weight_norm on weight_orig moves it into the parametrization; the step hooks read
    # module._parameters["weight_orig"] and raised a bare KeyError: 'weight_orig'.
    from torch.nn.utils import parametrize, parametrizations

    model = pruned_conv_net(signs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    parametrizations.weight_norm(model[0], "weight_orig")
    (x, y), = conv_net_batches(1)
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"ParametrizedConv2d.weight_orig is no longer a Parameter .*set_backend\(model, 'torch'\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step taken
    parametrize.remove_parametrizations(model[0], "weight_orig")  # the way out it names
    _backends.set_backend(model, "torch")
    parametrizations.weight_norm(model[0], "weight_orig")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in conv_net_batches(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model(x)
    assert not model[0].weight[~model[0].weight_mask].any()


def test_signs_rewritten_in_place_are_followed_by_the_next_forward():
    # The sign buffer keeps its identity under copy_ (as a checkpoint's buffers load): only its
    # version tells the projection that the locks moved.
    model = pruned_conv_net("locked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backends.set_backend(model, "projection", optimizer=opt)
    _train(model, opt, conv_net_batches(2))
    gen = torch.Generator().manual_seed(5)
    flipped = []
    for module, name in signmask._targets.pruned(model).values():
        orig, mask = getattr(module, name + "_orig"), getattr(module, name + "_mask")
        negative = torch.rand(orig.shape, generator=gen) < 0.5
        with torch.no_grad():
            getattr(module, name + "_sign").copy_(_bits.pack_signs(negative))
        want = torch.where(negative, -orig.detach().abs(), orig.detach().abs()) * mask
        flipped.append((module, name, want))
    model(conv_net_batches(1)[0][0])
    for module, name, want in flipped:
        assert torch.equal(getattr(module, name), want)
