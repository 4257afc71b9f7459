r"""The public ops, and the choice of compiled kernel or fallback.

Which implementation runs is chosen here, per call, in one place
(:func:`_run`): the compiled op when the extension is loaded and has a kernel
for the inputs' device, else the pure-PyTorch reference
(:mod:`simplex_param.reference`). Autograd of the compiled ops lives in C++
(``csrc/autograd.cpp``); their fake kernels, for ``torch.compile``, in
:mod:`simplex_param.fakes`.
"""
import itertools
import math
from collections.abc import Iterable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _ext, checks, distributed, fakes, maps, reference

__all__ = [
    "simplex_weighted_sum",
    "softmax_weighted_sum",
    "weighted_sum",
    "grouped_weighted_sum",
    "grouped_simplex_weighted_sum",
    "grouped_softmax_weighted_sum",
    "mix",
]

# Every op of the library (csrc/simplex_param.cpp).
OPS = (
    "weighted_sum",
    "_weighted_sum_backward",
    "simplex_weighted_sum",
    "softmax_weighted_sum",
    "grouped_weighted_sum",
    "_grouped_weighted_sum_backward",
    "grouped_simplex_weighted_sum",
    "mix",
    "_mix_backward",
    "sinkhorn",
    "_sinkhorn_backward",
)


def num_stacked(inputs: Tensor) -> int:
    """K of inputs given as one (K, ...) tensor."""
    if inputs.dim() == 0:
        raise ValueError("inputs given as a single tensor must have a first dimension K, got a 0-D tensor")
    return inputs.shape[0]


def as_list(inputs) -> list:
    """`inputs` as a list or tuple of tensors: a tensor is split (as views)
    along dim 0; any other iterable, a generator included, is read once."""
    if type(inputs) not in (list, tuple):
        if isinstance(inputs, Tensor):
            num_stacked(inputs)
            return inputs.unbind(0)
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
            raise TypeError(f"inputs must be an iterable of tensors, or one tensor, got {type(inputs).__name__}")
        inputs = list(inputs)
    for x in inputs:
        if not isinstance(x, Tensor):
            i = next(i for i, x in enumerate(inputs) if not isinstance(x, Tensor))
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(inputs[i]).__name__}")
    return inputs


def _use_compiled(weights: Tensor, inputs) -> bool:
    """Whether the compiled op can run this call. It has no batching rule and
    no forward-mode derivative, so under a torch.func transform (vmap, grad,
    jvp) or with a forward-mode tangent the reference, built from PyTorch
    ops, runs instead."""
    if not (inputs and _KERNEL_DEVICES.get(inputs[0].device.type, False)):
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return fwAD._current_level < 0 or all(fwAD.unpack_dual(t).tangent is None for t in (weights, *inputs))


def _fast_call(weights: Tensor, inputs) -> bool:
    """Whether the op may be called through simplex_param._C rather than
    torch.ops: not while torch.compile traces (it must see the op), and not
    where __torch_function__ (a tensor subclass or a mode) must see it."""
    return (
        _ext.MODULE is not None
        and not torch.compiler.is_compiling()
        and not torch._C._has_torch_function((weights, *inputs))
    )


def _run(op: str, weights: Tensor, inputs, args: tuple, check, fallback):
    """Op `op` of the extension on (weights, inputs, *args) where it can run
    (:func:`_use_compiled`), through simplex_param._C where allowed
    (:func:`_fast_call`), else torch.ops; otherwise `check()`, then the
    reference `fallback`. `check(weights, inputs)` checks the arguments.
    DTensor arguments go to :func:`simplex_param.distributed.run`, which
    calls this on each rank's local tensors."""
    if distributed.any_dtensor(weights, inputs):
        check(weights, inputs)  # the global shapes, dtypes and devices
        return distributed.run(op, weights, inputs, lambda w, xs: _run(op, w, xs, args, check, fallback))
    if _use_compiled(weights, inputs):
        if _fast_call(weights, inputs):
            return getattr(_ext.MODULE, op)(weights, inputs, *args)
        return getattr(torch.ops.simplex_param, op).default(weights, inputs, *args)
    check(weights, inputs)
    return fallback(weights, inputs, *args)


