r"""Architecture search: the mixed operation of DARTS and GDAS, and the split
of a model's parameters into architecture parameters and network weights.
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import checks, ops
from .gumbel import gumbel_softmax
from .layers import SimplexFusion
from .parametrization import Simplex, check_simplex_map

__all__ = ["MixedOp", "architecture_parameters", "split_parameters"]

MODES = ("soft", "hard")


class MixedOp(nn.Module):
    r"""A mixed operation: K candidate operations on one input, mixed by
    weights on the simplex.

    .. math::
        \mathrm{soft:}\quad y = \sum_k w_k\, \mathrm{op}_k(x), \quad w = \mathrm{map}(z / T)
        \qquad
        \mathrm{hard:}\quad y = \mathrm{op}_i(x), \quad i \sim \mathrm{softmax}(z / T)

    **Soft** (DARTS): every candidate runs, and their outputs are fused in one
    :func:`simplex_param.simplex_weighted_sum` call, never stacked. ``map`` is
    a map onto the simplex (see :class:`~simplex_param.Simplex`), with its
    ``alpha`` and ``learn_alpha``.

    **Hard** (GDAS): in training mode, one candidate per call is drawn with
    the hard Gumbel-softmax (:func:`simplex_param.gumbel_softmax`), and only
    that one runs: time and memory per call drop about K-fold, and a
    weight-free candidate (skip, zero) costs nothing when not drawn. The
    output is :math:`\tilde w_i\, \mathrm{op}_i(x)` with the straight-through
    weight :math:`\tilde w = \mathrm{onehot}(i) + p - \mathrm{sg}(p)`,
    :math:`p = \mathrm{softmax}(z / T + G)`: its value is
    :math:`\mathrm{op}_i(x)` and the gradient of the pre-weights is
    :math:`\partial L / \partial z_j = \langle g, \mathrm{op}_i(x) \rangle\,
    \partial p_i / \partial z_j`. In eval mode the most likely candidate
    (:math:`\arg\max_k z_k`) runs, deterministically.

    **Weights.** ``forward(x, logits)`` takes external pre-weights, for example
    a row of an α matrix that DARTS shares between all cells of a type.
    Without them the layer uses its own, ``weight``: a ``Simplex``-parametrized
    ``(K,)`` tensor whose pre-weights,
    ``parametrizations.weight.original``, are an *architecture* parameter:
    :func:`split_parameters` keeps them apart from the network weights, so
    DARTS' two optimizers are built in one line each. With
    ``own_weights=False`` there are none, and ``logits`` is required.

    Args:
        candidates (sequence of nn.Module): the K candidate operations, each
            mapping the input to outputs of one shape.
        mode (str, optional): ``"soft"`` or ``"hard"``. Default: ``"soft"``.
        map (str, optional): the soft mode's map. Default: ``"softmax"``.
        temperature (float, optional): ``T``. Default: ``1.0``.
        own_weights (bool, optional): create ``weight``. Default: ``True``.
        generator (torch.Generator, optional): the hard mode's noise source.

    Example::

        >>> ops = [nn.Identity(), nn.Tanh(), nn.ReLU()]
        >>> mixed = sp.MixedOp(ops)
        >>> x = torch.tensor([[-1.0, 2.0]])
        >>> mixed(x)  # uniform weights at first
        tensor([[-0.5872,  1.6547]], grad_fn=<...>)
        >>> alpha = torch.zeros(2, 3)  # shared architecture logits, one row per edge
        >>> mixed(x, alpha[1]).shape
        torch.Size([1, 2])
    """

    # set_temperature sets this module's temperature.
    anneals_temperature = True

    def __init__(
        self,
        candidates,
        *,
        mode: str = "soft",
        map: str = "softmax",
        temperature: float = 1.0,
        alpha: Optional[float] = None,
        learn_alpha: bool = False,
        own_weights: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        candidates = list(candidates)
        if not candidates:
            raise ValueError("candidates must hold at least one module")
        for i, c in enumerate(candidates):
            if not isinstance(c, nn.Module):
                raise TypeError(f"candidates[{i}] must be an nn.Module, got {type(c).__name__}")
        self.candidates = nn.ModuleList(candidates)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
        self.mode = mode
        self.map = check_simplex_map(map)
        self.temperature = checks.check_float_temperature(temperature)
        self.generator = generator
        simplex = Simplex(temperature=self.temperature, map=map, alpha=alpha, learn_alpha=learn_alpha)
        self._alpha = None if learn_alpha else simplex.alpha  # for logits given to forward
        if own_weights:
            self.weight = nn.Parameter(torch.zeros(len(candidates)))
            # Zeros are not on the simplex: right_inverse keeps them as the
            # pre-weights, uniform weights at first.
            parametrize.register_parametrization(self, "weight", simplex)
        elif learn_alpha:
            raise ValueError("learn_alpha=True needs own_weights=True: the learned alpha lives with the weights")

    def reset_parameters(self) -> None:
        """The constructor's start for the layer's own weights: zero
        pre-weights, uniform weights. The candidates are left alone (they
        are modules of their own, with their own ``reset_parameters``); a
        layer built with ``own_weights=False`` has nothing to reset."""
        if parametrize.is_parametrized(self, "weight"):
            nn.init.zeros_(self.parametrizations.weight.original)

    def extra_repr(self) -> str:
        return (
            f"num_candidates={len(self.candidates)}, mode={self.mode!r}, map={self.map!r}, "
            f"temperature={float(self.temperature)}"
        )

    def _logits(self, logits: Optional[Tensor]) -> Tensor:
        K = len(self.candidates)
        if logits is None:
            if not parametrize.is_parametrized(self, "weight"):
                raise ValueError("logits is required: this MixedOp was built with own_weights=False")
            return self.parametrizations.weight.original
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
        if logits.shape != (K,):
            raise ValueError(f"logits has shape {list(logits.shape)} but this MixedOp has {K} candidates: "
                             f"expected [{K}]")
        return logits

    def forward(self, x, logits: Optional[Tensor] = None) -> Tensor:
        z = self._logits(logits)
        if self.mode == "soft":
            return ops.simplex_weighted_sum(
                z, (op(x) for op in self.candidates), map=self.map, temperature=self.temperature,
                alpha=self.parametrizations.weight[0].alpha if logits is None else self._alpha,
            )
        # Which module runs is host control flow: one read on the host (a
        # graph break under torch.compile, which the soft mode does not have).
        if self.training:
            w = gumbel_softmax(z, temperature=self.temperature, hard=True, generator=self.generator)
            i = int(w.detach().argmax())
            w_i = w[i]
        else:
            # The most likely candidate; the same straight-through form, without noise.
            i = int(z.detach().argmax())
            p_i = torch.softmax(z / self.temperature, -1)[i]
            w_i = 1 + (p_i - p_i.detach())  # exactly 1, with the softmax's gradient
        return w_i * self.candidates[i](x)


def architecture_parameters(model: nn.Module) -> list:
    """The pre-weights of every :class:`MixedOp`'s own weights in ``model``,
    each followed by its map's ``alpha_pre`` when alpha is learned."""
    params = []
    for m in model.modules():
        if isinstance(m, MixedOp) and parametrize.is_parametrized(m, "weight"):
            params.append(m.parametrizations.weight.original)
            if m.parametrizations.weight[0].learn_alpha:
                params.append(m.parametrizations.weight[0].alpha_pre)
    return params


def split_parameters(model: nn.Module) -> tuple:
    r"""``(architecture, network)``: the parameters of ``model`` split in two.

    The architecture parameters are the pre-weights of the :class:`MixedOp`
    layers' own weights (and their learned alphas); everything else, the candidates' weights included,
    is a network weight. Each parameter is in exactly one list, once.

    Example::

        >>> model = nn.Sequential(sp.MixedOp([nn.Linear(2, 2), nn.Identity()]), nn.Linear(2, 1))
        >>> arch, net = sp.split_parameters(model)
        >>> len(arch), len(net)
        (1, 4)
        >>> w_opt = torch.optim.SGD(net, lr=0.025, momentum=0.9)   # DARTS' two optimizers
        >>> a_opt = torch.optim.Adam(arch, lr=3e-4, betas=(0.5, 0.999))
    """
    arch = architecture_parameters(model)
    ids = {id(p) for p in arch}
    return arch, [p for p in model.parameters() if id(p) not in ids]
