"""The CPU kernels' instruction-set paths, each forced through
SIMPLEX_PARAM_CPU_CAPABILITY in a fresh process: every path this CPU runs
gives bitwise the same outputs and gradients, and the forward equals the
reference bit for bit, bfloat16 rounding included (subnormal results and
NaN, where the native conversion differs from c10's, are patched)."""
import os
import subprocess
import sys

import pytest

import simplex_param as sp
from simplex_param import _ext

pytestmark = pytest.mark.skipif(not sp.extension_loaded(), reason="the compiled CPU kernels")

CAPABILITIES = ["default", "avx2", "avx512", "avx512_bf16"]

SCRIPT = r"""
import hashlib, torch, simplex_param as sp
from simplex_param import _ext, reference

def bits(t):
    t = t.detach().contiguous()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32 if t.element_size() == 4 else torch.int64)

gen = torch.Generator().manual_seed(0)
digest = hashlib.sha256()
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    # K = 19: a forward of two passes (16 inputs, then 3) and a backward of
    # three chunks (8, 8, 3), with one weight exactly 0.
    for (shape, rows), K in [(c, 5) for c in (((3000,), 0), ((7, 33, 5), 1), ((4, 5000), 1), ((2, 3, 4), 3),
                                              ((37,), 0))] + [(((4100,), 0), 19), (((3, 700), 1), 19)]:
        xs = [(10 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(K)]
        flat = xs[0].view(-1)
        flat[:3] = torch.tensor([float("nan"), -float("nan"), float("inf")]).to(dtype)
        if dtype in (torch.float32, torch.bfloat16):  # results below the smallest normal number
            for x in xs:
                x.view(-1)[3:20] = torch.full((17,), 3e-39).to(dtype)
        xs = [x.requires_grad_() for x in xs]
        logits = torch.randn(*shape[:rows], K, generator=gen)
        if K > 5:
            logits[..., 2] = -float("inf")
        logits.requires_grad_()
        out = sp.softmax_weighted_sum(logits, xs)
        # The op's own weights (its softmax: docs/numerics.md), read through
        # one-hot inputs, whose sums are exact.
        eye = torch.eye(K, dtype=reference.acc_dtype(dtype))
        w = sp.softmax_weighted_sum(logits.detach().to(eye.dtype), [e.expand(*shape[:rows], K) for e in eye])
        ref = reference.weighted_sum(w, [x.detach() for x in xs])
        # The same bits, NaN aside: torch's own bfloat16 NaN differs between
        # its scalar (0x7FC0, the kernels') and vector conversions (0xFFFF).
        nan = out.isnan()
        assert torch.equal(nan, ref.isnan()), (dtype, shape)
        assert torch.equal(bits(out)[~nan], bits(ref)[~nan]), (dtype, shape)
        grad = torch.randn(shape, generator=gen).to(dtype)
        if dtype in (torch.float32, torch.bfloat16) and K > 5:  # products NaN and below the smallest normal
            grad.view(-1)[-20:] = torch.tensor([float("nan")] + [3e-39] * 19).to(dtype)
        grads = torch.autograd.grad(out, [logits, *xs], grad)
        for t in (out, *grads):
            digest.update(bits(t).numpy().tobytes())
# Weights that are not finite: inf * 0 and NaN * g are NaN products, which
# each path must round alike (as c10 does).
for dtype in (torch.float32, torch.bfloat16):
    w = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0, -2.0, 0.5, 3.0, 1e-30])
    xs = [torch.randn(4100, generator=gen).to(dtype).requires_grad_() for _ in range(8)]
    grad = torch.randn(4100, generator=gen).to(dtype)
    grad[::3] = 0
    for t in torch.autograd.grad(sp.weighted_sum(w, xs), xs, grad):
        digest.update(bits(t).numpy().tobytes())
# mix: M outputs through the same kernels (shared and per-row matrices, rows
# in pieces, more than 16 inputs and outputs, a weight exactly 0).
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for wshape, shape in [((3, 4, 5), (3, 2100)), ((17, 19), (4100,)), ((40, 3, 2), (40, 9))]:
        w = torch.randn(wshape, generator=gen)
        w[..., 0, 1] = 0
        w.requires_grad_()
        xs = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(wshape[-1])]
        out = sp.mix(w, xs)
        grads = torch.autograd.grad(out, [w, *xs], torch.randn(out.shape, generator=gen).to(dtype))
        for t in (out, *grads):
            digest.update(bits(t).numpy().tobytes())
# HyperConnections' fused ops: projections with a column tail (n C not a
# multiple of 16) and token blocks cut short, forward and backward.
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for n, C, tokens in [(4, 37, 21), (3, 256, 17)]:
        hc = sp.HyperConnections(n, C)
        with torch.no_grad():
            hc.fn.copy_(torch.randn(hc.fn.shape, generator=gen) * 0.1)
            hc.scale.copy_(torch.rand(3, generator=gen) + 0.5)
            hc.base.copy_(torch.randn(n * (n + 2), generator=gen))
        residual = torch.randn(tokens, n, C, generator=gen).to(dtype).requires_grad_()
        x, mixes, _, _ = torch.ops.simplex_param.hc_pre(residual, hc.fn, hc.scale, hc.base, 1e-6, 1e-6)
        grads = torch.autograd.grad([x, mixes], [residual, *hc.parameters()],
                                    [torch.randn(x.shape, generator=gen).to(dtype), torch.randn(mixes.shape, generator=gen).to(mixes.dtype)])
        for t in (x, mixes, *grads):
            digest.update(bits(t).numpy().tobytes())
        f = torch.randn(tokens, C, generator=gen).to(dtype).requires_grad_()
        post = torch.rand(tokens, n, generator=gen).to(mixes.dtype).requires_grad_()
        h = torch.rand(tokens, n, n, generator=gen).to(mixes.dtype).requires_grad_()
        out = torch.ops.simplex_param.hc_post(f, residual, post, h)
        for t in (out, *torch.autograd.grad(out, [f, residual, post, h], torch.randn(out.shape, generator=gen).to(dtype))):
            digest.update(bits(t).numpy().tobytes())
print(_ext.MODULE.cpu_capability(), digest.hexdigest())
"""


