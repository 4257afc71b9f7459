"""sp.mix, the K-to-M contraction (hyper-connections' post-mix), against an
oracle written from its definition in float64:

    out[*p, m, *t] = sum_k weights[*p, m, k] * inputs[k][*p, *t]

on both paths (the compiled op and the fallback), with gradients to second
order, the op's registration (opcheck, torch.compile) and its errors."""
import itertools

import pytest
import torch

import simplex_param as sp
from conftest import COMPILED, assert_close


def oracle(weights, inputs):
    """The definition, term by term, in float64."""
    lead = weights.dim() - 2
    outs = []
    for m in range(weights.shape[-2]):
        o = torch.zeros(inputs[0].shape, dtype=torch.float64)
        for k, x in enumerate(inputs):
            w = weights[..., m, k].double()
            o = o + w.reshape(w.shape + (1,) * (x.dim() - lead)) * x.double()
        outs.append(o)
    return torch.stack(outs, lead) if outs else torch.zeros(
        (*inputs[0].shape[:lead], 0, *inputs[0].shape[lead:]), dtype=torch.float64)


# (weights shape, inputs shape): shared (M, K) matrices, per-row ones, mHC's
# post-mix (tokens, n, n + 1), rows longer than a CPU tile (2048 elements,
# the weights' gradient summed over pieces), many short rows in a tile, one
# output, no output, one input, more inputs and outputs than a pass takes
# (16), and empty inputs.
SHAPES = [
    ((3, 5), (7,)),
    ((3, 5), (5000,)),
    ((2, 3, 5), (2, 7)),
    ((2, 4, 1, 5), (2, 4, 6, 3)),
    ((64, 4, 5), (64, 32)),
    ((3, 4, 5), (3, 4500)),
    ((200, 2, 3), (200, 17)),
    ((6, 1, 4), (6, 100)),
    ((6, 0, 4), (6, 100)),
    ((6, 3, 1), (6, 100)),
    ((2, 17, 19), (2, 300)),
    ((0, 3, 2), (0, 8)),
    ((3, 2), (4, 0)),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def case(wshape, xshape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(wshape, generator=gen)
    xs = [torch.randn(xshape, generator=gen).to(dtype) for _ in range(wshape[-1])]
    return w, xs


@pytest.mark.parametrize("wshape, xshape, dtype", [(*s, d) for s, d in itertools.product(SHAPES, DTYPES)])
def test_forward_and_gradients_match_the_definition(wshape, xshape, dtype):
    w, xs = case(wshape, xshape, dtype)
    w.requires_grad_()
    xs = [x.requires_grad_() for x in xs]
    out = sp.mix(w, xs)
    lead = len(wshape) - 2
    assert out.shape == (*xshape[:lead], wshape[-2], *xshape[lead:]) and out.dtype == dtype
    assert_close(out, oracle(w.detach(), [x.detach() for x in xs]).to(dtype))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, [w, *xs], grad)
    if out.numel() == 0:  # nothing was summed: zero gradients of the right shapes
        for g, t in zip(got, [w, *xs]):
            assert g.shape == t.shape and g.dtype == t.dtype and not g.any()
        return
    wd = w.detach().double().requires_grad_()
    xd = [x.detach().double().requires_grad_() for x in xs]
    want = torch.autograd.grad(oracle(wd, xd), [wd, *xd], grad.double())
    # The weights' gradient sums a whole row of products: a float32 sum's
    # rounding grows with the row, so its tolerance is relative to the sum
    # of the magnitudes.
    scale = max(1.0, float(xshape[-1]) ** 0.5) if dtype != torch.float64 else 1.0
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5,
                               atol=1e-5 * scale if dtype == torch.float32 else 1e-10 if dtype == torch.float64 else 0.1 * scale)
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b.to(dtype))


def test_stacked_inputs_give_the_same_result():
    w, xs = case((2, 3, 4), (2, 50), torch.float32)
    torch.testing.assert_close(sp.mix(w, torch.stack(xs)), sp.mix(w, xs), atol=0, rtol=0)


