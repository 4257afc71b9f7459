# The version, written once: setup.py reads this file without importing the
# package, and simplex_param.__version__ is this value.
__version__ = "0.1.0"
