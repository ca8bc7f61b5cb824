"""import_timm(): the CPU-torch / CUDA-torchvision workaround, applied only when needed."""

import subprocess
import sys
import types

import torch

from signmask import _compat

PROBE = """
import importlib, sys
try:
    import torchvision
    print("plain-import-ok")
except RuntimeError as e:
    print("plain-import-failed" if "torchvision::nms" in str(e) else "other-error")
    # Half-imported: forget it. A working torchvision stays (importing it twice in one process
    # registers its Meta kernels twice, which torch refuses).
    for m in [m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')]:
        del sys.modules[m]
from signmask._compat import import_timm, _LIBRARIES
timm = import_timm()
model = timm.create_model("resnet18", pretrained=False, num_classes=3)
import torch
print(tuple(model.eval()(torch.randn(1, 3, 32, 32)).shape), len(_LIBRARIES))
"""


def test_import_timm_works_and_patches_only_when_the_extension_fails():
    first, second = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # The schemas are declared exactly when a plain import fails, never otherwise.
    assert first in ("plain-import-failed", "plain-import-ok")
    assert second == "(1, 3) " + ("1" if first == "plain-import-failed" else "0")


def test_import_timm_leaves_working_installs_alone(monkeypatch):
    fake = types.ModuleType("timm")
    monkeypatch.setattr(_compat.importlib, "import_module", lambda name: fake)
    before = list(_compat._LIBRARIES)
    assert _compat.import_timm() is fake
    assert _compat._LIBRARIES == before


def test_import_timm_reraises_unrelated_errors(monkeypatch):
    def boom(name):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(_compat.importlib, "import_module", boom)
    try:
        _compat.import_timm()
    except RuntimeError as e:
        assert "something else broke" in str(e)
    else:
        raise AssertionError("unrelated RuntimeError swallowed")


def test_the_workaround_forgets_half_imported_modules_and_declares_both_schemas(monkeypatch):
    # Stale timm/torchvision submodules left by the failed import would be reused by the retry.
    for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # restored after the test
    monkeypatch.setitem(sys.modules, "torchvision._half", types.ModuleType("torchvision._half"))
    monkeypatch.setitem(sys.modules, "timmy", types.ModuleType("timmy"))  # another package
    fake, seen = types.ModuleType("timm"), []

    def import_module(name):
        seen.append(sorted(n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision", "timmy")))
        if len(seen) == 1:
            raise RuntimeError(_compat._MISSING_OP)
        return fake

    class Library:
        def __init__(self, ns, kind):
            self.args, self.schemas = (ns, kind), []

        def define(self, schema):
            self.schemas.append(schema)

    monkeypatch.setattr(_compat.importlib, "import_module", import_module)
    monkeypatch.setattr(torch.library, "Library", Library)
    monkeypatch.setattr(_compat, "_LIBRARIES", [])
    assert _compat.import_timm() is fake
    assert "torchvision._half" in seen[0] and seen[1] == ["timmy"]
    [lib] = _compat._LIBRARIES
    assert lib.args == ("torchvision", "DEF")
    assert [s.split("(")[0] for s in lib.schemas] == ["nms", "qnms"]
