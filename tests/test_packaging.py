"""Packaging: the one list of C++ sources, the version, and what a failed
load of the compiled extension says. scripts/package_smoke.sh (make
package-check) builds and installs the sdist and the wheel."""
import importlib.machinery
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import simplex_param as sp
from simplex_param import _ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "simplex_param"


def listed_sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [p for p in (line.split("#", 1)[0].strip() for line in lines) if p]


def test_sources_list_names_every_source_once():
    listed = listed_sources()
    on_disk = sorted(str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.cu") for p in (ROOT / "csrc").rglob(ext))
    assert len(set(listed)) == len(listed), "csrc/sources.txt names a file twice"
    assert sorted(listed) == on_disk


def test_version_is_written_once():
    from simplex_param._version import __version__

    assert sp.__version__ == __version__
    assert "version=_version()" in (ROOT / "setup.py").read_text()


@pytest.mark.skipif(_ext.LOADED_FROM != "prebuilt", reason="no prebuilt extension loaded")
def test_build_record_names_this_torch():
    info = _ext._build_info()
    assert info is not None, "no simplex_param/_build_info.json next to the extension"
    assert info["torch"] == torch.__version__
    assert info["cuda"] in (None, torch.version.cuda)


def load_in_a_copy(tmp_path, build_info):
    """Imports a copy of the package whose _C is not a library, in a subprocess;
    returns its stderr (the warning) and stdout (what it printed)."""
    copy = tmp_path / "simplex_param"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "_build_info.json", "__pycache__"))
    (copy / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_text("not a shared library\n")
    if build_info is not None:
        (copy / "_build_info.json").write_text(json.dumps(build_info))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLEX_PARAM_")}
    env["PYTHONPATH"] = str(tmp_path)
    code = (
        "import sys, torch, simplex_param as sp\n"
        "from simplex_param import _ext\n"
        "assert _ext.__file__.startswith(sys.argv[1]), _ext.__file__\n"
        "out = sp.softmax_weighted_sum(torch.zeros(2), [torch.ones(3), torch.ones(3)])\n"
        "print(sp.extension_loaded())\n"
        "print(out.tolist())\n"
        "print(_ext.LOAD_ERROR)\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "always::RuntimeWarning", "-c", code, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr, run.stdout


def test_failed_load_says_why_and_which_torch(tmp_path):
    stderr, stdout = load_in_a_copy(tmp_path, {"torch": "2.0.0", "cuda": "11.8"})
    found = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    warning = stderr[stderr.index("RuntimeWarning: simplex_param"):]
    assert "the compiled extension could not be loaded (ImportError: " in warning
    assert "it was built for torch 2.0.0 (CUDA 11.8), and this is " + found in warning
    assert "The pure-PyTorch fallback is in use" in warning
    assert "pip install --no-build-isolation" in warning
    loaded, result, load_error = stdout.splitlines()
    assert (loaded, result) == ("False", "[1.0, 1.0, 1.0]")
    assert load_error.startswith("ImportError: ") and load_error in warning


def test_failed_load_without_a_build_record(tmp_path):
    stderr, _ = load_in_a_copy(tmp_path, None)
    assert "no record of the torch it was built for (simplex_param/_build_info.json)" in stderr
    assert f"this is torch {torch.__version__}" in stderr
    assert "The pure-PyTorch fallback is in use" in stderr
