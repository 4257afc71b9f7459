"""Shared devices, dtypes and tolerances for the tests."""
import os

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


def weights_of(map, logits, temperature=1.0, dtype=torch.float64, **opts):
    """The weights a map gives, read through the contraction: w[..., k] is the
    output for inputs that are the one-hot vectors e_k of `dtype` (their
    sums are exact), so the weights are taken in that dtype's accumulation
    dtype."""
    K = logits.shape[-1]
    eye = torch.eye(K, dtype=dtype, device=logits.device)
    xs = [eye[k].expand(*logits.shape[:-1], K) for k in range(K)]
    return sp.simplex_weighted_sum(logits, xs, map=map, temperature=temperature, **opts)


def pytest_report_header(config):
    return f"simplex_param: compiled extension loaded: {COMPILED}; devices: {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# make stress-dist: SIMPLEX_PARAM_STRESS=N runs every test marked
# `multiprocess` N times, then counts the passes, failures and aborts.
STRESS = int(os.environ.get("SIMPLEX_PARAM_STRESS", "0") or 0)


def pytest_generate_tests(metafunc):
    if STRESS and metafunc.definition.get_closest_marker("multiprocess"):
        metafunc.fixturenames.append("stress_run")
        metafunc.parametrize("stress_run", range(STRESS), ids=lambda i: f"run{i}")


def pytest_terminal_summary(terminalreporter):
    if not STRESS:
        return
    stats = terminalreporter.stats
    passed = [r for r in stats.get("passed", []) if r.when == "call"]
    failed = [r for r in stats.get("failed", [])]
    aborted = [r for r in failed if "killed by signal" in r.longreprtext]
    teardown = [w for w in stats.get("warnings", []) if "died in teardown" in w.message]
    terminalreporter.write_line(
        f"stress-dist: {len(passed) + len(failed)} runs of {STRESS} rounds: {len(passed)} passed, "
        f"{len(failed)} failed, of which {len(aborted)} aborted (a worker killed by a signal before it "
        f"reported); {len(teardown)} deaths in teardown after a reported result")
