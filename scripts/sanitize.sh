#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize/ (the in-tree extension is left alone), then runs the
# operator tests on that build. Any sanitizer report fails the run.
#
#   make sanitize            or            scripts/sanitize.sh [pytest args]
#
# Needs gcc's libasan and libubsan (Debian: libgcc-12-dev, installed with g++).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUILD=build/sanitize
mkdir -p "$BUILD"

# libasan must be loaded before anything else in any process that loads the
# instrumented library. CPython's own allocations are never freed at exit,
# so leak detection is off; tests/test_reliability.py checks leaks instead.
# libstdc++ is preloaded too, or ASan cannot intercept C++ exceptions
# (python itself does not link it).
ASAN_LIB="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

# cpp_extension.load also loads what it builds, hence the preload; the
# compiler it runs must not inherit it.
FLAGS='["-O1", "-g", "-ffp-contract=off", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-fopenmp"]'
# The C++ sources of csrc/sources.txt, without the CUDA ones (.cu).
LD_PRELOAD="$ASAN_LIB" "$PY" - <<PYEOF
import os
os.environ.pop("LD_PRELOAD")
from torch.utils import cpp_extension
with open("csrc/sources.txt") as f:
    paths = [p for p in (line.split("#", 1)[0].strip() for line in f) if p]
cpp_extension.load(
    name="simplex_param_sanitize",
    sources=[p for p in paths if not p.endswith(".cu")],
    build_directory="$BUILD",
    extra_cflags=$FLAGS,
    extra_ldflags=["-fsanitize=address,undefined", "-fopenmp"],
    is_python_module=False,
    with_cuda=False,
)
PYEOF
LIB="$BUILD/simplex_param_sanitize.so"
ldd "$LIB" | grep -q libasan || { echo "sanitize: $LIB is not instrumented" >&2; exit 1; }

export LD_PRELOAD="$ASAN_LIB"
export SIMPLEX_PARAM_LIBRARY="$LIB"
unset SIMPLEX_PARAM_DISABLE_EXTENSION
"$PY" -c "import simplex_param._ext as e, sys; sys.exit(0 if e.LOADED_FROM == 'library' else 'sanitized library not loaded')"
# --capture=sys: a sanitizer report goes to the real stderr, not a capture file.
# The resident-memory test is left out: ASan keeps freed memory in quarantine.
exec "$PY" -m pytest -q -p no:cacheprovider --capture=sys -k "not memory_stays_flat" \
    tests/test_ops.py tests/test_maps.py tests/test_properties.py tests/test_reliability.py tests/test_grouped.py \
    tests/test_soup.py "$@"
