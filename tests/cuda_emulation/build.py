"""Builds the emulation library (emulated.cpp against the HIP CPU runtime).

`build(csrc)` compiles tests/cuda_emulation/emulated.cpp with csrc's CUDA
kernels and launches (csrc/cuda/kernels.cuh, launch.cuh) and its op-level
code (csrc/contraction.cpp, layout.cpp, checks.cpp, sinkhorn.cpp) into one library, and
returns its path. The HIP CPU runtime is found at HIP_CPU_DIR, else at
../shared/hip-cpu beside the repository; it needs Intel TBB (libtbb-dev).
"""
import hashlib
import os
import shutil
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OP_SOURCES = ("contraction.cpp", "layout.cpp", "checks.cpp", "sinkhorn.cpp")


class Unavailable(RuntimeError):
    """The emulation cannot be built here (no HIP CPU runtime, no TBB)."""


def hip_cpu_dir() -> str:
    return os.environ.get("HIP_CPU_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "hip-cpu")


def check_available() -> str:
    """The HIP CPU runtime's folder; raises Unavailable, saying what is missing."""
    hip = hip_cpu_dir()
    if not os.path.isfile(os.path.join(hip, "include", "hip", "hip_runtime.h")):
        raise Unavailable(f"the HIP CPU runtime is not at {hip} (set HIP_CPU_DIR to its folder)")
    if not any(os.path.isfile(os.path.join(d, "tbb", "tbb.h")) for d in ("/usr/include", "/usr/local/include")):
        raise Unavailable("Intel TBB headers not found (Debian: apt-get install -y libtbb-dev)")
    return hip


def build(csrc: str = os.path.join(ROOT, "csrc"), build_dir: str | None = None, verbose: bool = False) -> str:
    """Compiles and loads the library for the sources under `csrc`; returns its path.

    The name carries a hash of every source it is built from, so that a
    changed kernel (or an injected fault) is always rebuilt, never reused."""
    from torch.utils import cpp_extension

    hip = check_available()
    csrc = os.path.abspath(csrc)
    sources = [os.path.join(HERE, "emulated.cpp")] + [os.path.join(csrc, s) for s in OP_SOURCES]
    deps = sources + [os.path.join(HERE, "hip_cuda.h")] + [
        os.path.join(csrc, "cuda", f) for f in sorted(os.listdir(os.path.join(csrc, "cuda")))]
    digest = hashlib.sha256()
    for path in deps:
        with open(path, "rb") as f:
            digest.update(path.encode() + b"\0" + f.read())
    name = "simplex_param_emulated_" + digest.hexdigest()[:12]
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda-emulate")
    target = os.path.join(build_dir, name)
    os.makedirs(target, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpp_extension.load(
            name=name,
            sources=sources,
            build_directory=target,
            extra_include_paths=[csrc, os.path.join(hip, "include")],
            # As the GPU build: -O3, no contraction of a * b + c beyond the
            # kernels' own fma calls (nvcc contracts, but the kernels leave it
            # no product to fuse); -fvisibility=hidden keeps this library's
            # copy of the op-level code apart from the extension's.
            extra_cflags=["-O2", "-DNDEBUG", "-ffp-contract=off", "-fvisibility=hidden", "-w"],
            extra_ldflags=["-ltbb", "-lpthread"],
            is_python_module=False,
            with_cuda=False,
            verbose=verbose,
        )
    return os.path.join(target, name + ".so")
