"""Loading of the compiled extension, ``simplex_param._C``.

The compiled ops are used when the extension imports. Otherwise every public
function runs the pure-PyTorch reference (:mod:`simplex_param.reference`),
which has the same semantics and error messages, and a ``RuntimeWarning``
says why: the import error, the torch the extension was built for (recorded
by setup.py in ``_build_info.json``, next to it) and the torch found. The
reason stays in ``LOAD_ERROR``. Environment variables:

``SIMPLEX_PARAM_DISABLE_EXTENSION=1``
    Never load the extension: use the fallback.
``SIMPLEX_PARAM_JIT=1``
    When no prebuilt extension imports, compile the sources listed in
    ``csrc/sources.txt`` with :func:`torch.utils.cpp_extension.load` (needs
    the source tree and a C++ compiler; the CUDA kernels too when torch has
    CUDA and nvcc is found).
``SIMPLEX_PARAM_LIBRARY=path/to/lib.so``
    Load the ops from this shared library instead of ``simplex_param._C``,
    e.g. the AddressSanitizer build of ``make sanitize``. Failing to load it
    is an error.
"""
import importlib
import json
import os
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The source tree, when the package is used from one (editable install, JIT).
_ROOT = os.path.dirname(_PACKAGE)

_REBUILD_HINT = (
    "rebuild it against this torch with `pip install --no-build-isolation .` "
    "(or `-e .`) in the source tree, or set SIMPLEX_PARAM_JIT=1 to compile it at import"
)


def _jit_load():
    from torch.utils import cpp_extension

    listing = os.path.join(_ROOT, "csrc", "sources.txt")
    if not os.path.isfile(listing):
        raise ImportError(f"SIMPLEX_PARAM_JIT=1 but the sources are missing: no {listing}")
    # One path a line, relative to the root; `#` starts a comment (setup.py).
    with open(listing) as f:
        paths = [os.path.join(_ROOT, p) for p in (line.split("#", 1)[0].strip() for line in f) if p]
    sources = [p for p in paths if not p.endswith(".cu")]
    cuda_sources = [p for p in paths if p.endswith(".cu")]
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += cuda_sources
    # -fopenmp and -ffp-contract=off as in setup.py: at::parallel_for is an
    # inline OpenMP loop, and the kernels of each instruction set must round alike.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cpp_extension.load(
        name="simplex_param_jit",
        sources=sources,
        extra_cflags=["-O3", "-DNDEBUG", "-ffp-contract=off", *openmp],
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3", "-lineinfo"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("SIMPLEX_PARAM_JIT_VERBOSE") == "1",
    )
    return "jit"


def _build_info():
    """What simplex_param._C was built against, as setup.py recorded it:
    {"torch": version, "cuda": version or None}, or None without a record."""
    try:
        with open(os.path.join(_PACKAGE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _torch_name(version, cuda):
    return f"torch {version}" + (f" (CUDA {cuda})" if cuda else "")


def _why(error):
    """Why simplex_param._C did not load, with the torch it was built for and this one."""
    info = _build_info()
    found = _torch_name(torch.__version__, torch.version.cuda)
    if info is None:
        built = "no record of the torch it was built for (simplex_param/_build_info.json)"
    else:
        built = f"it was built for {_torch_name(info.get('torch'), info.get('cuda'))}"
    return f"{type(error).__name__}: {error}; {built}, and this is {found}"


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
        error = _why(exc)
    if os.environ.get("SIMPLEX_PARAM_JIT", "0") not in ("", "0"):
        # A failed JIT build is an error the user asked for: let it raise.
        return _jit_load(), None
    warnings.warn(
        f"simplex_param: the compiled extension could not be loaded ({error}). "
        f"The pure-PyTorch fallback is in use: same results, slower. To get the fused kernels, {_REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None, error


# The module simplex_param._C when it was imported: its functions are direct
# entry points to the ops (csrc/python_module.cpp). LOAD_ERROR says why the
# fallback is in use (the reason the warning gives, or the environment
# variable that disabled the extension), None when it is not.
MODULE = None
LOADED_FROM, LOAD_ERROR = _load()


def extension_loaded() -> bool:
    """Whether the fused C++/CUDA kernels are active (else the pure-PyTorch fallback is).

    When they are not, ``simplex_param._ext.LOAD_ERROR`` says why.
    """
    return LOADED_FROM is not None


def cpu_capability():
    """The instruction set the compiled CPU kernels run on (``"default"``,
    ``"avx2"``, ``"avx512"`` or ``"avx512_bf16"``; see
    ``SIMPLEX_PARAM_CPU_CAPABILITY``), or None when the extension is not
    loaded."""
    return MODULE.cpu_capability() if MODULE is not None else None