def run(capability, **extra):
    env = dict(os.environ, SIMPLEX_PARAM_CPU_CAPABILITY=capability, **extra)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_every_path_gives_the_same_bits():
    supported = _ext.MODULE.cpu_capabilities()
    assert supported[0] == "default" and set(supported) <= set(CAPABILITIES)
    results = {}
    for capability in CAPABILITIES:
        if capability not in supported:
            continue
        proc = run(capability)
        assert proc.returncode == 0, proc.stderr[-3000:]
        name, digest = proc.stdout.split()
        assert name == capability
        results[name] = digest
    assert len(set(results.values())) == 1, results


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_path_or_skip_and_its_non_temporal_stores(capability):
    """Each path, and the same path with every store non-temporal (as for
    outputs beyond the last-level cache): the same bits."""
    if capability not in _ext.MODULE.cpu_capabilities():
        pytest.skip(f"this CPU does not run {capability}")
    proc = run(capability)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == capability
    streamed = run(capability, SIMPLEX_PARAM_STREAM_BYTES="0")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert streamed.stdout == proc.stdout


def test_best_path_by_default_and_a_clear_error_for_an_unknown_one():
    env = {k: v for k, v in os.environ.items() if k != "SIMPLEX_PARAM_CPU_CAPABILITY"}
    code = "from simplex_param import _ext; print(_ext.MODULE.cpu_capability(), _ext.MODULE.cpu_capabilities()[-1])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    active, best = proc.stdout.split()
    assert active == best
    proc = run("sse9")
    assert proc.returncode != 0
    assert "SIMPLEX_PARAM_CPU_CAPABILITY=sse9 is not an instruction set this CPU runs" in proc.stderr


def test_memory_streams_is_checked():
    """SIMPLEX_PARAM_MEMORY_STREAMS, the input streams per pass of a forward
    whose inputs exceed the last-level cache (docs/usage.md): a bad value is
    an error that names it, at the first call; a good one runs."""
    code = ("import torch, simplex_param as sp; "
            "print(sp.weighted_sum(torch.tensor([0.25, 0.75]), [torch.ones(3), torch.zeros(3)]).tolist())")

    def call(value):
        env = dict(os.environ, SIMPLEX_PARAM_MEMORY_STREAMS=value)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    for value in ("0", "eight"):
        proc = call(value)
        assert proc.returncode != 0
        assert f"SIMPLEX_PARAM_MEMORY_STREAMS={value} must be a whole number from 1 to 16" in proc.stderr
    proc = call("8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[0.25, 0.25, 0.25]"
