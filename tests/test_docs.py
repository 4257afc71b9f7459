"""Examples in README.md, docs/*.md and the docstrings run, so they cannot rot."""
import doctest
import importlib
import pathlib
import re

import pytest
import torch

import simplex_param as sp

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for path in MARKDOWN:
        for i, match in enumerate(FENCE.finditer(path.read_text())):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_markdown_example_runs(code):
    torch.manual_seed(0)
    exec(compile(code, "<markdown>", "exec"), {"__name__": "__doc_example__"})


MODULES = [
    "simplex_param.ops", "simplex_param.parametrization", "simplex_param.layers", "simplex_param.gumbel",
    "simplex_param.search", "simplex_param.diagnostics", "simplex_param.soup", "simplex_param.sinkhorn",
    "simplex_param.hyper_connections",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    globs = {"torch": torch, "nn": torch.nn, "sp": sp, "parametrize": torch.nn.utils.parametrize}
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, extraglobs=globs, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    assert result.attempted > 0, f"{name} has no docstring examples"
