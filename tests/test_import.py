"""The package front: small, lazy, and free of timm/torchvision/CUDA at import."""

import subprocess
import sys

import pytest

import signmask


@pytest.mark.parametrize("module", ["signmask", "signmask.analysis"])
def test_import_touches_neither_timm_torchvision_nor_cuda(module):
    code = (
        "import sys, torch\n"
        "calls = []\n"
        "torch.cuda._lazy_init = lambda *a, **k: calls.append('lazy_init')\n"
        f"import {module}\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'triton', 'matplotlib') if m in sys.modules), calls)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_public_front_is_small_and_explicit():
    assert len(signmask.__all__) <= 12
    assert all(hasattr(signmask, name) for name in signmask.__all__)
    public = {n for n in dir(signmask) if not n.startswith("_")}
    # Public subpackages appear once imported (pytest imports them all); they are namespaces.
    assert public <= set(signmask.__all__) | {"analysis"}
