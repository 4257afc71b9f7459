"""sp.sinkhorn and sp.Birkhoff, checked against mHC's Sinkhorn written out
from its definition (TileLang's examples/deepseek_mhc reference), and the
fused op (simplex_param::sinkhorn, csrc/cpu/sinkhorn_cpu.cpp) against the
composite of PyTorch ops it replaces."""
import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrize

import simplex_param as sp

from conftest import COMPILED

sinkhorn_module = importlib.import_module("simplex_param.sinkhorn")
# Whether sp.sinkhorn runs the fused op on CPU tensors ("unroll" and "recompute" alike).
KERNEL = "cpu" in sinkhorn_module._KERNEL_DEVICES


def oracle(x, iters, eps):
    """mHC's sinkhorn, step by step, from its definition."""
    x = x.softmax(-1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


BACKWARDS = ["unroll", "recompute", "implicit"]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_matches_the_definition(backward, iters):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sp.sinkhorn(x, iters=iters, backward=backward), oracle(x, iters, 1e-6),
                               rtol=0, atol=1e-15)


def test_doubly_stochastic_at_the_default():
    torch.manual_seed(0)
    h = sp.sinkhorn(torch.randn(64, 4, 4))
    torch.testing.assert_close(h.sum(-2), torch.ones(64, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.sum(-1), torch.ones(64, 4), atol=1e-3, rtol=0)
    assert bool((h > 0).all())


def test_softmax_subtracts_the_row_maximum():
    # Logits of 1000 overflow exp() without the row maximum subtracted.
    x = torch.tensor([[1000.0, 999.0], [0.0, 1.0]])
    h = sp.sinkhorn(x)
    assert bool(torch.isfinite(h).all())
    torch.testing.assert_close(h, oracle(x.double(), 20, 1e-6).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_logits_are_computed_in_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 4).to(dtype)
    h = sp.sinkhorn(x)
    assert h.dtype == dtype
    assert torch.equal(h, oracle(x.float(), 20, 1e-6).to(dtype))


def test_float64_stays_float64():
    x = torch.randn(4, 4, dtype=torch.float64)
    assert sp.sinkhorn(x).dtype == torch.float64
    if KERNEL:  # another order of operations than the composite's: within the target
        torch.testing.assert_close(sp.sinkhorn(x), oracle(x, 20, 1e-6), rtol=0, atol=1e-12)
    else:
        assert torch.equal(sp.sinkhorn(x), oracle(x, 20, 1e-6))


@pytest.mark.parametrize("iters", [1, 7])
def test_recompute_gradients_are_bitwise_those_of_unroll(iters):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 5, requires_grad=True)
    g = torch.randn(3, 5, 5)
    want = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="recompute"), x, g)[0]
    assert torch.equal(got, want)


def test_bfloat16_gradients_of_recompute_and_unroll_agree_bitwise():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 4).bfloat16().requires_grad_()
    g = torch.randn(6, 4, 4).bfloat16()
    want = torch.autograd.grad(sp.sinkhorn(x, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, backward="recompute"), x, g)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def implicit_error(iters):
    torch.manual_seed(0)
    x = (2 * torch.randn(16, 4, 4, dtype=torch.float64)).requires_grad_()
    g = torch.randn(16, 4, 4, dtype=torch.float64)
    want = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="implicit"), x, g)[0]
    return float((got - want).abs().max() / want.abs().max())


def test_implicit_error_shrinks_with_iters():
    e10, e40 = implicit_error(10), implicit_error(40)
    assert e40 < e10 / 10, (e10, e40)
    assert e40 < 1e-3  # measured: 4.6e-2 at 10, 1.1e-2 at 20, 4.5e-4 at 40, 1.7e-6 (the eps floor) from 80


