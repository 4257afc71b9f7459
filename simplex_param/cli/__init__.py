"""The command-line tools of ``python -m simplex_param {demo,bench,soup}``:
demos and benchmarks built on the library's public API, not part of it.
Nothing here is imported by ``import simplex_param``."""
