"""The fused operators against the pure-PyTorch reference: values, gradients,
opcheck, torch.compile, layouts, zero-size inputs and argument errors."""
import itertools
import os
import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp
from simplex_param import checks, reference

from conftest import COMPILED, DEVICES, DTYPES, assert_close

OPS = {
    "softmax": (sp.softmax_weighted_sum, reference.softmax_weighted_sum),
    "plain": (sp.weighted_sum, reference.weighted_sum),
}


def call(kind, weights, inputs, temperature=1.0):
    fused, _ = OPS[kind]
    return fused(weights, inputs, temperature=temperature) if kind == "softmax" else fused(weights, inputs)


def call_reference(kind, weights, inputs, temperature=1.0):
    _, ref = OPS[kind]
    return ref(weights, inputs, temperature) if kind == "softmax" else ref(weights, inputs)


def sample_inputs(device, requires_grad=False, dtype=torch.float64):
    """(weights, inputs, temperature) cases shared by the gradient and opcheck tests."""
    def make(*shape, K):
        return [torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(K)]

    def logits(K, scale=1.0):
        return (scale * torch.randn(K, device=device, dtype=dtype)).requires_grad_(requires_grad)

    def rows(*shape, K):
        return torch.randn(*shape, K, device=device, dtype=dtype).requires_grad_(requires_grad)

    return [
        (logits(3), make(4, 5, K=3), 1.0),
        (logits(1), make(7, K=1), 1.0),
        (logits(4), make(2, 3, 2, K=4), 0.3),
        (logits(5), make(33, K=5), 2.5),
        # Per-sample and per-token weights: P of length 1 to 3.
        (rows(4, K=3), make(4, 5, K=3), 1.0),
        (rows(2, 3, K=4), make(2, 3, 5, K=4), 0.7),
        (rows(2, 3, 2, K=2), make(2, 3, 2, K=2), 1.0),
    ]


# Weight shapes for inputs of shape (129, 31, 3): shared, per sample, per token.
WEIGHT_PREFIXES = {"shared": (), "P=1": (129,), "P=2": (129, 31), "P=3": (129, 31, 3)}


@pytest.mark.parametrize("prefix", WEIGHT_PREFIXES)
@pytest.mark.parametrize("kind,dtype,device", list(itertools.product(OPS, DTYPES, DEVICES)))
def test_matches_reference(kind, dtype, device, prefix):
    torch.manual_seed(0)
    K = 6
    xs = [torch.randn(129, 31, 3, device=device, dtype=dtype, requires_grad=True) for _ in range(K)]
    w = torch.randn(*WEIGHT_PREFIXES[prefix], K, device=device, requires_grad=True)
    out = call(kind, w, xs, 0.7)
    expected = call_reference(kind, w, xs, 0.7)
    assert out.dtype == dtype and out.shape == xs[0].shape
    assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [w, *xs], g)
    want = torch.autograd.grad(expected, [w, *xs], g)
    assert got[0].dtype == w.dtype and got[0].shape == w.shape
    # The weight gradient sums over many low-precision products.
    assert_close(got[0], want[0], dtype=torch.float32 if dtype == torch.float64 else torch.float16)
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b)


@pytest.mark.parametrize("logits_dtype,input_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float64, torch.float32), (torch.bfloat16, torch.float32),
])
def test_mixed_precision(logits_dtype, input_dtype, device):
    torch.manual_seed(1)
    xs = [torch.randn(64, device=device, dtype=input_dtype) for _ in range(3)]
    logits = torch.randn(3, device=device, dtype=logits_dtype, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    expected = reference.softmax_weighted_sum(logits, xs)
    assert out.dtype == input_dtype
    assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.float().sum(), logits)
    (want,) = torch.autograd.grad(expected.float().sum(), logits)
    assert grad.dtype == logits_dtype
    assert_close(grad, want, dtype=torch.bfloat16 if torch.bfloat16 in (logits_dtype, input_dtype) else torch.float16)