def saved_bytes(backward, iters):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.randn(32, 4, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sp.sinkhorn(x, iters=iters, backward=backward)
    y.sum().backward()
    return total


@pytest.mark.parametrize("backward", ["recompute", "implicit"])
def test_saved_memory_does_not_grow_with_iters(backward):
    assert saved_bytes(backward, 20) <= 1.2 * saved_bytes(backward, 1)
    assert saved_bytes(backward, 20) > 0


def test_unroll_saves_every_iterate():
    if KERNEL:
        # The fused op is the same node for both modes: the logits only.
        assert saved_bytes("unroll", 20) == saved_bytes("recompute", 20)
    else:
        assert saved_bytes("unroll", 20) > 10 * saved_bytes("unroll", 1)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck(backward):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    # "implicit" is the derivative of the converged projection: let it converge.
    iters = 200 if backward == "implicit" else 5
    kwargs = dict(atol=1e-5) if backward == "implicit" else {}
    assert gradcheck(lambda t: sp.sinkhorn(t, iters=iters, eps=0.0 if backward == "implicit" else 1e-6,
                                           backward=backward), (x,), **kwargs)


@pytest.mark.parametrize("backward", ["unroll", "recompute"])
def test_gradgradcheck(backward):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: sp.sinkhorn(t, iters=4, backward=backward), (x,))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compile_fullgraph(backward):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, requires_grad=True)
    f = torch.compile(lambda t: sp.sinkhorn(t, backward=backward).square().sum(), fullgraph=True)
    f(x).backward()
    xr = x.detach().requires_grad_()
    sp.sinkhorn(xr, backward=backward).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_vmap_and_grad(backward):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 4, dtype=torch.float64)
    f = lambda t: sp.sinkhorn(t, iters=30, backward=backward)[0].square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(f))(x)
    want = torch.stack([torch.func.grad(lambda t: oracle(t, 30, 1e-6)[0].square().sum())(t) for t in x])
    torch.testing.assert_close(got, want, atol=1e-4 if backward == "implicit" else 1e-12, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(logits=torch.zeros(3, 4)), "logits must have square last two dimensions"),
    (dict(logits=torch.zeros(4)), "logits must have square last two dimensions"),
    (dict(iters=0), "iters must be an int >= 1, got 0"),
    (dict(iters=2.0), "iters must be an int >= 1, got float"),
    (dict(eps=-1e-6), "eps must be a finite float >= 0"),
    (dict(backward="adjoint"), "backward must be one of 'unroll', 'recompute', 'implicit', got 'adjoint'"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(logits=torch.zeros(3, 3), iters=20, eps=1e-6, backward="recompute") | bad
    logits = args.pop("logits")
    with pytest.raises((ValueError, TypeError), match=match):
        sp.sinkhorn(logits, **args)


# --- the fused op against the composite ----------------------------------------
#
# sp.sinkhorn runs the fused op where it can (KERNEL); sinkhorn_module._forward
# is the composite of PyTorch ops, the fallback. On the fallback path these
# tests compare the composite with itself.

SIZES = [1, 2, 3, 4, 8, 16, 17]
KERNEL_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
BATCHES = [(), (5,), (2, 3), (0,), (33,)]

# (rtol, atol) of the fused op against the composite, in one place. The
# forward: the targets (1e-6, 1e-12); float32 measured 1.5e-7 at
# most. bfloat16 results are float32 ones rounded, so one bfloat16 ulp
# (2^-8 relative) apart at most. The gradients: float32 measured 4e-7 of the
# largest entry; atol is relative to it (grad_scale).
FORWARD_TOL = {torch.float32: (0.0, 1e-6), torch.float64: (0.0, 1e-12), torch.bfloat16: (2 ** -8, 1e-5)}
GRAD_TOL = {torch.float32: (1e-5, 2e-6), torch.float64: (1e-10, 1e-12), torch.bfloat16: (2 ** -7, 2 ** -8)}


def composite(x, iters=20, eps=1e-6):
    return sinkhorn_module._forward(x.to(sinkhorn_module._compute_dtype(x.dtype)), iters, eps).to(x.dtype)


def sample_inputs(requires_grad=False, dtypes=KERNEL_DTYPES, sizes=SIZES, batches=BATCHES):
    """(logits, grad) cases shared by the comparison and opcheck tests:
    contiguous, and a transposed (non-contiguous) view."""
    gen = torch.Generator().manual_seed(0)
    for dtype, n, batch in itertools.product(dtypes, sizes, batches):
        x = (2 * torch.randn(*batch, n, n, generator=gen)).to(dtype)
        g = torch.randn(*batch, n, n, generator=gen).to(dtype)
        yield x.requires_grad_(requires_grad), g
    x = torch.randn(4, 5, 5, generator=gen).mT
    yield x.requires_grad_(requires_grad), torch.randn(4, 5, 5, generator=gen)


@pytest.mark.parametrize("backward", ["unroll", "recompute"])
def test_kernel_matches_the_composite(backward, device):
    for x, g in sample_inputs(requires_grad=True):
        x, g = x.detach().to(device).requires_grad_(), g.to(device)
        y = sp.sinkhorn(x, backward=backward)
        want = composite(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        rtol, atol = FORWARD_TOL[x.dtype]
        torch.testing.assert_close(y, want, rtol=rtol, atol=atol, msg=lambda m: f"{x.dtype} {list(x.shape)}: {m}")
        if x.numel() == 0:
            continue
        got_g = torch.autograd.grad(y, x, g)[0]
        want_g = torch.autograd.grad(want, x, g)[0]
        scale = float(want_g.abs().max().float()) or 1.0
        rtol, atol = GRAD_TOL[x.dtype]
        torch.testing.assert_close(got_g, want_g, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"grad {x.dtype} {list(x.shape)}: {m}")


@pytest.mark.parametrize("iters", [1, 2, 7])
@pytest.mark.parametrize("n", [2, 4, 17])
def test_kernel_forward_and_gradient_equal_the_oracle(iters, n):
    """The issue's targets, float64: within 1e-12 of the formula, gradients too."""
    torch.manual_seed(n)
    x = torch.randn(9, n, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, n, n, dtype=torch.float64)
    for backward in ("unroll", "recompute"):
        y = sp.sinkhorn(x, iters=iters, backward=backward)
        want = oracle(x, iters, 1e-6)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0],
                                   rtol=0, atol=1e-12)


