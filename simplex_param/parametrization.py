r"""The ``Simplex`` parametrization: any floating parameter, constrained to the
probability simplex along a dimension, with :mod:`torch.nn.utils.parametrize`.

``Simplex`` is the parametrization module (``forward`` and ``right_inverse``),
:func:`simplex` validates, registers and returns the module, in the style of
:func:`torch.nn.utils.parametrizations.orthogonal`, and :func:`combine` is the
bridge to the fused operator: a weighted sum of inputs by a parametrized weight
vector that never materialises the weights.

:func:`set_temperature` sets the temperature of every ``Simplex`` in a model,
and of every layer built on one.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import checks, maps, ops
from .reference import acc_dtype

__all__ = ["Simplex", "simplex", "combine", "set_temperature", "check_simplex_map"]

# Slack on "sums to one" when deciding whether a value assigned to a
# parametrized tensor is probabilities. Generous enough for probabilities
# rounded to the dtype (or computed in float32 and cast to float64).
_SUM_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def _check_dim_type(dim) -> Optional[int]:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    return dim


def _check_dim_range(dim: Optional[int], ndim: int) -> None:
    """Raise PyTorch's own IndexError when `dim` does not index a tensor of `ndim` dimensions."""
    if dim is None:
        return
    n = max(ndim, 1)  # a 0-D tensor accepts dims -1 and 0, as in PyTorch
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")


