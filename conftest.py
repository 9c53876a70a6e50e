"""Shared fixtures (one_thread, fresh_dynamo, untruncated_init), the hypothesis profiles of the
property tests (test_flatten.py), and one thread per pytest-xdist worker.

Pick one with the HYPOTHESIS_PROFILE environment variable (default "ci"):
  ci   derandomized: the same examples on every run and machine, no example database;
       the profile the suite's timing budget is measured with.
  dev  fewer, random examples, with the local example database replaying past failures:
       for quick runs while editing.
  long many random examples, for a search before a release (minutes).
Neither has a deadline: the first call of a torch op is much slower than the next ones.

Without a GPU, Triton (when installed) runs flatten.py's kernels in its interpreter, on CPU
tensors: TRITON_INTERPRET=1 is set here, before flatten.py defines them.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`pytest -n 2`, the README's command) each worker process runs tests on one
# intra-op thread: two workers share two cores, where a thread pool per worker would
# oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("ci", max_examples=50, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: as fast, and steadier on a shared
    machine (a thread pool made the property tests 5-10x slower on a busy one: 77 s against
    8 s). The official fixtures reproduce bit-exactly at 1-2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo's caches emptied before and after the test: its torch.compile does not
    inherit what another test compiled (a code object compiled before at other sizes recompiles
    with dynamic sizes: several times the tracing, and other graphs than the test expects)."""
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def untruncated_init(monkeypatch):
    """nn.init.trunc_normal_ as a no-op: initial values do not matter to key, shape, count and
    FLOP checks, and the truncated normal is most of the build time of the full-size models."""
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
