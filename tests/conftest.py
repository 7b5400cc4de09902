"""Shared test set-up: small thread count (CI has 2 cores), deterministic seeds, hypothesis profiles."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)
settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
