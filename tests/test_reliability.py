"""Reliability: memory stays flat, threads, the GIL, hostile inputs and
autograd edge cases (retain_graph, torch.func, forward AD, no_grad)."""
import gc
import math
import os
import sys
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import simplex_param as sp
from simplex_param import reference

from conftest import COMPILED, assert_close

# Both implementations in one run: the public op (compiled when the extension
# is loaded) and the reference the fallback runs.
IMPLS = {"public": sp.softmax_weighted_sum, "reference": reference.softmax_weighted_sum}


def _call(impl, logits, xs, temperature=1.0):
    if impl == "public":
        return sp.softmax_weighted_sum(logits, xs, temperature=temperature)
    return reference.softmax_weighted_sum(logits, xs, temperature)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------
# Leaks
# --------------------------------------------------------------------------

LEAK_BOUND = 4 * 2**20  # bytes of resident growth allowed after warm-up


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("impl", IMPLS)
def test_memory_stays_flat(impl):
    # Each iteration makes tensors of 4 KiB: leaking any one of them per
    # iteration would grow by 16 MiB over 4000 iterations, 4x the bound.
    torch.manual_seed(0)
    logits = torch.randn(4, requires_grad=True)
    xs = [torch.randn(1024, requires_grad=True) for _ in range(4)]

    def step():
        out = _call(impl, logits, xs, 0.5)
        out.sum().backward()
        logits.grad = None
        for x in xs:
            x.grad = None

    for _ in range(300):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(4000):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < LEAK_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"


# --------------------------------------------------------------------------
# Threads and the GIL
# --------------------------------------------------------------------------

def test_concurrent_calls_are_correct():
    torch.manual_seed(1)
    jobs = []
    for t in range(4):
        logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
        xs = [torch.randn(300, 7, dtype=torch.float64, requires_grad=True) for _ in range(5)]
        want = reference.softmax_weighted_sum(logits, xs, 0.5 + t)
        jobs.append((logits, xs, 0.5 + t, want, torch.autograd.grad(want.sum(), [logits, *xs])))
    errors = []

    def work(logits, xs, T, want, want_grads):
        try:
            for _ in range(30):
                out = sp.softmax_weighted_sum(logits, xs, temperature=T)
                grads = torch.autograd.grad(out.sum(), [logits, *xs])
                assert_close(out, want)
                for a, b in zip(grads, want_grads):
                    assert_close(a, b)
        except Exception as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _main_thread_ran_during(fn):
    """Whether the main thread got to run while another thread ran `fn`.

    With a switch interval of minutes, a thread holding the GIL keeps it until
    it blocks or releases it. `Thread.start` returns to the main thread only
    once it gets the GIL back: before `fn` ended exactly when `fn` released it.
    """
    done = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(600.0)
    try:
        t = threading.Thread(target=lambda: done.append(fn()))
        t.start()
        ran_during = not done
    finally:
        sys.setswitchinterval(interval)
    t.join()
    assert done
    return ran_during


def test_gil_released_inside_the_op():
    logits = torch.randn(8)
    xs = [torch.randn(1 << 20) for _ in range(8)]
    sp.softmax_weighted_sum(logits, xs)  # warm-up: no first-call work in the probe

    def busy_python():
        total = 0
        for i in range(300_000):
            total += i
        return total

    # Control: pure Python holds the GIL throughout, and the probe says so.
    assert not _main_thread_ran_during(busy_python)
    assert _main_thread_ran_during(lambda: sp.softmax_weighted_sum(logits, xs))


# --------------------------------------------------------------------------
# Hostile inputs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad,i,kind", [
    ([torch.ones(2), 3.0], 1, "float"),
    ([None, torch.ones(2)], 0, "NoneType"),
    ([torch.ones(2), [1.0, 2.0]], 1, "list"),
])
def test_non_tensor_in_inputs(bad, i, kind):
    with pytest.raises(TypeError, match=rf"inputs\[{i}\] must be a Tensor, got {kind}"):
        sp.softmax_weighted_sum(torch.zeros(2), bad)
    with pytest.raises(TypeError, match=rf"inputs\[{i}\] must be a Tensor, got {kind}"):
        sp.weighted_sum(torch.zeros(2), bad)


