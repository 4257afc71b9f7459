"""Loading of the compiled extension, ``simplex_param._C``.

The compiled ops are used when the extension imports. Otherwise every public
function runs the pure-PyTorch reference (:mod:`simplex_param.reference`),
which has the same semantics and error messages. Environment variables:

``SIMPLEX_PARAM_DISABLE_EXTENSION=1``
    Never load the extension: use the fallback.
``SIMPLEX_PARAM_JIT=1``
    When no prebuilt extension imports, compile ``csrc/`` with
    :func:`torch.utils.cpp_extension.load` (needs the source tree and a C++
    compiler; the CUDA kernels too when torch has CUDA and nvcc is found).
``SIMPLEX_PARAM_LIBRARY=path/to/lib.so``
    Load the ops from this shared library instead of ``simplex_param._C``,
    e.g. the AddressSanitizer build of ``make sanitize``. Failing to load it
    is an error.
"""
import glob
import importlib
import os
import warnings

import torch

_REBUILD_HINT = (
    "rebuild it with `pip install --no-build-isolation -e .` in the source tree, "
    "or set SIMPLEX_PARAM_JIT=1 to compile it at import"
)


def _jit_load():
    from torch.utils import cpp_extension

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if not os.path.isdir(root):
        raise ImportError(f"SIMPLEX_PARAM_JIT=1 but the sources are missing: no {root}")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += cuda_sources
    # -fopenmp: at::parallel_for is an inline OpenMP loop (see setup.py).
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cpp_extension.load(
        name="simplex_param_jit",
        sources=sources,
        extra_cflags=["-O3", "-DNDEBUG", *openmp],
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3", "-lineinfo"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("SIMPLEX_PARAM_JIT_VERBOSE") == "1",
    )
    return "jit"


def _load():
    """Returns (how, error): how is "library", "prebuilt", "jit" or None."""
    if os.environ.get("SIMPLEX_PARAM_DISABLE_EXTENSION", "0") not in ("", "0"):
        return None, "disabled by SIMPLEX_PARAM_DISABLE_EXTENSION"
    library = os.environ.get("SIMPLEX_PARAM_LIBRARY", "")
    if library:
        torch.ops.load_library(library)
        return "library", None
    try:
        global MODULE
        MODULE = importlib.import_module("simplex_param._C")
        return "prebuilt", None
    except (ImportError, OSError) as exc:
        error = exc
    if os.environ.get("SIMPLEX_PARAM_JIT", "0") not in ("", "0"):
        # A failed JIT build is an error the user asked for: let it raise.
        return _jit_load(), None
    warnings.warn(
        f"simplex_param: the compiled extension could not be loaded ({error}); "
        f"using the pure-PyTorch fallback. To get the fused kernels, {_REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, str(error)


# The module simplex_param._C when it was imported: its functions are direct
# entry points to the ops (csrc/python_module.cpp).
MODULE = None
LOADED_FROM, LOAD_ERROR = _load()


def extension_loaded() -> bool:
    """Whether the fused C++/CUDA kernels are active (else the pure-PyTorch fallback is)."""
    return LOADED_FROM is not None
