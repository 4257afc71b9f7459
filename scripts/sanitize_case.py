"""A small run of every CUDA kernel path, for compute-sanitizer (memcheck,
racecheck): each dtype, aligned and unaligned inputs, one and several
pointer chunks, forward and backward; then the grouped one-launch kernels
over groups of mixed sizes, dtypes and alignments. Exits non-zero on a wrong
result."""
import sys

import torch

import simplex_param as sp
from simplex_param import reference


def main():
    if not (torch.cuda.is_available() and sp.extension_loaded()):
        sys.exit("sanitize_case: needs a CUDA device and the compiled extension")
    torch.manual_seed(0)
    failures = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for K in (3, 17, 70):
            for shift in (0, 1):
                n = 1031
                base = torch.randn(K, n + shift, device="cuda", dtype=dtype, requires_grad=True)
                xs = [base[k, shift:] for k in range(K)]
                logits = torch.randn(K, device="cuda", requires_grad=True)
                out = sp.softmax_weighted_sum(logits, xs)
                expected = reference.softmax_weighted_sum(logits, xs)
                g = torch.randn_like(out)
                got = torch.autograd.grad(out, [logits, base], g)
                want = torch.autograd.grad(expected, [logits, base], g)
                tol = dict(rtol=2e-2, atol=2e-2)
                ok = torch.allclose(out.float(), expected.float(), **tol) and all(
                    torch.allclose(a.float(), b.float(), **tol) for a, b in zip(got, want)
                )
                if not ok:
                    failures += 1
                    print(f"sanitize_case: MISMATCH dtype={dtype} K={K} shift={shift}")
    cases = 24
    for K in (3, 17):
        cases += 1
        groups = []
        for g, (n, dtype) in enumerate([(1, torch.float32), (9000, torch.bfloat16), (1031, torch.float64),
                                        (5, torch.float16), (20000, torch.float32)]):
            shift = g % 2
            base = torch.randn(K, n + shift, device="cuda", dtype=dtype, requires_grad=True)
            groups.append([base[k, shift:] for k in range(K)])
        logits = torch.randn(len(groups), K, device="cuda", requires_grad=True)
        w = torch.softmax(logits, -1)
        outs = sp.grouped_weighted_sum(w, groups)
        members = [x for group in groups for x in group]
        gs = [torch.randn_like(o) for o in outs]
        got = torch.autograd.grad(outs, [logits, *members], gs, retain_graph=True)
        expected = [sp.weighted_sum(w[g], group) for g, group in enumerate(groups)]
        want = torch.autograd.grad(expected, [logits, *members], gs)
        if not all(torch.equal(a, b) for a, b in zip([*outs, *got], [*expected, *want])):
            failures += 1
            print(f"sanitize_case: MISMATCH grouped K={K}")
    torch.cuda.synchronize()
    print(f"sanitize_case: {cases - failures}/{cases} cases match the reference")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
