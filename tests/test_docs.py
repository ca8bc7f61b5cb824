"""The docstring examples of the public API run as a user would paste them.

pytest's ``--doctest-modules`` runs every example in its module's namespace, where an example
may call ``barrier(...)`` or use ``torch`` without importing it. Here each example of a public
name (``signmask.__all__``, ``signmask.analysis.__all__``, and the public methods and properties
of the public classes) runs in a fresh, empty namespace instead, so it must import what it uses.

The same public callables' documented contract is checked against their signatures: a one-line
summary, ``Args:`` naming exactly the parameters in order, ``Raises:`` naming real exceptions,
and the README's API table giving each function's parameters, defaults and ``*``.

And the README's own code blocks run as shown: its python blocks (with small stand-ins for the
names its prose leaves to the reader), its ``inspect`` output, and its test command is CI's.
"""

import ast
import builtins
import dataclasses
import doctest
import inspect
import re
from pathlib import Path

import pytest
import torch

import signmask
from signmask import analysis

PACKAGES = (signmask, analysis)


def public_examples() -> list[doctest.DocTest]:
    """The doctests, with at least one example, of every public name of ``PACKAGES``."""
    finder = doctest.DocTestFinder()
    found = []
    for package in PACKAGES:
        found += doctest.DocTestFinder(recurse=False).find(package)  # the package's own docstring
        for name in package.__all__:
            obj = getattr(package, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue  # __version__, PERTURBATIONS: their docstrings are str's and dict's
            tests = finder.find(obj, f"{package.__name__}.{name}", module=inspect.getmodule(obj))
            # A class's private helpers (`_name`, not `__dunder__`) may keep module-namespace style.
            found += [t for t in tests if not any(private(part) for part in t.name.split("."))]
    return [t for t in found if t.examples]


def private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


EXAMPLES = public_examples()


def test_the_public_examples_are_found():
    names = {t.name for t in EXAMPLES}
    # Functions, classes and class methods of both packages: the walk reaches each kind.
    assert {
        "signmask.prune",
        "signmask.Ticket",
        "signmask.Search.start_round",
        "signmask.Ticket.layer_sparsity",
        "signmask.analysis.barrier",
        "signmask.analysis.Telemetry.record",
    } <= names
    assert len(names) == len(EXAMPLES)  # each runs once, under its public name


@pytest.mark.parametrize("test", EXAMPLES, ids=lambda t: t.name)
def test_public_example_runs_in_a_fresh_namespace(test):
    """The example imports what it uses: nothing of its module's namespace is there."""
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)  # pytest's default flags
    test.globs = {}
    result = runner.run(test, out=report.append, clear_globs=True)
    failed = f"{test.name}: {result.failed} of {result.attempted} examples failed\n"
    assert result.failed == 0, failed + "".join(report)


# The documented contract: every public callable's docstring (summary, Args, Raises) and the
# README's API table agree with its signature.

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("Args", "Attributes", "Returns", "Raises", "Example")
ARG_ENTRY = re.compile(r"(\*{0,2}\w+(?:, \*{0,2}\w+)*): \S")  # "name: ...", "a, b: ..."
EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Warning)\b")
RAISES_ENTRY = re.compile(rf"({EXCEPTION.pattern}(?: / {EXCEPTION.pattern})*): \S")
# Callables whose docstring documents no Args although they take some, and why.
NO_ARGS = {
    "signmask.Search": "made by signmask.apply, its constructor's arguments are internal",
}


