r"""Fusion layers on the fused operator.

:class:`SimplexFusion` mixes K same-shaped inputs (modalities, branches) with
learned weights on the simplex (for architecture search, see
:class:`simplex_param.MixedOp`);
:class:`LazySimplexFusion` infers K from its first call; :class:`ScalarMix` is
a drop-in for AllenNLP's ``ScalarMix`` (the ELMo-style mix of layer outputs),
down to its parameters and checkpoints.

The fusion layers keep their weights as a 1-D parameter parametrized by
:class:`~simplex_param.Simplex`, stored as the pre-softmax values
``parametrizations.weight.original``; ScalarMix keeps AllenNLP's
``scalar_parameters``. Each runs one fused pass over the inputs.
"""
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from . import checks, ops
from .parametrization import Simplex, check_simplex_map

__all__ = ["SimplexFusion", "LazySimplexFusion", "ScalarMix", "WeightedLayerSum"]


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _check_probability(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"weight_dropout must be a float, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"weight_dropout must be in [0, 1], got {p!r}")
    return float(p)


def _num_entries(inputs) -> int:
    """K of a list/tuple of inputs (``None`` entries included) or of a tensor of shape (K, ...)."""
    if isinstance(inputs, Tensor):
        return ops.num_stacked(inputs)
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list or tuple of tensors, or one tensor, got {type(inputs).__name__}")
    return len(inputs)


def _drop_logits(logits: Tensor, p: float) -> Tensor:
    r"""Drop each entry with probability ``p`` (its logit becomes ``-inf``), keeping at least one.

    The softmax of the result is the softmax over the kept entries alone: the
    weights of the kept inputs, renormalised to sum to one. When every entry
    falls, one chosen uniformly is kept. Runs on the device, without a host
    synchronisation, so it also compiles.
    """
    n = logits.shape[0]
    keep = torch.rand(n, device=logits.device) >= p
    lucky = torch.randint(n, (1,), device=logits.device)
    one = torch.zeros(n, dtype=torch.bool, device=logits.device).index_fill_(0, lucky, True)
    keep = torch.where(keep.any(), keep, one)
    return logits.masked_fill(~keep, float("-inf"))


class SimplexFusion(nn.Module):
    r"""Learned convex combination of K same-shaped inputs.

    .. math::
        y = \sum_{k=1}^{K} w_k x_k \;(+\, b), \qquad
        w = \mathrm{map}(z / T)

    with the map ``"softmax"`` (the default), or a sparse one, which gives
    exact zeros (see :func:`simplex_param.simplex_weighted_sum`).

    The pre-weights :math:`z` are the parameter
    ``parametrizations.weight.original`` (shape ``(K,)``, zeros at first: uniform
    weights); ``self.weight`` reads as the probabilities :math:`w`, and
    assigning probabilities to it sets :math:`z` so that it reads them back.
    The forward is :func:`simplex_param.simplex_weighted_sum` of :math:`z`: one
    fused call, which reads each input once.

    **Missing inputs.** A ``None`` entry marks an absent input (a dropped
    modality, a missing sensor). The weights are renormalised over the present
    inputs: the map of the present pre-weights (for the softmax,
    :math:`w_k / \sum_{j\,\mathrm{present}} w_j`), and stay differentiable.
    All absent is an error.

    **Named inputs.** With ``names=["rgb", "depth", "audio"]`` the layer also
    takes a mapping from names to tensors, with any non-empty subset of the
    names present: the absent ones are missing inputs, as above. An unknown
    name raises ``KeyError``. The K weights exist from construction, so an
    optimizer built then sees them, and calls with different subsets all
    train the same weights.

    **Weight dropout.** With ``weight_dropout=p``, in training mode each present
    input is dropped with probability ``p`` and the weights are renormalised
    over the kept ones, so they still sum to one; when all fall, one chosen
    uniformly is kept. Nothing is dropped in eval mode. A dropped input is
    given weight zero (its pre-weight is masked with ``-inf``), so it must
    still be finite.

    Args:
        num_inputs (int): K, the number of inputs, at least 1; may be left
            out when ``names`` is given.
        names (sequence of str, optional): a name per input, for mappings.
        bias (bool, optional): add a learnable scalar bias, zero at first.
            Default: ``False``.
        temperature (float, optional): softmax temperature, positive and
            finite. Default: ``1.0``.
        weight_dropout (float, optional): probability of dropping each input
            in training, in ``[0, 1]``. Default: ``0.0``.
        map (str, optional): a map onto the simplex (see :class:`~simplex_param.Simplex`).
            Default: ``"softmax"``.
        alpha, learn_alpha: the map's alpha, fixed or learned (see
            :class:`~simplex_param.Simplex`).
            Default: ``"softmax"``.
        device, dtype: of the parameters, as in other ``torch.nn`` layers.
            The inputs may have another floating dtype (float32 weights with
            bfloat16 inputs is the usual mixed-precision case).

    Shape:
        - inputs: a list or tuple of K tensors of one shape :math:`(*)`
          (``None`` for an absent one), or one tensor :math:`(K, *)`.
        - output: :math:`(*)`, in the inputs' dtype.

    Example::

        >>> fuse = sp.SimplexFusion(3)
        >>> fuse.extra_repr()
        'num_inputs=3, temperature=1.0, weight_dropout=0.0, bias=False'
        >>> list(fuse.state_dict())
        ['parametrizations.weight.original']
        >>> fuse.weight
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SoftmaxBackward0>)
        >>> xs = [torch.full((2,), float(k)) for k in range(3)]
        >>> fuse(xs)
        tensor([1., 1.], grad_fn=<...>)
        >>> fuse([xs[0], None, xs[2]])
        tensor([1., 1.], grad_fn=<...>)
        >>> fuse.weight = torch.tensor([0.5, 0.25, 0.25])
        >>> fuse(xs)
        tensor([0.7500, 0.7500], grad_fn=<...>)
    """

    # set_temperature sets this module's temperature.
    anneals_temperature = True

    def __init__(
        self,
        num_inputs: Optional[int] = None,
        *,
        names: Optional[Sequence[str]] = None,
        bias: bool = False,
        temperature: float = 1.0,
        weight_dropout: float = 0.0,
        map: str = "softmax",
        alpha: Optional[float] = None,
        learn_alpha: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.names = _check_names(names, num_inputs)
        if self.names is not None:
            num_inputs = len(self.names)
        self.temperature = checks.check_float_temperature(temperature)
        self.weight_dropout = _check_probability(weight_dropout)
        self.map = check_simplex_map(map)
        # Checked now by the Simplex of the weight, even when it comes later (lazy).
        self._map_options = {"alpha": alpha, "learn_alpha": learn_alpha}
        Simplex(map=self.map, **self._map_options)
        if bias:
            self.bias = nn.Parameter(torch.zeros((), **factory))
        else:
            self.register_parameter("bias", None)
        self._create_weight(num_inputs, factory)

    def _create_weight(self, num_inputs, factory) -> None:
        self.num_inputs = _check_count(num_inputs, "num_inputs")
        self.weight = nn.Parameter(torch.zeros(self.num_inputs, **factory))
        self._parametrize_weight()

    def _parametrize_weight(self) -> None:
        parametrize.register_parametrization(
            self, "weight", Simplex(temperature=self.temperature, map=self.map, **self._map_options))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights (zero pre-weights) and a zero bias."""
        nn.init.zeros_(self.parametrizations.weight.original)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        extra = "" if self.map == "softmax" else f", map={self.map!r}"
        return (
            f"num_inputs={self.num_inputs}, temperature={float(self.temperature)}, "
            f"weight_dropout={self.weight_dropout}, bias={self.bias is not None}{extra}"
        )

    def forward(self, inputs) -> Tensor:
        if isinstance(inputs, Mapping):
            inputs = self._by_name(inputs)
        n = _num_entries(inputs)
        if n != self.num_inputs:
            raise ValueError(f"inputs has {n} entries but this layer fuses num_inputs={self.num_inputs}")
        logits = self.parametrizations.weight.original
        if not isinstance(inputs, Tensor):
            present = [k for k, x in enumerate(inputs) if x is not None]
            if not present:
                raise ValueError("inputs: every entry is None; at least one input must be present")
            if len(present) < n:
                logits = logits[present]
                inputs = [inputs[k] for k in present]
        if self.training and self.weight_dropout > 0 and logits.shape[0] > 1:
            logits = _drop_logits(logits, self.weight_dropout)
        out = ops.simplex_weighted_sum(logits, inputs, map=self.map, temperature=self.temperature,
                                       alpha=self.parametrizations.weight[0].alpha)
        if self.bias is not None:
            out = out + self.bias
        return out


    def _by_name(self, inputs: Mapping) -> list:
        """A mapping of names to tensors as the list of K entries, ``None``
        for the names it lacks."""
        if self.names is None:
            raise TypeError("inputs given as a mapping need a layer built with names=[...]")
        unknown = [key for key in inputs if key not in self.names]
        if unknown:
            raise KeyError(f"unknown input name {unknown[0]!r}; this layer fuses {list(self.names)}")
        if not inputs:
            raise ValueError(f"inputs: the mapping is empty; at least one of {list(self.names)} must be present")
        return [inputs.get(name) for name in self.names]


def _check_names(names, num_inputs):
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list or tuple of str, got {type(names).__name__}")
    names = tuple(names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {type(name).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {list(names)}")
    if num_inputs is not None and num_inputs != len(names):
        raise ValueError(f"num_inputs={num_inputs} but names has {len(names)} entries")
    return names


class LazySimplexFusion(LazyModuleMixin, SimplexFusion):
    r"""A :class:`SimplexFusion` whose ``num_inputs`` is inferred from the first call.

    Until then ``weight`` is a :class:`~torch.nn.parameter.UninitializedParameter`.
    The first forward (or loading a state_dict of a materialised layer)
    materialises it with shape ``(K,)``, in place, and registers the
    :class:`~simplex_param.Simplex` parametrization on that same parameter
    object, which becomes ``parametrizations.weight.original``. So an optimizer
    built after a dry run sees it, as with other lazy modules
    (:class:`torch.nn.LazyLinear`); one built before the dry run would not.
    After that the layer is an ordinary :class:`SimplexFusion` (it stays of
    this class), and a call with another number of inputs raises
    ``ValueError``.

    Args:
        bias, temperature, weight_dropout, map, device, dtype: as in
            :class:`SimplexFusion`.

    Example::

        >>> fuse = sp.LazySimplexFusion()
        >>> fuse.has_uninitialized_params()
        True
        >>> _ = fuse([torch.ones(2)] * 4)          # the dry run
        >>> fuse.num_inputs, list(fuse.state_dict())
        (4, ['parametrizations.weight.original'])
        >>> optimizer = torch.optim.SGD(fuse.parameters(), lr=0.1)
    """

    # Keep this class after materialisation: parametrize has already swapped it
    # for a subclass that carries the `weight` property.
    cls_to_become = None

    def __init__(
        self,
        *,
        bias: bool = False,
        temperature: float = 1.0,
        weight_dropout: float = 0.0,
        map: str = "softmax",
        alpha: Optional[float] = None,
        learn_alpha: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            None, bias=bias, temperature=temperature, weight_dropout=weight_dropout, map=map, alpha=alpha,
            learn_alpha=learn_alpha, device=device, dtype=dtype,
        )
        self.register_load_state_dict_pre_hook(LazySimplexFusion._materialize_from_state_dict)

    def _create_weight(self, num_inputs, factory) -> None:
        self.num_inputs = 0
        self.weight = UninitializedParameter(**factory)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params():
            super().reset_parameters()

    def _materialize(self, num_inputs: int) -> None:
        self.num_inputs = _check_count(num_inputs, "num_inputs")
        with torch.no_grad():
            self.weight.materialize((self.num_inputs,))
            self.weight.zero_()  # finite values for Simplex.right_inverse
        self._parametrize_weight()

    def initialize_parameters(self, inputs) -> None:
        """Materialise the weights with K taken from ``inputs`` (called before the first forward)."""
        if self.has_uninitialized_params():
            self._materialize(_num_entries(inputs))

    @staticmethod
    def _materialize_from_state_dict(module, state_dict, prefix, *args) -> None:
        saved = state_dict.get(prefix + "parametrizations.weight.original")
        if saved is not None and module.has_uninitialized_params() and saved.dim() == 1:
            module._materialize(saved.shape[0])


class ScalarMix(nn.Module):
    r"""AllenNLP's ``ScalarMix``: ``gamma`` times a learned convex mix of K tensors.

    .. math::
        y = \gamma \sum_{k=1}^{K} s_k\, \tilde t_k, \qquad
        s = \mathrm{softmax}(z), \qquad
        \tilde t_k = \begin{cases}
            \dfrac{t_k - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} & \text{with layer norm} \\
            t_k & \text{otherwise}
        \end{cases}

    A drop-in for ``allennlp.modules.scalar_mix.ScalarMix``, down to its
    parameters: the pre-softmax :math:`z` are ``scalar_parameters``, an
    :class:`~torch.nn.ParameterList` of K one-element parameters, and
    ``gamma`` has shape ``(1,)``. Reading or setting them (``.data``,
    ``fill_``) and handing them to an optimizer act on the values the layer
    uses, and the state_dict has AllenNLP's keys, ``scalar_parameters.0`` ...
    ``scalar_parameters.{K-1}`` and ``gamma``, so AllenNLP checkpoints load as
    they are. ``self.weight`` reads as :math:`s`.

    **Layer norm.** ``layer_norm="tensor"`` (AllenNLP's ``do_layer_norm=True``)
    takes :math:`\mu_k` and :math:`\sigma_k^2` as the mean and (biased)
    variance of all the unmasked elements of :math:`t_k` (a position is
    unmasked when ``mask`` is nonzero there; the mask covers every dimension
    but the last), exactly as AllenNLP computes them, with AllenNLP's
    :math:`\epsilon`: ``1e-4`` for float16 inputs, ``1e-13`` otherwise. The
    statistics and the normalisation are computed in float32 for float16 and
    bfloat16 inputs, and the result has the inputs' dtype. An all-masked
    ``mask`` gives NaN, as in AllenNLP.

    ``layer_norm="token"`` normalises each vector along the last dimension on
    its own, ``F.layer_norm(t, (D,))`` (:math:`\epsilon = 10^{-5}`, no affine
    parameters), as s3prl's ``Featurizer`` and speechbrain's
    ``WeightedSSLModel`` do; it needs no mask (one is ignored).

    Since :math:`\gamma s` is a vector of K numbers, the mix is one
    :func:`simplex_param.weighted_sum` pass over the tensors.

    Args:
        mixture_size (int): K, the number of tensors to mix.
        do_layer_norm (bool, optional): AllenNLP's switch, read by its
            truth as AllenNLP does (any true value, such as the string
            ``"scalar_norm_reg"`` of AllenNLP's own test, counts as ``True``):
            true is ``layer_norm="tensor"``, false no normalisation. Default:
            ``None`` (not given: as AllenNLP's default, ``False``, unless
            ``layer_norm`` says otherwise).
        initial_scalar_parameters (list of float, optional): K pre-softmax
            values, as in AllenNLP; ``-inf`` gives a layer the weight 0 (at
            least one must be finite). Default: zeros (uniform weights).
        trainable (bool, optional): whether the weights and ``gamma`` learn.
            Default: ``True``.
        layer_norm (str, optional): ``"tensor"``, ``"token"`` or ``None``
            (no normalisation). Give it or ``do_layer_norm``; a contradiction
            between the two raises ``ValueError``. Default: ``None``.

    Shape:
        - tensors: a list or tuple of K tensors of one shape :math:`(*, D)`,
          or one tensor :math:`(K, *, D)`.
        - mask: :math:`(*)`, bool or numeric; required with
          ``layer_norm="tensor"``, ignored otherwise.
        - output: :math:`(*, D)`, in the tensors' dtype.

    Example::

        >>> mix = sp.ScalarMix(3, initial_scalar_parameters=[0.0, 0.0, 1.0])
        >>> mix.weight
        tensor([0.2119, 0.2119, 0.5761], grad_fn=<SoftmaxBackward0>)
        >>> mix.scalar_parameters[2]
        Parameter containing:
        tensor([1.], requires_grad=True)
        >>> layers = [torch.full((1, 2), float(k)) for k in range(3)]
        >>> mix(layers)
        tensor([[1.3642, 1.3642]], grad_fn=<...>)
        >>> sp.ScalarMix(3, layer_norm="token").extra_repr()
        "mixture_size=3, layer_norm='token'"
        >>> sp.ScalarMix(3, do_layer_norm=True).layer_norm
        'tensor'
    """

    def __init__(
        self,
        mixture_size: int,
        do_layer_norm=None,
        initial_scalar_parameters: Optional[Sequence[float]] = None,
        trainable: bool = True,
        *,
        layer_norm: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.mixture_size = _check_count(mixture_size, "mixture_size")
        self.layer_norm = _check_scalar_mix_norm(do_layer_norm, layer_norm)
        if initial_scalar_parameters is None:
            initial = torch.zeros(self.mixture_size)
        else:
            initial = torch.as_tensor(initial_scalar_parameters, dtype=torch.float32)
            if initial.dim() != 1 or initial.shape[0] != self.mixture_size:
                raise ValueError(
                    f"initial_scalar_parameters has {initial.numel()} values but mixture_size is {self.mixture_size}"
                )
            if initial.isnan().any() or (initial == math.inf).any() or not initial.isfinite().any():
                raise ValueError(
                    "initial_scalar_parameters must be finite or -inf (a weight of 0), with at least one "
                    f"finite, got {initial.tolist()}"
                )
        # One (1,) parameter per layer, as AllenNLP keeps them.
        self.scalar_parameters = nn.ParameterList(
            [nn.Parameter(initial[k : k + 1].clone(), requires_grad=trainable) for k in range(self.mixture_size)]
        )
        self.gamma = nn.Parameter(torch.ones(1), requires_grad=trainable)
        # The constructor's start, for reset_parameters (not in the state_dict).
        self._initial_scalars = initial.tolist()
        self.register_load_state_dict_pre_hook(ScalarMix._check_checkpoint)

    def reset_parameters(self) -> None:
        """The constructor's start, in place: ``scalar_parameters`` back to
        ``initial_scalar_parameters`` (zeros, uniform weights, when none were
        given) and ``gamma`` to 1. ``requires_grad`` is kept."""
        for p, value in zip(self.scalar_parameters, self._initial_scalars):
            nn.init.constant_(p, value)
        nn.init.ones_(self.gamma)

    @property
    def do_layer_norm(self) -> bool:
        """AllenNLP's flag: whether the layer norm is AllenNLP's whole-tensor one."""
        return self.layer_norm == "tensor"

    def extra_repr(self) -> str:
        return f"mixture_size={self.mixture_size}, layer_norm={self.layer_norm!r}"

    @property
    def weight(self) -> Tensor:
        r"""The mixing weights :math:`s = \mathrm{softmax}(z)`, shape ``(K,)``."""
        return torch.softmax(torch.cat(list(self.scalar_parameters)), 0)

    def forward(self, tensors, mask: Optional[Tensor] = None) -> Tensor:
        tensors = ops.as_list(tensors)
        if len(tensors) != self.mixture_size:
            raise ValueError(f"tensors has {len(tensors)} tensors but mixture_size is {self.mixture_size}")
        dtype = tensors[0].dtype
        if not dtype.is_floating_point:
            raise TypeError(f"tensors[0] must have a floating dtype, got {dtype}")
        # gamma * s in the dtype of AllenNLP's products: float64 for float64 tensors.
        cdtype = torch.promote_types(self.gamma.dtype, dtype)
        coefficients = self.gamma.to(cdtype) * self.weight.to(cdtype)
        if self.layer_norm is None:
            return ops.weighted_sum(coefficients, tensors)
        if self.layer_norm == "token":
            return ops.weighted_sum(coefficients, [F.layer_norm(t, t.shape[-1:]) for t in tensors])
        if mask is None:
            raise ValueError('mask is required when layer_norm="tensor" (do_layer_norm=True)')
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
        if tensors[0].dim() < 1 or mask.shape != tensors[0].shape[:-1]:
            raise ValueError(
                f"mask has shape {list(mask.shape)} but tensors of shape {list(tensors[0].shape)} "
                f"need a mask of shape {list(tensors[0].shape[:-1])}"
            )
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        eps = 1e-4 if dtype == torch.float16 else 1e-13
        m = mask.to(compute).unsqueeze(-1)
        count = m.sum() * tensors[0].shape[-1]
        normed = [_masked_standardize(t.to(compute), m, count, eps) for t in tensors]
        return ops.weighted_sum(coefficients, normed).to(dtype)

    @staticmethod
    def _check_checkpoint(module, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        """A checkpoint of another K is an error even with strict=False; one
        saved by simplex_param 0.1 (the K values in one tensor,
        ``parametrizations.weight.original``) is split into scalar_parameters."""
        old = prefix + "parametrizations.weight.original"
        if old in state_dict:
            values = state_dict.pop(old).reshape(-1)
            for k, v in enumerate(values):
                state_dict[f"{prefix}scalar_parameters.{k}"] = v.reshape(1)
        head = prefix + "scalar_parameters."
        found = sorted(key for key in state_dict if key.startswith(head))
        wanted = sorted(f"{head}{k}" for k in range(module.mixture_size))
        if found and found != wanted:
            error_msgs.append(
                f"ScalarMix checkpoint has {len(found)} scalar_parameters "
                f"({', '.join(found)}) but mixture_size is {module.mixture_size}"
            )


def _masked_standardize(t: Tensor, m: Tensor, count: Tensor, eps: float) -> Tensor:
    r"""``(t - mean) / sqrt(var + eps)``, mean and variance over the elements where ``m`` is nonzero."""
    tm = t * m
    mean = tm.sum() / count
    var = ((tm - mean) * m).pow(2).sum() / count
    return (t - mean) / torch.sqrt(var + eps)


def _check_scalar_mix_norm(do_layer_norm, layer_norm) -> Optional[str]:
    """ScalarMix's normalisation from AllenNLP's ``do_layer_norm`` and ``layer_norm``."""
    if layer_norm not in (None, "tensor", "token"):
        raise ValueError(f'layer_norm must be "tensor", "token" or None, got {layer_norm!r}')
    if do_layer_norm is None:
        return layer_norm
    # AllenNLP reads only the truth of do_layer_norm (its own test passes the
    # string "scalar_norm_reg"), so any value with a truth value is taken.
    try:
        flag = bool(do_layer_norm)
    except Exception as error:  # a tensor of several elements, for one
        raise TypeError(
            f"do_layer_norm must have a truth value (a bool, or anything bool() reads), got "
            f"{type(do_layer_norm).__name__}: {error}"
        ) from None
    implied = "tensor" if flag else None
    if layer_norm is not None and layer_norm != implied:
        given = repr(flag) if isinstance(do_layer_norm, bool) else f"{do_layer_norm!r} (read as {flag})"
        raise ValueError(
            f"do_layer_norm={given} contradicts layer_norm={layer_norm!r}: a true do_layer_norm "
            'means layer_norm="tensor"; give only layer_norm'
        )
    return implied


class WeightedLayerSum(nn.Module):
    r"""The softmax-weighted sum of L layer outputs of HF transformers'
    ``use_weighted_layer_sum``, s3prl's ``Featurizer`` and speechbrain's
    ``WeightedSSLModel``.

    .. math::
        y = \sum_{l=1}^{L} w_l\, \tilde h_l, \qquad w = \mathrm{softmax}(z), \qquad
        \tilde h_l = \begin{cases}
            \mathrm{layer\_norm}(h_l) \text{ over the last dimension} & \text{with } \texttt{layer\_norm="token"} \\
            h_l & \text{otherwise}
        \end{cases}

    No ``gamma``, no mask. The pre-softmax :math:`z` are the parameter
    ``layer_weights``, shape ``(L,)``, as all three keep them (HF names it
    ``layer_weights``, s3prl and speechbrain ``weights``); ``self.weight``
    reads as :math:`w`.

    **Formulas.** ``formula`` picks how the sum is computed. ``"fused"`` is
    one :func:`simplex_param.softmax_weighted_sum` pass: no stacking, no
    temporaries; it equals the others up to floating-point rounding (the
    order of the additions and fused multiply-adds differ). ``"hf"``,
    ``"s3prl"`` and ``"speechbrain"`` run the source's own PyTorch
    operations in its order, so outputs and gradients equal the source's bit
    for bit, at the source's cost:

    - ``"hf"``: ``(torch.stack(h, dim=1) * softmax(z).view(-1, 1, ..., 1)).sum(dim=1)``;
    - ``"s3prl"``: ``stacked = torch.stack(h, dim=0)``, then the token
      layer norm of ``stacked``, then
      ``(softmax(z).unsqueeze(-1) * stacked.view(L, -1)).sum(dim=0)``;
    - ``"speechbrain"``: the token layer norm of each layer, then
      ``y = h[0] * w[0]`` and ``y += h[l] * w[l]`` for each further layer.

    The constructors :meth:`hf`, :meth:`s3prl` and :meth:`speechbrain` also
    start the pre-weights where the source does (HF: ``ones(L) / L``; the
    others: zeros, as the plain constructor).

    Args:
        num_layers (int): L, the number of layer outputs.
        layer_norm (str, optional): ``"token"`` or ``None``. Default: ``None``.
        formula (str, optional): ``"fused"``, ``"hf"``, ``"s3prl"`` or
            ``"speechbrain"``. HF's formula has no layer norm. Default:
            ``"fused"``.
        device, dtype: of ``layer_weights``.

    Shape:
        - layers: a list or tuple of L tensors of one shape :math:`(*, D)`
          (HF's ``outputs.hidden_states``), or one tensor :math:`(L, *, D)`.
        - output: :math:`(*, D)`.

    Example::

        >>> mix = sp.WeightedLayerSum.hf(4)
        >>> mix.layer_weights
        Parameter containing:
        tensor([0.2500, 0.2500, 0.2500, 0.2500], requires_grad=True)
        >>> layers = [torch.full((1, 2), float(k)) for k in range(4)]
        >>> mix(layers)
        tensor([[1.5000, 1.5000]], grad_fn=<SumBackward1>)
        >>> sp.WeightedLayerSum.s3prl(4, normalize=True)
        WeightedLayerSum(num_layers=4, layer_norm='token', formula='s3prl')
    """

    FORMULAS = ("fused", "hf", "s3prl", "speechbrain")

    def __init__(
        self,
        num_layers: int,
        *,
        layer_norm: Optional[str] = None,
        formula: str = "fused",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_layers = _check_count(num_layers, "num_layers")
        if layer_norm not in (None, "token"):
            hint = ' (AllenNLP\'s masked whole-tensor norm is sp.ScalarMix(..., layer_norm="tensor"))'
            hint = hint if layer_norm == "tensor" else ""
            raise ValueError(f'layer_norm must be "token" or None, got {layer_norm!r}{hint}')
        if formula not in self.FORMULAS:
            raise ValueError(f"formula must be one of {list(self.FORMULAS)}, got {formula!r}")
        if formula == "hf" and layer_norm is not None:
            raise ValueError('formula="hf" takes no layer_norm: HF\'s use_weighted_layer_sum normalises nothing')
        self.layer_norm = layer_norm
        self.formula = formula
        # The constructor's start, for reset_parameters: zeros here, 1 / L
        # from hf(), as the sources start.
        self._initial_value = 0.0
        self.layer_weights = nn.Parameter(torch.zeros(self.num_layers, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """The constructor's start, in place: ``layer_weights`` all ``1 / L``
        for a layer built by :meth:`hf` (HF's ``ones(L) / L``), zeros
        otherwise; uniform weights either way. Call it where a checkpoint
        lacks ``layer_weights``, for example from HF's ``_init_weights``."""
        nn.init.constant_(self.layer_weights, self._initial_value)

    @classmethod
    def hf(cls, num_layers: int, *, device=None, dtype=None) -> "WeightedLayerSum":
        """HF transformers' ``use_weighted_layer_sum``: pre-weights
        ``ones(L) / L``, HF's formula."""
        mix = cls(num_layers, formula="hf", device=device, dtype=dtype)
        mix._initial_value = 1.0 / mix.num_layers
        mix.reset_parameters()
        return mix

    @classmethod
    def s3prl(cls, num_layers: int, *, normalize: bool = False, device=None, dtype=None) -> "WeightedLayerSum":
        """s3prl's ``Featurizer``: pre-weights zeros, the token layer norm
        with ``normalize=True``, s3prl's formula."""
        return cls(num_layers, layer_norm="token" if normalize else None, formula="s3prl", device=device, dtype=dtype)

    @classmethod
    def speechbrain(cls, num_layers: int, *, layernorm: bool = False, device=None, dtype=None) -> "WeightedLayerSum":
        """speechbrain's ``WeightedSSLModel``: pre-weights zeros, the token
        layer norm with ``layernorm=True``, speechbrain's formula."""
        return cls(
            num_layers, layer_norm="token" if layernorm else None, formula="speechbrain", device=device, dtype=dtype
        )

    @property
    def weight(self) -> Tensor:
        r"""The mixing weights :math:`w = \mathrm{softmax}(z)`, shape ``(L,)``."""
        return F.softmax(self.layer_weights, dim=-1)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, layer_norm={self.layer_norm!r}, formula={self.formula!r}"

    def forward(self, layers) -> Tensor:
        layers = ops.as_list(layers)
        if len(layers) != self.num_layers:
            raise ValueError(f"layers has {len(layers)} tensors but num_layers is {self.num_layers}")
        z, norm = self.layer_weights, self.layer_norm is not None
        if self.formula == "hf":
            stacked = torch.stack(layers, dim=1)
            w = F.softmax(z, dim=-1)
            return (stacked * w.view(-1, *[1] * (layers[0].dim() - 1))).sum(dim=1)
        if self.formula == "s3prl":
            stacked = torch.stack(layers, dim=0)
            if norm:
                stacked = F.layer_norm(stacked, (stacked.shape[-1],))
            _, *shape = stacked.shape
            w = F.softmax(z, dim=-1)
            return (w.unsqueeze(-1) * stacked.reshape(self.num_layers, -1)).sum(dim=0).view(*shape)
        if norm:
            layers = [F.layer_norm(h, (h.shape[-1],)) for h in layers]
        if self.formula == "speechbrain":
            w = F.softmax(z, dim=-1)
            out = layers[0] * w[0]
            for k in range(1, self.num_layers):
                out += layers[k] * w[k]
            return out
        return ops.softmax_weighted_sum(z, layers)
