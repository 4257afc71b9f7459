#!/usr/bin/env bash
# CUDA build check, for machines without a GPU (CI): builds the extension
# with its CUDA kernels against a CUDA build of torch, in a virtual
# environment of its own and out of tree, then imports the built library and
# asserts from the dispatcher's registrations that every op has a CUDA kernel.
#
# The in-tree simplex_param/_C*.so of the CPU environment is never touched.
# Skipped (exit 0) where nvcc is absent.
#
# Environment: CUDA_VENV (default .venv-cuda), CUDA_TORCH_SPEC (default
# torch==2.14.1, a CUDA 13.0 build), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
# MAX_JOBS (default 2), CUDA_BUILD_DIR (default build-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
CUDA_BUILD_DIR=${CUDA_BUILD_DIR:-build-cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    # The toolkit's root, also when nvcc is reached through a symbolic link.
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-build: SKIPPED: nvcc not found (set CUDA_HOME or put nvcc on PATH to check the CUDA build)"
  exit 0
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "cuda-build: nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

PY="$CUDA_VENV/bin/python"
STAMP="$CUDA_VENV/.deps-stamp"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$CUDA_TORCH_SPEC" ]; then
  test -x "$PY" || "$PYTHON" -m venv "$CUDA_VENV"
  "$PY" -m pip install -q "$CUDA_TORCH_SPEC" ninja pybind11 setuptools wheel
  echo "$CUDA_TORCH_SPEC" > "$STAMP"
fi
"$PY" -W "ignore:Failed to initialize NumPy" -c "import torch, sys; print('cuda-build: torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.version.cuda else 'cuda-build: this torch is not a CUDA build')"

# Out of tree: the library lands in $CUDA_BUILD_DIR/lib, the objects in
# $CUDA_BUILD_DIR/temp; nothing is written next to the sources.
rm -rf "$CUDA_BUILD_DIR/lib"
start=$(date +%s)
SIMPLEX_PARAM_WITH_CUDA=1 "$PY" -W "ignore:Failed to initialize NumPy" setup.py -q build_ext \
  --build-lib "$CUDA_BUILD_DIR/lib" --build-temp "$CUDA_BUILD_DIR/temp"
echo "cuda-build: built in $(( $(date +%s) - start )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

LIB=$(ls "$CUDA_BUILD_DIR"/lib/simplex_param/_C*.so)
"$PY" - "$LIB" <<'EOF'
import os
import shutil
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch

lib = sys.argv[1]
torch.ops.load_library(lib)
# The package's own list of ops, read without loading its (CPU) extension.
os.environ["SIMPLEX_PARAM_DISABLE_EXTENSION"] = "1"
from simplex_param.ops import OPS as ops
# A kernel for the key itself or, for the composite ops, through an alias key.
has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
missing = [f"{op} ({key})" for op in ops for key in ("CUDA", "CPU") if not has(f"simplex_param::{op}", key)]
if missing:
    sys.exit("cuda-build: FAILED: no kernel registered for " + ", ".join(missing))
# The device code really is in the library, for every architecture asked for.
if shutil.which("cuobjdump"):
    listing = subprocess.run(["cuobjdump", "--list-elf", lib], capture_output=True, text=True).stdout
    archs = sorted({part for part in listing.replace(".", " ").split() if part.startswith("sm_")})
    print("cuda-build: device code for", " ".join(archs) or "no architecture")
    if not archs:
        sys.exit("cuda-build: FAILED: the library holds no device code")
print(f"cuda-build: OK: CUDA and CPU kernels registered for {len(ops)} ops; "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}")
EOF
