# One-command set-up: `make demo` and `make test` create .venv, install the
# pinned torch and the tools, build the extension and run.
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` pulls a multi-GB CUDA build; this pin is a CPU build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-stamp
BUILT := $(VENV)/.built-stamp
# What the build depends on: the sources of csrc/sources.txt (the one list),
# every header, and what setup.py reads.
SOURCES := setup.py csrc/sources.txt simplex_param/_version.py simplex_param/errors.def \
	$(shell sed -e 's/\#.*//' csrc/sources.txt) $(shell find csrc -name '*.h' -o -name '*.cuh')
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: setup demo test test-compiled test-fallback bench clean

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(BUILT)

demo: setup
	$(PY) -m simplex_param demo

# The whole suite on the compiled kernels, then again on the pure-PyTorch fallback.
test: test-compiled test-fallback

test-compiled: setup
	$(PY) -c "import simplex_param as sp, sys; sys.exit(0 if sp.extension_loaded() else 'extension not loaded')"
	$(PYTEST) -m "not faults" tests

test-fallback: setup
	SIMPLEX_PARAM_DISABLE_EXTENSION=1 $(PYTEST) -m "not faults" tests

bench: setup
	$(PY) -m simplex_param bench

clean:
	rm -rf build *.egg-info simplex_param/_C*.so simplex_param/_build_info.json

# The sdist, a wheel built from it and installed into a clean venv with
# only torch, then called from outside the tree (scripts/package_smoke.sh).
.PHONY: package-check
package-check: $(DEPS)
	PY=$(PY) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/package_smoke.sh

# The CUDA kernels built against a CUDA build of torch, in .venv-cuda and out
# of tree, and their registration checked without a GPU (docs/cuda.md).
.PHONY: cuda-build gpu-check
cuda-build:
	bash scripts/cuda_build_check.sh

# One shot on a GPU machine without network: build, tests, benchmark,
# compute-sanitizer; results in $$OUT or gpu-check-out/ (docs/cuda.md).
gpu-check:
	bash scripts/gpu_check.sh

# The CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
# (in build/sanitize/), and the operator tests run on them. docs/numerics.md.
.PHONY: sanitize
sanitize: $(DEPS)
	PY=$(PY) scripts/sanitize.sh

# The CUDA kernels and launches executed on the CPU through the HIP CPU
# runtime (HIP_CPU_DIR, default ../shared/hip-cpu; needs libtbb-dev): every
# case against the oracle, results saved for gpu-check, then three faults
# injected into a copy of csrc/cuda must be caught. Skips, saying why,
# where the runtime or TBB is missing. docs/cuda.md.
.PHONY: cuda-emulate
cuda-emulate: setup
	@$(PY) tests/cuda_emulation/check.py --save build/cuda-emulate/results.json; rc=$$?; \
	if [ $$rc -eq 2 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	$(PYTEST) -m faults tests/test_cuda_emulation.py

# The multi-process tests (marker `multiprocess`, tests/multiprocess.py)
# STRESS_RUNS times each; prints the passes, failures and aborts. Not part
# of `make test`.
STRESS_RUNS ?= 200
.PHONY: stress-dist
stress-dist: setup
	SIMPLEX_PARAM_STRESS=$(STRESS_RUNS) $(PYTEST) -m multiprocess tests
