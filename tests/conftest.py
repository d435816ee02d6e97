import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """float64 everywhere in correctness tests, and a fixed seed per test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