@pytest.mark.skipif(not COMPILED, reason="bits of the compiled kernels")
def test_one_output_is_weighted_sum_bit_for_bit():
    """M = 1 runs weighted_sum's kernels: the same bits, forward and backward,
    with rows cut into pieces and rows packed in a tile."""
    for wshape, xshape in [((3, 4, 5), (3, 4, 700)), ((1, 5), (9000,)), ((50, 1, 3), (50, 9))]:
        for dtype in (torch.float32, torch.bfloat16):
            w, xs = case(wshape[:-2] + (1, wshape[-1]), xshape, dtype)
            w.requires_grad_()
            xs = [x.requires_grad_() for x in xs]
            got = sp.mix(w, xs).squeeze(w.dim() - 2)
            want = sp.weighted_sum(w.squeeze(-2), xs)
            assert torch.equal(got, want)
            grad = torch.randn(want.shape).to(dtype)
            for a, b in zip(torch.autograd.grad(got, [w, *xs], grad), torch.autograd.grad(want, [w, *xs], grad)):
                assert torch.equal(a, b)


def test_non_contiguous_inputs_keep_their_layout():
    """Transposed (channels-last-like) inputs: the values of the definition;
    on the compiled path, the output laid out as the inputs, M inserted
    after the rows, with no copy of the inputs."""
    base = torch.randn(6, 10, 4)
    xs = [(base + k).transpose(1, 2) for k in range(3)]
    w = torch.randn(6, 2, 3)
    out = sp.mix(w, xs)
    assert out.shape == (6, 2, 4, 10)
    assert_close(out, oracle(w, xs).float())
    if COMPILED:
        assert out.stride() == (80, 40, 1, 4)


def test_zero_weights_do_not_read_their_input():
    """An input whose weights are all exactly 0 is not read (as weighted_sum:
    inf or NaN there does not reach the output) on the compiled path."""
    if not COMPILED:
        pytest.skip("the fallback multiplies 0 by every input")
    w = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    xs = [torch.ones(5), torch.full((5,), float("nan"))]
    assert torch.equal(sp.mix(w, xs), torch.tensor([[1.0] * 5, [0.5] * 5]))


def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(0)
    for wshape, xshape in [((2, 3, 4), (2, 5)), ((3, 4), (2, 3)), ((2, 1, 2, 3), (2, 1, 3))]:
        w = torch.randn(wshape, dtype=torch.float64, generator=gen, requires_grad=True)
        xs = [torch.randn(xshape, dtype=torch.float64, generator=gen, requires_grad=True)
              for _ in range(wshape[-1])]
        f = lambda w, *xs: sp.mix(w, xs)
        assert torch.autograd.gradcheck(f, (w, *xs))
        assert torch.autograd.gradgradcheck(f, (w, *xs))


def test_vmap_and_forward_mode():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    xs = [torch.randn(2, 5, dtype=torch.float64, generator=gen) for _ in range(4)]
    batched = torch.func.vmap(lambda w, x: sp.mix(w, x.unbind(0)))(w, torch.stack(xs, 1))
    torch.testing.assert_close(batched, oracle(w, xs))
    tangent = torch.randn_like(w)
    _, jvp = torch.func.jvp(lambda w: sp.mix(w, xs), (w,), (tangent,))
    torch.testing.assert_close(jvp, oracle(tangent, xs))


def test_compile_fullgraph_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 5, generator=gen, requires_grad=True)
    xs = [torch.randn(8, 64, generator=gen, requires_grad=True) for _ in range(5)]
    f = lambda w, *xs: sp.mix(w, xs)
    compiled = torch.compile(f, fullgraph=True)
    out, want = compiled(w, *xs), f(w, *xs)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [w, *xs], g), torch.autograd.grad(want, [w, *xs], g)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not COMPILED, reason="the compiled ops")
