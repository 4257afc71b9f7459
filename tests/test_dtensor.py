"""DTensor arguments of every op, on a 2-rank CPU mesh (gloo): outputs,
input gradients and weight gradients equal the dense results, on the
compiled path and on the fallback, in one spawned run."""
import copy

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
                exact_weight_grad=False, weight_grad_placements=None, exact=True):
    """fn(weights, inputs) dense and distributed: the same output (bitwise),
    input gradients (bitwise, with the inputs' placements) and weight
    gradient (replicated; bitwise when `exact_weight_grad`, else within 1e-6).
    `weight_grad_placements` (default: the weights') lists the placements
    the weight gradient may have on each mesh dimension. Not `exact`: the
    output and the gradients within the dtype's tolerance, for the softmax
    of a DTensor reaching the op itself, which runs torch's kernel where the
    dense call runs the library's short-row loops (docs/numerics.md)."""
    def same(a, b, msg):
        if exact:
            assert torch.equal(a, b), msg
        else:
            torch.testing.assert_close(a, b, msg=msg)

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
        same(d.full_tensor(), o, f"{name}: output")
    torch.autograd.backward(dense_out, grads)
    torch.autograd.backward(dist_out, [distribute_tensor(g, mesh, placements) for g in grads])
    for k, (a, b) in enumerate(zip(dist_x, dense_x)):
        assert tuple(a.grad.placements) == tuple(placements), (name, k, a.grad.placements)
        same(a.grad.full_tensor(), b.grad, f"{name}: gradient of input {k}")
    wg = dist_w.grad
    if weight_grad_placements is None and weight_placements is not None:
        weight_grad_placements = [[p] for p in weight_placements]
    if isinstance(wg, DTensor):
        assert all(p in allowed for p, allowed in zip(wg.placements, weight_grad_placements)), (name, wg.placements)
    if all(isinstance(p, Replicate) for p in (wg.placements if isinstance(wg, DTensor) else ())):
        # Replicated: the same reduced value on every rank.
        local = wg.to_local() if isinstance(wg, DTensor) else wg
        gathered = [torch.empty_like(local) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, local.contiguous())
        assert all(torch.equal(gathered[0], t) for t in gathered), f"{name}: weight gradient not replicated"
    if exact_weight_grad and exact:
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


def _public_extras(mesh):
    """Through the public functions: DTensor inputs with a tensor
    temperature, a tensor alpha, and a SimplexFusion with a learned alpha."""
    from torch.distributed.tensor import Shard, distribute_tensor

    done = []
    torch.manual_seed(2)
    xs = [torch.randn(5, 6, dtype=torch.float64) for _ in range(3)]
    logits = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    for placements in ([Shard(0)], [Shard(1)]):
        for map, extra in (("sparsemax", {}), ("entmax_bisect", {"alpha": torch.tensor([1.3], dtype=torch.float64)})):
            dense_t, dist_t = (torch.tensor(0.7, dtype=torch.float64, requires_grad=True) for _ in range(2))
            dense_a, dist_a = ({k: v.clone().requires_grad_() for k, v in extra.items()} for _ in range(2))
            name = f"tensor temperature, {map} {placements}"
            dense_x = [x.clone().requires_grad_() for x in xs]
            dist_x = [distribute_tensor(x.clone(), mesh, placements).requires_grad_() for x in xs]
            dense_l, dist_l = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            out = sp.simplex_weighted_sum(dense_l, dense_x, map=map, temperature=dense_t, **dense_a)
            dout = sp.simplex_weighted_sum(dist_l, dist_x, map=map, temperature=dist_t, **dist_a)
            assert torch.equal(dout.full_tensor(), out), name
            g = torch.randn_like(out)
            out.backward(g)
            dout.backward(distribute_tensor(g, mesh, placements))
            for a, b in zip(dist_x, dense_x):
                assert torch.equal(a.grad.full_tensor(), b.grad), name
            for a, b in [(dist_l, dense_l), (dist_t, dense_t), *((dist_a[k], dense_a[k]) for k in dense_a)]:
                torch.testing.assert_close(_full(a.grad), b.grad, rtol=1e-6, atol=1e-12, msg=name)
            done.append(name)
        # A learned alpha: SimplexFusion(map="entmax_bisect", learn_alpha=True).
        name = f"SimplexFusion learn_alpha {placements}"
        dense_f = sp.SimplexFusion(3, map="entmax_bisect", learn_alpha=True, dtype=torch.float64)
        with torch.no_grad():
            dense_f.parametrizations.weight.original.copy_(logits)
        dist_f = copy.deepcopy(dense_f)
        out = dense_f(xs)
        dout = dist_f([distribute_tensor(x, mesh, placements) for x in xs])
        assert torch.equal(dout.full_tensor(), out), name
        out.sum().backward()
        dout.sum().backward()
        for (n, a), b in zip(dist_f.named_parameters(), dense_f.parameters()):
            assert a.grad is not None and b.grad is not None, (name, n)
            torch.testing.assert_close(_full(a.grad), b.grad, rtol=1e-6, atol=1e-12, msg=f"{name}: {n}")
        done.append(name)
    return done


