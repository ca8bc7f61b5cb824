"""Correctness sweep over timm, one model per family: pruning, AWS, projection, tickets, search.

Not a timing. For every model family of timm (the module that defines the model), the variant
with the fewest parameters among the likeliest small names (``test_``, ``pico``, ``tiny``,
``b0``, ``18``, ...; counted on the meta device) is built with ``pretrained=False``; families
above ``--limit-params`` are skipped, and large ViTs that accept them are shrunk with
``depth=2, embed_dim=64, num_heads=2``. Parameters that are all zeros get small random values
(so that no gradient is zero by construction), then a dense copy is taken and the model is
pruned with ``signmask.prune(model, 0.5, scope="layer")`` (per layer, so that a head
initialized near zero keeps weights). The same masks are applied to the dense copy
(``weight *= mask``). On one seeded batch of 2 (64 px, through ``img_size=64`` where the model
accepts it, else its minimum input size, 128 px or its default size, whichever the dense model
runs first) the check compares, relative to the dense magnitude:

(a) the forward outputs (train mode; every floating tensor of the output);
(b) for every pruned tensor, ``<name>_orig.grad`` against the dense ``grad * mask``
    (below 1e-3; a missing gradient where the dense one is non-zero fails);
(c) after every ``<name>_orig`` and the dense weights are multiplied by 1.5 in place, a second
    forward's outputs, in eval mode so that batch norm does not normalize the scaling away:
    a module that reads a stale effective weight shows here.

Then the AWS search's training forward, on a fresh copy (:func:`check_aws`): the model is
pruned with ``signs="locked"`` and its norm layers interpolated with their init
(``alpha = 0.25``); the pruned weights move at random (across zero too) and so do the norms'
trained values. The oracle is the dense copy holding ``s * |o| * mask`` (``s``: the sign at the
lock) and ``lerp(trained, init, alpha)``: (d) train outputs, (e) every ``_orig`` gradient against
the dense gradient through the chain rule, (f) eval outputs (trained norms). The report counts
the norm layers interpolated and lists modules left out whose class name says "norm" and that
own a floating Parameter (a norm ``is_norm`` could have missed).

Then the ``"projection"`` backend against the torch path (:func:`check_projection`): two
sign-locked copies take two AdamW steps with clipping, one under each backend; (g) every
effective weight and the eval outputs must agree. Last, a ticket's trip (:func:`check_ticket`):
(h) extracted with biases, dense signs and norms, saved and loaded equal, transferred onto a
redrawn init, where every tensor must hold what the ticket and the new init say. And the whole
AWS search (:func:`check_search`, ``signmask.apply``): (i) a dense and two pruning rounds of two
steps; the ticket's exact count, the model's masks, no interpolation left, finite outputs.

``--no-parent-hooks`` is a negative control: it removes signmask's refresh hooks on parent
modules that read a child's weight directly (BEiT, EVA, Swin-V2 attention read ``qkv.weight``)
right after pruning; the check must then fail on those models. The full sweep runs this control
on ``CONTROL_MODELS`` at the end and records it in the notes.

Usage::

    python benchmarks/timm_zoo.py                                   # ~10 min on 1 CPU thread
    python benchmarks/timm_zoo.py --models test_vit resnet18        # a subset
    python benchmarks/timm_zoo.py --models beit_base_patch16_224 --no-parent-hooks --out zoo_ctl
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import signmask  # noqa: E402
from signmask import _interpolate, _parents, _reparam, _targets  # noqa: E402

AMOUNT = 0.5
GRAD_RTOL = 1e-3
OUT_RTOL = 1e-5  # both sides compute the same products; only summation order may differ
SCALE = 1.5
ALPHA = 0.25  # AWS check: the norms' weight on their init values in training forwards
PROJECTION_STEPS = 2
SEARCH_ROUNDS = 2  # pruning rounds of the AWS search check, after its dense round
SIDE = 64
BATCH = 2
# Name fragments of small variants, most preferred first; the best few per family are counted.
SMALL_HINTS = ("test_", "pico", "nano", "atto", "femto", "xxs", "tiny", "mini", "b0", "s0",
               "m0", "xs", "small", "18", "_s", "050", "lite")
CANDIDATES = 6
SHRINK_ABOVE = 50e6  # params: try the shrinking kwargs on models bigger than this
SHRINK = dict(depth=2, embed_dim=64, num_heads=2)
# Per-model kwargs and input sizes that work (found by an earlier sweep); the rest is generic.
OVERRIDES = {
    "samvit_base_patch16_224": dict(kwargs=dict(SHRINK, global_attn_indexes=[1])),
    "deepseek_vit_412m": dict(side=546),           # patch 14: 64 px does not divide
    "efficientformer_l1": dict(side=224),          # fixed attention bias grid
    "halonet_h1": dict(side=256),                  # halo attention blocks need 256 px
    "inception_v3": dict(side=128),                # 64 px shrinks to nothing
    "inception_v4": dict(side=128),
    "inception_resnet_v2": dict(side=128),
}
CONTROL_MODELS = ("beit_base_patch16_224", "vit_tiny_patch16_dinov3_qkvb", "swinv2_tiny_window8_256")


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout("timed out")


# ------------------------------------------------------------------ choosing the models


def meta_params(timm, name: str, kwargs: dict) -> int | None:
    """Parameter count from a build on the meta device (no memory, no init), None if it fails."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - some models compute on their weights in __init__
        return None