def test_non_tensor_weights_and_inputs():
    with pytest.raises(TypeError, match="logits must be a Tensor, got list"):
        sp.softmax_weighted_sum([0.0, 0.0], [torch.ones(2)] * 2)
    with pytest.raises(TypeError, match="inputs must be an iterable of tensors, or one tensor, got str"):
        sp.weighted_sum(torch.zeros(2), "ab")
    with pytest.raises(TypeError, match="inputs must be an iterable of tensors, or one tensor, got int"):
        sp.weighted_sum(torch.zeros(2), 3)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a Tensor, got int"):
        sp.weighted_sum(torch.zeros(2), {1, 2})


def test_mixed_requires_grad():
    torch.manual_seed(2)
    logits = torch.randn(3, dtype=torch.float64)
    xs = [torch.randn(6, dtype=torch.float64, requires_grad=need) for need in (True, False, True)]
    sp.softmax_weighted_sum(logits, xs).sum().backward()
    p = torch.softmax(logits, 0)
    assert xs[1].grad is None and logits.grad is None
    assert_close(xs[0].grad, p[0].expand(6))
    assert_close(xs[2].grad, p[2].expand(6))


def test_aliased_inputs_accumulate_gradients():
    torch.manual_seed(3)
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, [a, b, a], temperature=0.7)
    g = torch.randn(5, dtype=torch.float64)
    got = torch.autograd.grad(out, [logits, a, b], g)
    # The same sum with a distinct copy in place of the second `a`.
    a2 = a.detach().clone().requires_grad_()
    want_out = reference.softmax_weighted_sum(logits, [a, b, a2], 0.7)
    gl, ga, gb, ga2 = torch.autograd.grad(want_out, [logits, a, b, a2], g)
    assert_close(out, want_out)
    assert_close(got[0], gl)
    assert_close(got[1], ga + ga2)
    assert_close(got[2], gb)


def test_output_never_aliases_an_input():
    x = torch.randn(4)
    for out in (sp.weighted_sum(torch.ones(1), [x]), sp.softmax_weighted_sum(torch.zeros(1), [x])):
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(out, x)


