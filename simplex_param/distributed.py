r"""DTensor arguments of the ops: each rank contracts its local shards.

The contraction is elementwise over the inputs, so every rank computes its
own shard of the output from its own shards of the inputs, and the input
gradients likewise, with no communication; only the weight gradient needs
one: its dot products ``<g, x_k>`` run over the whole tensor, so each rank's
local sums are a ``Partial`` that is all-reduced once per call (for a
grouped call, one all-reduce of the ``(G, K)`` values).

:func:`run` does this for every public op, on both paths (the compiled op
and the fallback run on the local tensors, exactly as in one process):

* the inputs (K tensors, or a grouped call's G·K) are DTensors on one mesh
  with the same placements, ``Shard(d)`` or ``Replicate()`` on each mesh
  dimension; their local tensors are taken with :meth:`DTensor.to_local`,
  so their gradients come back with their placements;
* the weights are a plain tensor (taken as replicated) or a DTensor on the
  same mesh, ``Replicate()``, or, for per-sample weights ``(*P, K)``,
  ``Shard(d)`` where the inputs are ``Shard(d)`` on a ``P`` dimension. A
  replicated row prefix is cut to the local rows (no communication);
  through :meth:`DTensor.to_local`'s ``grad_placements`` the local weight
  gradient is declared ``Partial`` on the mesh dimensions where the inputs
  are sharded along a summed dimension, and reduced to the weights'
  placements by :meth:`DTensor.from_local`'s backward;
* the output is a DTensor with the inputs' placements (and global shape).

No input is ever gathered. Errors name the argument that does not match.

The compiled ops also have DTensor sharding rules (:func:`register_sharding`,
through DTensor's ``register_op_strategy``, the hook behind
``torch.distributed.tensor.experimental.register_sharding``, which cannot
express a ``Tensor[]`` output nor the backward ops' ``(Tensor, Tensor[])``),
so that ``torch.ops.simplex_param.<op>`` called directly on DTensors runs in
DTensor's own dispatch, autograd included: the forward ops and the private
backward ops ``_weighted_sum_backward`` and ``_grouped_weighted_sum_backward``
that ``csrc/autograd.cpp`` calls. Each call gets one strategy, from the
placements its arguments have, with the same checks: the output and the
input gradients have the inputs' placements (an incoming gradient is
redistributed to them); the weight gradient is ``Partial()`` on a mesh
dimension where the inputs are sharded along a summed dimension, as DTensor
leaves the gradient of ``w`` in ``x * w``, and is reduced where it is used
(``full_tensor()``, ``redistribute``). A plain weight tensor is taken as
replicated only where DTensor allows it (``implicit_replication()``). The
rules are registered when ``torch.distributed.tensor`` is imported, not by
``import simplex_param``, which does not import it.
"""
import importlib.util
import sys

import torch
from torch import Tensor

from . import _ext, fakes

__all__ = ["any_dtensor", "register_sharding", "run"]

_DTENSOR_MODULE = "torch.distributed.tensor"


def any_dtensor(weights, inputs) -> bool:
    """Whether the weights or the first input is a DTensor. Nothing is
    imported: no DTensor exists before ``torch.distributed.tensor`` is (its
    import takes about a second, which a plain call must not pay). A later
    input that is a DTensor while the first is not is left to the op, which
    refuses the mix."""
    module = sys.modules.get(_DTENSOR_MODULE)
    if module is None:
        return False
    DTensor = module.DTensor
    return isinstance(weights, DTensor) or (bool(inputs) and isinstance(inputs[0], DTensor))


def _describe(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _input_spec(inputs, grouped: bool, K: int):
    """The mesh and placements every input shares, checked."""
    from torch.distributed.tensor import DTensor

    def name(i):
        return f"groups[{i // K}][{i % K}]" if grouped else f"inputs[{i}]"

    x0 = inputs[0]
    if not isinstance(x0, DTensor):
        i = next(i for i, x in enumerate(inputs) if isinstance(x, DTensor))
        raise TypeError(f"{name(i)} is a DTensor but {name(0)} is a torch.Tensor: "
                        f"the inputs must all be DTensors on one mesh, or all plain tensors")
    for i, x in enumerate(inputs):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name(i)} is a torch.Tensor but {name(0)} is a DTensor: "
                            f"the inputs must all be DTensors on one mesh, or all plain tensors")
    return _common_placements([(x.device_mesh, tuple(x.placements)) for x in inputs], name)