def _check_floating(t: Tensor, what: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{what} must have a floating dtype, got {t.dtype}")


class Simplex(nn.Module):
    r"""Parametrization of a tensor whose slices along ``dim`` are probability vectors.

    .. math::
        W = \mathrm{map}(Z / T, \mathrm{dim}), \qquad
        W \ge 0, \quad \textstyle\sum_{\mathrm{dim}} W = 1

    with the map ``"softmax"`` (the default), or a sparse one, which gives
    exact zeros (see :func:`simplex_param.simplex_weighted_sum`).

    where :math:`Z` are the unconstrained pre-weights stored by
    :func:`torch.nn.utils.parametrize.register_parametrization` in
    ``module.parametrizations[name].original`` and :math:`T` is the
    temperature. With ``dim=None`` all the entries form one distribution.
    float16 and bfloat16 tensors are computed in float32 and returned in their
    own dtype.

    ``right_inverse`` (called on registration and on ``module.name = value``)
    follows one rule:

    * a ``value`` that lies on the simplex along ``dim`` (every entry
      ``>= 0``, every sum equal to one within ``1e-6`` for float64, ``1e-4`` for
      float32, ``1e-2`` for float16, ``3e-2`` for bfloat16) is taken as
      probabilities: the pre-weights become ``Z`` such that the parametrized
      tensor gives ``value`` back. For the softmax, the centred
      ``log(clamp(value, floor)) * T``, whose floor ``max(tiny, eps**2)`` of
      the dtype keeps zeros finite (they come back as tiny weights). For
      sparsemax, ``value * T``; for entmax15, ``2 * sqrt(value) * T``, where
      ``sparsemax(p) = p`` and ``entmax15(2 sqrt(p)) = p`` on the simplex; a
      zero entry gets the pre-weight ``-T``, below the threshold, so zeros
      come back exactly zero;
    * any other finite ``value`` is taken as the pre-weights themselves. So
      registering on a freshly initialised parameter keeps its values as
      pre-weights, as in the classic recipe;
    * a ``value`` with NaN or inf raises ``ValueError``, and so does a value
      whose shape differs from that of the tensor the parametrization was
      registered on.

    Args:
        dim (int or None, optional): the dimension along which entries sum to
            one; ``None`` for all entries. Default: ``-1``.
        temperature (float, optional): softmax temperature, positive and
            finite. Default: ``1.0``.
        map (str, optional): a map onto the simplex, one of
            :data:`simplex_param.maps.SIMPLEX_MAPS` (``"softmax"``,
            ``"sparsemax"``, ``"entmax15"``, ``"entmax_bisect"``; see
            ``docs/maps.md``).
            Default: ``"softmax"``.
        alpha (float, optional): the map's parameter, for ``"entmax_bisect"``
            only: ``>= 1``, default 1.5.
        learn_alpha (bool, optional): learn alpha as ``1 + softplus(alpha_pre)``,
            with the parameter ``alpha_pre`` of this module (initialised from
            ``alpha``), so that it stays above 1. Default: ``False``.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> m = nn.Linear(3, 2)
        >>> parametrize.register_parametrization(m, "weight", sp.Simplex(dim=1))
        ParametrizedLinear(
          in_features=3, out_features=2, bias=True
          (parametrizations): ModuleDict(
            (weight): ParametrizationList(
              (0): Simplex(dim=1, temperature=1.0)
            )
          )
        )
        >>> m.weight.sum(dim=1)
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
        >>> m.weight = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
        >>> m.weight
        tensor([[0.5000, 0.2500, 0.2500],
                [0.2000, 0.3000, 0.5000]], grad_fn=<SoftmaxBackward0>)
    """

    # set_temperature sets this module's temperature.
    anneals_temperature = True

    def __init__(self, dim: Optional[int] = -1, temperature: float = 1.0, map: str = "softmax", *,
                 alpha: Optional[float] = None, learn_alpha: bool = False) -> None:
        super().__init__()
        self.dim = _check_dim_type(dim)
        self.temperature = checks.check_float_temperature(temperature)
        self.map = check_simplex_map(map)
        alpha = checks.check_alpha(alpha, map, maps.MAPS[map].has_alpha)
        if isinstance(alpha, Tensor):
            raise TypeError("alpha must be a number; learn_alpha=True makes it a learned parameter")
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"learn_alpha must be a bool, got {type(learn_alpha).__name__}")
        self.learn_alpha = learn_alpha
        if learn_alpha:
            if not maps.MAPS[map].has_alpha:
                raise ValueError(f"learn_alpha=True needs a map with the parameter alpha, got map '{map}'")
            alpha = maps.DEFAULT_ALPHA if alpha is None else alpha
            if alpha == 1.0:
                raise ValueError("learn_alpha=True needs alpha > 1: alpha = 1 + softplus(alpha_pre) never reaches 1")
            # alpha = 1 + softplus(alpha_pre) > 1, as entmax's maintainers
            # recommend: a learned alpha cannot drift to 1 or below (NaN).
            self.alpha_pre = nn.Parameter(torch.tensor(math.log(math.expm1(alpha - 1))))
        else:
            self._alpha = alpha
        # The shape of the tensor registered with; later assignments must keep it.
        self.shape: Optional[torch.Size] = None

    @property
    def alpha(self):
        """The map's alpha: a float (None for a map without it), or the 0-D
        tensor ``1 + softplus(alpha_pre)`` when it is learned."""
        if self.learn_alpha:
            return 1 + F.softplus(self.alpha_pre)
        return self._alpha

    def extra_repr(self) -> str:
        extra = "" if self.map == "softmax" else f", map={self.map!r}"
        if self.learn_alpha:
            extra += ", learn_alpha=True"
        elif self._alpha is not None:
            extra += f", alpha={self._alpha}"
        return f"dim={self.dim}, temperature={float(self.temperature)}{extra}"

    def _along_dim(self, f, X: Tensor) -> Tensor:
        """f over `dim` (the last dimension of what f sees), or over all entries."""
        if self.dim is None:
            return f(X.reshape(-1)).reshape(X.shape)
        return f(X.movedim(self.dim, -1)).movedim(-1, self.dim)

    def forward(self, X: Tensor) -> Tensor:
        Xc = X.to(acc_dtype(X.dtype))
        if not (isinstance(self.temperature, float) and self.temperature == 1.0):
            Xc = Xc / self.temperature  # a float, or a 0-D tensor after set_temperature
        alpha = self.alpha
        if self.dim is None:
            W = maps.apply(self.map, Xc.reshape(-1), alpha).reshape(X.shape)
        else:
            W = maps.apply(self.map, Xc, alpha, dim=self.dim)
        return W.to(X.dtype)

    def _on_simplex(self, Y: Tensor, dtype: torch.dtype) -> bool:
        """Whether `Y` (`dtype` values, computed in float32 or float64) lies on the simplex along dim."""
        if not bool((Y >= 0).all()):
            return False
        sums = Y.sum() if self.dim is None else Y.sum(dim=self.dim)
        if sums.numel() == 0:
            return False
        tol = _SUM_TOLERANCE.get(dtype, 1e-2)
        return bool(((sums - 1).abs() <= tol).all())

    @torch.no_grad()
    def right_inverse(self, Y: Tensor) -> Tensor:
        _check_floating(Y, "the parametrized tensor")
        _check_dim_range(self.dim, Y.dim())
        if self.shape is None:
            self.shape = Y.shape
        elif Y.shape != self.shape:
            raise ValueError(
                f"Simplex.right_inverse: expected a value of shape {list(self.shape)}, the shape of the "
                f"parametrized tensor, got {list(Y.shape)}"
            )
        if Y.device.type == "meta":  # no values to inspect: pre-weights
            return Y.clone()
        Yc = Y.to(acc_dtype(Y.dtype))
        if not bool(torch.isfinite(Yc).all()):
            raise ValueError(
                "Simplex.right_inverse: the value contains NaN or inf; expected probabilities "
                "along dim or finite pre-weights"
            )
        if not self._on_simplex(Yc, Y.dtype):
            return Y.clone()
        alpha = self.alpha
        alpha = alpha.detach().to(Yc.dtype) if isinstance(alpha, Tensor) else alpha
        if self.map == "softmax":  # its inverse's floor is the stored dtype's
            info = torch.finfo(Y.dtype)
            Z = self._along_dim(lambda p: maps.inverse(self.map, p.clamp_min(max(info.tiny, info.eps**2))), Yc)
        else:
            Z = self._along_dim(lambda p: maps.inverse(self.map, p, alpha), Yc)
        Z = (Z * self.temperature).to(Y.dtype)
        if not bool(torch.isfinite(Z).all()):
            raise ValueError(
                f"Simplex.right_inverse: these probabilities need pre-weights beyond the range of "
                f"{Y.dtype} at temperature {float(self.temperature)}"
            )
        return Z