def test_writing_the_output_into_an_input():
    # An out=-like misuse: the result copied into one of the inputs. The
    # forward value is unaffected; a backward that needs the overwritten
    # input refuses, as PyTorch's own ops do.
    torch.manual_seed(4)
    logits = torch.randn(3, requires_grad=True)
    xs = [torch.randn(8) for _ in range(3)]
    want = reference.softmax_weighted_sum(logits, xs)
    out = sp.softmax_weighted_sum(logits, xs)
    xs[0].copy_(out)
    assert_close(xs[0], want.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # Without gradients for the logits the inputs are not saved: backward works.
    ys = [torch.randn(8, requires_grad=True) for _ in range(3)]
    out = sp.softmax_weighted_sum(logits.detach(), ys)
    with torch.no_grad():
        ys[0].copy_(out)
    out.sum().backward()
    assert_close(ys[1].grad, torch.softmax(logits.detach(), 0)[1].expand(8))


def test_huge_k():
    # 10,000 tiny tensors: forward and backward, against the reference.
    torch.manual_seed(5)
    K = 10_000
    logits = torch.randn(K, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    out = sp.softmax_weighted_sum(logits, xs)
    want = reference.softmax_weighted_sum(logits, xs)
    assert_close(out, want)
    g = torch.randn(3, dtype=torch.float64)
    got = torch.autograd.grad(out, [logits, *xs], g)
    expected = torch.autograd.grad(want, [logits, *xs], g)
    assert_close(got[0], expected[0])
    assert_close(torch.stack(got[1:]), torch.stack(expected[1:]))


def test_logits_on_another_device():
    xs = [torch.randn(2) for _ in range(3)]
    with pytest.raises(ValueError, match=r"logits is on device meta but inputs\[0\] is on device cpu"):
        sp.softmax_weighted_sum(torch.zeros(3, device="meta"), xs)
    with pytest.raises(ValueError, match=r"weights is on device meta but inputs\[0\] is on device cpu"):
        sp.weighted_sum(torch.zeros(3, device="meta"), xs)
    with pytest.raises(ValueError, match=r"inputs\[2\] is on device meta but inputs\[0\] is on device cpu"):
        sp.softmax_weighted_sum(torch.zeros(3), xs[:2] + [torch.zeros(2, device="meta")])


# --------------------------------------------------------------------------
# Autograd edge cases
# --------------------------------------------------------------------------

def test_retain_graph_double_backward_use():
    torch.manual_seed(6)
    logits = torch.randn(3, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = sp.softmax_weighted_sum(logits, xs)
    out.sum().backward(retain_graph=True)
    first = [logits.grad.clone(), xs[0].grad.clone()]
    out.sum().backward()
    assert_close(logits.grad, 2 * first[0])
    assert_close(xs[0].grad, 2 * first[1])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()


def test_func_grad():
    torch.manual_seed(7)
    xs = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    logits = torch.randn(4, dtype=torch.float64)
    got = torch.func.grad(lambda l: sp.softmax_weighted_sum(l, xs, temperature=0.5).square().sum())(logits)
    l = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.softmax_weighted_sum(l, xs, 0.5).square().sum(), l)
    assert_close(got, want)


def test_vmap_over_a_batch_of_logits():
    torch.manual_seed(8)
    xs = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    batch = torch.randn(6, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda l: sp.softmax_weighted_sum(l, xs))(batch)
    want = torch.stack([reference.softmax_weighted_sum(l, xs) for l in batch])
    assert_close(got, want)
    # And per-sample gradients, vmap over grad.
    per_sample = torch.func.vmap(torch.func.grad(lambda l: sp.softmax_weighted_sum(l, xs).sum()))(batch)
    for l, g in zip(batch, per_sample):
        l = l.clone().requires_grad_()
        (want_g,) = torch.autograd.grad(reference.softmax_weighted_sum(l, xs).sum(), l)
        assert_close(g, want_g)


@pytest.mark.parametrize("op", ["softmax_weighted_sum", "weighted_sum"])
def test_forward_mode_ad(op):
    torch.manual_seed(9)
    logits, tangent = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    xs = [torch.randn(4, dtype=torch.float64) for _ in range(3)]
    x_tangent = torch.randn(4, dtype=torch.float64)
    fused, ref = getattr(sp, op), getattr(reference, op)
    with fwAD.dual_level():
        out = fused(fwAD.make_dual(logits, tangent), [fwAD.make_dual(xs[0], x_tangent), *xs[1:]])
        got = fwAD.unpack_dual(out)
    _, want = torch.func.jvp(lambda l, x0: ref(l, [x0, *xs[1:]]), (logits, xs[0]), (tangent, x_tangent))
    assert got.tangent is not None, "the forward-mode tangent was dropped"
    assert_close(got.primal, ref(logits, xs))
    assert_close(got.tangent, want)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_autograd_state_without_grad(mode):
    logits = torch.randn(3, requires_grad=True)
    xs = [torch.randn(4, requires_grad=True) for _ in range(3)]
    refs = [sys.getrefcount(t) for t in (logits, *xs)]
    with mode():
        out = sp.softmax_weighted_sum(logits, xs)
    assert out.grad_fn is None and not out.requires_grad
    # Nothing holds on to the arguments (as saved tensors would).
    assert [sys.getrefcount(t) for t in (logits, *xs)] == refs
    assert_close(out, reference.softmax_weighted_sum(logits.detach(), [x.detach() for x in xs]))


def test_all_neg_inf_logits_give_nan_like_torch_softmax():
    logits = torch.full((3,), -math.inf, requires_grad=True)
    xs = [torch.ones(2, requires_grad=True) for _ in range(3)]
    out = sp.softmax_weighted_sum(logits, xs)
    assert torch.softmax(logits, 0).isnan().all() and out.isnan().all()
    out.sum().backward()
    assert logits.grad.isnan().all() and xs[0].grad.isnan().all()


@pytest.mark.skipif(not COMPILED, reason="thread-count independence is a property of the compiled kernels")
def test_bitwise_reproducible_across_thread_counts():
    torch.manual_seed(10)
    logits = torch.randn(3, requires_grad=True)
    xs = [torch.randn(300_000, requires_grad=True) for _ in range(3)]
    g = torch.randn(300_000)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = sp.softmax_weighted_sum(logits, xs)
            results.append((out, *torch.autograd.grad(out, [logits, *xs], g)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# The parametrization's right_inverse given hostile values
# --------------------------------------------------------------------------

needs_simplex = pytest.mark.skipif(not hasattr(sp, "Simplex"), reason="simplex_param.Simplex not available")


def _parametrized_linear():
    torch.manual_seed(11)
    m = torch.nn.Linear(4, 3)
    torch.nn.utils.parametrize.register_parametrization(m, "weight", sp.Simplex(dim=-1))
    return m


@needs_simplex
@pytest.mark.parametrize("value", [
    torch.tensor([[-0.5, 1.0, 0.25, 0.25]] * 3),  # negative: not probabilities
    torch.tensor([[0.2, 0.2, 0.2, 0.2]] * 3),  # sums to 0.8: not probabilities
])
def test_right_inverse_off_simplex_values_are_pre_weights(value):
    m = _parametrized_linear()
    m.weight = value
    assert torch.equal(m.parametrizations.weight.original.detach(), value)
    assert_close(m.weight.detach(), torch.softmax(value, -1))


@needs_simplex
def test_right_inverse_round_trips_probabilities():
    m = _parametrized_linear()
    value = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    m.weight = value
    assert torch.isfinite(m.parametrizations.weight.original).all()
    torch.testing.assert_close(m.weight.detach(), value, rtol=0, atol=1e-6)


@needs_simplex
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_right_inverse_non_finite_raises(bad):
    m = _parametrized_linear()
    before = m.parametrizations.weight.original.detach().clone()
    value = torch.full((3, 4), 0.25)
    value[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        m.weight = value
    assert torch.equal(m.parametrizations.weight.original.detach(), before)


@needs_simplex
def test_right_inverse_wrong_shape_raises():
    # torch's parametrize would let right_inverse change the shape of `original`.
    m = _parametrized_linear()
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match=r"expected a value of shape \[3, 4\].*got \[3, 5\]"):
        m.weight = torch.rand(3, 5)
    torch.testing.assert_close(m.weight.detach(), before)


def test_per_sample_weights_under_torch_func_and_forward_ad():
    # jvp, vmap and forward-mode AD with (*P, K) logits: the call routes to
    # the reference, so tangents are exact, never silently empty.
    torch.manual_seed(30)
    xs = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    logits, tangent = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    out, jvp = torch.func.jvp(lambda l: sp.softmax_weighted_sum(l, xs), (logits,), (tangent,))
    want, want_jvp = torch.func.jvp(lambda l: reference.softmax_weighted_sum(l, xs), (logits,), (tangent,))
    assert_close(out, want)
    assert_close(jvp, want_jvp)
    assert want_jvp.abs().sum() > 0
    with fwAD.dual_level():
        dual = sp.softmax_weighted_sum(fwAD.make_dual(logits, tangent), xs)
        assert_close(fwAD.unpack_dual(dual).tangent, want_jvp)
    batch = torch.randn(2, 4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda l: sp.softmax_weighted_sum(l, xs))(batch)
    assert_close(got, torch.stack([reference.softmax_weighted_sum(l, xs) for l in batch]))


@pytest.mark.skipif(not COMPILED, reason="tests the compiled op")
def test_direct_op_call_with_a_tangent_raises():
    # The compiled op has no forward-mode formula: called directly with a
    # tangent it raises rather than dropping the tangent.
    xs = [torch.randn(3, dtype=torch.float64) for _ in range(2)]
    logits = torch.randn(2, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(RuntimeError):
            fwAD.unpack_dual(torch.ops.simplex_param.softmax_weighted_sum(dual, xs, 1.0))