def _common_placements(layouts, name):
    """The (mesh, placements) that every one of `layouts` has, checked;
    `name(i)` names the argument of ``layouts[i]`` in an error."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = layouts[0]
    for i, (m, p) in enumerate(layouts):
        if m != mesh:
            raise ValueError(f"{name(i)} is on device mesh {m} but {name(0)} is on {mesh}")
        if tuple(p) != tuple(placements):
            raise ValueError(f"{name(i)} has placements {_describe(p)} but {name(0)} has "
                             f"{_describe(placements)}: the inputs of one call must share their placements")
        for q in p:
            if not isinstance(q, (Shard, Replicate)):
                raise ValueError(f"{name(i)} has placement {q!r}: inputs must be Shard(d) or Replicate() "
                                 f"on every mesh dimension")
    return mesh, tuple(placements)


def _weight_plan(wname: str, given, placements, row_dims: int):
    """For weights with placements `given` and inputs with `placements`:
    the weights' placements for the local contraction, and those of the
    local weight gradient. A replicated row prefix is cut to the inputs'
    rows; a dimension sharded along a summed dimension makes the local dot
    products a partial sum."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    target, grad_placements = [], []
    for i, (p, q) in enumerate(zip(placements, given)):
        if isinstance(p, Shard) and p.dim < row_dims:
            # Sharded along a weight-row dimension: the weights follow, shard for shard.
            want = Shard(p.dim)
            ok = isinstance(q, Replicate) or q == want
            target.append(want)
            grad_placements.append(want)
        else:
            ok = isinstance(q, Replicate)
            target.append(Replicate())
            grad_placements.append(Partial() if isinstance(p, Shard) else Replicate())
        if not ok:
            raise ValueError(
                f"{wname} has placement {q!r} on mesh dimension {i}, where the inputs have {p!r}: "
                f"weights must be Replicate(), or Shard(d) where the inputs are Shard(d) on a weight-row dimension")
    return tuple(target), tuple(grad_placements)


def _local_weights(weights, wname: str, mesh, placements, row_dims: int):
    """The weights as this rank's contraction needs them, a plain tensor
    whose gradient reaches ``weights`` reduced to its placements."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(weights, DTensor):
        if weights.device_mesh != mesh:
            raise ValueError(f"{wname} is on device mesh {weights.device_mesh} but the inputs are on {mesh}")
        given = tuple(weights.placements)
        # Its local tensor, re-wrapped below: the gradient goes back through
        # from_local's backward, which reduces it to these placements.
        local = weights.to_local()
    else:
        given = tuple(Replicate() for _ in placements)
        local = weights
    target, grad_placements = _weight_plan(wname, given, placements, row_dims)
    if not local.requires_grad and all(isinstance(p, Replicate) for p in target):
        return local  # nothing to cut, no gradient to reduce
    wd = DTensor.from_local(local, mesh, given, run_check=False, shape=weights.shape, stride=weights.stride())
    if target != given:
        wd = wd.redistribute(mesh, target)  # Replicate -> Shard: each rank keeps its rows, no communication
    return wd.to_local(grad_placements=grad_placements)


def _wrap(out: Tensor, like, mesh, placements):
    """A DTensor of the global shape of `like` from this rank's output."""
    from torch.distributed.tensor import DTensor

    stride = _contiguous_strides(like.shape) if out.is_contiguous() else like.stride()
    return DTensor.from_local(out, mesh, placements, run_check=False, shape=like.shape, stride=stride)


def _contiguous_strides(shape) -> tuple:
    strides, expected = [], 1
    for size in reversed(shape):
        strides.append(expected)
        expected *= max(size, 1)
    return tuple(reversed(strides))


def run(op: str, weights: Tensor, inputs, local_call):
    """Op `op` (a public op's name in ``torch.ops.simplex_param``) on
    DTensor arguments: ``local_call(local_weights, local_inputs)`` runs it on
    this rank's shards; returns the output as a DTensor (a list of them for
    the grouped ops)."""
    grouped = op.startswith("grouped")
    wname = "weights" if op in ("weighted_sum", "grouped_weighted_sum") else "logits"
    K = weights.shape[-1]
    mesh, placements = _input_spec(inputs, grouped, K)
    row_dims = 0 if grouped else weights.dim() - 1
    w = _local_weights(weights, wname, mesh, placements, row_dims)
    local = [x.to_local() for x in inputs]
    out = local_call(w, local)
    if grouped:
        return [_wrap(o, inputs[g * K], mesh, placements) for g, o in enumerate(out)]
    return _wrap(out, inputs[0], mesh, placements)


# The sharding rules of the compiled ops, for DTensor's own dispatch: a
# direct call torch.ops.simplex_param.<op>(w, [dtensors]), and the ops that
# the autograd of csrc/autograd.cpp calls below autograd (the contraction,
# then its private backward op). One strategy per call, the placements the
# arguments have: the inputs are never redistributed, only the weights (a
# replicated row prefix cut to the inputs' rows, no communication) and an
# incoming gradient (to the inputs' placements).

