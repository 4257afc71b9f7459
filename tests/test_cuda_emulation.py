"""The CUDA kernels executed on the CPU through the HIP CPU runtime
(tests/cuda_emulation/, docs/cuda.md): every case matches the oracle, and
faults injected into a copy of the CUDA sources are caught.

Skipped, saying why, where the HIP CPU runtime or TBB is missing. The
fault-injection tests (marker `faults`) build the emulation three more
times; `make cuda-emulate` runs them, `make test` leaves them out."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "cuda_emulation"))
import build  # noqa: E402

try:
    build.check_available()
    UNAVAILABLE = None
except build.Unavailable as exc:
    UNAVAILABLE = str(exc)

pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"CUDA emulation unavailable: {UNAVAILABLE}")


def run_check(*args):
    """check.py in a subprocess (each emulation library registers the same
    op namespace, so one per process)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_emulation", "check.py"), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def summary(output):
    lines = [l for l in output.splitlines() if l.startswith("cuda-emulate:") and "cases" in l]
    assert lines, f"no summary line in:\n{output[-3000:]}"
    words = lines[-1].split()
    return int(words[1]), int(words[3])  # "cuda-emulate: N cases, M mismatches ..."


def test_every_emulated_case_matches_the_oracle():
    rc, out = run_check()
    cases, bad = summary(out)
    assert (rc, bad) == (0, 0), out[-5000:]
    assert cases >= 90, out


# Each fault: the kernel source's text and its faulty replacement (each
# found exactly once), in a copy of csrc/.
FAULTS = {
    # the forward's scalar tail starts one element late: the last element
    # of each thread's first tail turn is never written
    "tail-off-by-one": ("for (int64_t i = nv * V + tid; i < n; i += stride)",
                        "for (int64_t i = nv * V + tid + 1; i < n; i += stride)"),
    # every block of the forward works on the first block's elements
    "missing-block-offset": ("const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;",
                             "const int64_t tid = threadIdx.x;"),
    # mix's inputs read at the first row's offset in every row: the input
    # gradients of per-row matrices (the M output gradients as inputs) wrong
    "mix-row-skip-dropped": ("load<VV>(xs.p[k] + i + row * x_skip.s[k], x);", "load<VV>(xs.p[k] + i, x);"),
    # the warp reduction starts at offset 8: lanes 16..31 are dropped
    "reduction-drops-half-the-lanes": ("for (int off = 16; off > 0; off >>= 1)",
                                       "for (int off = 8; off > 0; off >>= 1)"),
}


@pytest.mark.faults
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_fault_is_caught(tmp_path, fault):
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    # checks.cpp includes ../simplex_param/errors.def
    (tmp_path / "simplex_param").mkdir()
    shutil.copy(os.path.join(ROOT, "simplex_param", "errors.def"), tmp_path / "simplex_param")
    path = csrc / "cuda" / "kernels.cuh"
    text = path.read_text()
    old, new = FAULTS[fault]
    assert text.count(old) == 1, f"the fault's target is not in kernels.cuh once: {old}"
    path.write_text(text.replace(old, new))

    rc, out = run_check("--csrc", str(csrc))
    cases, bad = summary(out)
    assert rc == 1 and bad > 0, f"fault {fault} not caught:\n{out[-3000:]}"


# Faults in the Sinkhorn kernels (csrc/cuda/sinkhorn_kernels.cuh), as above.
SINKHORN_FAULTS = {
    # the backward's denominators overlap the last step's output on the tape
    "sinkhorn-tape-overlap": ("const int64_t z0 = N * N, d0 = (steps + 1) * N * N;",
                              "const int64_t z0 = N * N, d0 = steps * N * N;"),
}


@pytest.mark.faults
@pytest.mark.parametrize("fault", sorted(SINKHORN_FAULTS))
def test_injected_sinkhorn_fault_is_caught(tmp_path, fault):
    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    (tmp_path / "simplex_param").mkdir()
    shutil.copy(os.path.join(ROOT, "simplex_param", "errors.def"), tmp_path / "simplex_param")
    path = csrc / "cuda" / "sinkhorn_kernels.cuh"
    text = path.read_text()
    old, new = SINKHORN_FAULTS[fault]
    assert text.count(old) == 1, f"the fault's target is not in sinkhorn_kernels.cuh once: {old}"
    path.write_text(text.replace(old, new))

    rc, out = run_check("--csrc", str(csrc), "-k", "sinkhorn")
    cases, bad = summary(out)
    assert rc == 1 and bad > 0, f"fault {fault} not caught:\n{out[-3000:]}"
