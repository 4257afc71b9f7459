"""DTensor arguments of every op, on a 2-rank CPU mesh (gloo): outputs,
input gradients and weight gradients equal the dense results, on the
compiled path and on the fallback, in one spawned run."""
import pytest
import torch

import multiprocess
import simplex_param as sp

pytestmark = [
    pytest.mark.skipif(not multiprocess.available(), reason="torch.distributed with gloo is not available"),
    pytest.mark.multiprocess,
]

WORLD = 2


def _dense_and_dist(mesh, weights, inputs, placements, weight_placements=None):
    """Leaf copies of the arguments: dense, and distributed (inputs as
    DTensors with `placements`; weights plain, or a DTensor with
    `weight_placements`)."""
    from torch.distributed.tensor import distribute_tensor

    dense_w = weights.clone().requires_grad_()
    dense_x = [x.clone().requires_grad_() for x in inputs]
    if weight_placements is None:
        dist_w = weights.clone().requires_grad_()
    else:
        dist_w = distribute_tensor(weights.clone(), mesh, weight_placements).requires_grad_()
    dist_x = [distribute_tensor(x.clone(), mesh, placements).requires_grad_() for x in inputs]
    return dense_w, dense_x, dist_w, dist_x


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_case(name, mesh, fn, weights, inputs, placements, weight_placements=None, grouped_k=None,
                exact_weight_grad=False):
    """fn(weights, inputs) dense and distributed: the same output (bitwise),
    input gradients (bitwise, with the inputs' placements) and weight
    gradient (replicated; bitwise when `exact_weight_grad`, else within 1e-6)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    dense_w, dense_x, dist_w, dist_x = _dense_and_dist(mesh, weights, inputs, placements, weight_placements)
    dense_out = fn(dense_w, dense_x)
    dist_out = fn(dist_w, dist_x)
    if grouped_k is None:
        dense_out, dist_out = [dense_out], [dist_out]
    torch.manual_seed(1)
    grads = [torch.randn_like(o) for o in dense_out]
    for o, d, g in zip(dense_out, dist_out, grads):
        assert isinstance(d, DTensor), name
        assert tuple(d.placements) == tuple(placements), (name, d.placements)
        assert d.shape == o.shape and d.dtype == o.dtype, name
        assert torch.equal(d.full_tensor(), o), f"{name}: output"
    torch.autograd.backward(dense_out, grads)
    torch.autograd.backward(dist_out, [distribute_tensor(g, mesh, placements) for g in grads])
    for k, (a, b) in enumerate(zip(dist_x, dense_x)):
        assert tuple(a.grad.placements) == tuple(placements), (name, k, a.grad.placements)
        assert torch.equal(a.grad.full_tensor(), b.grad), f"{name}: gradient of input {k}"
    wg = dist_w.grad
    if isinstance(wg, DTensor):
        assert tuple(wg.placements) == tuple(weight_placements), (name, wg.placements)
    if weight_placements is None or all(isinstance(p, Replicate) for p in weight_placements):
        # Replicated: the same reduced value on every rank.
        local = wg.to_local() if isinstance(wg, DTensor) else wg
        gathered = [torch.empty_like(local) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, local.contiguous())
        assert all(torch.equal(gathered[0], t) for t in gathered), f"{name}: weight gradient not replicated"
    if exact_weight_grad:
        assert torch.equal(_full(wg), dense_w.grad), f"{name}: weight gradient"
    else:
        torch.testing.assert_close(_full(wg), dense_w.grad, rtol=1e-6, atol=1e-6, msg=f"{name}: weight gradient")
    return name


def _expect_error(name, kind, text, fn):
    try:
        fn()
    except kind as e:
        assert text in str(e), (name, str(e))
        return name
    raise AssertionError(f"{name}: expected {kind.__name__} with {text!r}")


def _cases(rank, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    done = []
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        K = 3
        xs = [torch.randn(5, 6, 4, dtype=dtype) for _ in range(K)]  # 5 rows: an uneven Shard(0)
        w = torch.randn(K, dtype=dtype)
        for placements in ([Shard(0)], [Shard(1)], [Shard(2)], [Replicate()]):
            replicated = isinstance(placements[0], Replicate)
            done.append(_check_case(f"weighted_sum {dtype} {placements}", mesh, sp.weighted_sum, w, xs,
                                    placements, exact_weight_grad=replicated))
            done.append(_check_case(f"weighted_sum Replicate weights {dtype} {placements}", mesh, sp.weighted_sum,
                                    w, xs, placements, weight_placements=[Replicate()],
                                    exact_weight_grad=replicated))
            for map in ("softmax", "sparsemax"):
                done.append(_check_case(
                    f"simplex_weighted_sum {map} {dtype} {placements}", mesh,
                    lambda l, x, map=map: sp.simplex_weighted_sum(l, x, map=map, temperature=0.5),
                    torch.tensor([0.3, -0.2, 0.1], dtype=dtype), xs, placements, exact_weight_grad=replicated))
            done.append(_check_case(f"softmax_weighted_sum {dtype} {placements}", mesh,
                                    lambda l, x: sp.softmax_weighted_sum(l, x, temperature=2.0),
                                    w, xs, placements, weight_placements=[Replicate()],
                                    exact_weight_grad=replicated))
        # Per-sample weights (5, 6, K): a row per (sample, position).
        ws = torch.randn(5, 6, K, dtype=dtype)
        for placements in ([Shard(0)], [Shard(1)]):
            done.append(_check_case(f"per-sample, plain weights {dtype} {placements}", mesh, sp.weighted_sum,
                                    ws, xs, placements, exact_weight_grad=True))
            done.append(_check_case(f"per-sample, weights {placements} {dtype}", mesh, sp.weighted_sum,
                                    ws, xs, placements, weight_placements=placements, exact_weight_grad=True))
        # Per-sample weights (5, K), inputs sharded along a summed dim.
        done.append(_check_case(f"per-sample (5, K), inputs Shard(2) {dtype}", mesh,
                                lambda l, x: sp.softmax_weighted_sum(l, x), ws[:, 0], xs, [Shard(2)]))
        # Grouped: G = 3 groups of different shapes and dtypes, one call.
        groups = [[torch.randn(4, 3, dtype=dtype) for _ in range(K)],
                  [torch.randn(7, dtype=dtype) for _ in range(K)],
                  [torch.randn(2, 5, dtype=torch.bfloat16 if dtype == torch.float32 else dtype) for _ in range(K)]]
        flat = [x for g in groups for x in g]
        wg = torch.randn(3, K, dtype=dtype)

        def regroup(xs):
            return [xs[g * K:(g + 1) * K] for g in range(3)]

        for placements in ([Shard(0)], [Replicate()]):
            replicated = isinstance(placements[0], Replicate)
            done.append(_check_case(f"grouped_weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, xs_: sp.grouped_weighted_sum(w_, regroup(xs_)),
                                    wg, flat, placements, grouped_k=K, exact_weight_grad=replicated))
            done.append(_check_case(f"grouped_softmax_weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, xs_: sp.grouped_softmax_weighted_sum(w_, regroup(xs_), temperature=0.7),
                                    wg, flat, placements, weight_placements=[Replicate()], grouped_k=K,
                                    exact_weight_grad=replicated))
            done.append(_check_case(f"grouped_simplex_weighted_sum entmax15 {dtype} {placements}", mesh,
                                    lambda w_, xs_: sp.grouped_simplex_weighted_sum(w_, regroup(xs_), map="entmax15"),
                                    wg, flat, placements, grouped_k=K, exact_weight_grad=replicated))

    # Errors name the argument.
    xs = [distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)]) for _ in range(2)]
    w = torch.ones(2)
    done.append(_expect_error("mixed", TypeError, "inputs[1] is a torch.Tensor but inputs[0] is a DTensor",
                              lambda: sp.weighted_sum(w, [xs[0], torch.randn(4, 2)])))
    done.append(_expect_error("placements", ValueError, "inputs[1] has placements (Shard(dim=1))",
                              lambda: sp.weighted_sum(w, [xs[0], distribute_tensor(torch.randn(4, 2), mesh,
                                                                                   [Shard(1)])])))
    done.append(_expect_error("grouped placements", ValueError, "groups[1][0] has placements (Replicate())",
                              lambda: sp.grouped_weighted_sum(torch.ones(2, 2), [xs, [
                                  distribute_tensor(torch.randn(3), mesh, [Replicate()])] * 2])))
    done.append(_expect_error("weights placement", ValueError, "logits has placement Shard(dim=0) on mesh dimension 0",
                              lambda: sp.softmax_weighted_sum(
                                  distribute_tensor(torch.ones(4, 2, 2), mesh, [Shard(0)]),
                                  [distribute_tensor(torch.randn(4, 2), mesh, [Shard(1)])] * 2)))
    return done


def dtensor_ops(rank, world_size):
    """One rank: every case on the compiled path (when the extension is
    loaded) and on the fallback."""
    from torch.distributed.device_mesh import init_device_mesh

    from simplex_param import ops

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    if sp.extension_loaded():
        results["compiled"] = _cases(rank, mesh)
    kernels = ops._KERNEL_DEVICES
    ops._KERNEL_DEVICES = {}  # the fallback, as without the extension
    try:
        results["fallback"] = _cases(rank, mesh)
    finally:
        ops._KERNEL_DEVICES = kernels
    return results


def test_dtensor_ops_two_ranks():
    results = multiprocess.run(dtensor_ops, world_size=WORLD)
    paths = ["compiled", "fallback"] if sp.extension_loaded() else ["fallback"]
    for r in results:
        assert sorted(r) == sorted(paths)
        for path in paths:
            assert len(r[path]) == 66 and r[path] == results[0][path], path
