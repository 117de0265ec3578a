"""Test set-up: Triton runs in its interpreter on CPU, and hypothesis has bounded profiles.

`TRITON_INTERPRET=1` must be set before `triton` is first imported, so it is set here,
at the top of the first module pytest loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
