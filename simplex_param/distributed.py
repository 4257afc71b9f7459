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
"""
import sys

from torch import Tensor

__all__ = ["any_dtensor", "run"]

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
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def name(i):
        return f"groups[{i // K}][{i % K}]" if grouped else f"inputs[{i}]"

    x0 = inputs[0]
    if not isinstance(x0, DTensor):
        i = next(i for i, x in enumerate(inputs) if isinstance(x, DTensor))
        raise TypeError(f"{name(i)} is a DTensor but {name(0)} is a torch.Tensor: "
                        f"the inputs must all be DTensors on one mesh, or all plain tensors")
    mesh, placements = x0.device_mesh, tuple(x0.placements)
    for i, x in enumerate(inputs):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name(i)} is a torch.Tensor but {name(0)} is a DTensor: "
                            f"the inputs must all be DTensors on one mesh, or all plain tensors")
        if x.device_mesh != mesh:
            raise ValueError(f"{name(i)} is on device mesh {x.device_mesh} but {name(0)} is on {mesh}")
        if tuple(x.placements) != placements:
            raise ValueError(f"{name(i)} has placements {_describe(x.placements)} but {name(0)} has "
                             f"{_describe(placements)}: the inputs of one call must share their placements")
        for p in x.placements:
            if not isinstance(p, (Shard, Replicate)):
                raise ValueError(f"{name(i)} has placement {p!r}: inputs must be Shard(d) or Replicate() "
                                 f"on every mesh dimension")
    return mesh, placements


def _local_weights(weights, wname: str, x0, mesh, placements, row_dims: int):
    """The weights as this rank's contraction needs them, a plain tensor
    whose gradient reaches ``weights`` reduced to its placements."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

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
            # Sharded along a summed dimension: the local dot products are a partial sum.
            grad_placements.append(Partial() if isinstance(p, Shard) else Replicate())
        if not ok:
            raise ValueError(
                f"{wname} has placement {q!r} on mesh dimension {i}, where the inputs have {p!r}: "
                f"weights must be Replicate(), or Shard(d) where the inputs are Shard(d) on a weight-row dimension")
    if not local.requires_grad and all(isinstance(p, Replicate) for p in target):
        return local  # nothing to cut, no gradient to reduce
    wd = DTensor.from_local(local, mesh, given, run_check=False, shape=weights.shape, stride=weights.stride())
    if tuple(target) != given:
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
    w = _local_weights(weights, wname, inputs[0], mesh, placements, row_dims)
    local = [x.to_local() for x in inputs]
    out = local_call(w, local)
    if grouped:
        return [_wrap(o, inputs[g * K], mesh, placements) for g, o in enumerate(out)]
    return _wrap(out, inputs[0], mesh, placements)