def test_kernel_eps_zero_and_extreme_logits():
    x = torch.tensor([[[1000.0, -1000.0], [0.0, 0.0]], [[-float("inf"), 0.0], [0.0, 1.0]]])
    for eps in (0.0, 1e-6):
        y = sp.sinkhorn(x, eps=eps)
        torch.testing.assert_close(y, oracle(x.double(), 20, eps).float(), rtol=0, atol=1e-6)


@pytest.mark.skipif(not COMPILED, reason="the compiled kernels")
def test_kernel_is_deterministic_across_threads():
    torch.manual_seed(0)
    x = torch.randn(5000, 4, 4)
    g = torch.randn(5000, 4, 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append((torch.ops.simplex_param.sinkhorn(x, 20, 1e-6),
                            torch.ops.simplex_param._sinkhorn_backward(g, x, 20, 1e-6)))
    finally:
        torch.set_num_threads(threads)
    for y, gx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(gx, results[0][1])


ISA_SCRIPT = r"""
import hashlib, torch, simplex_param as sp
digest = hashlib.sha256()
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64):
    for n in (1, 3, 4, 16, 17):
        x = torch.randn(37, n, n, generator=gen).to(dtype)
        g = torch.randn(37, n, n, generator=gen).to(dtype)
        for t in (torch.ops.simplex_param.sinkhorn(x, 5, 1e-6), torch.ops.simplex_param._sinkhorn_backward(g, x, 5, 1e-6)):
            digest.update(t.numpy().tobytes())
print(sp.cpu_capability(), digest.hexdigest())
"""


@pytest.mark.skipif(not COMPILED, reason="the compiled kernels")
def test_kernel_every_instruction_set_gives_the_same_bits():
    digests = set()
    for capability in sp._ext.MODULE.cpu_capabilities():
        env = dict(os.environ, SIMPLEX_PARAM_CPU_CAPABILITY=capability)
        proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.add(proc.stdout.split()[1])
    assert len(digests) == 1


DTENSOR_SCRIPT = r"""
import os, socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
from torch.distributed.tensor import DTensor, Shard, init_device_mesh
import simplex_param as sp
torch.manual_seed(0)
x = torch.randn(8, 4, 4, requires_grad=True)
dx = DTensor.from_local(x.detach().clone(), init_device_mesh("cpu", (1,)), [Shard(0)]).requires_grad_()
y = sp.sinkhorn(dx)
assert isinstance(y, DTensor)
y.sum().backward()
sp.sinkhorn(x).sum().backward()
torch.testing.assert_close(y.full_tensor(), sp.sinkhorn(x).detach(), rtol=0, atol=1e-6)
torch.testing.assert_close(dx.grad.full_tensor(), x.grad, rtol=1e-5, atol=1e-6)
dist.destroy_process_group()
print("ok")
"""


def test_dtensor_logits_run_the_composite():
    """A DTensor (no sharding rule for the fused op) runs the composite."""
    proc = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, device):
    from torch.library import opcheck

    cases = sample_inputs(requires_grad, dtypes=[torch.float32, torch.float64], sizes=[1, 4, 17],
                          batches=[(), (3,), (0,)])
    for x, g in cases:
        x, g = x.detach().to(device).requires_grad_(requires_grad), g.to(device)
        opcheck(torch.ops.simplex_param.sinkhorn.default, (x, 3, 1e-6))
        if not requires_grad:
            opcheck(torch.ops.simplex_param._sinkhorn_backward.default, (g.to(x.dtype), x, 3, 1e-6))