def public_callables() -> dict[str, object]:
    """Qualified name -> function, class, method or property, for every public callable."""
    found = {}
    for package in PACKAGES:
        for name in package.__all__:
            obj = getattr(package, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue  # __version__, PERTURBATIONS
            qualname = f"{package.__name__}.{name}"
            found[qualname] = obj
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():  # no public class has a public base
                    if not attr.startswith("_") and (
                        inspect.isfunction(value) or isinstance(value, property)
                    ):
                        found[f"{qualname}.{attr}"] = value
    return found


CALLABLES = public_callables()


def docstring(obj) -> str:
    """The object's own docstring, cleaned (``inspect.getdoc`` would fall back on a base's)."""
    return inspect.cleandoc(obj.__doc__ or "")


def sections(doc: str) -> dict[str, list[str]]:
    """Each Google-style section (``Args:`` at column 0) -> its lines, dedented by 4."""
    found, current = {}, None
    for line in doc.splitlines():
        if re.fullmatch(r"[A-Z]\w*:", line):
            assert line[:-1] in SECTIONS, f"unknown section {line!r}"
            assert line[:-1] not in found, f"two {line!r} sections"
            current = found[line[:-1]] = []
        elif current is not None and (not line or line.startswith("    ")):
            current.append(line[4:])
        else:
            current = None  # a paragraph at column 0 ends the section
    return found


def parameters(obj) -> list[str]:
    """The parameter names a docstring's Args must list, in order."""
    if isinstance(obj, property):
        return []
    return [name for name in inspect.signature(obj).parameters if name != "self"]


def documented_args(lines: list[str]) -> list[str]:
    names = []
    for line in lines:
        if line and not line.startswith(" "):  # deeper lines continue an entry
            entry = ARG_ENTRY.match(line)
            assert entry, f"Args line is no 'name: text' entry: {line!r}"
            names += [name.lstrip("*") for name in entry[1].split(", ")]
    return names


def test_the_public_callables_are_found():
    assert {
        "signmask.prune",
        "signmask.Search",
        "signmask.Search.report",
        "signmask.Search.ticket",
        "signmask.Ticket.layer_sparsity",
        "signmask.analysis.Verdict.prize",
        "signmask.analysis.Telemetry.series",
    } <= set(CALLABLES)


@pytest.mark.parametrize("name", CALLABLES)
def test_docstring_has_a_one_line_summary(name):
    obj = CALLABLES[name]
    assert docstring(obj), f"{name} has no docstring"
    summary, *rest = docstring(obj).splitlines()
    assert summary.endswith("."), f"{name}: the summary line ends without a period: {summary!r}"
    assert not rest or rest[0] == "", f"{name}: the summary runs onto a second line"
    if inspect.isroutine(obj):  # "Prune ...", not "Prunes ..."
        verb = summary.split()[0]
        assert not (verb.endswith("s") and not verb.endswith("ss")), f"{name}: {verb!r}"


@pytest.mark.parametrize("name", CALLABLES)
def test_docstring_args_are_the_signature(name):
    obj = CALLABLES[name]
    documented = documented_args(sections(docstring(obj)).get("Args", []))
    if name in NO_ARGS:
        assert not documented, f"{name} is in NO_ARGS but documents {documented}"
        return
    assert documented == parameters(obj), f"{name}: Args lists {documented}"


@pytest.mark.parametrize("name", CALLABLES)
def test_docstring_raises_names_real_exceptions(name):
    lines = sections(docstring(CALLABLES[name])).get("Raises", [])
    for line in lines:
        entry = RAISES_ENTRY.match(line)
        if EXCEPTION.match(line) or re.match(r"[\w /]+: ", line):  # an entry, else a note
            assert entry, f"{name}: Raises line is no 'Error: text' entry: {line!r}"
        inside = re.search(rf"{EXCEPTION.pattern}: ", line[entry.end(1) if entry else 0 :])
        assert not inside, f"{name}: {inside[0]!r} inside an entry; give it its own line"
    for exception in EXCEPTION.findall("\n".join(lines)):
        cls = getattr(builtins, exception, None)
        assert isinstance(cls, type) and issubclass(cls, BaseException), f"{name}: {exception}"


def readme_api() -> dict[str, str]:
    """Name -> its parameter list, from the backticked ``name(...)`` cells of the API table."""
    api = README.read_text(encoding="utf-8").split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for row in api.splitlines():
        if row.startswith("| `"):
            cell = row[2 : row.index(" | ", 2)]
            for name, params in re.findall(r"`(\w+)(\(.*?\))?(?: -> [\w.]+)?`", cell):
                found[name] = params[1:-1] if params else None  # `Search`: no signature
    return found


def readme_parameters(params: str) -> list[str]:
    """``a, b=1, *, c`` -> ``["a", "b=1", "*", "c"]``, defaults as their ``repr``."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    listed = [
        a.arg if d is None else f"{a.arg}={ast.literal_eval(d)!r}"
        for a, d in zip(positional, defaults)
    ]
    if args.vararg or args.kwonlyargs:
        listed.append(f"*{args.vararg.arg}" if args.vararg else "*")
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        listed.append(a.arg if d is None else f"{a.arg}={ast.literal_eval(d)!r}")
    return listed + ([f"**{args.kwarg.arg}"] if args.kwarg else [])


def code_parameters(obj) -> list[str]:
    """The same list from ``inspect.signature`` (a dataclass's factory default as its value)."""
    fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ()
    factories = {f.name: f.default_factory for f in fields}  # MISSING where there is none
    listed = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not any(x.startswith("*") for x in listed):
            listed.append("*")
        factory = factories.get(p.name, dataclasses.MISSING)
        default = p.default if factory is dataclasses.MISSING else factory()
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        listed.append(prefix + p.name + ("" if default is p.empty else f"={default!r}"))
    return listed


README_API = readme_api()


def test_readme_api_table_lists_the_public_names():
    public = {n for n in signmask.__all__ if not n.startswith("__")}
    assert set(README_API) == public


@pytest.mark.parametrize("name", [n for n, params in README_API.items() if params is not None])
def test_readme_api_signature_is_the_code(name):
    readme, code = readme_parameters(README_API[name]), code_parameters(getattr(signmask, name))
    assert readme == code, f"README: {name}({', '.join(readme)}); code: {', '.join(code)}"


# The README's code blocks run as shown. A block may use names its prose leaves to the reader
# (your model, optimizer, loaders, training function): each test defines those, small, and
# nothing else, so a renamed function or argument in a block fails here.

ROOT = README.parent


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def readme_block(marker: str) -> str:
    found = [b for b in readme_blocks("python") if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


APPLY_BLOCK, ANALYSIS_BLOCK, TEN_LINES = "search = signmask.apply(", "from signmask import analysis", "timm = import_timm()"


def test_every_readme_python_block_is_run_below():
    blocks = readme_blocks("python")
    assert len(blocks) == 3
    assert all(sum(m in b for m in (APPLY_BLOCK, ANALYSIS_BLOCK, TEN_LINES)) == 1 for b in blocks)


def test_readme_test_command_is_what_ci_runs():
    command = next(b for b in readme_blocks("bash") if '".[test]"' in b).strip()
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def tiny_loaders():
    """Four batches of 8 random TinyNet inputs and labels."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 5, (32,))
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def same_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readme_apply_block_runs(tmp_path, monkeypatch):
    from _util import tiny

    monkeypatch.chdir(tmp_path)
    loader = tiny_loaders()
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_one_epoch(model, opt, loader):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def evaluate(model):
        return analysis.evaluate(model, loader).accuracy

    names = dict(signmask=signmask, model=model, opt=opt, loader=loader, epochs=1, new_model=tiny(1),
                 sched=torch.optim.lr_scheduler.StepLR(opt, 1), train_one_epoch=train_one_epoch,
                 evaluate=evaluate)
    exec(readme_block(APPLY_BLOCK), names)
    ticket = signmask.load(tmp_path / "aws.safetensors")
    assert ticket.metadata["method"] == "aws" and ticket.sparsity == pytest.approx(0.8, abs=0.01)
    assert same_masks(signmask.extract(names["new_model"]).masks, ticket.masks)


def test_readme_analysis_block_runs(tmp_path, monkeypatch):
    import copy

    from _util import tiny

    monkeypatch.chdir(tmp_path)
    loader = tiny_loaders()
    init_model = tiny(0)
    solution = signmask.prune(copy.deepcopy(init_model), 0.5, classifier=False)
    ticket = signmask.extract(solution, dense=True)
    transferred = signmask.transfer(ticket, tiny(1))

    def train_fn(model, seed):
        torch.manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    names = dict(solution=solution, transferred=transferred, test_loader=loader, train_loader=loader,
                 model_at_k=copy.deepcopy(init_model), train_fn=train_fn, ticket=ticket, fresh_a=tiny(2),
                 init_copy=copy.deepcopy(init_model), ticket_acc=0.9, dense_acc=0.9, reinit_acc=0.8,
                 best_dense_acc=0.9, model_a=solution, model_b=transferred, model=solution, step=0,
                 init_model=init_model)
    exec(readme_block(ANALYSIS_BLOCK), names)
    assert (tmp_path / "lmc.png").stat().st_size > 0


def test_readme_ten_lines_run_and_inspect_prints_what_the_readme_shows(tmp_path, monkeypatch):
    from signmask import _cli

    monkeypatch.chdir(tmp_path)
    names = {}
    exec(readme_block(TEN_LINES), names)
    ticket = signmask.load("ticket.safetensors")
    assert same_masks(signmask.extract(names["fresh"]).masks, ticket.masks)
    shown = next(b for b in readme_blocks("text") if "python -m signmask inspect ticket.safetensors" in b)
    printed = _cli.inspect("ticket.safetensors").splitlines()
    # Per-layer rows depend on the random init, the versions line on what is installed.
    expected = [line for line in shown.splitlines()[1:] if line != "..." and "versions:" not in line]
    head = expected.index("") + 3  # the metadata, a blank line, the table's head and rule
    printed = [line for line in printed if "versions:" not in line]
    assert printed[:head] == expected[:head]
    assert printed[head].split()[:2] == expected[head].split()[:2]  # conv1.weight, its shape
