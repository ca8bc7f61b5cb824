"""The docstring examples of the public API run as a user would paste them.

pytest's ``--doctest-modules`` runs every example in its module's namespace, where an example
may call ``barrier(...)`` or use ``torch`` without importing it. Here each example of a public
name (``signmask.__all__``, ``signmask.analysis.__all__``, and the public methods and properties
of the public classes) runs in a fresh, empty namespace instead, so it must import what it uses.
"""

import doctest
import inspect

import pytest

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
