"""Suite-wide settings. The tests' own helpers live in ``_util.py``."""

import os

import pytest
import torch
from hypothesis import settings

# No per-example deadline (hypothesis's default is 200 ms): a deadline is a timing test, and on a
# shared 2-core machine a pure-Python example of kept_schedule over 10**7 weights can miss it
# while other jobs hold the cores; speed goals live in benchmarks/.
settings.register_profile("signmask", deadline=None)
settings.load_profile("signmask")

# Without CUDA the Triton kernels run through the interpreter. Triton reads this when a kernel
# is decorated, so it must be set before any test module imports signmask._triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run tensor work on one thread.

    No check depends on it (every comparison runs both sides under the same setting). On the
    2-core CI machine, 2 OpenMP threads spin-waiting at barriers made the suite many times slower
    whenever anything else ran, and one thread is as fast on these tiny models.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