def _mapped_weighted_sum(logits, inputs, map: str, temperature, alpha=None) -> Tensor:
    """simplex_weighted_sum once `map` is known to be valid."""
    inputs = as_list(inputs)
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    alpha = checks.check_alpha(alpha, map, maps.MAPS[map].has_alpha)
    if type(temperature) is not float or not 0.0 < temperature < math.inf:
        temperature = checks.check_temperature(temperature)
        if isinstance(temperature, Tensor):
            # A tensor temperature: divide through differentiable ops, then map at T = 1.
            checks.check_args(logits, inputs, "logits")
            logits = logits.to(reference.acc_dtype(inputs[0].dtype)) / temperature
            temperature = 1.0
    if isinstance(alpha, Tensor):
        # A learned alpha: the weights by the map's twin, which gives alpha
        # its gradient, then the compiled contraction.
        checks.check_args(logits, inputs, "logits")
        z = logits.to(reference.acc_dtype(inputs[0].dtype))
        return weighted_sum(maps.apply(map, z if temperature == 1.0 else z / temperature, alpha), inputs)
    return _run("simplex_weighted_sum", logits, inputs, (map, temperature, alpha),
                lambda w, xs: checks.check_args(w, xs, "logits"), reference.simplex_weighted_sum)


def simplex_weighted_sum(logits: Tensor, inputs, *, map: str = "softmax", temperature=1.0, alpha=None) -> Tensor:
    r"""Fused ``sum_k map(logits / temperature)[..., k] * inputs[k]``.

    The map acts on the last dimension of ``logits``, row by row:

    - ``"softmax"``: see :func:`softmax_weighted_sum`;
    - ``"sparsemax"``: the Euclidean projection onto the simplex,
      ``max(x - tau, 0)`` (Martins & Astudillo, 2016), with exact zeros;
    - ``"entmax15"``: 1.5-entmax, ``max(x / 2 - tau, 0) ** 2`` (Peters et
      al., 2019), between the two, also with exact zeros;
    - ``"entmax_bisect"``: alpha-entmax, ``max((alpha - 1) x - tau, 0) **
      (1 / (alpha - 1))``: the softmax at ``alpha = 1``, 1.5-entmax at 1.5,
      sparsemax at 2, sparser beyond;
    - ``"identity"``: the scaled logits as given (:func:`weighted_sum` when
      ``temperature`` is 1).

    ``x`` is ``logits / temperature`` and ``tau`` the threshold that makes the
    row sum to one. Rows of all ``-inf``, or with ``+inf`` or NaN, give NaN.
    ``alpha`` (``"entmax_bisect"`` only; default 1.5) is a number ``>= 1``,
    or a floating tensor broadcastable to ``logits`` with size 1 in the last
    dimension, which gets a gradient (the exact one). The maps are listed in
    :data:`simplex_param.maps.MAPS`; see ``docs/maps.md``.

    Example::

        >>> xs = [torch.full((2,), float(k)) for k in range(3)]
        >>> sp.simplex_weighted_sum(torch.tensor([0.5, 0.5, 0.0]), xs, map="identity")
        tensor([0.5000, 0.5000])
        >>> sp.simplex_weighted_sum(torch.tensor([2.0, 1.5, -1.0]), xs, map="sparsemax")  # weights 0.75, 0.25, 0
        tensor([0.2500, 0.2500])
    """
    checks.check_map(map, maps.MAPS)
    return _mapped_weighted_sum(logits, inputs, map, temperature, alpha)


def softmax_weighted_sum(logits: Tensor, inputs, *, temperature=1.0) -> Tensor:
    r"""Fused ``sum_k softmax(logits / temperature)[..., k] * inputs[k]``.

    .. math::
        \mathrm{out}[p, t] = \sum_{k=1}^{K} w_{p,k}\, x_k[p, t], \qquad
        w_{p,\cdot} = \mathrm{softmax}(\ell_{p,\cdot} / T)

    Args:
        logits (Tensor): pre-softmax weights of shape ``(K,)``, shared by every
            element, or ``(*P, K)``, one row per sample or token, where ``P``
            is a leading prefix of the inputs' shape. Any floating dtype.
        inputs (iterable of Tensor, or Tensor): K tensors of one shape, dtype
            and device (a list, a tuple or a generator), or one tensor of shape
            ``(K, ...)``. Never stacked; an input laid out unlike the others
            is copied, alone.
        temperature (float or Tensor, optional): softmax temperature: a
            positive finite number, or a 0-D floating tensor (learned or
            annealed; it gets a gradient, and changing it does not make
            ``torch.compile`` recompile). Default: ``1.0``.

    Returns:
        Tensor of the shape and dtype of one input. float16 and bfloat16
        inputs accumulate in float32, and the softmax is taken in that dtype.
        The gradient of ``logits`` has the logits' dtype.

    Non-finite logits propagate as in :func:`torch.softmax`: ``-inf`` gives a
    zero weight, a row of all ``-inf``, any ``+inf`` or NaN gives NaN. They
    are not checked, since that would synchronise with the device.

    Example::

        >>> logits = torch.zeros(3, requires_grad=True)
        >>> xs = [torch.full((2,), float(k)) for k in range(3)]
        >>> sp.softmax_weighted_sum(logits, xs)
        tensor([1., 1.], grad_fn=<...>)
        >>> gate = torch.tensor([[0.0, 0.0, 0.0], [0.0, -float("inf"), -float("inf")]])
        >>> sp.softmax_weighted_sum(gate, xs)  # one weight row per sample
        tensor([1., 0.])
    """
    return _mapped_weighted_sum(logits, inputs, "softmax", temperature)