def plan(timm, name: str, shrink: bool = True) -> tuple[dict, int | None]:
    """The build kwargs of ``name`` (its override, or the ViT shrink where the model is above
    ``SHRINK_ABOVE`` and accepts it) and its parameter count."""
    if "kwargs" in OVERRIDES.get(name, {}):
        kwargs = OVERRIDES[name]["kwargs"]
        return kwargs, meta_params(timm, name, kwargs)
    n = meta_params(timm, name, {})
    if shrink and n is not None and n > SHRINK_ABOVE:
        small = meta_params(timm, name, SHRINK)
        if small is not None and small < n:
            return dict(SHRINK), small
    return {}, n


def hint_rank(name: str) -> tuple[int, int]:
    rank = next((i for i, h in enumerate(SMALL_HINTS) if h in name), len(SMALL_HINTS))
    return rank, len(name)


def family_of(timm) -> dict[str, str]:
    return {n: mod for mod in timm.list_modules() for n in timm.list_models(module=mod)}


def select(timm) -> list[dict]:
    """One spec per family: the candidate with the fewest parameters, shrunk if still large."""
    specs = []
    for mod in sorted(timm.list_modules()):
        names = sorted(timm.list_models(module=mod), key=hint_rank)[:CANDIDATES]
        counted = [(n, c) for n in names if (c := plan(timm, n, shrink=False)[1]) is not None]
        name = min(counted, key=lambda s: s[1])[0] if counted else names[0]
        kwargs, n = plan(timm, name)
        specs.append(dict(name=name, family=mod, kwargs=kwargs, meta_params=n))
    return specs


# ------------------------------------------------------------------ one model


def tensors_of(out) -> list[torch.Tensor]:
    """Every floating tensor in a model output (tensor, tuple/list, dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    if not (torch.isfinite(a).all() and torch.isfinite(ref).all()):
        return 0.0 if torch.equal(a, ref) else math.inf
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def outputs_err(out, ref) -> float:
    a, b = tensors_of(out), tensors_of(ref)
    if len(a) != len(b) or not b:
        return math.inf
    return max(rel_err(x, y) for x, y in zip(a, b))


def input_sizes(timm, name: str) -> list[tuple[dict, int | tuple]]:
    """(extra build kwargs, side) to try in order: img_size=64, minimum size, 128, default."""
    if "side" in OVERRIDES.get(name, {}):
        return [({}, OVERRIDES[name]["side"])]
    cfg = timm.get_pretrained_cfg(name)
    minimum = max(cfg.min_input_size[1:]) if cfg and cfg.min_input_size else SIDE
    default = tuple(cfg.input_size[1:]) if cfg else (224, 224)
    tries = [({"img_size": SIDE}, SIDE), ({}, max(SIDE, minimum)), ({}, 128), ({}, default)]
    return [t for i, t in enumerate(tries) if t not in tries[:i]]


def build(timm, name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # all-zero tensors (zero-init heads, layer scales) would zero gradients
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.train()


def fit(timm, name: str, kwargs: dict):
    """Build the model and find an input the dense model runs on; the errors of what did not."""
    tried, model, model_kwargs = [], None, None
    channels = (timm.get_pretrained_cfg(name).input_size or (3,))[0]
    for extra, side in input_sizes(timm, name):
        hw = (side, side) if isinstance(side, int) else side
        try:
            if model is None or extra | kwargs != model_kwargs:
                model, model_kwargs = None, extra | kwargs
                model = build(timm, name, model_kwargs)
            x = torch.randn(BATCH, channels, *hw, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                model.eval()(x)
            return model.train(), model_kwargs, x, tried
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - try the next size, keep why this one failed
            tried.append(f"{extra or ''}{hw[0]}x{hw[1]}: {last_line(e)}")
    raise RuntimeError("no input size runs the dense model: " + " | ".join(tried))


def pruned_tensors(model, dense) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    """(tensor key, pruned module, tensor name, dense module) for every pruned tensor."""
    return [(key, mod, name, dense.get_submodule(key[: -len(name)].rstrip(".")))
            for key, (mod, name) in _targets.pruned(model).items()]


def forward(model, x, train: bool):
    torch.manual_seed(3)  # same dropout / drop-path draws in both models
    return model.train(train)(x)


def train_backward(model, x) -> None:
    """Backpropagate a training forward's loss (the mean square of every output tensor)."""
    sum(t.float().square().mean() for t in tensors_of(forward(model, x, True))).backward()