def check_simplex_map(map) -> str:
    """`map` must name one of the maps whose weights lie on the simplex
    (:data:`simplex_param.maps.SIMPLEX_MAPS`)."""
    return checks.check_map(map, maps.SIMPLEX_MAPS)


def _get_tensor(module: nn.Module, name: str) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    t = getattr(module, name, None)
    if not isinstance(t, Tensor):
        raise ValueError(f"Module '{type(module).__name__}' has no parameter or buffer with name '{name}'")
    return t


def simplex(
    module: nn.Module, name: str = "weight", *, dim: Optional[int] = -1, temperature: float = 1.0,
    map: str = "softmax", alpha: Optional[float] = None, learn_alpha: bool = False,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to the probability simplex along ``dim``.

    Registers :class:`Simplex` on the tensor: from then on

    .. math::
        \mathrm{module.name} = \mathrm{softmax}(Z / T, \mathrm{dim})

    with the current values kept as the pre-weights :math:`Z` (or, if they are
    already probabilities along ``dim``, turned into pre-weights that give them
    back; see :class:`Simplex`). The pre-weights are
    ``module.parametrizations[name].original``, the same ``Parameter`` object
    as before, so an existing optimizer keeps working.

    Args:
        module (nn.Module): the module holding the tensor.
        name (str, optional): name of a floating parameter or buffer.
            Default: ``"weight"``.
        dim (int or None, optional): the dimension along which entries sum to
            one; ``None`` for all entries. Default: ``-1``.
        temperature (float, optional): softmax temperature, positive and
            finite. Default: ``1.0``.
        map (str, optional): a map onto the simplex (see :class:`Simplex`).
            Default: ``"softmax"``.
        alpha, learn_alpha: the map's alpha, fixed or learned (see :class:`Simplex`).

    Returns:
        The module, with the parametrization registered.

    Raises:
        ValueError: no tensor ``name`` on the module, or a temperature that is
            not positive and finite.
        TypeError: a tensor that is not floating.
        IndexError: ``dim`` out of range for the tensor.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> m = sp.simplex(nn.Linear(4, 3), dim=1)
        >>> m.weight
        tensor([[0.2723, 0.3574, 0.1811, 0.1892],
                [0.1856, 0.2573, 0.2228, 0.3344],
                [0.2476, 0.2954, 0.2225, 0.2346]], grad_fn=<SoftmaxBackward0>)
        >>> m.weight.sum(dim=1)
        tensor([1., 1., 1.], grad_fn=<SumBackward1>)
    """
    t = _get_tensor(module, name)
    _check_floating(t, f"module.{name}")
    dim = _check_dim_type(dim)
    _check_dim_range(dim, t.dim())
    return parametrize.register_parametrization(
        module, name, Simplex(dim=dim, temperature=temperature, map=map, alpha=alpha, learn_alpha=learn_alpha))


def combine(module: nn.Module, name: str, inputs) -> Tensor:
    r"""Weighted sum of ``inputs`` by the weight vector ``module.<name>``.

    .. math::
        \mathrm{out} = \sum_{k=1}^{K} w_k x_k, \qquad w = \mathrm{module.name}

    When ``module.<name>`` is 1-D and parametrized by exactly one
    :class:`Simplex`, this is :func:`simplex_param.simplex_weighted_sum` of the
    stored pre-weights with that Simplex's map and temperature
    (:func:`simplex_param.softmax_weighted_sum` for the softmax): one fused
    call, and the weights are never materialised (so :func:`~torch.nn.utils.parametrize.cached`
    has nothing to cache here). Otherwise it is
    :func:`simplex_param.weighted_sum` of ``module.<name>`` as it evaluates,
    cached or not. Both give the same values and gradients.

    Args:
        module (nn.Module): the module holding the weights.
        name (str): name of a 1-D tensor of K weights, parametrized or not.
        inputs (list of Tensor or Tensor): K tensors of one shape, dtype and
            device, or one tensor of shape ``(K, ...)``.

    Returns:
        Tensor of the shape and dtype of one input.

    Example::

        >>> m = nn.Module()
        >>> m.mix = nn.Parameter(torch.zeros(3))
        >>> _ = sp.simplex(m, "mix")
        >>> xs = [torch.full((2,), float(k)) for k in range(3)]
        >>> sp.combine(m, "mix", xs)
        tensor([1., 1.], grad_fn=<...>)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        if _is_fusable(plist):
            p = plist[0]
            return ops.simplex_weighted_sum(plist.original, inputs, map=p.map, temperature=p.temperature,
                                            alpha=p.alpha)
    return ops.weighted_sum(_get_tensor(module, name), inputs)


def _is_fusable(plist: parametrize.ParametrizationList) -> bool:
    """Exactly one Simplex over one stored 1-D tensor: the fused path applies."""
    if len(plist) != 1 or not isinstance(plist[0], Simplex) or not plist.is_tensor:
        return False
    return plist.original.dim() == 1 and plist[0].dim in (0, -1, None)


def set_temperature(module: nn.Module, value) -> int:
    r"""Set the temperature of every :class:`Simplex` in ``module``, and of
    every layer built on one (:class:`~simplex_param.SimplexFusion`,
    :class:`~simplex_param.MixedOp`): the modules whose class sets
    ``anneals_temperature = True``.

    The first call makes each one's temperature a 0-D float64 buffer
    (non-persistent: state_dicts do not change); later calls write the new
    value into it, in place. So annealing a model compiled with
    :func:`torch.compile` does not recompile it: call ``set_temperature``
    once before compiling, then as often as the schedule wants.

    Args:
        module (nn.Module): the model.
        value (float or Tensor): the temperature, positive and finite (a
            0-D tensor's value is copied).

    Returns:
        The number of modules set.

    Example::

        >>> model = nn.Sequential(sp.SimplexFusion(3), sp.MixedOp([nn.Identity(), nn.Tanh()]))
        >>> sp.set_temperature(model, 0.5)
        4
        >>> model[0].temperature
        tensor(0.5000, dtype=torch.float64)
    """
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"value must be a number or a 0-D tensor, got a {value.dim()}-D tensor")
        value = value.item()
    value = checks.check_float_temperature(value)
    count = 0
    for m in module.modules():
        if not getattr(m, "anneals_temperature", False):
            continue
        t = m.temperature
        if isinstance(t, Tensor):
            with torch.no_grad():
                t.fill_(value)
        else:
            del m.temperature
            m.register_buffer("temperature", torch.tensor(value, dtype=torch.float64), persistent=False)
        count += 1
    return count
