"""Hypothesis profiles for the property tests (test_properties.py).

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

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=50, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