def has_norms(model) -> bool:
    return any(_interpolate.is_norm(m) for m in model.modules())


def prune(model, no_parent_hooks: bool, signs: str | None = None) -> None:
    """``signmask.prune`` layer-wise; with ``no_parent_hooks`` (the negative control), drop the
    parent refresh hooks it linked."""
    signmask.prune(model, AMOUNT, scope="layer", signs=signs)
    if no_parent_hooks:
        for m in model.modules():
            _parents._unlink(m)


def check(model, dense, x, no_parent_hooks: bool) -> dict:
    prune(model, no_parent_hooks)
    pruned = pruned_tensors(model, dense)
    with torch.no_grad():
        for _, mod, name, dmod in pruned:
            getattr(dmod, name).mul_(getattr(mod, name + "_mask").to(getattr(dmod, name).dtype))
    out, ref = forward(model, x, True), forward(dense, x, True)
    out_err = outputs_err(out, ref)
    sum(t.float().sum() for t in tensors_of(out)).backward()
    sum(t.float().sum() for t in tensors_of(ref)).backward()
    failures, grad_err, nonzero = [], 0.0, 0
    for tensor, mod, name, dmod in pruned:
        grad, dgrad = getattr(mod, name + "_orig").grad, getattr(dmod, name).grad
        want = None if dgrad is None else dgrad * getattr(mod, name + "_mask")
        if grad is None:
            if want is not None and want.any():
                failures.append(dict(tensor=tensor, check="grad", error="no gradient"))
            continue
        err = rel_err(grad, torch.zeros_like(grad) if want is None else want)
        nonzero += bool(grad.any())
        grad_err = max(grad_err, err)
        if err > GRAD_RTOL:
            failures.append(dict(tensor=tensor, check="grad", error=f"rel err {err:.3g}"))
    with torch.no_grad():
        for _, mod, name, dmod in pruned:
            getattr(mod, name + "_orig").mul_(SCALE)
            getattr(dmod, name).mul_(SCALE)
        scaled_err = outputs_err(forward(model, x, False), forward(dense, x, False))
    if out_err > OUT_RTOL:
        failures.insert(0, dict(tensor="<output>", check="forward", error=f"rel err {out_err:.3g}"))
    if scaled_err > OUT_RTOL:
        failures.append(dict(tensor="<output>", check="scaled forward", error=f"rel err {scaled_err:.3g}"))
    return dict(pruned=len(pruned), nonzero_grads=nonzero, out_err=out_err, grad_err=grad_err,
                scaled_err=scaled_err, failures=failures)