@pytest.mark.parametrize("wshape, xshape, dtype", [
    ((2, 3, 4), (2, 5), torch.float64), ((3, 4), (6, 7), torch.float32), ((2, 0, 3), (2, 5), torch.float32),
    ((4, 2, 3), (4, 3, 5), torch.bfloat16),
])
def test_opcheck(wshape, xshape, dtype):
    w, xs = case(wshape, xshape, dtype)
    w.requires_grad_()
    xs = [x.requires_grad_() for x in xs]
    torch.library.opcheck(torch.ops.simplex_param.mix.default, (w, xs))
    grad = torch.randn(sp.mix(w, xs).shape).to(dtype)
    torch.library.opcheck(torch.ops.simplex_param._mix_backward.default,
                          (grad, w.detach(), [x.detach() for x in xs], True, [True, False] + [True] * (len(xs) - 2)))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"weights must have shape \(M, K\) or \(\*P, M, K\).*got shape \[3\]"):
        sp.mix(torch.ones(3), [torch.ones(2)] * 3)
    with pytest.raises(ValueError, match="weights has 3 entries in its last dimension but inputs has 2 tensors"):
        sp.mix(torch.ones(2, 3), [torch.ones(2)] * 2)
    with pytest.raises(ValueError, match=r"weights has shape \[4, 2, 3\], but its leading dimensions must be the "
                                         r"first dimensions of the shape \[5, 2\] of inputs\[0\]"):
        sp.mix(torch.ones(4, 2, 3), [torch.ones(5, 2)] * 3)
    with pytest.raises(TypeError, match="weights must have a floating dtype"):
        sp.mix(torch.ones(2, 3, dtype=torch.long), [torch.ones(2)] * 3)
    with pytest.raises(TypeError, match=r"inputs\[1\] has dtype torch.float64"):
        sp.mix(torch.ones(2, 2), [torch.ones(2), torch.ones(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="inputs must contain at least one tensor"):
        sp.mix(torch.ones(2, 0), [])
    with pytest.raises(TypeError, match="weights must be a Tensor, got list"):
        sp.mix([[1.0]], [torch.ones(2)])


@pytest.mark.skipif(not COMPILED, reason="the compiled ops")
def test_backward_op_errors_name_the_argument():
    w, xs = case((2, 3, 4), (2, 5), torch.float32)
    bwd = torch.ops.simplex_param._mix_backward.default
    with pytest.raises(ValueError, match=r"grad has shape \[2, 3, 6\] but the mix of the inputs has shape \[2, 3, 5\]"):
        bwd(torch.ones(2, 3, 6), w, xs, True, [True] * 4)
    with pytest.raises(ValueError, match=r"the shape \[2, 5\] of grad"):
        bwd(torch.ones(2, 5), w, xs, True, [True] * 4)
    with pytest.raises(ValueError, match="inputs_requires_grad has 2 entries but weights has 4"):
        bwd(torch.ones(2, 3, 5), w, xs, True, [True] * 2)


def test_slices_and_expanded_inputs_as_hyper_connections_pass_them():
    """HyperConnections.post's call: the layer output and the n streams of a
    residual (tokens, n, C) as slices (on the compiled path, read in place),
    plus an input expanded over the tokens: the definition's values and
    gradients, and the output laid out as a residual."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        residual = torch.randn(6, 4, 3000, generator=gen).to(dtype).requires_grad_()
        bias = torch.randn(3000, generator=gen).to(dtype).requires_grad_()
        x = torch.randn(6, 3000, generator=gen).to(dtype).requires_grad_()
        w = torch.rand(6, 4, 6, generator=gen, requires_grad=True)
        inputs = [x, *residual.unbind(1), bias.expand(6, 3000)]
        out = sp.mix(w, inputs)
        assert out.shape == (6, 4, 3000) and out.is_contiguous()
        assert_close(out, oracle(w.detach(), [t.detach() for t in inputs]).to(dtype))
        g = torch.randn(out.shape, generator=gen).to(dtype)
        got = torch.autograd.grad(out, [w, x, residual, bias], g)
        leaves = [t.detach().double().requires_grad_() for t in (w, x, residual, bias)]
        want = torch.autograd.grad(
            oracle(leaves[0], [leaves[1], *leaves[2].unbind(1), leaves[3].expand(6, 3000)]), leaves, g.double())
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max().item())