@pytest.mark.parametrize("n", [1, 4, 17])
def test_gradcheck_and_gradgradcheck_of_the_kernel_sizes(n):
    torch.manual_seed(0)
    x = torch.randn(2, n, n, dtype=torch.float64, requires_grad=True)
    f = lambda t: sp.sinkhorn(t, iters=3, backward="recompute")  # noqa: E731
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def test_compile_fullgraph_forward_and_gradient_match_eager():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 4, requires_grad=True)
    g = torch.randn(64, 4, 4)
    f = torch.compile(lambda t: sp.sinkhorn(t, iters=20), fullgraph=True)
    y = f(x)
    gx = torch.autograd.grad(y, x, g)[0]
    xr = x.detach().requires_grad_()
    yr = sp.sinkhorn(xr, iters=20)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, torch.autograd.grad(yr, xr, g)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not COMPILED, reason="the compiled ops' own checks")
@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3, 4), 20, 1e-6), ValueError, "logits must have square last two dimensions"),
    ((torch.zeros(4), 20, 1e-6), ValueError, "logits must have square last two dimensions"),
    ((torch.zeros(3, 3), 0, 1e-6), ValueError, "iters must be an int >= 1, got 0"),
    ((torch.zeros(3, 3), 20, -1e-6), ValueError, "eps must be a finite float >= 0"),
    ((torch.zeros(3, 3), 20, float("inf")), ValueError, "eps must be a finite float >= 0"),
    ((torch.zeros(3, 3, dtype=torch.int64), 20, 1e-6), TypeError, "logits must be a floating tensor"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # the kernel, and the fake's checks
def test_op_errors_name_the_argument(args, error, match, device):
    x, iters, eps = args
    with pytest.raises(error, match=match):
        torch.ops.simplex_param.sinkhorn(x.to(device), iters, eps)
    with pytest.raises(error, match=match):
        torch.ops.simplex_param._sinkhorn_backward(x.to(device), x.to(device), iters, eps)


@pytest.mark.skipif(not COMPILED, reason="the compiled ops' own checks")
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_op_errors_name_the_argument(device):
    x = torch.zeros(2, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"grad has shape \[3, 3\] but logits has shape \[2, 3, 3\]"):
        torch.ops.simplex_param._sinkhorn_backward(torch.zeros(3, 3, device=device), x, 20, 1e-6)
    with pytest.raises(TypeError, match="grad has dtype"):
        torch.ops.simplex_param._sinkhorn_backward(x.double(), x, 20, 1e-6)


# --- Birkhoff ---------------------------------------------------------------

def test_birkhoff_gives_doubly_stochastic_weights_and_trains():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff())
    w = m.weight
    torch.testing.assert_close(w.sum(-2), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(4), atol=1e-3, rtol=0)
    m(torch.randn(2, 4)).sum().backward()
    assert m.parametrizations.weight.original.grad is not None


