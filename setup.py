"""Build of simplex_param and its compiled extension, simplex_param._C.

The CUDA kernels are built when csrc/cuda/ holds sources, a CUDA toolkit is
found (CUDA_HOME or nvcc) and torch is a CUDA build. Environment overrides:

  SIMPLEX_PARAM_WITH_CUDA=0|1   never / always build the CUDA kernels
  SIMPLEX_PARAM_DEBUG=1         -O0 -g, no NDEBUG
  TORCH_CUDA_ARCH_LIST          target architectures, as for any torch extension
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # Relative paths: setuptools rejects absolute ones.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _with_cuda(cuda_sources):
    wanted = os.environ.get("SIMPLEX_PARAM_WITH_CUDA", "auto")
    available = bool(cuda_sources) and CUDA_HOME is not None and torch.version.cuda is not None
    if wanted == "1" and not available:
        raise RuntimeError(
            "SIMPLEX_PARAM_WITH_CUDA=1 but the CUDA kernels cannot be built: "
            f"CUDA sources found: {bool(cuda_sources)}, CUDA_HOME: {CUDA_HOME}, "
            f"torch CUDA version: {torch.version.cuda}"
        )
    return available and wanted != "0"


def extensions():
    debug = os.environ.get("SIMPLEX_PARAM_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    # at::parallel_for is an inline OpenMP loop: without -fopenmp the kernels
    # would run on one thread. No -std flag: torch adds the one its headers need.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    # No a * b + c contracted to a fused multiply-add: the kernels built for
    # each instruction set (csrc/cpu/isa_*.cpp) must round alike.
    kwargs = dict(extra_compile_args={"cxx": cxx + ["-ffp-contract=off"] + openmp}, extra_link_args=openmp)
    if _with_cuda(cuda_sources):
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        return [CUDAExtension("simplex_param._C", sources + cuda_sources, **kwargs)]
    return [CppExtension("simplex_param._C", sources, **kwargs)]


setup(
    name="simplex_param",
    version="0.1.0",
    description="Learnable weights on the probability simplex, with a fused softmax-weighted-sum operator",
    packages=find_packages(include=["simplex_param", "simplex_param.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "plot": ["matplotlib"],
        "demo": ["tqdm"],
        "tensorboard": ["tensorboard"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
