import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Fixed seeds: hypothesis draws the same configurations on every run (derandomize), so CI is
# reproducible; HYPOTHESIS_PROFILE=explore draws fresh ones for a longer local search.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models and densities: more threads only add overhead and make
    sequential draws differ from process-parallel ones); the caller's setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