def test_birkhoff_fresh_values_are_logits():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3, bias=False)
    before = m.weight.detach().clone()
    parametrize.register_parametrization(m, "weight", sp.Birkhoff())
    assert torch.equal(m.parametrizations.weight.original, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_birkhoff_right_inverse_reproduces_a_doubly_stochastic_matrix(dtype):
    torch.manual_seed(0)
    # A convex combination of permutation matrices (Birkhoff-von Neumann), all entries positive.
    n = 4
    perms = [torch.eye(n)[torch.randperm(n)] for _ in range(6)] + [torch.full((n, n), 1.0 / n)]
    c = torch.softmax(torch.randn(len(perms)), 0)
    target = sum(ci * p for ci, p in zip(c, perms)).to(dtype)
    target = target.expand(2, n, n).clone()
    m = torch.nn.Module()
    m.h = torch.nn.Parameter(torch.randn(2, n, n, dtype=dtype))
    parametrize.register_parametrization(m, "h", sp.Birkhoff())
    m.h = target
    torch.testing.assert_close(m.h, target, atol=1e-5, rtol=0)


def test_birkhoff_rejects_non_finite_and_non_square():
    m = torch.nn.Module()
    m.h = torch.nn.Parameter(torch.randn(3, 3))
    parametrize.register_parametrization(m, "h", sp.Birkhoff())
    with pytest.raises(ValueError, match="NaN or inf"):
        m.h = torch.full((3, 3), float("nan"))
    m2 = torch.nn.Module()
    m2.h = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="square last two dimensions"):
        parametrize.register_parametrization(m2, "h", sp.Birkhoff())


def test_birkhoff_summary_reports_row_and_column_deviation():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff(iters=3))
    (record,) = sp.summary(m)
    w = m.weight.detach().double()
    assert record.kind == "Birkhoff"
    assert record.row_error == pytest.approx(float((w.sum(-1) - 1).abs().max()))
    assert record.col_error == pytest.approx(float((w.sum(-2) - 1).abs().max()))
    assert "rows" in str(sp.summary(m)) and "cols" in str(sp.summary(m))


def test_implicit_forward_mode_is_the_converged_derivative():
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    t = torch.randn(3, 4, 4, dtype=torch.float64)
    _, want = torch.func.jvp(lambda z: oracle(z, 300, 0.0), (x,), (t,))
    with fwAD.dual_level():
        y = sp.sinkhorn(fwAD.make_dual(x.clone().requires_grad_(), t), iters=300, eps=0.0, backward="implicit")
        got = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_birkhoff_weight_logger_csv_reads_back_equal(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff(iters=3))
    logger = sp.WeightLogger(m, csv=tmp_path / "w.csv")
    with torch.no_grad():
        m.parametrizations.weight.original.add_(torch.randn(4, 4))
    logger.step()
    assert logger.history[-1][1][0].row_error is not None
    assert sp.WeightLogger.read_csv(tmp_path / "w.csv") == logger.history
