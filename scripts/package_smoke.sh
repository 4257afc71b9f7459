#!/usr/bin/env bash
# Packaging smoke test: what a user gets without the Makefile (make
# package-check, run by .ci/run).
#
#   1. the sdist, built from this tree, holds every source of
#      csrc/sources.txt, every header under csrc/, simplex_param/errors.def
#      and the command-line tools (simplex_param/cli/);
#   2. a wheel built from that sdist (pip wheel --no-build-isolation) holds
#      the compiled extension, errors.def, the build record and the tools;
#   3. in a new virtual environment with only torch ($TORCH_SPEC), the wheel
#      installs, and from another folder the package imports, loads its
#      compiled extension, and softmax_weighted_sum's forward and backward
#      match the pure-PyTorch reference.
#
# The extension is compiled once, from the sdist. Everything is written to a
# temporary folder, removed at exit unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/simplex_param_package.XXXXXX")
trap 'if [ "${KEEP:-0}" = 1 ]; then echo "package-check: kept $WORK"; else rm -rf "$WORK"; fi' EXIT
step() { echo "package-check: [${SECONDS} s] $*"; }
fail() { echo "package-check: FAILED: $*" >&2; exit 1; }

step "sdist"
# The egg-info goes to $WORK too, so that the tree is left as it was.
"$PY" setup.py -q egg_info --egg-base "$WORK" sdist --dist-dir "$WORK/dist" >"$WORK/sdist.log" 2>&1 \
    || { cat "$WORK/sdist.log"; fail "setup.py sdist"; }
SDIST=$(ls "$WORK"/dist/simplex_param-*.tar.gz)
tar tzf "$SDIST" | sed 's|^[^/]*/||' >"$WORK/sdist.txt"
{
    echo setup.py; echo pyproject.toml; echo README.md
    echo csrc/sources.txt; echo simplex_param/_version.py; echo simplex_param/errors.def
    echo simplex_param/__main__.py; find simplex_param/cli -name '*.py'
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' csrc/sources.txt
    find csrc -name '*.h' -o -name '*.cuh'
} | sort -u >"$WORK/expected.txt"
missing=$(grep -vxF -f "$WORK/sdist.txt" "$WORK/expected.txt" || true)
[ -z "$missing" ] || fail "the sdist lacks: $missing"
grep -qE '\.so$|_build_info\.json$' "$WORK/sdist.txt" && fail "the sdist holds build outputs"
echo "  $(basename "$SDIST"): $(grep -vc '/$' "$WORK/sdist.txt") files, all $(wc -l <"$WORK/expected.txt") expected ones"

step "wheel from the sdist (compiles the extension)"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" "$SDIST"
WHEEL=$(ls "$WORK"/wheel/simplex_param-*.whl)
"$PY" - "$WHEEL" <<'PYEOF'
import glob, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
wanted = ["simplex_param/errors.def", "simplex_param/_build_info.json", "simplex_param/_version.py",
          "simplex_param/__main__.py", *sorted(glob.glob("simplex_param/cli/*.py"))]
missing = [n for n in wanted if n not in names]
if not any(n.startswith("simplex_param/_C") and n.endswith(".so") for n in names):
    missing.append("simplex_param/_C*.so")
if missing:
    sys.exit(f"package-check: FAILED: the wheel lacks {missing}")
PYEOF
echo "  $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

step "clean venv with only $TORCH_SPEC"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$TORCH_SPEC"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"

step "import and compute from another folder"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
REPO="$REPO" "$WORK/venv/bin/python" - <<'PYEOF'
import os
import sys

import torch

import simplex_param as sp
from simplex_param import _ext, reference

where = os.path.dirname(sp.__file__)
if where.startswith(os.environ["REPO"] + os.sep) or "site-packages" not in where:
    sys.exit(f"package-check: FAILED: simplex_param imported from {where}, not from the clean venv")
if not sp.extension_loaded():
    sys.exit(f"package-check: FAILED: the compiled extension did not load: {_ext.LOAD_ERROR}")
info = _ext._build_info()
if info is None or info["torch"] != torch.__version__:
    sys.exit(f"package-check: FAILED: the build record {info} does not name torch {torch.__version__}")

torch.manual_seed(0)
xs = [torch.randn(4, 33, dtype=torch.float64, requires_grad=True) for _ in range(5)]
logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
grad = torch.randn(4, 33, dtype=torch.float64)
results = []
for op in (sp.softmax_weighted_sum, reference.softmax_weighted_sum):
    out = op(logits, xs)
    grads = torch.autograd.grad(out, [logits, *xs], grad)
    results.append((out, *grads))
for got, want in zip(*results):
    torch.testing.assert_close(got, want)
print(f"  simplex_param {sp.__version__} from {where}: extension loaded ({_ext.LOADED_FROM}), "
      f"forward and backward match the reference; torch {torch.__version__}")
PYEOF
step "passed"
