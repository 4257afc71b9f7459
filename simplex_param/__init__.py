"""simplex_param: learnable weights on the probability simplex, fast.

A ``Simplex`` parametrization for any module parameter, a fused
softmax-and-weighted-sum operator (C++/CUDA kernels registered with
``torch.library``, with a pure-PyTorch fallback), and fusion layers built on it.
"""
from ._ext import cpu_capability, extension_loaded
from ._version import __version__
from .ops import (
    grouped_simplex_weighted_sum,
    grouped_softmax_weighted_sum,
    grouped_weighted_sum,
    mix,
    simplex_weighted_sum,
    softmax_weighted_sum,
    weighted_sum,
)
from . import maps
from .parametrization import Simplex, combine, set_temperature, simplex
from .layers import LazySimplexFusion, ScalarMix, SimplexFusion, WeightedLayerSum
from .gumbel import gumbel_softmax
from .soup import LearnedSoup
from .search import MixedOp, architecture_parameters, split_parameters
from .diagnostics import entropy, summary, zero_one_loss
from .weightlog import WeightLogger
from .entmax import (
    Entmax15,
    Entmax15Loss,
    EntmaxBisect,
    EntmaxBisectLoss,
    Sparsemax,
    SparsemaxLoss,
    entmax15,
    entmax15_loss,
    entmax_bisect,
    entmax_bisect_loss,
    sparsemax,
    sparsemax_loss,
)
from .sinkhorn import Birkhoff, sinkhorn
from .hyper_connections import HyperConnections

__all__ = [
    "Simplex",
    "combine",
    "simplex",
    "extension_loaded",
    "cpu_capability",
    "simplex_weighted_sum",
    "softmax_weighted_sum",
    "weighted_sum",
    "grouped_weighted_sum",
    "grouped_simplex_weighted_sum",
    "grouped_softmax_weighted_sum",
    "LearnedSoup",
    "SimplexFusion",
    "LazySimplexFusion",
    "ScalarMix",
    "WeightedLayerSum",
    "gumbel_softmax",
    "MixedOp",
    "architecture_parameters",
    "split_parameters",
    "set_temperature",
    "summary",
    "entropy",
    "zero_one_loss",
    "WeightLogger",
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "Sparsemax",
    "Entmax15",
    "EntmaxBisect",
    "sparsemax_loss",
    "entmax15_loss",
    "entmax_bisect_loss",
    "SparsemaxLoss",
    "Entmax15Loss",
    "EntmaxBisectLoss",
    "sinkhorn",
    "Birkhoff",
    "mix",
    "HyperConnections",
]