def _direct_cases(mesh):
    """torch.ops.simplex_param.* called on DTensors: DTensor's own dispatch,
    through the sharding rules that simplex_param.distributed registers. The
    weight gradient is Partial(sum) where the inputs are sharded along a
    summed dimension (DTensor's convention, as for x * w), or Replicate where
    an op of the map's backward reduced it already; full_tensor() reduces it."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    ops = torch.ops.simplex_param
    done = []
    torch.manual_seed(3)
    for dtype in (torch.float64, torch.float32):
        K = 3
        xs = [torch.randn(5, 6, 4, dtype=dtype) for _ in range(K)]
        w = torch.randn(K, dtype=dtype)
        for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
            replicated = isinstance(placements[0], Replicate)
            grad_w = [[Replicate()] if replicated else [Partial(), Replicate()]]
            common = dict(weight_placements=[Replicate()], exact_weight_grad=replicated,
                          weight_grad_placements=grad_w)
            done.append(_check_case(f"direct weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, x: ops.weighted_sum(w_, x), w, xs, placements, **common))
            for map in ("softmax", "identity", "entmax_bisect", "sparsemax", "entmax15"):
                done.append(_check_case(f"direct simplex_weighted_sum {map} {dtype} {placements}", mesh,
                                        lambda w_, x, map=map: ops.simplex_weighted_sum(w_, x, map, 0.5),
                                        w, xs, placements, exact=map != "softmax", **common))
            done.append(_check_case(f"direct softmax_weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, x: ops.softmax_weighted_sum(w_, x, 2.0), w, xs, placements,
                                    exact=False, **common))
            with torch.inference_mode():  # the op whole, through its rule
                xd = [distribute_tensor(x, mesh, placements) for x in xs]
                for map in ("sparsemax", "entmax15"):
                    out = ops.simplex_weighted_sum(distribute_tensor(w, mesh, [Replicate()]), xd, map, 0.5)
                    assert tuple(out.placements) == tuple(placements)
                    assert torch.equal(out.full_tensor(), ops.simplex_weighted_sum(w, xs, map, 0.5)), map
                    done.append(f"direct simplex_weighted_sum {map} inference {dtype} {placements}")
            # A plain weight tensor, where DTensor allows it (implicit replication).
            name = f"direct weighted_sum, plain weights {dtype} {placements}"
            with implicit_replication():
                out = ops.weighted_sum(w, [distribute_tensor(x, mesh, placements) for x in xs])
            assert tuple(out.placements) == tuple(placements), name
            assert torch.equal(out.full_tensor(), ops.weighted_sum(w, xs)), name
            done.append(name)
        # Per-sample weights (5, 6, K): replicated (cut to the local rows), or sharded as the inputs.
        ws = torch.randn(5, 6, K, dtype=dtype)
        for placements in ([Shard(0)], [Shard(1)]):
            for wp in ([Replicate()], placements):
                done.append(_check_case(f"direct per-sample, weights {wp} {dtype} {placements}", mesh,
                                        lambda w_, x: ops.weighted_sum(w_, x), ws, xs, placements,
                                        weight_placements=wp, weight_grad_placements=[placements],
                                        exact_weight_grad=True))
        # Grouped: G = 3 groups of different shapes and dtypes.
        groups = [[torch.randn(4, 3, dtype=dtype) for _ in range(K)],
                  [torch.randn(7, dtype=dtype) for _ in range(K)],
                  [torch.randn(2, 5, dtype=torch.bfloat16 if dtype == torch.float32 else dtype) for _ in range(K)]]
        flat = [x for g in groups for x in g]
        wg = torch.randn(3, K, dtype=dtype)
        for placements in ([Shard(0)], [Replicate()]):
            replicated = isinstance(placements[0], Replicate)
            common = dict(weight_placements=[Replicate()], grouped_k=K, exact_weight_grad=replicated,
                          weight_grad_placements=[[Replicate()] if replicated else [Partial(), Replicate()]])
            done.append(_check_case(f"direct grouped_weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, x: ops.grouped_weighted_sum(w_, x), wg, flat, placements, **common))
            done.append(_check_case(f"direct grouped_simplex_weighted_sum {dtype} {placements}", mesh,
                                    lambda w_, x: ops.grouped_simplex_weighted_sum(w_, x, "softmax", 0.7),
                                    wg, flat, placements, exact=False, **common))

    # Errors name the argument.
    wd = distribute_tensor(torch.ones(2), mesh, [Replicate()])
    x0 = distribute_tensor(torch.randn(4, 2), mesh, [Shard(0)])
    done.append(_expect_error("direct placements", RuntimeError, "inputs[1] has placements (Shard(dim=1))",
                              lambda: ops.weighted_sum(wd, [x0, distribute_tensor(torch.randn(4, 2), mesh,
                                                                                    [Shard(1)])])))
    bad_w = distribute_tensor(torch.ones(4, 2, 2), mesh, [Shard(0)])
    x1 = [distribute_tensor(torch.randn(4, 2), mesh, [Shard(1)])] * 2
    done.append(_expect_error("direct weights placement", RuntimeError,
                              "weights has placement Shard(dim=0) on mesh dimension 0, where the inputs have Shard(dim=1)",
                              lambda: ops.weighted_sum(bad_w, x1)))
    with torch.inference_mode():  # with autograd, the contraction of the mapped logits checks them: "weights"
        done.append(_expect_error("direct logits placement", RuntimeError,
                                  "logits has placement Shard(dim=0) on mesh dimension 0",
                                  lambda: ops.simplex_weighted_sum(bad_w, x1)))
    return done


def dtensor_ops(rank, world_size):
    """One rank: every case on the compiled path (when the extension is
    loaded) and on the fallback."""
    from torch.distributed.device_mesh import init_device_mesh

    from simplex_param import ops

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    if sp.extension_loaded():
        results["compiled"] = _cases(rank, mesh) + _public_extras(mesh)
        results["direct"] = _direct_cases(mesh)
    kernels = ops._KERNEL_DEVICES
    ops._KERNEL_DEVICES = {}  # the fallback, as without the extension
    try:
        results["fallback"] = _cases(rank, mesh) + _public_extras(mesh)
    finally:
        ops._KERNEL_DEVICES = kernels
    return results


def test_dtensor_ops_two_ranks():
    results = multiprocess.run(dtensor_ops, world_size=WORLD)
    counts = {"compiled": 72, "direct": 79, "fallback": 72} if sp.extension_loaded() else {"fallback": 72}
    for r in results:
        assert sorted(r) == sorted(counts)
        for path, count in counts.items():
            assert len(r[path]) == count and r[path] == results[0][path], (path, len(r[path]))
