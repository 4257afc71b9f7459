"""The fused operators against the pure-PyTorch reference: values, gradients,
opcheck, torch.compile, layouts, zero-size inputs and argument errors."""
import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp
from simplex_param import reference

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

    return [
        (logits(3), make(4, 5, K=3), 1.0),
        (logits(1), make(7, K=1), 1.0),
        (logits(4), make(2, 3, 2, K=4), 0.3),
        (logits(5), make(33, K=5), 2.5),
    ]


@pytest.mark.parametrize("kind,dtype,device", list(itertools.product(OPS, DTYPES, DEVICES)))
def test_matches_reference(kind, dtype, device):
    torch.manual_seed(0)
    K = 6
    xs = [torch.randn(129, 31, device=device, dtype=dtype, requires_grad=True) for _ in range(K)]
    w = torch.randn(K, device=device, requires_grad=True)
    out = call(kind, w, xs, 0.7)
    expected = call_reference(kind, w, xs, 0.7)
    assert out.dtype == dtype and out.shape == xs[0].shape
    assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [w, *xs], g)
    want = torch.autograd.grad(expected, [w, *xs], g)
    assert got[0].dtype == w.dtype
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


@pytest.mark.parametrize("op", ["softmax_weighted_sum", "weighted_sum"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
def test_opcheck(op, requires_grad, device):
    torch.manual_seed(3)
    for w, xs, T in sample_inputs(device, requires_grad=requires_grad):
        args = (w, xs, T) if op == "softmax_weighted_sum" else (w, xs)
        torch.library.opcheck(getattr(torch.ops.simplex_param, op).default, args)


@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
@pytest.mark.parametrize("need_w,need_x", [(True, [True, False, True]), (False, [True, True, True]), (True, [False] * 3)])
def test_opcheck_backward_ops(need_w, need_x, device):
    torch.manual_seed(4)
    grad = torch.randn(4, 3, device=device, dtype=torch.float64)
    w = torch.randn(3, device=device, dtype=torch.float64)
    xs = [torch.randn(4, 3, device=device, dtype=torch.float64) for _ in range(3)] if need_w else []
    ops = torch.ops.simplex_param
    torch.library.opcheck(ops._softmax_weighted_sum_backward.default, (grad, w, xs, 0.5, need_w, need_x))
    torch.library.opcheck(ops._weighted_sum_backward.default, (grad, w, xs, need_w, need_x))


@pytest.mark.parametrize("kind", OPS)
def test_compile_fullgraph(kind, device):
    torch._dynamo.reset()
    torch.manual_seed(5)
    xs = [torch.randn(16, 8, device=device, requires_grad=True) for _ in range(4)]
    w = torch.randn(4, device=device, requires_grad=True)

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
# Bad input: the public functions, the compiled ops called directly and the
# fallback raise the same exception type with the same message.
# ---------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


BAD = [
    ("empty inputs", torch.zeros(0), [], 1.0, ValueError, "inputs must contain at least one tensor"),
    ("K mismatch", torch.zeros(3), [_x(2)] * 2, 1.0, ValueError, "logits has 3 entries but inputs has 2 tensors"),
    ("shape", torch.zeros(2), [_x(2), _x(3)], 1.0, ValueError, r"inputs\[1\] has shape \[3\] but inputs\[0\] has shape \[2\]"),
    ("dtype", torch.zeros(2), [_x(2), _x(2, dtype=torch.float64)], 1.0, TypeError,
     r"inputs\[1\] has dtype torch.float64 but inputs\[0\] has dtype torch.float32"),
    ("int inputs", torch.zeros(1), [torch.ones(2, dtype=torch.int64)], 1.0, TypeError,
     r"inputs\[0\] must have a floating dtype, got torch.int64"),
    ("bool inputs", torch.zeros(1), [torch.ones(2, dtype=torch.bool)], 1.0, TypeError,
     r"inputs\[0\] must have a floating dtype, got torch.bool"),
    ("int logits", torch.zeros(1, dtype=torch.int32), [_x(2)], 1.0, TypeError,
     "logits must have a floating dtype, got torch.int32"),
    ("2-D logits", torch.zeros(1, 2), [_x(2)] * 2, 1.0, ValueError, "logits must be a 1-D tensor, got a tensor of 2 dimensions"),
    ("zero temperature", torch.zeros(1), [_x(2)], 0.0, ValueError, r"temperature must be a positive finite number, got 0.0"),
    ("negative temperature", torch.zeros(1), [_x(2)], -2, ValueError, r"temperature must be a positive finite number, got -2.0"),
    ("inf temperature", torch.zeros(1), [_x(2)], float("inf"), ValueError, r"temperature must be a positive finite number, got inf"),
    ("nan temperature", torch.zeros(1), [_x(2)], float("nan"), ValueError, r"temperature must be a positive finite number, got nan"),
]


@pytest.mark.parametrize("name,logits,inputs,temperature,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, logits, inputs, temperature, exc, msg):
    with pytest.raises(exc, match=f"^{msg}$"):
        sp.softmax_weighted_sum(logits, inputs, temperature=temperature)
    with pytest.raises(exc, match=f"^{msg}$"):
        reference_checked(logits, inputs, temperature)
    if COMPILED:
        with pytest.raises(exc, match=f"^{msg}$"):
            torch.ops.simplex_param.softmax_weighted_sum(logits, inputs, float(temperature))


def reference_checked(logits, inputs, temperature):
    from simplex_param import ops
    ops._check_temperature(temperature)
    ops._check_args(logits, inputs, "logits")


def test_weighted_sum_errors_name_weights():
    with pytest.raises(ValueError, match="^weights has 3 entries but inputs has 1 tensors$"):
        sp.weighted_sum(torch.ones(3), [_x(2)])


def test_bad_containers():
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a Tensor, got int"):
        sp.softmax_weighted_sum(torch.zeros(2), [_x(2), 3])
    with pytest.raises(TypeError, match="inputs must be a list or tuple of tensors, or one tensor, got int"):
        sp.softmax_weighted_sum(torch.zeros(2), 3)
    with pytest.raises(TypeError, match="logits must be a Tensor, got list"):
        sp.softmax_weighted_sum([0.0, 1.0], [_x(2), _x(2)])
    with pytest.raises(ValueError, match="0-D tensor"):
        sp.softmax_weighted_sum(torch.zeros(1), torch.tensor(1.0))
    with pytest.raises(TypeError, match="temperature must be a float, got str"):
        sp.softmax_weighted_sum(torch.zeros(1), [_x(2)], temperature="1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"inputs\[1\] is on device cuda:0 but inputs\[0\] is on device cpu"):
        sp.softmax_weighted_sum(torch.zeros(2), [_x(2), _x(2).cuda()])
    with pytest.raises(ValueError, match="logits is on device cpu but inputs are on device cuda:0"):
        sp.softmax_weighted_sum(torch.zeros(1), [_x(2).cuda()])


def test_device_mismatch_meta():
    # Runs without a GPU: the meta device stands in for a second device.
    with pytest.raises(ValueError, match=r"logits is on device meta but inputs are on device cpu"):
        sp.softmax_weighted_sum(torch.zeros(1, device="meta"), [_x(2)])


def test_zero_size_nan_logits_give_nan_gradient(device):
    # d = 0 for empty inputs, so the logits' gradient is p * (0 - <p, 0>): NaN where p is.
    logits = torch.tensor([float("nan"), 0.0], device=device, requires_grad=True)
    xs = [torch.empty(0, device=device, requires_grad=True) for _ in range(2)]
    sp.softmax_weighted_sum(logits, xs).sum().backward()
    assert torch.isnan(logits.grad).all()