def weighted_sum(weights: Tensor, inputs) -> Tensor:
    r"""Fused ``sum_k weights[..., k] * inputs[k]``, the weights used as given.

    Args:
        weights (Tensor): shape ``(K,)`` or ``(*P, K)`` as in
            :func:`softmax_weighted_sum`; any floating dtype and any real values.
        inputs (iterable of Tensor, or Tensor): as in :func:`softmax_weighted_sum`.

    Returns:
        Tensor of the shape and dtype of one input.

    Example::

        >>> sp.weighted_sum(torch.tensor([0.25, 0.75]), torch.tensor([[4.0], [8.0]]))
        tensor([7.])
    """
    inputs = as_list(inputs)
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a Tensor, got {type(weights).__name__}")
    return _run("weighted_sum", weights, inputs, (), lambda w, xs: checks.check_args(w, xs, "weights"),
                reference.weighted_sum)


def _flatten_groups(weights, groups, name: str) -> list:
    """The G groups of K tensors, flattened group by group (``groups[g][k]``
    at ``g * K + k``), K being the weights' last dimension. A group may be a
    list or tuple of tensors, any iterable of them, or one ``(K, ...)`` tensor."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(weights).__name__}")
    checks.check_grouped_weights(weights, name)
    if isinstance(groups, (Tensor, str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be a sequence of groups of tensors, got {type(groups).__name__}")
    groups = groups if type(groups) in (list, tuple) else list(groups)
    G, K = weights.shape
    if len(groups) != G:
        raise ValueError(f"{name} has shape {list(weights.shape)}, one row per group, but groups has {len(groups)} groups")
    # The common case, lists or tuples of K tensors, in one pass: many small
    # groups (a model soup's) make this loop part of the host cost.
    if all(type(group) in (list, tuple) and len(group) == K for group in groups):
        flat = list(itertools.chain.from_iterable(groups))
        if all(isinstance(x, Tensor) for x in flat):
            return flat
    flat = []
    for g, group in enumerate(groups):
        if isinstance(group, Tensor):
            if group.dim() == 0:
                raise ValueError(f"groups[{g}] given as a single tensor must have a first dimension K, got a 0-D tensor")
            group = group.unbind(0)
        elif isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
            raise TypeError(f"groups[{g}] must be a sequence of tensors, or one tensor, got {type(group).__name__}")
        elif type(group) not in (list, tuple):
            group = list(group)
        for k, x in enumerate(group):
            if not isinstance(x, Tensor):
                raise TypeError(f"groups[{g}][{k}] must be a Tensor, got {type(x).__name__}")
        if len(group) != K:
            raise checks.error("weights_k", name=name, n=K, inputs=f"groups[{g}]", K=len(group))
        flat.extend(group)
    return flat


def grouped_weighted_sum(weights: Tensor, groups) -> list:
    r"""G weighted sums in one call: ``out[g] = sum_k weights[g, k] * groups[g][k]``.

    Args:
        weights (Tensor): shape ``(G, K)``, one row of weights per group, any
            floating dtype and any real values.
        groups (sequence of G groups): each a sequence of K tensors of one
            shape, dtype and device (or one ``(K, ...)`` tensor). Groups may
            differ in shape and dtype.

    Returns:
        A list of G tensors, ``out[g]`` of the shape and dtype of group g.

    One pass over all the groups (on CPU, one parallel loop over every
    group's tiles), one autograd node. In the backward, the weights get their
    gradient and an input gets one only where it requires grad: frozen
    inputs cost no gradient writes. Deterministic.

    Example::

        >>> w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
        >>> a, b = sp.grouped_weighted_sum(w, [[torch.zeros(2), torch.ones(2)], [torch.ones(3), torch.zeros(3)]])
        >>> a, b
        (tensor([0.7500, 0.7500]), tensor([1., 1., 1.]))
    """
    flat = _flatten_groups(weights, groups, "weights")
    return _run("grouped_weighted_sum", weights, flat, (),
                lambda w, xs: checks.check_grouped_args(w, xs, "weights"), reference.grouped_weighted_sum)


def grouped_simplex_weighted_sum(logits: Tensor, groups, *, map: str = "softmax", temperature=1.0,
                                 alpha=None) -> list:
    r"""``out[g] = sum_k map(logits / temperature)[g, k] * groups[g][k]``, in one call.

    ``logits`` is ``(G, K)``; the map (see :func:`simplex_weighted_sum`) acts on
    each row, in float64 when a group is float64, else in float32. ``alpha``
    as in :func:`simplex_weighted_sum`. Otherwise as :func:`grouped_weighted_sum`.
    """
    checks.check_map(map, maps.MAPS)
    alpha = checks.check_alpha(alpha, map, maps.MAPS[map].has_alpha)
    flat = _flatten_groups(logits, groups, "logits")
    if type(temperature) is not float or not 0.0 < temperature < math.inf:
        temperature = checks.check_temperature(temperature)
        if isinstance(temperature, Tensor):
            # Divide in the map's dtype, as a float temperature is.
            checks.check_grouped_args(logits, flat, "logits")
            logits = logits.to(reference.grouped_acc_dtype(flat)) / temperature
            temperature = 1.0
    if isinstance(alpha, Tensor):
        checks.check_grouped_args(logits, flat, "logits")
        z = logits.to(reference.grouped_acc_dtype(flat))
        return grouped_weighted_sum(maps.apply(map, z if temperature == 1.0 else z / temperature, alpha),
                                    [flat[g * logits.shape[1]:(g + 1) * logits.shape[1]] for g in range(len(logits))])
    return _run("grouped_simplex_weighted_sum", logits, flat, (map, temperature, alpha),
                lambda w, xs: checks.check_grouped_args(w, xs, "logits"), reference.grouped_simplex_weighted_sum)


def grouped_softmax_weighted_sum(logits: Tensor, groups, *, temperature=1.0) -> list:
    r"""``out[g] = sum_k softmax(logits[g] / temperature)[k] * groups[g][k]``, in one call.

    The grouped :func:`softmax_weighted_sum`, for model soups and merging,
    multi-task layer mixes: G groups, each of K tensors with its own row of
    ``(G, K)`` logits. See :func:`grouped_weighted_sum` for the groups.

    Example::

        >>> logits = torch.zeros(2, 2, requires_grad=True)
        >>> members = [[torch.zeros(3), torch.ones(3)], [torch.ones(1), torch.ones(1)]]
        >>> sp.grouped_softmax_weighted_sum(logits, members)
        [tensor([0.5000, 0.5000, 0.5000], grad_fn=<...>), tensor([1.], grad_fn=<...>)]
    """
    return grouped_simplex_weighted_sum(logits, groups, map="softmax", temperature=temperature)


def _kernel_devices() -> dict:
    """Device types with a kernel for every op, read from the dispatcher."""
    if not _ext.extension_loaded():
        return {}
    has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    return {
        device: all(has(f"simplex_param::{op}", key) for op in OPS)
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
    }


if _ext.extension_loaded():
    fakes.register()
_KERNEL_DEVICES = _kernel_devices()


def mix(weights: Tensor, inputs) -> Tensor:
    r"""The K-to-M contraction: M weighted sums of the same K inputs, stacked.

    ``out[*p, m, *t] = sum_k weights[*p, m, k] * inputs[k][*p, *t]``

    Args:
        weights (Tensor): ``(M, K)``, one matrix for every element, or
            ``(*P, M, K)``, one matrix per row (a token, a sample), where
            ``P`` is a leading prefix of the inputs' shape ``(*P, *rest)``;
            any floating dtype and any real values.
        inputs (iterable of Tensor, or Tensor): K tensors of one shape, dtype
            and device, or one tensor stacked along dim 0.

    Returns:
        Tensor of shape ``(*P, M, *rest)`` (the M outputs stacked right after
        the rows' dimensions; ``(M, *rest)`` for ``(M, K)`` weights) and the
        inputs' dtype, accumulated in float32 (float64 for float64 inputs).
        For a shared matrix and outputs stacked per token, pass
        ``weights.expand(*P, M, K)``. With ``M = 1``, ``out[..., 0, :]`` is
        :func:`weighted_sum` of ``weights[..., 0, :]``.

    This is the post-mix of hyper-connections (``docs/hyper_connections.md``):
    ``n + 1`` inputs (the layer's output and the ``n`` streams) to ``n``
    streams per token. The compiled op is :func:`weighted_sum`'s kernel with
    M outputs: one pass over the inputs, each segment of an input read from
    memory once for all M outputs, and a C++ backward; the output keeps the
    inputs' memory layout, with M inserted after the rows.

    Example::

        >>> w = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # M = 2 outputs of K = 2 inputs
        >>> sp.mix(w, [torch.tensor([2.0, 4.0]), torch.tensor([0.0, 2.0])])
        tensor([[2., 4.],
                [1., 3.]])
    """
    inputs = as_list(inputs)
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a Tensor, got {type(weights).__name__}")
    if distributed.any_dtensor(weights, inputs):
        raise NotImplementedError("mix does not take DTensor arguments: its output has a dimension M that the "
                                  "inputs lack, which simplex_param.distributed does not place yet")
    return _run("mix", weights, inputs, (), lambda w, xs: checks.check_mix_args(w, xs, "weights"), reference.mix)
