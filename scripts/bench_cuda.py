"""GPU benchmark of the fused operators: the achieved fraction of the
device-to-device copy bandwidth measured in the same run, for the forward and
for forward+backward, against the eager recipe (simplex_param.reference) and
torch.compile of that recipe.

Bytes counted per call (s = element size, n = elements per input):
forward (K + 1) n s (K reads, one write); forward+backward adds
(2K + 1) n s (read the gradient and the K inputs, write K input gradients).
Copy bandwidth is 2 * bytes / time of ``dst.copy_(src)``. Times are medians
of CUDA-event timings. Nothing here is asserted: the numbers are recorded.

Usage: python scripts/bench_cuda.py [--out bench.md] [--no-compile] [--reps N]
"""
import argparse
import statistics
import sys
import time
import warnings

import torch

import simplex_param as sp
from simplex_param import reference

MB = 1 << 20


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes, reps):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3)


def recipe(logits, xs):
    return reference.softmax_weighted_sum(logits, xs)


def bench_case(dtype, K, n, reps, with_compile):
    torch.manual_seed(0)
    xs = [torch.randn(n, device="cuda", dtype=dtype, requires_grad=True) for _ in range(K)]
    logits = torch.randn(K, device="cuda", requires_grad=True)
    g = torch.randn(n, device="cuda", dtype=dtype)
    leaves = [logits, *xs]
    s = xs[0].element_size()
    fwd_bytes = (K + 1) * n * s
    bwd_bytes = (2 * K + 1) * n * s
    impls = {"fused": sp.softmax_weighted_sum, "eager": recipe}
    if with_compile:
        # A fresh cache per case: no recompile limit, no dynamic shapes.
        torch._dynamo.reset()
        impls["compile"] = torch.compile(recipe, dynamic=False)
    rows = []
    for name, f in impls.items():
        with torch.no_grad():
            fwd = median_ms(lambda: f(logits, xs), reps)
        both = median_ms(lambda: torch.autograd.grad(f(logits, xs), leaves, g), reps)
        rows.append((name, fwd, fwd_bytes / (fwd * 1e-3), both, (fwd_bytes + bwd_bytes) / (both * 1e-3)))
    return fwd_bytes, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report (markdown) here")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: no CUDA device")
    warnings.filterwarnings("ignore")
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"device: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"compiled extension: {sp.extension_loaded()}",
    ]
    copy_bw = copy_bandwidth(512 * MB, args.reps)
    lines.append(f"device-to-device copy of 512 MiB: {copy_bw / 1e9:.0f} GB/s (read + write)")
    # Working sets of the forward >= 256 MiB; (dtype, K, n, with torch.compile).
    cases = [
        (torch.float32, 8, 1 << 23, True),
        (torch.bfloat16, 8, 1 << 24, True),
        (torch.float32, 32, 1 << 21, False),
    ]
    lines += [
        "",
        "| dtype | K | n | fwd MiB | impl | fwd ms | fwd GB/s | fwd / copy | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd / copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, K, n, with_compile in cases:
        t0 = time.time()
        fwd_bytes, rows = bench_case(dtype, K, n, args.reps, with_compile and not args.no_compile)
        for name, fwd, fwd_bw, both, both_bw in rows:
            lines.append(
                f"| {str(dtype).replace('torch.', '')} | {K} | {n} | {fwd_bytes / MB:.0f} | {name} | "
                f"{fwd:.3f} | {fwd_bw / 1e9:.0f} | {fwd_bw / copy_bw:.1%} | "
                f"{both:.3f} | {both_bw / 1e9:.0f} | {both_bw / copy_bw:.1%} |"
            )
        print(f"bench_cuda: {dtype} K={K} n={n} done in {time.time() - t0:.0f} s", file=sys.stderr)
        torch.cuda.empty_cache()
        # Written after every case, so a run cut short keeps what it measured.
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
