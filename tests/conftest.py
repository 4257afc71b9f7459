"""Shared devices, dtypes and tolerances for the tests."""
import pytest
import torch

import simplex_param as sp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances by dtype, in one place: (rtol, atol) of torch.testing.assert_close.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

COMPILED = sp.extension_loaded()


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None):
    """assert_close with the tolerance of `dtype` (default: that of `expected`)."""
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **tol(dtype), equal_nan=True)


def pytest_report_header(config):
    return f"simplex_param: compiled extension loaded: {COMPILED}; devices: {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