def _moved(t: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """``t`` times random factors in [0.5, 1.5] (with random signs if ``flip``): "training"."""
    factor = 0.5 + torch.rand(t.shape, generator=gen)
    if flip:
        factor *= torch.randint(0, 2, t.shape, generator=gen) * 2 - 1
    return t * factor.to(t.dtype)


def check_aws(model, dense, x, no_parent_hooks: bool) -> dict:
    """The AWS search's training forward: sign-locked masks, norms interpolated with their init.

    ``model`` gets ``signmask.prune(..., signs="locked")`` and every norm layer signmask finds
    is interpolated with ``alpha = ALPHA``; then every pruned ``<name>_orig`` and every norm's
    trained ``weight_orig``/``bias_orig`` move at random (pruned weights across zero too). The
    oracle ``dense`` holds the values the AWS paper defines: ``s * |o| * mask`` with ``s`` the
    sign at the lock, and ``lerp(trained, init, ALPHA)`` for the norms in training (the trained
    values in eval). Compared: train outputs, the gradients of every ``_orig`` (the chain rule
    through ``s * |o|`` and through the lerp, from the dense gradients), eval outputs.
    """
    prune(model, no_parent_hooks, signs="locked")
    pruned = pruned_tensors(model, dense)
    norms = _interpolate.attach(model, torch.tensor(ALPHA)) if has_norms(model) else {}
    norm_pairs = [(key, mod, t, dense.get_submodule(key)) for key, mod in norms.items()
                  for t in ("weight", "bias") if t + "_orig" in mod._parameters]
    gen = torch.Generator().manual_seed(4)
    locks = {}
    with torch.no_grad():
        for tensor, mod, name, dmod in pruned:
            orig, w = getattr(mod, name + "_orig"), getattr(dmod, name)
            # The dense copy still holds the values at the lock (exact zeros stay zeros below).
            negative = locks[tensor] = torch.signbit(w)
            orig.copy_(_moved(orig, gen, flip=True))
            w.copy_(torch.where(negative, -orig.abs(), orig.abs()) * getattr(mod, name + "_mask"))
        for _, mod, t, dmod in norm_pairs:
            orig = getattr(mod, t + "_orig")
            orig.copy_(_moved(orig, gen, flip=False) + 0.1)  # + 0.1: a zero init moves too
            getattr(dmod, t).copy_(torch.lerp(orig, getattr(mod, t + "_init"), ALPHA))
    out, ref = forward(model, x, True), forward(dense, x, True)
    out_err = outputs_err(out, ref)
    sum(t.float().sum() for t in tensors_of(out)).backward()
    sum(t.float().sum() for t in tensors_of(ref)).backward()
    expected = []
    for tensor, mod, name, dmod in pruned:
        orig, w = getattr(mod, name + "_orig"), getattr(dmod, name)
        # d(s |o| m)/do = s * b * m, b = -1 where o's sign bit is set (at o = 0 too: the
        # derivative on that side, so that a kept zero trains).
        s, b = (1 - 2 * t.to(orig.dtype) for t in (locks[tensor], torch.signbit(orig)))
        expected.append((tensor, orig, w.grad, s * b * getattr(mod, name + "_mask")))
    for key, mod, t, dmod in norm_pairs:
        expected.append((f"{key}.{t}", getattr(mod, t + "_orig"), getattr(dmod, t).grad, 1 - ALPHA))
    failures, grad_err = [], 0.0
    for tensor, orig, dgrad, chain in expected:
        want = None if dgrad is None else dgrad * chain
        if orig.grad is None:
            if want is not None and want.any():
                failures.append(dict(tensor=tensor, check="aws grad", error="no gradient"))
            continue
        err = rel_err(orig.grad, torch.zeros_like(orig.grad) if want is None else want)
        grad_err = max(grad_err, err)
        if err > GRAD_RTOL:
            failures.append(dict(tensor=tensor, check="aws grad", error=f"rel err {err:.3g}"))
    with torch.no_grad():
        for _, mod, t, dmod in norm_pairs:
            getattr(dmod, t).copy_(getattr(mod, t + "_orig"))
        eval_err = outputs_err(forward(model, x, False), forward(dense, x, False))
    for check_name, err in (("aws forward", out_err), ("aws eval forward", eval_err)):
        if err > OUT_RTOL:
            failures.insert(0, dict(tensor="<output>", check=check_name, error=f"rel err {err:.3g}"))
    return dict(norms=len(norms), norm_like_left=norm_like_left(model), aws_out_err=out_err,
                aws_grad_err=grad_err, aws_eval_err=eval_err, aws_failures=failures)


def check_projection(model, x, no_parent_hooks: bool) -> dict:
    """The ``"projection"`` backend against the torch path, from two copies of ``model``.

    Both are pruned with ``signs="locked"`` (the harder case: zero crossings are reflected) and
    take ``PROJECTION_STEPS`` AdamW steps (weight decay, gradients clipped to norm 1) on the same
    batch; ``proj`` switches to ``"projection"`` first. Compared after the steps: every
    effective weight and the eval outputs.
    """
    ref, proj = model, copy.deepcopy(model)
    for m in (ref, proj):
        prune(m, no_parent_hooks, signs="locked")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05) for m in (ref, proj)]
    signmask.set_backend(proj, "projection", optimizer=opts[1])
    for _ in range(PROJECTION_STEPS):
        for m, opt in zip((ref, proj), opts):
            opt.zero_grad(set_to_none=True)
            train_backward(m, x)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    failures, weight_err = [], 0.0
    pairs = zip(_targets.pruned(ref).items(), _targets.pruned(proj).values())
    with torch.no_grad():
        for (tensor, (ma, na)), (mb, nb) in pairs:
            a, b = (_reparam.find_hook(m, n)[1].apply_mask(m) for m, n in ((ma, na), (mb, nb)))
            err = rel_err(b, a)
            weight_err = max(weight_err, err)
            if err > OUT_RTOL:
                failures.append(dict(tensor=tensor, check="projection weight", error=f"rel err {err:.3g}"))
        out_err = outputs_err(forward(proj, x, False), forward(ref, x, False))
    if out_err > OUT_RTOL:
        failures.insert(0, dict(tensor="<output>", check="projection forward",
                                error=f"rel err {out_err:.3g}"))
    return dict(proj_weight_err=weight_err, proj_out_err=out_err, proj_failures=failures)