def test_fp16_accumulates_in_float32(device):
    # 1000 + 0.25 + 0.25 + ... is lost in float16 accumulation, kept in float32.
    K = 9
    xs = [torch.full((8,), 2048.0 if k == 0 else 0.25, device=device, dtype=torch.float16) for k in range(K)]
    out = sp.weighted_sum(torch.ones(K, device=device), xs)
    assert out[0].item() == 2050.0


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("stacked", [False, True])
def test_gradcheck(kind, stacked, device):
    torch.manual_seed(2)
    for w, xs, T in sample_inputs(device, requires_grad=True):
        if stacked:
            x = torch.stack([x.detach() for x in xs]).requires_grad_()
            fn = lambda w, x: call(kind, w, x, T)  # noqa: E731
            args = (w, x)
        else:
            fn = lambda w, *xs: call(kind, w, list(xs), T)  # noqa: E731
            args = (w, *xs)
        assert gradcheck(fn, args)
        assert gradgradcheck(fn, args)


def test_gradcheck_extreme_logits(device):
    xs = [torch.randn(5, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    logits = torch.tensor([1e4, -1e4, 0.0], device=device, dtype=torch.float64, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    assert torch.isfinite(out).all()
    assert_close(out, xs[0].detach())
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(g).all()
    assert gradcheck(lambda l, *xs: sp.softmax_weighted_sum(l, list(xs)), (logits, *xs))


OPCHECK_ARGS = {
    "softmax_weighted_sum": lambda w, xs, T: (w, xs, T),
    "weighted_sum": lambda w, xs, T: (w, xs),
    "simplex_weighted_sum": lambda w, xs, T: (w, xs, "softmax", T),
    "simplex_weighted_sum.identity": lambda w, xs, T: (w, xs, "identity", T),
}


@pytest.mark.parametrize("op", OPCHECK_ARGS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
def test_opcheck(op, requires_grad, device):
    torch.manual_seed(3)
    overload = getattr(torch.ops.simplex_param, op.split(".")[0]).default
    for w, xs, T in sample_inputs(device, requires_grad=requires_grad):
        torch.library.opcheck(overload, OPCHECK_ARGS[op](w, xs, T))


@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
@pytest.mark.parametrize("need_w,need_x", [(True, [True, False, True]), (False, [True, True, True]), (True, [False] * 3)])
@pytest.mark.parametrize("weight_shape", [(3,), (4, 3), (4, 2, 3)])
def test_opcheck_backward_op(need_w, need_x, weight_shape, device):
    torch.manual_seed(4)
    grad = torch.randn(4, 2, 5, device=device, dtype=torch.float64)
    w = torch.randn(weight_shape, device=device, dtype=torch.float64)
    xs = [torch.randn(4, 2, 5, device=device, dtype=torch.float64) for _ in range(3)] if need_w else []
    torch.library.opcheck(torch.ops.simplex_param._weighted_sum_backward.default, (grad, w, xs, need_w, need_x))


def test_autograd_is_the_cpp_node(device):
    # The compiled ops' autograd runs in C++ (csrc/autograd.cpp), not through
    # a Python autograd.Function or torch.library.register_autograd.
    xs = [torch.randn(3, device=device, requires_grad=True) for _ in range(2)]
    logits = torch.randn(2, device=device, requires_grad=True)
    soft, plain = sp.softmax_weighted_sum(logits, xs), sp.weighted_sum(logits, xs)
    if COMPILED:
        assert type(soft.grad_fn).__name__ == "CppFunction"
        assert "SimplexWeightedSumFunction" in soft.grad_fn.name()
        assert "WeightedSumFunction" in plain.grad_fn.name()
    else:
        assert "Cpp" not in soft.grad_fn.name()


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("weight_shape", [(4,), (16, 4)])
def test_compile_fullgraph(kind, weight_shape, device):
    torch._dynamo.reset()
    torch.manual_seed(5)
    xs = [torch.randn(16, 8, device=device, requires_grad=True) for _ in range(4)]
    w = torch.randn(weight_shape, device=device, requires_grad=True)

    def f(w, xs):
        return call(kind, w, xs, 0.5).tanh()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(w, xs)
    expected = f(w, xs)
    assert_close(out, expected)
    got = torch.autograd.grad(out.sum(), [w, *xs])
    want = torch.autograd.grad(expected.sum(), [w, *xs])
    for a, b in zip(got, want):
        assert_close(a, b)


LAYOUTS = {
    "transposed": lambda b: b.transpose(1, 3),
    "sliced": lambda b: b[:, ::2, 1:],
    "expanded": lambda b: b[:, :1].expand(4, 6, 5, 3),
    "channels_last": lambda b: b.contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
def test_non_contiguous(layout, device):
    torch.manual_seed(6)
    base = [torch.randn(4, 6, 5, 3, device=device, requires_grad=True) for _ in range(3)]
    if layout == "mixed":
        xs = [base[0], LAYOUTS["channels_last"](base[1]), base[2].transpose(0, 1).contiguous().transpose(0, 1)]
    else:
        xs = [LAYOUTS[layout](b) for b in base]
    logits = torch.randn(3, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    expected = reference.softmax_weighted_sum(logits, xs)
    assert_close(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [logits, *base], g)
    want = torch.autograd.grad(expected, [logits, *base], g)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_zero_size(shape, device):
    xs = [torch.randn(shape, device=device, requires_grad=True) for _ in range(3)]
    logits = torch.randn(3, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    assert out.shape == shape
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros(3, device=device))
    assert all(x.grad.shape == shape for x in xs)


def test_stacked_matches_list(device):
    x = torch.randn(5, 7, 3, device=device)
    logits = torch.randn(5, device=device)
    assert torch.equal(sp.softmax_weighted_sum(logits, x), sp.softmax_weighted_sum(logits, list(x.unbind(0))))
    assert torch.equal(sp.weighted_sum(logits, tuple(x)), sp.weighted_sum(logits, x))


def test_skips_unneeded_gradients(device):
    xs = [torch.randn(10, device=device) for _ in range(3)]
    xs[1].requires_grad_()
    logits = torch.randn(3, device=device)
    out = sp.softmax_weighted_sum(logits, xs)
    out.sum().backward()
    assert xs[0].grad is None and logits.grad is None
    assert_close(xs[1].grad, torch.softmax(logits, 0)[1].expand(10))


def test_deterministic(device):
    torch.manual_seed(7)
    xs = [torch.randn(300_001, device=device, requires_grad=True) for _ in range(5)]
    logits = torch.randn(5, device=device, requires_grad=True)
    g = torch.randn(300_001, device=device)
    runs = [torch.autograd.grad(sp.softmax_weighted_sum(logits, xs), [logits, *xs], g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_non_finite_logits_propagate_like_softmax(device):
    xs = [torch.ones(3, device=device) for _ in range(3)]
    neg = torch.tensor([0.0, float("-inf"), 1.0], device=device)
    assert_close(sp.softmax_weighted_sum(neg, xs), torch.ones(3, device=device))
    all_neg = torch.full((3,), float("-inf"), device=device)
    assert torch.isnan(sp.softmax_weighted_sum(all_neg, xs)).all()
    assert torch.isnan(sp.softmax_weighted_sum(torch.tensor([0.0, float("nan"), 0.0], device=device), xs)).all()



# ---------------------------------------------------------------------------
# Per-sample and per-token weights, K, temperatures, containers.
# ---------------------------------------------------------------------------

def test_per_token_gating_like_a_mixture_of_experts(device):
    # A gating network's (B, T, K) logits combine K expert outputs (B, T, D),
    # as a dense mixture of experts does with torch.stack and einsum.
    torch.manual_seed(20)
    B, T, D, K = 3, 5, 16, 4
    gate = torch.nn.Linear(D, K).to(device)
    h = torch.randn(B, T, D, device=device)
    experts = [torch.nn.Linear(D, D).to(device) for _ in range(K)]
    outs = [e(h) for e in experts]
    logits = gate(h)
    got = sp.softmax_weighted_sum(logits, outs)
    want = torch.einsum("btk,kbtd->btd", torch.softmax(logits, -1), torch.stack(outs))
    assert_close(got, want)
    params = [*gate.parameters(), *(p for e in experts for p in e.parameters())]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g, retain_graph=True), torch.autograd.grad(want, params, g)):
        assert_close(a, b)


@pytest.mark.parametrize("K", [1, 100])
@pytest.mark.parametrize("weight_shape", [(), (6,)])
def test_k_one_and_many(K, weight_shape, device):
    torch.manual_seed(21)
    xs = [torch.randn(6, 7, device=device, requires_grad=True) for _ in range(K)]
    logits = torch.randn(*weight_shape, K, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs, temperature=0.5)
    want = reference.softmax_weighted_sum(logits, xs, 0.5)
    assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [logits, *xs], g), torch.autograd.grad(want, [logits, *xs], g)):
        assert_close(a, b)


def test_per_sample_rows_with_neg_inf(device):
    xs = [torch.full((2, 3), float(k + 1), device=device) for k in range(3)]
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf, 0.0], [-inf, -inf, -inf]], device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    assert torch.equal(out[0], torch.full((3,), 2.0, device=device))  # (1 + 3) / 2; input 2 has weight 0
    assert torch.isnan(out[1]).all()  # a row of all -inf is NaN, as torch.softmax gives
    out[0].sum().backward()
    assert torch.isfinite(logits.grad[0]).all() and logits.grad[0, 1] == 0


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("weight_shape", [(3,), (4, 3), (4, 5, 3)])
def test_per_sample_gradcheck(kind, weight_shape, device):
    torch.manual_seed(22)
    w = torch.randn(weight_shape, device=device, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(4, 5, 2, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    fn = lambda w, *xs: call(kind, w, list(xs), 0.7)  # noqa: E731
    assert gradcheck(fn, (w, *xs))
    assert gradgradcheck(fn, (w, *xs))


def test_temperature_as_tensor_gets_a_gradient(device):
    torch.manual_seed(23)
    xs = [torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    logits = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    T = torch.tensor(0.6, device=device, dtype=torch.float64, requires_grad=True)
    fn = lambda l, t, *xs: sp.softmax_weighted_sum(l, list(xs), temperature=t)  # noqa: E731
    assert gradcheck(fn, (logits, T, *xs))
    assert gradgradcheck(fn, (logits, T, *xs))
    assert_close(fn(logits, T, *xs), reference.softmax_weighted_sum(logits, xs, 0.6))


def test_temperature_kinds_agree(device):
    np = pytest.importorskip("numpy")
    xs = [torch.randn(5, device=device) for _ in range(3)]
    logits = torch.randn(3, device=device)
    want = sp.softmax_weighted_sum(logits, xs, temperature=0.25)
    for T in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, device=device)):
        assert_close(sp.softmax_weighted_sum(logits, xs, temperature=T), want)


def test_annealed_temperature_does_not_recompile(device):
    torch._dynamo.reset()
    xs = [torch.randn(8, device=device) for _ in range(3)]
    logits = torch.randn(3, device=device)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    f = torch.compile(lambda l, xs, t: sp.softmax_weighted_sum(l, xs, temperature=t), backend=counter, fullgraph=True)
    for t in (1.0, 0.5, 0.25):
        T = torch.tensor(t, device=device)
        assert_close(f(logits, xs, T), reference.softmax_weighted_sum(logits, xs, t))
    assert counter.frame_count == 1


def test_generator_of_inputs(device):
    # DARTS writes sum(w * op(x) for w, op in zip(weights, self._ops)).
    ops = [torch.nn.Identity(), torch.nn.Tanh(), torch.nn.ReLU()]
    x = torch.randn(2, 4, device=device)
    logits = torch.randn(3, device=device)
    got = sp.softmax_weighted_sum(logits, (op(x) for op in ops))
    want = sum(w * op(x) for w, op in zip(torch.softmax(logits, 0), ops))
    assert_close(got, want)
    assert_close(sp.weighted_sum(logits, map(torch.exp, [x, x, x])), logits.sum() * torch.exp(x))


@pytest.mark.skipif(not COMPILED, reason="the fallback's temporaries are PyTorch's")
def test_one_odd_layout_copies_only_itself():
    # PC-DARTS: one channel slice among 8 inputs. The other 7 are used in
    # place; only the slice is copied. Measured as the bytes the op allocates.
    torch.manual_seed(24)
    n = 1 << 16
    xs = [torch.randn(4, n // 4) for _ in range(7)] + [torch.randn(4, n // 2)[:, ::2]]
    logits = torch.randn(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = sp.softmax_weighted_sum(logits, xs)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert_close(out, reference.softmax_weighted_sum(logits, xs))
    one = n * 4  # bytes of one input
    assert one * 2 <= allocated < 2 * one + 4096  # the output and one copy


@pytest.mark.skipif(not COMPILED, reason="the fallback's temporaries are PyTorch's")
def test_per_token_streams_of_a_residual_are_read_in_place():
    # Hyper-connections' pre-mix: per-token weights over the n streams of a
    # residual (tokens, n, C), passed as residual.unbind(1). The slices are
    # read where they lie (allocations: the output only; backward: the input
    # gradients and the weights' gradient only), with the bits of contiguous
    # copies, forward and backward.
    gen = torch.Generator().manual_seed(27)
    for dtype in (torch.float32, torch.bfloat16):
        residual = torch.randn(64, 4, 3000, generator=gen).to(dtype).requires_grad_()
        w = torch.rand(64, 4, generator=gen, requires_grad=True)
        g = torch.randn(64, 3000, generator=gen).to(dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            streams = residual.unbind(1)
            out = sp.weighted_sum(w, streams)
            got = torch.autograd.grad(out, [w, *streams], g)  # the slices' own gradients
        allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
        copies = [x.detach().clone().requires_grad_() for x in residual.unbind(1)]
        want_out = sp.weighted_sum(w, copies)
        assert torch.equal(out, want_out)
        for a, b in zip(got, torch.autograd.grad(want_out, [w, *copies], g)):
            assert torch.equal(a, b)
        row = 3000 * residual.element_size() * 64
        assert allocated < 6 * row + 64 * 1024  # the output and 4 input gradients: no copy of the streams


@pytest.mark.parametrize("threads", [1, 2])
def test_per_sample_deterministic_across_threads(threads):
    torch.manual_seed(25)
    xs = [torch.randn(37, 9000, requires_grad=True) for _ in range(5)]
    logits = torch.randn(37, 5, requires_grad=True)
    g = torch.randn(37, 9000)
    prev = torch.get_num_threads()
    try:
        runs = []
        for n in (1, threads):
            torch.set_num_threads(n)
            runs.append(torch.autograd.grad(sp.softmax_weighted_sum(logits, xs), [logits, *xs], g))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_per_sample_non_contiguous(layout, device):
    torch.manual_seed(26)
    base = [torch.randn(4, 6, 5, 3, device=device, requires_grad=True) for _ in range(3)]
    xs = [LAYOUTS[layout](b) for b in base]
    logits = torch.randn(*xs[0].shape[:2], 3, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    expected = reference.softmax_weighted_sum(logits, xs)
    assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [logits, *base], g), torch.autograd.grad(expected, [logits, *base], g)):
        assert_close(a, b)


@pytest.mark.parametrize("weight_shape", [(3,), (0, 3), (2, 3)])
def test_per_sample_zero_size(weight_shape, device):
    shape = (0, 4) if weight_shape[0] == 0 else (2, 0)
    xs = [torch.randn(shape, device=device, requires_grad=True) for _ in range(3)]
    logits = torch.randn(weight_shape, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    assert out.shape == shape
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros(weight_shape, device=device))


@pytest.mark.parametrize("weight_shape, shape", [((2, 0, 3), (2, 0, 5)), ((0, 2, 3), (0, 2, 4)), ((3, 2, 3), (3, 2, 0))])
def test_per_sample_empty_rows(weight_shape, shape, device):
    # Rows of two dimensions, one of them empty: the layout rule must not
    # divide by the empty dimension's size (it once raised SIGFPE).
    xs = [torch.randn(shape, device=device)[..., ::1].requires_grad_() for _ in range(3)]
    logits = torch.randn(weight_shape, device=device, requires_grad=True)
    out = sp.softmax_weighted_sum(logits, xs)
    assert out.shape == shape
    out.sum().backward()
    assert logits.grad.shape == weight_shape and all(x.grad.shape == shape for x in xs)


# ---------------------------------------------------------------------------
# Bad input. The texts come from one table (simplex_param/errors.def): the
# public functions, the compiled ops called directly and the fallback's checks
# raise the same exception type with the same message.
# ---------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


BAD = [
    ("empty inputs", torch.zeros(0), [], 1.0, ValueError, "inputs must contain at least one tensor"),
    ("K mismatch", torch.zeros(3), [_x(2)] * 2, 1.0, ValueError,
     "logits has 3 entries in its last dimension but inputs has 2 tensors"),
    ("shape", torch.zeros(2), [_x(2), _x(3)], 1.0, ValueError, r"inputs\[1\] has shape \[3\] but inputs\[0\] has shape \[2\]"),
    ("dtype", torch.zeros(2), [_x(2), _x(2, dtype=torch.float64)], 1.0, TypeError,
     r"inputs\[1\] has dtype torch.float64 but inputs\[0\] has dtype torch.float32"),
    ("int inputs", torch.zeros(1), [torch.ones(2, dtype=torch.int64)], 1.0, TypeError,
     r"inputs\[0\] must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.int64"),
    ("bool inputs", torch.zeros(1), [torch.ones(2, dtype=torch.bool)], 1.0, TypeError,
     r"inputs\[0\] must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.bool"),
    ("float8 inputs", torch.zeros(1), [torch.ones(2).to(torch.float8_e4m3fn)], 1.0, TypeError,
     r"inputs\[0\] must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.float8_e4m3fn"),
    ("int logits", torch.zeros(1, dtype=torch.int32), [_x(2)], 1.0, TypeError,
     "logits must have a floating dtype, got torch.int32"),
    ("0-D logits", torch.zeros(()), [_x(2)], 1.0, ValueError,
     "logits must have at least one dimension, the last holding the K weights, got a 0-D tensor"),
    ("prefix", torch.zeros(3, 2), [_x(4, 5)] * 2, 1.0, ValueError,
     r"logits has shape \[3, 2\], but its leading dimensions must be the first dimensions of the shape "
     r"\[4, 5\] of inputs\[0\]"),
    ("prefix too long", torch.zeros(4, 5, 1, 2), [_x(4, 5)] * 2, 1.0, ValueError,
     r"logits has shape \[4, 5, 1, 2\], but its leading dimensions must be the first dimensions of the shape "
     r"\[4, 5\] of inputs\[0\]"),
    ("zero temperature", torch.zeros(1), [_x(2)], 0.0, ValueError, r"temperature must be a positive finite number, got 0.0"),
    ("negative temperature", torch.zeros(1), [_x(2)], -2, ValueError, r"temperature must be a positive finite number, got -2.0"),
    ("inf temperature", torch.zeros(1), [_x(2)], float("inf"), ValueError, r"temperature must be a positive finite number, got inf"),
    ("nan temperature", torch.zeros(1), [_x(2)], float("nan"), ValueError, r"temperature must be a positive finite number, got nan"),
    ("meta logits", torch.zeros(1, device="meta"), [_x(2)], 1.0, ValueError,
     r"logits is on device meta but inputs\[0\] is on device cpu"),
]


@pytest.mark.parametrize("name,logits,inputs,temperature,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, logits, inputs, temperature, exc, msg):
    with pytest.raises(exc, match=f"^{msg}$"):
        sp.softmax_weighted_sum(logits, inputs, temperature=temperature)
    with pytest.raises(exc, match=f"^{msg}$"):
        checks.check_float_temperature(temperature)
        checks.check_args(logits, inputs, "logits")
    if COMPILED:
        with pytest.raises(exc, match=f"^{msg}$"):
            torch.ops.simplex_param.softmax_weighted_sum(logits, inputs, float(temperature))
        with pytest.raises(exc, match=f"^{msg}$"):
            torch.ops.simplex_param.simplex_weighted_sum(logits, inputs, "softmax", float(temperature))


def test_weighted_sum_errors_name_weights():
    msg = "^weights has 3 entries in its last dimension but inputs has 1 tensors$"
    with pytest.raises(ValueError, match=msg):
        sp.weighted_sum(torch.ones(3), [_x(2)])
    if COMPILED:
        with pytest.raises(ValueError, match=msg):
            torch.ops.simplex_param.weighted_sum(torch.ones(3), [_x(2)])


BAD_BACKWARD = [
    ("count", (_x(4), torch.zeros(3), [], False, [True, True]), ValueError,
     "inputs_requires_grad has 2 entries but weights has 3 in its last dimension"),
    ("int grad", (torch.ones(4, dtype=torch.int32), torch.zeros(2), [], False, [True, True]), TypeError,
     r"grad must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.int32"),
    ("grad shape", (_x(5), torch.zeros(2), [_x(4)] * 2, True, [False, False]), ValueError,
     r"grad has shape \[5\] but inputs\[0\] has shape \[4\]"),
    ("grad dtype", (_x(4, dtype=torch.float64), torch.zeros(2), [_x(4)] * 2, True, [False, False]), TypeError,
     r"grad has dtype torch.float64 but inputs\[0\] has dtype torch.float32"),
    ("weights prefix", (_x(4, 5), torch.zeros(3, 2), [], False, [True, True]), ValueError,
     r"weights has shape \[3, 2\], but its leading dimensions must be the first dimensions of the shape "
     r"\[4, 5\] of grad"),
    ("weights device", (_x(4), torch.zeros(2, device="meta"), [], False, [True, True]), ValueError,
     "weights is on device meta but grad is on device cpu"),
]


@pytest.mark.parametrize("args,exc,msg", [b[1:] for b in BAD_BACKWARD], ids=[b[0] for b in BAD_BACKWARD])
def test_bad_backward_input(args, exc, msg):
    # The backward op's errors name its own arguments: grad and weights.
    with pytest.raises(exc, match=f"^{msg}$"):
        checks.check_backward_args(*args)
    if COMPILED:
        with pytest.raises(exc, match=f"^{msg}$"):
            torch.ops.simplex_param._weighted_sum_backward(*args)


def test_unknown_map():
    msg = "^map must be one of " + ", ".join(repr(m) for m in sp.maps.MAPS) + ", got 'gumbel'$"
    with pytest.raises(ValueError, match=msg):
        sp.simplex_weighted_sum(torch.zeros(2), [_x(2)] * 2, map="gumbel")
    if COMPILED:
        with pytest.raises(ValueError, match=msg):
            torch.ops.simplex_param.simplex_weighted_sum(torch.zeros(2), [_x(2)] * 2, "gumbel", 1.0)


def test_error_table_is_parsed():
    # Every entry of errors.def reached Python, with its type.
    with open(os.path.join(os.path.dirname(sp.__file__), "errors.def")) as f:
        lines = [line for line in f if line.startswith("SP_ERROR(")]
    assert len(checks.ERRORS) == len(lines) > 10
    assert checks.ERRORS["temperature"][0] is ValueError and checks.ERRORS["weights_dtype"][0] is TypeError


def test_bad_containers():
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a Tensor, got int"):
        sp.softmax_weighted_sum(torch.zeros(2), [_x(2), 3])
    with pytest.raises(TypeError, match="inputs must be an iterable of tensors, or one tensor, got int"):
        sp.softmax_weighted_sum(torch.zeros(2), 3)
    with pytest.raises(TypeError, match="logits must be a Tensor, got list"):
        sp.softmax_weighted_sum([0.0, 1.0], [_x(2), _x(2)])
    with pytest.raises(ValueError, match="0-D tensor"):
        sp.softmax_weighted_sum(torch.zeros(1), torch.tensor(1.0))
    with pytest.raises(TypeError, match="temperature must be a float or a 0-D tensor, got str"):
        sp.softmax_weighted_sum(torch.zeros(1), [_x(2)], temperature="1")
    with pytest.raises(TypeError, match="temperature given as a tensor must be a 0-D floating tensor"):
        sp.softmax_weighted_sum(torch.zeros(1), [_x(2)], temperature=torch.ones(1))
    with pytest.raises(TypeError, match="map must be a str, got int"):
        sp.simplex_weighted_sum(torch.zeros(1), [_x(2)], map=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"inputs\[1\] is on device cuda:0 but inputs\[0\] is on device cpu"):
        sp.softmax_weighted_sum(torch.zeros(2), [_x(2), _x(2).cuda()])
    with pytest.raises(ValueError, match=r"logits is on device cpu but inputs\[0\] is on device cuda:0"):
        sp.softmax_weighted_sum(torch.zeros(1), [_x(2).cuda()])


def test_zero_size_nan_logits_give_nan_gradient(device):
    # d = 0 for empty inputs, so the logits' gradient is p * (0 - <p, 0>): NaN where p is.
    logits = torch.tensor([float("nan"), 0.0], device=device, requires_grad=True)
    xs = [torch.empty(0, device=device, requires_grad=True) for _ in range(2)]
    sp.softmax_weighted_sum(logits, xs).sum().backward()
    assert torch.isnan(logits.grad).all()


@pytest.mark.skipif(not COMPILED, reason="the compiled op formats the value in C++")
@pytest.mark.parametrize("value", [-100000.0, -0.0001, -1e-05, -1e16, -1.5e16, -123.456, 0.0, -3.14159e-07])
def test_temperature_error_prints_the_value_as_python_does(value):
    # The C++ check writes the float as repr() does, so both paths match.
    msg = f"^temperature must be a positive finite number, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=msg):
        torch.ops.simplex_param.softmax_weighted_sum(torch.zeros(1), [_x(2)], value)
    with pytest.raises(ValueError, match=msg):
        checks.check_float_temperature(value)
