"""Build of simplex_param and its compiled extension, simplex_param._C.

The sources are listed in csrc/sources.txt, the version in
simplex_param/_version.py. Build with `pip install --no-build-isolation .`:
the extension must be compiled against the torch that is installed, and
build isolation would compile it against a second one. The torch it was
built against is recorded next to it (simplex_param/_build_info.json), so
that a failed load can say which torch it wanted (simplex_param/_ext.py).

The CUDA kernels (the .cu files of the list) are built when a CUDA toolkit is
found (CUDA_HOME or nvcc) and torch is a CUDA build. Environment overrides:

  SIMPLEX_PARAM_WITH_CUDA=0|1   never / always build the CUDA kernels
  SIMPLEX_PARAM_DEBUG=1         -O0 -g, no NDEBUG
  TORCH_CUDA_ARCH_LIST          target architectures, as for any torch extension
"""
import json
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    # Read, not imported: importing simplex_param would load the extension.
    with open(os.path.join(ROOT, "simplex_param", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _sources():
    """(C++ sources, CUDA sources) of csrc/sources.txt, relative to the root."""
    # Relative paths: setuptools rejects absolute ones.
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        paths = [line.split("#", 1)[0].strip() for line in f]
    paths = [p for p in paths if p]
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    if missing:
        raise FileNotFoundError(f"csrc/sources.txt lists files that do not exist: {missing}")
    return [p for p in paths if not p.endswith(".cu")], [p for p in paths if p.endswith(".cu")]


def _with_cuda(cuda_sources):
    wanted = os.environ.get("SIMPLEX_PARAM_WITH_CUDA", "auto")
    available = bool(cuda_sources) and CUDA_HOME is not None and torch.version.cuda is not None
    if wanted == "1" and not available:
        raise RuntimeError(
            "SIMPLEX_PARAM_WITH_CUDA=1 but the CUDA kernels cannot be built: "
            f"CUDA sources in csrc/sources.txt: {bool(cuda_sources)}, CUDA_HOME: {CUDA_HOME}, "
            f"torch CUDA version: {torch.version.cuda}"
        )
    return available and wanted != "0"


def extensions():
    debug = os.environ.get("SIMPLEX_PARAM_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    sources, cuda_sources = _sources()
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


class BuildExtensionWithInfo(BuildExtension):
    """torch's BuildExtension, which also writes _build_info.json next to _C.

    It holds the torch version the extension was compiled against and the
    CUDA version of its kernels (null without them). It goes into build_lib,
    hence into wheels, and next to the in-place library of an editable
    install.
    """

    def run(self):
        super().run()
        for ext in self.extensions:
            info = {
                "torch": torch.__version__,
                "cuda": torch.version.cuda if any(s.endswith(".cu") for s in ext.sources) else None,
            }
            package = ext.name.split(".")[:-1]
            # get_ext_fullpath gives the in-place path when building in place.
            for folder in {os.path.join(self.build_lib, *package), os.path.dirname(self.get_ext_fullpath(ext.name))}:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_build_info.json"), "w") as f:
                    json.dump(info, f)
                    f.write("\n")


setup(
    name="simplex_param",
    version=_version(),
    description="Learnable weights on the probability simplex, with a fused softmax-weighted-sum operator",
    packages=find_packages(include=["simplex_param", "simplex_param.*"]),
    # The error table, read by simplex_param/checks.py at import.
    package_data={"simplex_param": ["errors.def"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "plot": ["matplotlib"],
        "demo": ["tqdm"],
        "tensorboard": ["tensorboard"],
        "safetensors": ["safetensors"],  # LearnedSoup members as files, save_merged
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionWithInfo},
    zip_safe=False,
)
