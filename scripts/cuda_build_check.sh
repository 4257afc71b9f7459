#!/usr/bin/env bash
# CUDA build check, for machines without a GPU (CI): builds the extension
# with its CUDA kernels against a CUDA build of torch, in a virtual
# environment of its own and out of tree, with a wheel from the same build;
# then imports the built library and asserts from the dispatcher's
# registrations that every op has a CUDA kernel, and that the wheel holds
# device code for every architecture asked for, errors.def and its build
# record.
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
# $CUDA_BUILD_DIR/temp, the wheel in $CUDA_BUILD_DIR/dist (one compile for
# both: bdist_wheel reuses the build); nothing is written next to the sources.
rm -rf "$CUDA_BUILD_DIR/lib" "$CUDA_BUILD_DIR/dist"
start=$(date +%s)
SIMPLEX_PARAM_WITH_CUDA=1 "$PY" -W "ignore:Failed to initialize NumPy" setup.py -q \
  build --build-lib "$CUDA_BUILD_DIR/lib" --build-temp "$CUDA_BUILD_DIR/temp" \
  bdist_wheel --dist-dir "$CUDA_BUILD_DIR/dist" >/dev/null
echo "cuda-build: built in $(( $(date +%s) - start )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
WHEEL=$(ls "$CUDA_BUILD_DIR"/dist/simplex_param-*.whl)
echo "cuda-build: wheel $(basename "$WHEEL") ($(( $(stat -c %s "$WHEEL") / 1048576 )) MiB)"
LIB=$(ls "$CUDA_BUILD_DIR"/lib/simplex_param/_C*.so)
"$PY" - "$LIB" "$WHEEL" <<'EOF'
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
# The device code really is in the wheel's library, for every architecture
# asked for: the fat binaries' entries (header magic 0xBA55ED50, then
# entries of kind 1 = PTX or 2 = SASS, the SM at byte 28), read without
# cuobjdump, which a toolkit without the binary utilities lacks.
import json
import struct
import tempfile
import zipfile


def device_code(path):
    data = open(path, "rb").read()
    found, at = set(), 0
    while (at := data.find(struct.pack("<I", 0xBA55ED50), at)) >= 0:
        version, header_size, fat_size = struct.unpack_from("<HHQ", data, at + 4)
        if (version, header_size) != (1, 16):
            at += 4
            continue
        p, end = at + header_size, at + header_size + fat_size
        while p + 32 <= end:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", data, p)
            if entry_header == 0:
                break
            found.add(f"{ {1: 'ptx', 2: 'sass'}.get(kind, kind) }:sm_{struct.unpack_from('<I', data, p + 28)[0]}")
            p += entry_header + padded
        at = end
    return sorted(found)


wheel = zipfile.ZipFile(sys.argv[2])
names = wheel.namelist()
for needed in ("simplex_param/errors.def", "simplex_param/_build_info.json"):
    if needed not in names:
        sys.exit(f"cuda-build: FAILED: the wheel lacks {needed}")
info = json.loads(wheel.read("simplex_param/_build_info.json"))
if info.get("cuda") != torch.version.cuda:
    sys.exit(f"cuda-build: FAILED: the wheel's build record says CUDA {info.get('cuda')}, torch has {torch.version.cuda}")
with tempfile.TemporaryDirectory() as tmp:
    so = [n for n in names if n.startswith("simplex_param/_C") and n.endswith(".so")]
    code = device_code(wheel.extract(so[0], tmp)) if so else []
wanted = {f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a}
have = {c.split(":")[1] for c in code if c.startswith("sass")}
print("cuda-build: wheel device code:", " ".join(code) or "none")
if not wanted <= have:
    sys.exit(f"cuda-build: FAILED: no device code for {sorted(wanted - have)} in the wheel")
print(f"cuda-build: OK: CUDA and CPU kernels registered for {len(ops)} ops; "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}")
EOF
