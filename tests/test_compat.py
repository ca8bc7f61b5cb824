"""import_timm(): the CPU-torch / CUDA-torchvision workaround, applied only when needed."""

import subprocess
import sys
import types

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