def check_ticket(model) -> dict:
    """A ticket's trip to a new init of the same architecture (``signmask.transfer``).

    ``model`` is pruned, its ticket extracted with the biases, a dense classifier's signs and
    the norms, saved and loaded (it must come back equal), then transferred with ``norms=True``
    onto a copy whose every parameter was redrawn (new signs and magnitudes). Expected, from
    the new init and the ticket alone: every pruned tensor holds ``signed mask * |new init|``
    behind the ticket's mask, every recorded bias or dense weight ``sign * |new init|``, every
    norm the ticket's values; and the new model's own ticket has the same signed masks.
    """
    fresh = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.is_floating_point():
                p.copy_(_moved(p, gen, flip=True))
    init = {k: v.detach().clone() for k, v in fresh.named_parameters()}
    prune(model, no_parent_hooks=False)
    ticket = signmask.extract(model, biases=True, dense=True, norms=True)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ticket.safetensors")
        signmask.save(ticket, path)
        loaded = signmask.load(path)
    failures = [] if loaded == ticket else [dict(tensor="<ticket>", check="ticket round trip",
                                                 error="loaded != saved")]
    signmask.transfer(loaded, fresh, norms=bool(ticket.norms))  # NFNets have no norm layer
    pruned = _targets.pruned(fresh)
    with torch.no_grad():
        for key, signed in ticket.masks.items():
            mod, name = pruned[key]
            got = _reparam.find_hook(mod, name)[1].apply_mask(mod)
            want = init[key].abs() * signed.to(init[key].dtype)
            same_mask = torch.equal(getattr(mod, name + "_mask"), signed != 0)
            if not (torch.equal(got, want) and same_mask):
                failures.append(dict(tensor=key, check="transfer", error="weight or mask differs"))
        params = dict(fresh.named_parameters())
        for key, sign in ticket.signs.items():
            if not torch.equal(params[key], init[key].abs() * sign.to(init[key].dtype)):
                failures.append(dict(tensor=key, check="transfer", error="dense sign differs"))
        for key, value in ticket.norms.items():
            if not torch.equal(params[key], value):
                failures.append(dict(tensor=key, check="transfer", error="norm differs"))
        again = signmask.extract(fresh).masks
    if again.keys() != ticket.masks.keys() or any(not torch.equal(again[k], v)
                                                  for k, v in ticket.masks.items()):
        failures.append(dict(tensor="<ticket>", check="transfer", error="re-extracted masks differ"))
    return dict(ticket_tensors=len(ticket.masks) + len(ticket.signs) + len(ticket.norms),
                ticket_failures=failures)


