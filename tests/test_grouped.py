"""The grouped ops against a loop of single calls: values, gradients (frozen
and trainable members), layouts, zero sizes, opcheck, torch.compile, errors
naming groups[g][k], and hypothesis properties over G, K and shapes."""
import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp
from simplex_param import checks

from conftest import COMPILED, DEVICES, DTYPES, assert_close


def make_groups(G, K, device="cpu", seed=0, requires_grad=lambda g, k: True, dtypes=DTYPES):
    """G groups of K members, with shapes from 1 to ~3000 elements, a zero-size
    group, dtypes cycling through `dtypes`, some members non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(G):
        dtype = dtypes[g % len(dtypes)]
        shape = [(0, 3), (5,), (17, 3), (3000,), (2, 3, 4)][g % 5]
        group = []
        for k in range(K):
            if g % 3 == 2 and len(shape) == 2:  # a transposed member
                x = torch.randn(shape[::-1], generator=gen).t()
            else:
                x = torch.randn(shape, generator=gen)
            group.append(x.to(device=device, dtype=dtype).requires_grad_(requires_grad(g, k)))
        groups.append(group)
    return groups


def loop(logits, groups, map="softmax", temperature=1.0):
    return [sp.simplex_weighted_sum(logits[g], group, map=map, temperature=temperature)
            for g, group in enumerate(groups)]


def grads(outputs, tensors, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen).to(o) for o in outputs]
    want = [t for t in tensors if t.requires_grad]
    got = torch.autograd.grad(outputs, want, cot, allow_unused=True)
    return dict(zip(map(id, want), got))


def assert_same_grads(out, ref, weights, groups):
    """The gradients of the weights and of the members that require grad,
    through `out` and through `ref`, are bitwise equal."""
    members = [x for group in groups for x in group]
    got, want = grads(out, [weights, *members]), grads(ref, [weights, *members])
    assert torch.equal(got[id(weights)], want[id(weights)])
    for x in members:
        if x.requires_grad:
            assert torch.equal(got[id(x)], want[id(x)])


@pytest.mark.parametrize("G", [1, 7, 50])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_a_loop_of_single_calls(G, device):
    K = 4
    # Even members frozen, odd ones trainable; no float64 group, so that the
    # map runs in float32 as it does for each single call: the same bits.
    groups = make_groups(G, K, device, requires_grad=lambda g, k: k % 2 == 1,
                         dtypes=[torch.float32, torch.bfloat16, torch.float16])
    logits = torch.randn(G, K, device=device, requires_grad=True)
    out = sp.grouped_softmax_weighted_sum(logits, groups)
    ref = loop(logits, groups)
    assert len(out) == G
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert torch.equal(o, r)
    assert_same_grads(out, ref, logits, groups)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_groups_take_the_map_in_float64(device):
    groups = make_groups(6, 3, device, dtypes=DTYPES)
    logits = torch.randn(6, 3, device=device, dtype=torch.float64, requires_grad=True)
    for o, r in zip(sp.grouped_softmax_weighted_sum(logits, groups, temperature=0.7),
                    loop(logits, groups, temperature=0.7)):
        assert_close(o, r)
    w = torch.softmax(logits.detach() / 0.7, -1)
    for g, group in enumerate(groups):
        expected = sum(w[g, k] * x.detach().double() for k, x in enumerate(group))
        assert_close(sp.grouped_softmax_weighted_sum(logits, groups, temperature=0.7)[g], expected.to(group[0].dtype))


@pytest.mark.parametrize("map", list(sp.maps.MAPS))
def test_every_map(map):
    groups = make_groups(5, 3, dtypes=[torch.float32])
    logits = torch.randn(5, 3, requires_grad=True)
    out = sp.grouped_simplex_weighted_sum(logits, groups, map=map, temperature=0.5)
    for o, r in zip(out, loop(logits, groups, map, 0.5)):
        assert_close(o, r)
    members = [x for group in groups for x in group]
    got, want = grads(out, [logits]), grads(loop(logits, groups, map, 0.5), [logits])
    assert_close(got[id(logits)], want[id(logits)])
    assert members[0].grad is None


def test_frozen_members_get_no_gradient_and_keep_their_bits():
    groups = make_groups(4, 3, requires_grad=lambda g, k: False, dtypes=[torch.float32])
    before = [x.clone() for group in groups for x in group]
    logits = torch.zeros(4, 3, requires_grad=True)
    sum(o.sum() for o in sp.grouped_softmax_weighted_sum(logits, groups)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for x, b in zip((x for group in groups for x in group), before):
        assert x.grad is None and torch.equal(x, b)


@pytest.mark.skipif(not COMPILED, reason="the backward op is compiled only")
def test_backward_op_writes_only_the_wanted_gradients():
    flat = [torch.randn(n) for n in (4, 4, 3, 3, 5, 5)]
    groups = [flat[0:2], flat[2:4], flat[4:6]]
    w = torch.rand(3, 2)
    gs = [torch.randn_like(group[0]) for group in groups]
    need = [False, True, False, False, True, False]
    grad_w, grad_x = torch.ops.simplex_param._grouped_weighted_sum_backward(gs, w, flat, True, need)
    assert grad_w.shape == (3, 2)
    assert len(grad_x) == 2  # one per wanted gradient: groups[0][1], groups[2][0]
    assert torch.equal(grad_x[0], w[0, 1] * gs[0])
    for g in range(3):
        for k in range(2):
            assert_close(grad_w[g, k], (gs[g] * flat[g * 2 + k]).sum())
    # Without the weights' gradient, no inputs are needed.
    grad_w, grad_x = torch.ops.simplex_param._grouped_weighted_sum_backward(gs, w, [], False, need)
    assert grad_w.numel() == 0 and torch.equal(grad_x[1], w[2, 0] * gs[2])


def test_unused_outputs_and_zero_size_groups():
    groups = [[torch.zeros(0, 4, requires_grad=True)] * 2, [torch.randn(3, requires_grad=True) for _ in range(2)]]
    logits = torch.zeros(2, 2, requires_grad=True)
    out = sp.grouped_softmax_weighted_sum(logits, groups)
    assert out[0].shape == (0, 4)
    out[1].sum().backward()  # out[0] unused
    assert torch.equal(logits.grad[0], torch.zeros(2))
    assert_close(logits.grad[1], 0.25 * (groups[1][0] - groups[1][1]).detach().sum() * torch.tensor([1.0, -1.0]))


def test_inputs_as_tensors_and_generators():
    a, b = torch.randn(3, 5), torch.randn(3, 2)
    w = torch.rand(2, 3)
    out = sp.grouped_weighted_sum(w, (a, (x for x in b)))
    assert_close(out[0], (w[0, :, None] * a).sum(0))
    assert_close(out[1], (w[1, :, None] * b).sum(0))
    assert sp.grouped_weighted_sum(torch.ones(0, 2), []) == []


def test_deterministic_across_threads():
    groups = make_groups(20, 5, dtypes=[torch.float32, torch.bfloat16])
    logits = torch.randn(20, 5, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        out = sp.grouped_softmax_weighted_sum(logits, groups)
        results.append((out, grads(out, [logits])[id(logits)]))
    torch.set_num_threads(threads)
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[1][1])


CUDA = "cuda" in DEVICES


@pytest.mark.skipif(not (CUDA and COMPILED), reason="the one-launch CUDA kernels need a GPU and the extension")
@pytest.mark.parametrize("K", [3, 17, 33])
def test_cuda_one_launch_per_dtype_gives_the_bits_of_single_calls(K):
    # Groups of every size class (under one tile, several tiles, a ragged
    # tail), four dtypes, members offset by one element (no vector loads),
    # a row of zero weights and single zero weights; K = 17 and 33 cross the
    # kernels' chunks of 16 and 32 inputs.
    gen = torch.Generator().manual_seed(K)
    sizes = [1, 5, 8193, 70001, 3, 40000]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32, torch.bfloat16]
    groups = []
    for g, (n, dtype) in enumerate(zip(sizes, dtypes)):
        offset = 1 if g == 4 else 0
        groups.append([torch.randn(n + offset, generator=gen)[offset:].to("cuda", dtype).requires_grad_(k % 3 != 0)
                       for k in range(K)])
    w = torch.rand(len(sizes), K, generator=gen, dtype=torch.float64)
    w[1] = 0
    w[2, ::4] = 0
    w = w.cuda().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = sp.grouped_weighted_sum(w, groups)
        torch.cuda.synchronize()
    launches = [e.name for e in prof.events() if "grouped_forward_kernel" in e.name]
    assert len(launches) == len(set(dtypes))  # one launch per dtype, not per group
    ref = [sp.weighted_sum(w[g].to(torch.float64 if d == torch.float64 else torch.float32), group)
           for g, (d, group) in enumerate(zip(dtypes, groups))]
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    assert_same_grads(out, ref, w, groups)


def test_gradcheck_and_gradgradcheck():
    G, K = 3, 2
    shapes = [(2,), (3, 2), (1,)]
    flat = [torch.randn(shapes[g], dtype=torch.float64, requires_grad=(g + k) % 2 == 0)
            for g in range(G) for k in range(K)]
    logits = torch.randn(G, K, dtype=torch.float64, requires_grad=True)

    def f(logits, *flat):
        return tuple(sp.grouped_softmax_weighted_sum(logits, [flat[g * K:(g + 1) * K] for g in range(G)],
                                                     temperature=0.8))

    assert gradcheck(f, (logits, *flat))
    assert gradgradcheck(f, (logits, *flat))
    plain = lambda w, *flat: tuple(sp.grouped_weighted_sum(w, [flat[g * K:(g + 1) * K] for g in range(G)]))
    assert gradcheck(plain, (logits, *flat))
    assert gradgradcheck(plain, (logits, *flat))


@pytest.mark.skipif(not COMPILED, reason="opcheck and the C++ node apply to the compiled ops")
def test_opcheck_and_the_cpp_node():
    from torch.library import opcheck

    flat = [torch.randn(s, dtype=torch.float64) for s in [(2,), (2,), (3, 2), (3, 2)]]
    w = torch.rand(2, 2, dtype=torch.float64)
    for requires_grad in (False, True):
        w.requires_grad_(requires_grad)
        flat[1].requires_grad_(requires_grad)
        opcheck(torch.ops.simplex_param.grouped_weighted_sum.default, (w, flat))
        opcheck(torch.ops.simplex_param.grouped_simplex_weighted_sum.default, (w, flat, "sparsemax", 0.5))
    gs = [torch.randn(2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    detached = [x.detach() for x in flat]
    opcheck(torch.ops.simplex_param._grouped_weighted_sum_backward.default,
            (gs, w.detach(), detached, True, [True, False, False, True]))
    opcheck(torch.ops.simplex_param._grouped_weighted_sum_backward.default,
            (gs, w.detach(), [], False, [True, False, False, True]))
    out = sp.grouped_weighted_sum(w, [flat[:2], flat[2:]])
    assert "GroupedWeightedSum" in out[0].grad_fn.name()


def test_compile_fullgraph():
    groups = make_groups(4, 3, dtypes=[torch.float32])
    logits = torch.randn(4, 3, requires_grad=True)
    compiled = torch.compile(lambda l, gs: sp.grouped_softmax_weighted_sum(l, gs, temperature=0.5), fullgraph=True)
    out = compiled(logits, groups)
    ref = sp.grouped_softmax_weighted_sum(logits, groups, temperature=0.5)
    for o, r in zip(out, ref):
        assert_close(o, r)
    assert_close(grads(out, [logits])[id(logits)], grads(ref, [logits])[id(logits)])


def test_tensor_temperature_gets_a_gradient():
    groups = make_groups(3, 2, dtypes=[torch.float64])
    logits = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = sp.grouped_softmax_weighted_sum(logits, groups, temperature=t)
    for o, r in zip(out, loop(logits, groups, temperature=0.5)):
        assert_close(o, r)
    sum(o.sum() for o in out).backward()
    assert t.grad is not None and torch.isfinite(t.grad)


ERRORS = [
    # (weights, groups, exception, message)
    (torch.ones(2, 2), [[torch.ones(3), torch.ones(3)], [torch.ones(3), torch.ones(4)]], ValueError,
     "groups[1][1] has shape [4] but groups[1][0] has shape [3]"),
    (torch.ones(2, 2), [[torch.ones(3), torch.ones(3)], [torch.ones(3, dtype=torch.float64), torch.ones(3)]],
     TypeError, "groups[1][1] has dtype torch.float32 but groups[1][0] has dtype torch.float64"),
    (torch.ones(2, 2), [[torch.ones(3), torch.ones(3)], [torch.ones(3)]], ValueError,
     "weights has 2 entries in its last dimension but groups[1] has 1 tensors"),
    (torch.ones(2), [[torch.ones(3), torch.ones(3)]], ValueError,
     "weights must have shape (G, K), one row of K weights per group, got shape [2]"),
    (torch.ones(3, 2), [[torch.ones(3), torch.ones(3)]], ValueError,
     "weights has shape [3, 2], one row per group, but groups has 1 groups"),
    (torch.ones(1, 2, dtype=torch.long), [[torch.ones(3), torch.ones(3)]], TypeError,
     "weights must have a floating dtype, got torch.int64"),
    (torch.ones(1, 2), [[torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)]], TypeError,
     "groups[0][0] must have a floating dtype (float16, bfloat16, float32 or float64), got torch.int64"),
    (torch.ones(1, 2), [[torch.ones(3), "x"]], TypeError, "groups[0][1] must be a Tensor, got str"),
    (torch.ones(1, 2), torch.ones(1, 2, 3), TypeError, "groups must be a sequence of groups of tensors, got Tensor"),
    (torch.ones(1, 2), [3], TypeError, "groups[0] must be a sequence of tensors, or one tensor, got int"),
    ([[1.0]], [[torch.ones(3)]], TypeError, "weights must be a Tensor, got list"),
]


@pytest.mark.parametrize("weights,groups,kind,message", ERRORS)
def test_errors_name_the_group_and_the_index(weights, groups, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        sp.grouped_weighted_sum(weights, groups)


@pytest.mark.parametrize("backend", ["fallback", "op"])
def test_flat_errors_of_the_op_and_the_fallback(backend):
    if backend == "op" and not COMPILED:
        pytest.skip("the compiled op")
    check = (lambda w, flat: torch.ops.simplex_param.grouped_weighted_sum(w, flat)) if backend == "op" \
        else (lambda w, flat: checks.check_grouped_args(w, flat, "weights"))
    with pytest.raises(ValueError, match=re.escape(
            "inputs has 3 tensors but weights has shape [2, 2], so G * K = 4 were expected")):
        check(torch.ones(2, 2), [torch.ones(1)] * 3)
    with pytest.raises(ValueError, match=re.escape("groups[1][1] is on device meta but groups[1][0] is on device cpu")):
        check(torch.ones(2, 2), [torch.ones(1)] * 3 + [torch.ones(1, device="meta")])
    bwd = (lambda *a: torch.ops.simplex_param._grouped_weighted_sum_backward(*a)) if backend == "op" \
        else checks.check_grouped_backward_args
    with pytest.raises(ValueError, match=re.escape("grads has 1 tensors but weights has 2 rows, one per group")):
        bwd([torch.ones(1)], torch.ones(2, 2), [], False, [False] * 4)
    with pytest.raises(ValueError, match=re.escape(
            "inputs_requires_grad has 3 entries but weights has shape [2, 2], so G * K = 4 were expected")):
        bwd([torch.ones(1)] * 2, torch.ones(2, 2), [], False, [False] * 3)
    with pytest.raises(ValueError, match=re.escape("grads[1] has shape [2] but groups[1][0] has shape [1]")):
        bwd([torch.ones(1), torch.ones(2)], torch.ones(2, 2), [torch.ones(1)] * 4, True, [False] * 4)
    with pytest.raises(TypeError, match=re.escape("grads[0] must have a floating dtype")):
        bwd([torch.ones(1, dtype=torch.long)] * 2, torch.ones(2, 2), [], False, [False] * 4)


hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (requirements-dev.txt)")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    K=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_grouped_equals_the_loop(sizes, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = [[torch.randn(n, generator=gen).to(dtype) for _ in range(K)] for n in sizes]
    w = torch.randn(len(sizes), K, generator=gen)
    out = sp.grouped_weighted_sum(w, groups)
    for g, group in enumerate(groups):
        assert torch.equal(out[g], sp.weighted_sum(w[g], group))


def test_tensor_temperature_divides_in_the_maps_dtype():
    """A 0-D tensor temperature gives the bits of the same float temperature,
    bfloat16 logits and a float64 group included."""
    groups = [[torch.randn(5, dtype=torch.float64) for _ in range(3)], [torch.randn(4) for _ in range(3)]]
    logits = torch.randn(2, 3).to(torch.bfloat16)
    as_float = sp.grouped_softmax_weighted_sum(logits, groups, temperature=0.3)
    as_tensor = sp.grouped_softmax_weighted_sum(logits, groups, temperature=torch.tensor(0.3, dtype=torch.float64))
    for a, b in zip(as_float, as_tensor):
        assert_close(b, a)