# op: (its weight or logits argument, the index of its first non-tensor argument)
_RULES = {
    "weighted_sum": ("weights", 2),
    "simplex_weighted_sum": ("logits", 2),
    "grouped_weighted_sum": ("weights", 2),
    "_weighted_sum_backward": ("weights", 3),
    "_grouped_weighted_sum_backward": ("weights", 3),
}
_FAKES = {
    "_weighted_sum_backward": fakes._fake_weighted_sum_backward,
    "_grouped_weighted_sum_backward": fakes._fake_grouped_weighted_sum_backward,
}
_registered = False


def register_sharding() -> bool:
    """Register the DTensor sharding strategies of the compiled ops, once;
    done when ``torch.distributed.tensor`` is imported (or at once, when it
    already is). Returns whether they are registered: not without the
    compiled extension, whose ops the fallback does not define."""
    global _registered
    if _registered:
        return True
    if _ext.LOADED_FROM is None:
        return False
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    propagator = DTensor._op_dispatcher.sharding_propagator
    for op, (_, static_argnum) in _RULES.items():
        propagator.register_op_strategy(getattr(torch.ops.simplex_param, op).default, _strategy,
                                        RuntimeSchemaInfo(static_argnum, needs_pytree=True))
    _registered = True
    return True


def _specs(arg):
    """The DTensorSpec of a Tensor argument in DTensor's strategy schema, a
    list of them for a Tensor[] argument."""
    from torch.distributed.tensor._op_schema import OpStrategy, TupleStrategy

    if isinstance(arg, OpStrategy):
        return arg.strategies[0].output_spec
    return [_specs(a) for a in (arg.children if isinstance(arg, TupleStrategy) else arg)]


def _strategy(op_schema):
    """The one OpStrategy of a call of an op of `_RULES`."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._op_schema import OpSpec, OpStrategy

    name = op_schema.op._schema.name.split("::")[1]
    wname = _RULES[name][0]
    backward = name.startswith("_")
    args = op_schema.args_schema
    grads = _specs(args[0]) if backward else []
    grads = grads if isinstance(grads, list) else [grads]
    first = 1 if backward else 0  # the index of the weights
    w, xs = _specs(args[first]), _specs(args[first + 1])
    if xs:
        mesh, placements = _common_placements([(x.mesh, x.placements) for x in xs], lambda i: f"inputs[{i}]")
    else:  # a backward without the inputs (the weights need no gradient): the gradient's placements
        mesh, placements = grads[0].mesh, tuple(grads[0].placements)
    if w.mesh != mesh:
        raise ValueError(f"{wname} is on device mesh {w.mesh} but the inputs are on {mesh}")
    row_dims = 0 if "grouped" in name else w.ndim - 1
    target, grad_w = _weight_plan(wname, w.placements, placements, row_dims)

    def spec(placements, meta=None):
        return DTensorSpec(mesh, tuple(placements), tensor_meta=meta)

    like_inputs = [spec(placements) for _ in xs]
    inputs = [spec(placements) for _ in grads] + [spec(target)] + like_inputs
    if not backward:
        out = like_inputs[0] if name != "grouped_weighted_sum" else tuple(
            spec(placements) for _ in range(w.shape[0]))
        return OpStrategy([OpSpec(out, inputs)])
    # (grad of the weights, [grads of the inputs]). The specs in the list
    # carry their global shapes here (DTensor fills only those of a Tensor
    # or a Tensor[] output), from the op's fake kernel on meta tensors.
    _, grad_x = _FAKES[name](*(_meta(a) for a in args[:3]), *args[3:])
    # The non-grouped op returns an empty tensor for an input that needs no gradient.
    real = args[4] if name == "_weighted_sum_backward" else [True] * len(grad_x)
    replicate = [Replicate()] * len(placements)
    grad_x = tuple(spec(placements if r else replicate, TensorMeta(t.shape, t.stride(), t.dtype))
                   for t, r in zip(grad_x, real))
    return OpStrategy([OpSpec((spec(grad_w if args[3] else replicate), grad_x), inputs)])


def _meta(arg):
    """A meta tensor of the global shape of a strategy schema's argument (a list for a Tensor[])."""
    spec = _specs(arg)
    if isinstance(spec, list):
        return [_meta(a) for a in arg.children] if spec else []
    m = spec.tensor_meta
    return torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device="meta")


class _RegisterOnImport:
    """A finder on ``sys.meta_path`` that lets ``torch.distributed.tensor``
    import as usual, then registers the sharding rules: DTensors exist only
    after that import, which takes about half a second that ``import
    simplex_param`` must not pay."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _DTENSOR_MODULE:
            return None
        sys.meta_path.remove(_RegisterOnImport)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_sharding()

        spec.loader.exec_module = exec_then_register
        return spec


if _ext.LOADED_FROM is not None and torch.distributed.is_available():
    if _DTENSOR_MODULE in sys.modules:
        register_sharding()
    else:
        sys.meta_path.insert(0, _RegisterOnImport)