def check_search(model, x) -> dict:
    """The AWS search end to end (``signmask.apply``; LRR where there is no norm layer): a dense
    round and ``SEARCH_ROUNDS`` pruning rounds of two SGD steps each on ``x``. The ticket must
    keep exactly ``round(total * (1 - AMOUNT))`` weights and match the model's masks, no norm
    layer may stay interpolated, and the eval outputs must be finite."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # AWS refuses a model without norm layers (NFNets): it would be LRR.
    method = "aws" if has_norms(model) else "lrr"
    search = signmask.apply(model, method, AMOUNT, optimizer=opt, rounds=SEARCH_ROUNDS, progress=False)
    for _ in search:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            train_backward(model, x)
            opt.step()
    ticket, failures = search.ticket, []
    if ticket.kept != round(ticket.numel * (1 - AMOUNT)):
        failures.append(dict(tensor="<ticket>", check="search",
                             error=f"kept {ticket.kept} of {ticket.numel}"))
    pruned = _targets.pruned(model)
    differ = [k for k, v in ticket.masks.items()
              if not torch.equal(pruned[k][0]._buffers[pruned[k][1] + "_mask"], v != 0)]
    failures += [dict(tensor=k, check="search", error="mask differs from the ticket's")
                 for k in differ]
    if _interpolate.interpolated(model):
        failures.append(dict(tensor="<model>", check="search", error="norms still interpolated"))
    with torch.no_grad():
        if not all(torch.isfinite(t).all() for t in tensors_of(forward(model, x, False))):
            failures.append(dict(tensor="<output>", check="search", error="not finite"))
    return dict(search_rounds=len(search), search_failures=failures)


def norm_like_left(model) -> list[str]:
    """Modules not interpolated whose class says "norm" (any case) and that own a floating
    Parameter: where a norm layer could have escaped :func:`signmask._interpolate.is_norm`."""
    left = []
    for key, mod in model.named_modules():
        names = [c.__name__.lower() for c in type(mod).__mro__]
        owns = any(p.is_floating_point() for p in mod.parameters(recurse=False))
        if owns and any("norm" in n for n in names) and _interpolate._hook(mod)[1] is None:
            left.append(f"{key} ({type(mod).__name__})")
    return left


def last_line(e: BaseException) -> str:
    return traceback.format_exception_only(type(e), e)[-1].strip()[:300]


def run_one(timm, spec: dict, args) -> dict:
    row = dict(name=spec["name"], family=spec["family"], kwargs=spec["kwargs"])
    limit = args.limit_params * 1e6
    if spec["meta_params"] is not None and spec["meta_params"] > limit:
        return row | dict(status="skipped", params=spec["meta_params"],
                          error=f"{spec['meta_params'] / 1e6:.0f}M params > --limit-params")
    t0 = time.perf_counter()
    signal.alarm(args.timeout)
    try:
        model, kwargs, x, tried = fit(timm, spec["name"], spec["kwargs"])
        row |= dict(kwargs=kwargs, params=sum(p.numel() for p in model.parameters()),
                    input=list(x.shape[1:]), size_fallbacks=tried)
        def fresh():  # each check prunes a copy of the same built model
            return copy.deepcopy(model)

        row |= check(fresh(), fresh(), x, args.no_parent_hooks)
        row |= check_aws(fresh(), fresh(), x, args.no_parent_hooks)
        row |= check_projection(fresh(), x, args.no_parent_hooks)
        row |= check_ticket(fresh())
        row |= check_search(model, x)
        for check_name in ("aws", "proj", "ticket", "search"):
            row["failures"] += row.pop(f"{check_name}_failures")
        row["status"] = "fail" if row["failures"] else "ok"
    except Exception as e:  # noqa: BLE001 - record and go on with the next family
        row |= dict(status="error", error=last_line(e))
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    return row


# ------------------------------------------------------------------ output


def summary_line(rows: list[dict]) -> str:
    checked = [r for r in rows if r["status"] in ("ok", "fail")]
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    return f"{len(rows)} models, {len(checked)} checked, {len(bad)} failures"


def result_cell(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] == "fail":
        f = r["failures"]
        more = f" (+{len(f) - 2} more)" if len(f) > 2 else ""
        return "FAIL: " + "; ".join(f"`{x['tensor']}` {x['check']}: {x['error']}" for x in f[:2]) + more
    return f"{r['status'].upper()}: {r.get('error', '')}".replace("|", "\\|")


def table(rows: list[dict]) -> str:
    lines = ["| family | model | params | input | pruned (non-zero grad) | norms | result | s |",
             "|---|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        shrunk = " (shrunk)" if any(k in r.get("kwargs", {}) for k in SHRINK) else ""
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
        size = "x".join(map(str, r["input"][1:])) if "input" in r else "-"
        lines.append(f"| {r['family']} | `{r['name']}`{shrunk} | {params} | {size} | "
                     f"{r.get('pruned', '-')} ({r.get('nonzero_grads', '-')}) | {r.get('norms', '-')} | "
                     f"{result_cell(r)} | "
                     f"{r.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"


def control_notes(control: list[dict]) -> str:
    lines = [f"- Negative control (`--no-parent-hooks` on {len(control)} models, parent refresh "
             f"hooks removed after pruning): {summary_line(control)}."]
    for r in control:
        kinds = sorted({f["check"] for f in r.get("failures", [])})
        tensors = [f["tensor"] for f in r.get("failures", []) if f["tensor"] != "<output>"]
        lines.append(f"  - `{r['name']}`: {r['status']}"
                     + (f", {len(tensors)} tensors ({', '.join(f'`{t}`' for t in tensors[:2])}"
                        f"{', ...' if len(tensors) > 2 else ''}), checks failing: {', '.join(kinds)}"
                        if r["status"] == "fail" else f" {r.get('error', '')}"))
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], control: list[dict] | None, env: dict, args, seconds: float) -> str:
    mode = " (negative control: parent hooks removed)" if args.no_parent_hooks else ""
    notes = [
        f"Each model: pruned `signmask.prune(model, {AMOUNT}, scope=\"layer\")` vs a dense copy "
        "with the same masks, one seeded batch of 2. Fails when the forward outputs (train mode) "
        f"differ by more than {OUT_RTOL:g} of the dense magnitude, when any `<name>_orig.grad` "
        f"differs from the dense `grad * mask` by more than {GRAD_RTOL:g}, or when, after every "
        f"weight is scaled by {SCALE} in place, an eval-mode forward differs by more than "
        f"{OUT_RTOL:g} (stale weights). Then, on a fresh copy, the AWS training forward: "
        f"`signs=\"locked\"` and every norm layer interpolated with its init (alpha {ALPHA}), "
        "weights and norms moved at random, against a dense copy holding `s * |o| * mask` and "
        "`lerp(trained, init, alpha)`: train outputs, every `_orig` gradient (chain rule from the "
        "dense gradient), eval outputs (trained norms), same tolerances. `norms`: layers "
        "interpolated. Last, `set_backend(\"projection\")` against the torch path: two sign-locked "
        f"copies, {PROJECTION_STEPS} AdamW steps with clipping each; every effective weight and the "
        "eval outputs, same tolerance. Then the ticket (`extract(biases=True, dense=True, "
        "norms=True)`) must load back equal from `.safetensors` and, transferred with "
        "`norms=True` onto a copy whose every parameter was redrawn, give every pruned weight "
        "`signed mask * |new init|` behind the ticket's mask, every bias `sign * |new init|`, "
        "every norm the ticket's values (exactly), and the same ticket again. And "
        f"`signmask.apply(model, \"aws\", {AMOUNT}, rounds={SEARCH_ROUNDS})` (`\"lrr\"` without norm "
        "layers) with two SGD steps per "
        "round: the ticket keeps exactly `round(total * (1 - sparsity))` weights, the model's masks "
        "are the ticket's, no norm stays interpolated, the eval outputs are finite.",
        f"- Families: one per timm module, the smallest of the {CANDIDATES} likeliest small names; "
        f"skipped above {args.limit_params:g}M params; ViTs above {SHRINK_ABOVE / 1e6:.0f}M "
        f"shrunk with `{SHRINK}` where accepted.",
        f"- {summary_line(rows)}; wall time {seconds / 60:.1f} min.",
    ]
    text = (f"# timm zoo: pruning, AWS, projection and tickets vs oracles, one small model per family{mode}\n\n"
            f"{_common.env_markdown(env)}\n" + "\n".join(notes) + "\n")
    if control:
        text += control_notes(control)
    left = [r for r in rows if r.get("norm_like_left")]
    text += (f"- Modules left out of the interpolation whose class says \"norm\" and that own a "
             f"floating Parameter: {len(left)} models" + (":" if left else ".") + "\n")
    for r in left:
        names = r["norm_like_left"]
        text += (f"  - `{r['name']}`: {', '.join(f'`{n}`' for n in names[:3])}"
                 f"{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}\n")
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    if bad:
        text += "\n## Failures\n\n" + table(bad)
    return text + "\n## All models\n\n" + table(rows)


# ------------------------------------------------------------------ main


def sweep(timm, specs: list[dict], args, tag: str = "") -> list[dict]:
    rows = []
    for i, spec in enumerate(specs, 1):
        r = run_one(timm, spec, args)
        rows.append(r)
        worst = "" if r["status"] in ("skipped", "error") else (
            f" out {r['out_err']:.1e} grad {r['grad_err']:.1e} scaled {r['scaled_err']:.1e}"
            f" | aws out {r['aws_out_err']:.1e} grad {r['aws_grad_err']:.1e} eval {r['aws_eval_err']:.1e}"
            f" norms {r['norms']} | proj w {r['proj_weight_err']:.1e} out {r['proj_out_err']:.1e}"
            f" | ticket {r['ticket_tensors']} | search {r['search_rounds']} rounds")
        print(f"{tag}[{i}/{len(specs)}] {r['family']:>26} {r['name']:<34} "
              f"{r['status']}{worst} {r.get('seconds', 0)}s"
              + (f"  {r.get('error', '')}" if r["status"] in ("error", "skipped") else "")
              + ("  " + "; ".join(f"{f['tensor']} {f['error']}" for f in r.get("failures", [])[:3])
                 if r["status"] == "fail" else ""), flush=True)
    return rows


def specs_for(timm, names: list[str]) -> list[dict]:
    families = family_of(timm)
    return [dict(name=n, family=families.get(n, "?"), **dict(zip(("kwargs", "meta_params"), plan(timm, n))))
            for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names to check instead of one per family")
    parser.add_argument("--limit-params", type=float, default=100, help="skip models above (millions)")
    parser.add_argument("--no-parent-hooks", action="store_true",
                        help="negative control: remove signmask's parent refresh hooks after pruning")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="results stem (default timm_zoo_cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _alarm)
    timm = _common.import_timm()
    env = _common.environment("cpu")
    env["signmask_from"] = os.path.dirname(signmask.__file__)

    t0 = time.perf_counter()
    specs = specs_for(timm, args.models) if args.models else select(timm)
    print(f"{len(specs)} models selected in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = sweep(timm, specs, args)
    control = None
    if not args.models and not args.no_parent_hooks:  # the full sweep shows its control too
        ctl_args = argparse.Namespace(**vars(args) | {"no_parent_hooks": True})
        control = sweep(timm, specs_for(timm, list(CONTROL_MODELS)), ctl_args, tag="control ")
    seconds = time.perf_counter() - t0

    setup = dict(amount=AMOUNT, scope="layer", alpha=ALPHA, projection_steps=PROJECTION_STEPS,
                 batch=BATCH, side=SIDE, grad_rtol=GRAD_RTOL,
                 out_rtol=OUT_RTOL, scale=SCALE, limit_params_m=args.limit_params,
                 no_parent_hooks=args.no_parent_hooks, seconds=round(seconds, 1))
    payload = dict(environment=env, setup=setup, summary=summary_line(rows), rows=rows)
    if control is not None:
        payload["negative_control"] = dict(summary=summary_line(control), rows=control)
    stem = args.out or ("timm_zoo_cpu_no_parent_hooks" if args.no_parent_hooks else "timm_zoo_cpu")
    paths = _common.write_results(stem, payload, markdown(rows, control, env, args, seconds))
    print("wrote", *paths)
    if control is not None:
        print("negative control:", summary_line(control))
    print(summary_line(rows), f"({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
