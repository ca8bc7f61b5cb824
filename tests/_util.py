"""Small seeded models and helpers shared by the tests."""

import copy
import inspect
import sys
import threading

import pytest
import torch
from torch import nn

import signmask
from signmask import _projection, _reparam


class TinyNet(nn.Module):
    """A small conv net with BatchNorm, a bias-free conv and a classifier (``fc``)."""

    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class AttnNet(nn.Module):
    """A MultiheadAttention (which reads ``out_proj.weight`` itself) under a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class Wrapper(nn.Module):
    """Its own ``fc`` beside ``module.fc``: the same name once ``module.`` is stripped."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.module = nn.Sequential()
        self.module.add_module("fc", nn.Linear(4, 4))
        self.fc = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(4)
        self.module.add_module("bn", nn.BatchNorm1d(4))

    def forward(self, x):
        return self.fc(self.bn(self.module(x)))


def tiny(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def train_tiny(model, steps=20):
    """Train a TinyNet ``steps`` SGD steps on one fixed random batch (seed 0), then run one forward."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model(x)


# TinyNet's norm parameters (its affine BatchNorm tensors).
TINY_NORMS = ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")


def trained_ticket(**kwargs):
    """A pruned TinyNet trained 5 steps, and its ticket with norms (more ``extract`` options in ``kwargs``)."""
    model = signmask.prune(tiny(0), 0.5)
    train_tiny(model, steps=5)  # moves the norm parameters off their init (1, 0)
    return model, signmask.extract(model, norms=True, **kwargs)


def make_search(method="imp", sparsity=0.6, seed=0, **kw):
    """A TinyNet, its SGD (momentum) and StepLR, and ``signmask.apply`` on them; returns all four."""
    # Not named `setup`: pytest 8.0 (nose support, removed in 8.1) would run a module-level
    # `setup` before the module's tests, with the module as `method`.
    model = tiny(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    kw.setdefault("progress", False)
    search = signmask.apply(model, method, sparsity, optimizer=opt, scheduler=sched, **kw)
    return model, opt, sched, search


def small_ticket() -> signmask.Ticket:
    """Two masked tensors: ``a.weight`` (1, 5) and ``b.weight`` (2,)."""
    return signmask.Ticket({"a.weight": torch.tensor([[1, 0, -1, 1, 0]]), "b.weight": torch.tensor([-1, 1])})


def norm_ticket(dtype=torch.float32) -> signmask.Ticket:
    """:func:`small_ticket`'s masks and two norm tensors of ``dtype`` (a -0.0 among their values)."""
    norms = {"bn.weight": torch.tensor([0.5, -0.0, 2.0], dtype=dtype), "bn.bias": torch.tensor([1e-3, -7.0, 0.0], dtype=dtype)}
    return signmask.Ticket(small_ticket().masks, norms=norms)


def conv_net(seed: int = 0) -> nn.Module:
    """Two convs (the second bias-free) and a Linear head of 10 classes, for 3x6x6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )


def pruned_conv_net(signs: str | None = None, seed: int = 0) -> nn.Module:
    return signmask.prune(conv_net(seed), 0.7, signs=signs)


def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """The effective weights the next forward will use (via the hooks' current backend)."""
    out = []
    for module, name in signmask._targets.pruned(model).values():
        hook = _reparam.find_hook(module, name)[1]
        with torch.no_grad():
            out.append(hook.apply_mask(module).clone())
    return out


def orig_grads(model):
    return [_reparam.original(m, n).grad for m, n in signmask._targets.pruned(model).values()]


def conv_net_batches(n: int, seed: int = 1):
    """``n`` seeded batches of 4 inputs and labels for :func:`conv_net`."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 10, (4,), generator=gen))
        for _ in range(n)
    ]


def projection_hooks(opt) -> list:
    """The projection backend's hooks on optimizer ``opt`` (step pre/post, state loading)."""
    tables = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_load_state_dict_post_hooks")
    return [fn for t in tables for fn in getattr(opt, t).values() if isinstance(fn, _projection._OptimizerHook)]


def snapshot(model: nn.Module, alive_only: bool = False):
    """Everything a failed call must leave untouched: tensors (and extra state), parameter
    objects, hooks. ``alive_only``: each ``<name>_orig`` at the entries its mask keeps."""
    sd = model.state_dict()

    def read(k, v):
        mask = sd.get(k[: -len("_orig")] + "_mask") if alive_only and k.endswith("_orig") else None
        return v.detach().clone() if mask is None else torch.where(mask.bool(), v.detach(), 0)

    return (
        {k: read(k, v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in sd.items()},
        [(n, id(p)) for n, p in model.named_parameters()],
        [(n, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for n, m in model.named_modules()],
    )


def assert_same(before, after):
    sd0, params0, hooks0 = before
    sd1, params1, hooks1 = after
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) if isinstance(sd0[k], torch.Tensor) else sd0[k] == sd1[k] for k in sd0)
    assert params0 == params1
    assert hooks0 == hooks1


def kept(model: nn.Module) -> int:
    return sum(int(b.sum()) for n, b in model.named_buffers() if n.endswith("weight_mask"))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values, signed zeros included (``torch.equal`` treats -0.0 == 0.0),
    and NaN exactly where the other has NaN (``torch.equal`` treats NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    a, b = a[~nan], b[~nan]
    return torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


def backends_of(model: nn.Module) -> dict:
    """Canonical tensor name -> backend key for every pruned tensor of ``model``."""
    from signmask import _reparam, _targets

    out = {}
    for key, (module, name) in _targets.pruned(model).items():
        out[key] = getattr(_reparam.find_hook(module, name)[1], "backend", "torch")
    return out


def timm_at_least(version: str) -> bool:
    """Whether the installed timm is ``version`` or newer (``"1.0.17"``)."""
    from signmask._compat import import_timm

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())

    return parse(import_timm().__version__) >= parse(version)


def since_timm(version: str, what: str) -> pytest.MarkDecorator:
    """Skip a test of ``what`` (a test model or layer timm added in ``version``) on an older timm.

    pyproject allows timm >= 1.0.8, the oldest with ``ResNet(channels=...)``; CI's timm (1.0.31)
    has everything, so nothing is skipped there, and a name missing from it still fails.
    """
    return pytest.mark.skipif(not timm_at_least(version), reason=f"{what} is in timm >= {version}")


def timm_plateau(opt, **options):
    """timm's ``PlateauLRScheduler`` on ``opt``. timm up to at least 1.0.22 passes ``verbose=``
    to torch's ``ReduceLROnPlateau``, which torch 2.11 no longer takes (the floor venv's timm
    1.0.8 with torch 2.11): there it is built with that argument dropped (it only prints), so
    the tests still run; CI's timm builds it as is."""
    from signmask._compat import import_timm

    import_timm()
    from timm.scheduler import PlateauLRScheduler

    lr_scheduler = torch.optim.lr_scheduler
    stock = lr_scheduler.ReduceLROnPlateau
    try:
        return PlateauLRScheduler(opt, **options)
    except TypeError as e:
        # Only that known cause: torch's own signature lacks the argument timm passes.
        if "verbose" in inspect.signature(stock).parameters or "'verbose'" not in str(e):
            raise

    class WithoutVerbose(stock):
        def __init__(self, *args, verbose=None, **kwargs):
            super().__init__(*args, **kwargs)

    lr_scheduler.ReduceLROnPlateau = WithoutVerbose  # timm looks it up at construction
    try:
        return PlateauLRScheduler(opt, **options)
    finally:
        lr_scheduler.ReduceLROnPlateau = stock


def in_threads(jobs) -> list:
    """Run ``jobs`` (callables) in one thread each, started together and switching as often as
    the interpreter allows, so that their pruned forwards, backwards and steps interleave."""
    barrier, results, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def run(i):
        torch.set_num_threads(1)  # OpenMP's setting is per thread: the same sums as the main one
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # raised in the test's thread below, not just printed
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return results


class Fault(RuntimeError):
    """The error :class:`FailAt` injects."""


class FailAt(torch.overrides.TorchFunctionMode):
    """Raise :class:`Fault` at the ``at``-th torch call inside it, as an out-of-memory error can
    at any op; ``at=None`` only counts them (``.calls``). Grad-mode switches are not counted:
    a ``no_grad`` block failing to exit is no fault of the code under test."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.calls = at, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "_set_grad_enabled":
            self.calls += 1
            if self.calls == self.at:
                raise Fault(f"injected at call {self.calls}: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def two_linears_trained(backend: str = "torch", signs=None, amount: float = 0.5, *, flip: bool = False,
                        grad_left: bool = True):
    """Two pruned Linears (seed 0) and the SGD (momentum, weight decay) that trained them one
    step on ``backend``; ``flip``: the first weight negated, against its locks; ``grad_left``:
    a second backward's gradient left in place, unstepped."""
    torch.manual_seed(0)
    model = signmask.prune(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), amount, signs=signs)
    if flip:
        with torch.no_grad():
            model[0].weight_orig.neg_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    if backend == "projection":
        signmask.set_backend(model, "projection", optimizer=opt)
    for step in (True, False) if grad_left else (True,):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        if step:
            opt.step()
    return model, opt


def layout(model: nn.Module, alive_only: bool = False):
    """:func:`snapshot` plus what it leaves out: buffers and attributes of every module, and
    the state of its pruning hooks; and apart, the values of its tensor attributes (see
    :func:`same_aliases`)."""
    return snapshot(model, alive_only), [
        (n, list(m._buffers), sorted(m.__dict__),
         [(type(h).__name__, [type(p).__name__ for p in getattr(h, "_pruning_methods", ())])
          for h in m._forward_pre_hooks.values()])
        for n, m in model.named_modules()
    ], [(n, k, v.detach().clone(), _masked(m, k)) for n, m in model.named_modules()
        for k, v in sorted(m.__dict__.items()) if isinstance(v, torch.Tensor)]


def _masked(module: nn.Module, name: str) -> torch.Tensor | None:
    """``<name>_orig`` under its mask and signs, as the torch path computes it (None: no
    pruned tensor of that name)."""
    orig, mask = module._parameters.get(name + "_orig"), module._buffers.get(name + "_mask")
    if orig is None or mask is None or mask.dtype != torch.bool:
        return None
    with torch.no_grad():
        return _reparam.masked_weight(orig, mask, module._buffers.get(name + "_sign")).clone()


def same_aliases(before: list, after: list) -> bool:
    """The tensor attributes (``module.weight``) after a failed call: each as it was, or
    recomputed from the restored tensors (the value a stale one, computed before an optimizer
    step, would take at the next forward); never of the failed call's masks."""
    if [(n, k) for n, k, _, _ in before] != [(n, k) for n, k, _, _ in after]:
        return False
    return all(torch.equal(v1, v0) or (m1 is not None and torch.equal(v1, m1))
               for (_, _, v0, _), (_, _, v1, m1) in zip(before, after))


def outside(model: nn.Module, *optimizers, alive_only: bool = False) -> list:
    """What :func:`layout` leaves out and a failed call must leave too: the model's tensors and
    gradients bit for bit (signed zeros), with their attributes (a gradient's "masked" mark);
    its Parameters' post-accumulate-grad hooks; and each optimizer's state and hook tables,
    with the attributes of the hook objects (the tensors a projection hook serves).

    ``alive_only``: a pruned ``<name>_orig``, its gradient and its per-weight optimizer state
    are read at the entries their mask keeps (``set_backend`` and ``remove`` may zero the
    others, which nothing reads)."""
    def attrs(fn):
        return None if inspect.isroutine(fn) or not hasattr(fn, "__dict__") else dict(vars(fn))

    masks = {}  # id(<name>_orig) -> its mask
    for m in model.modules() if alive_only else ():
        for key, mask in m._buffers.items():
            orig = m._parameters.get(key[: -len("_mask")] + "_orig") if key.endswith("_mask") else None
            if orig is not None:
                masks[id(orig)] = mask.bool()

    def read(t, owner):
        mask = masks.get(id(owner))
        value = t.detach().clone()
        return value if mask is None or value.shape != mask.shape else torch.where(mask, value, 0)

    tables = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_load_state_dict_post_hooks")
    out = [[(n, read(t, t), dict(vars(t))) for n, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor)]]
    for n, p in model.named_parameters():
        grad = None if p.grad is None else (read(p.grad, p), dict(vars(p.grad)))
        out.append((n, grad, list((p._post_accumulate_grad_hooks or {}).items())))
    for opt in optimizers:
        state = [{k: read(v, p) if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                 for group in opt.param_groups for p in group["params"] if p in opt.state]
        out.append((state, [[(k, fn, attrs(fn)) for k, fn in getattr(opt, t).items()] for t in tables]))
    return out


def outside_alive(model: nn.Module, *optimizers) -> list:
    """:func:`outside` at the entries the masks keep."""
    return outside(model, *optimizers, alive_only=True)


def same(a, b) -> bool:
    """``a == b`` for nested lists, tuples and dicts, tensors compared by :func:`bits_equal`."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bits_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def assert_each_fault_leaves_it_untouched(make, call, rest=None, alive_only=False):
    """Make a fresh ``(model, *rest) = make()`` for each torch call ``call(model, *rest)`` makes,
    fail it at that call, and check the model is as it was, and that the call then succeeds as
    on a model it never failed on. ``rest(model, *rest)``: what else must be as it was (see
    :func:`outside`). ``alive_only``: pruned entries of ``<name>_orig`` may be zeroed."""
    clean = make()
    with FailAt() as counter:
        call(*clean)
    clean = layout(clean[0])
    for at in range(1, counter.calls + 1):
        args = make()
        before = layout(args[0], alive_only)
        others = None if rest is None else rest(*args)
        try:
            with FailAt(at):
                call(*args)
        except Exception as e:  # torch's load_state_dict re-raises it as its own RuntimeError
            if "injected at call" not in str(e):
                raise
            after = layout(args[0], alive_only)
            assert_same(before[0], after[0])
            assert same(before[1], after[1]), f"fault at call {at}"
            assert same_aliases(before[2], after[2]), f"fault at call {at}: module.weight"
            assert others is None or same(others, rest(*args)), f"fault at call {at}"
            call(*args)
        # else: caught on the way, where torch's own RuntimeError means "take another path"
        again = layout(args[0])
        assert_same(clean[0][:1] + again[0][1:], again[0])
        assert same(clean[1], again[1]), f"fault at call {at}"
        assert same_aliases(clean[2], again[2]), f"fault at call {at}: module.weight"
