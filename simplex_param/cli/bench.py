r"""Benchmark of the fused operator against what users would otherwise write.

``python -m simplex_param bench`` times :func:`simplex_param.softmax_weighted_sum`
and four contenders on the cases the library is meant for, forward and
forward+backward, in float32 and bfloat16, and reports each time as a ratio to
the *floor*: the time of a plain memory copy moving as many bytes as the
operator must move, measured in the same run.

The op is memory bound. Its forward reads K inputs and writes one output,
:math:`(K+1)N` elements; its backward reads the gradient and the K inputs and
writes K gradients, :math:`(2K+1)N` elements. The floor of ``B`` moved bytes is
the time of ``dst.copy_(src)`` with ``src`` and ``dst`` of ``B/2`` bytes each
(it reads ``B/2`` and writes ``B/2``).

Times are medians over ``--repeats`` samples, taken round-robin across the
contenders so that a noisy neighbour slows them alike, after a warm-up. Each
sample times enough calls to last a few milliseconds. The peak extra memory
of one call is measured: on CPU from the allocations recorded by
:mod:`torch.profiler` (``profile_memory=True``), on CUDA with
:func:`torch.cuda.max_memory_allocated`.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from simplex_param import MixedOp, cpu_capability, extension_loaded, reference, softmax_weighted_sum

from . import bench_grouped, bench_mhc, timing
from .bench_grouped import GROUPED_CONTENDERS, GROUPED_SETS
from .bench_mhc import MHC_CONTENDERS, MHC_SETS
from .timing import median_times, peak_extra_bytes, sync

__all__ = ["main", "add_arguments", "run", "run_benchmark"]


@dataclass(frozen=True)
class Case:
    name: str
    K: int
    shape: tuple  # None: sized to the last-level cache (beyond_cache_shape)
    rows: int = 0  # leading dims of `shape` with a weight row each: logits (*shape[:rows], K)
    zeros: int = 0  # logits set to -inf: inputs of weight 0, which the fused op does not read


CASES = [
    Case("multimodal", 3, (256, 512)),
    Case("darts", 8, (64, 16, 32, 32)),
    Case("scalar-mix-13", 13, (32, 128, 768)),
    Case("scalar-mix-25", 25, (8, 128, 1024)),
    Case("model-soup", 8, (4 * 2**20,)),
    # Per-token weights: a gating network's (B, T, K) logits over K streams.
    Case("per-token", 8, (32, 128, 768), rows=2),
    # A model soup with 6 of its 8 members at weight 0 (-inf logits).
    Case("soup-2-of-8", 8, (4 * 2**20,), zeros=6),
    # The forward's working set at least 4x the last-level cache, whatever
    # the machine (capped by the free memory): its floor is the memory's.
    Case("beyond-cache", 8, None),
]
BEYOND_CACHE_FACTOR = 4
QUICK_CASES = ["multimodal", "darts"]
# A small DARTS-style search cell: one training step, soft against hard MixedOp.
SEARCH = "search-cell"
# The host cost of one call on tiny tensors: K, elements per input.
OVERHEAD = "overhead"
OVERHEAD_SIZES = [(3, 4), (3, 4096), (8, 4), (8, 4096)]
OVERHEAD_CONTENDERS = ("fused", "eager", "stack+tensordot")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
CONTENDERS = ("fused", "eager", "stack+tensordot", "compile", "reference")


# --------------------------------------------------------------------------
# Contenders: each a function (logits, xs) -> output.
# --------------------------------------------------------------------------

def _eager(logits, xs):
    """The recipe users write: softmax, then one product and one sum per input.
    Per-row logits (*P, K) are broadcast over the inputs' trailing dimensions."""
    w = torch.softmax(logits, -1)
    if logits.dim() == 1:
        return sum(wk * x for wk, x in zip(w, xs))
    row_shape = logits.shape[:-1] + (1,) * (xs[0].dim() - logits.dim() + 1)
    return sum(w[..., k].reshape(row_shape) * x for k, x in enumerate(xs))


def _stack_tensordot(logits, xs):
    """Stack the inputs, then one contraction: tensordot, or einsum per row."""
    w = torch.softmax(logits, -1).to(xs[0].dtype)
    if logits.dim() == 1:
        return torch.tensordot(w, torch.stack(xs), dims=1)
    K, rows = len(xs), w[..., 0].numel()
    stacked = torch.stack(xs).reshape(K, rows, -1)
    return torch.einsum("rk,krd->rd", w.reshape(rows, K), stacked).reshape(xs[0].shape)


def _contender(name):
    if name == "fused":
        return softmax_weighted_sum
    if name == "eager":
        return _eager
    if name == "stack+tensordot":
        return _stack_tensordot
    if name == "compile":
        return torch.compile(_eager, dynamic=False)
    if name == "reference":
        return reference.softmax_weighted_sum
    raise ValueError(f"unknown contender {name!r}")


def _step(fn, logits, xs, grad):
    """One call of `fn`: the forward alone (grad is None) or forward+backward."""
    if grad is None:
        return lambda: fn(logits, xs)
    leaves = [logits, *xs]
    return lambda: torch.autograd.grad(fn(logits, xs), leaves, grad)


# --------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------

def last_level_cache_bytes():
    """The size of the largest cache of CPU 0, from sysfs (else glibc's
    sysconf), or None when neither says."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
            sizes.append(int(text.rstrip("KMGkmg")) * scale)
    if not sizes:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            sizes.append(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
    return max(sizes) if sizes and max(sizes) > 0 else None


def available_memory_bytes():
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def beyond_cache_shape(K, element_size):
    """Inputs whose forward working set, (K + 1) arrays, is BEYOND_CACHE_FACTOR
    times the last-level cache (32 MiB assumed when unknown), capped so that
    the biggest step (4K + 4 arrays, the floor's buffers included) takes at
    most half the free memory."""
    llc = last_level_cache_bytes() or 32 * 2**20
    n = math.ceil(BEYOND_CACHE_FACTOR * llc / ((K + 1) * element_size))
    free = available_memory_bytes()
    if free is not None:
        n = min(n, free // 2 // ((4 * K + 4) * element_size))
    return (n,)


def _moved_elements(K, n, mode):
    fwd = (K + 1) * n
    return fwd if mode == "fwd" else fwd + (2 * K + 1) * n


def run_one(case, dtype, mode, contenders, repeats, device, target_s, log=None):
    """Times `contenders` and the floor on one case; returns a result dict."""
    gen = torch.Generator().manual_seed(0)
    shape = case.shape or beyond_cache_shape(case.K, torch.empty((), dtype=dtype).element_size())
    n = math.prod(shape)
    need_grad = mode != "fwd"
    logits = torch.randn(*shape[: case.rows], case.K, generator=gen)
    logits[..., : case.zeros] = -math.inf
    logits = logits.to(device).requires_grad_(need_grad)
    xs = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(need_grad) for _ in range(case.K)]
    grad = torch.randn(shape, generator=gen).to(device, dtype) if need_grad else None

    # The bytes the op must move: inputs of weight 0 need not be read.
    moved = _moved_elements(case.K - case.zeros, n, mode) * xs[0].element_size()
    src = torch.ones(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    steps = {"floor": lambda: dst.copy_(src)}
    compile_s = None
    for name in contenders:
        if name == "compile":
            # A cold compile: no graphs kept from earlier cases, no on-disk caches.
            from torch._functorch import config as functorch_config
            from torch._inductor import config as inductor_config

            torch._dynamo.reset()
            t0 = time.perf_counter()
            step = _step(_contender(name), logits, xs, grad)
            with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                    functorch_config.patch(enable_autograd_cache=False):
                step()
            sync(device)
            compile_s = time.perf_counter() - t0
        else:
            step = _step(_contender(name), logits, xs, grad)
        steps[name] = step

    faults = {}
    times = median_times(steps, repeats, device, target_s, faults)
    del src, dst
    steps.pop("floor")

    floor = times["floor"]
    result = {
        "case": case.name,
        "K": case.K,
        "shape": list(shape),
        "weights_shape": list(logits.shape),
        "numel": n,
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "moved_bytes": moved,
        "floor_s": floor,
        "contenders": {},
    }
    for name, step in steps.items():
        entry = {
            "time_s": times[name],
            "ratio": times[name] / floor,
            "peak_bytes": peak_extra_bytes(step, device),
            "page_faults": faults[name],
        }
        if name == "compile":
            entry["compile_s"] = compile_s
        result["contenders"][name] = entry
    if log:
        log(_row(result, contenders))
    return result


def run_overhead(contenders, repeats, device, target_s, log=None):
    """The host cost of one call: float32 inputs of 4 and 4096 elements, where
    the time is Python, dispatch and autograd rather than memory traffic.
    Modes: the forward under no_grad, the forward building the graph
    (``fwd``), and forward+backward as in :func:`run_one`. Ratios are to the
    eager recipe's time in the same mode."""
    contenders = [c for c in OVERHEAD_CONTENDERS if c in contenders or c == "eager"]
    if log:
        log(f"\n{OVERHEAD}: time per call on tiny inputs (us, ratio to eager)")
        log(f"{'K':>3}{'numel':>7} {'mode':<12}" + "".join(f"{n:>22}" for n in contenders))
    rows = []
    for K, n in OVERHEAD_SIZES:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(K, generator=gen).to(device).requires_grad_()
        xs = [torch.randn(n, generator=gen).to(device).requires_grad_() for _ in range(K)]
        grad = torch.randn(n, generator=gen).to(device)
        for mode in ("fwd no_grad", "fwd", "fwd+bwd"):
            steps = {}
            for name in contenders:
                step = _step(_contender(name), logits, xs, grad if mode == "fwd+bwd" else None)
                steps[name] = _no_grad(step) if mode == "fwd no_grad" else step
            times = median_times(steps, repeats, device, target_s)
            row = {"K": K, "numel": n, "mode": mode, "contenders": {
                name: {"time_s": t, "ratio_to_eager": t / times["eager"]} for name, t in times.items()}}
            rows.append(row)
            if log:
                log(f"{K:>3}{n:>7} {mode:<12}" + "".join(
                    f"{e['time_s'] * 1e6:>14.1f} {e['ratio_to_eager']:>6.2f}x" for e in row["contenders"].values()))
    if log and "fused" in contenders:
        for K, n in OVERHEAD_SIZES:
            t = {r["mode"]: r["contenders"]["fused"]["time_s"] for r in rows if (r["K"], r["numel"]) == (K, n)}
            log(f"fused, K={K}, {n} elements: forward building the graph / under no_grad = "
                f"{t['fwd'] / t['fwd no_grad']:.2f}x")
    return rows


def _search_cell(mode, C):
    """Two MixedOp edges in a chain over DARTS-like candidates."""
    from torch import nn

    def candidates():
        return [nn.Conv2d(C, C, 3, padding=1, bias=False), nn.Conv2d(C, C, 5, padding=2, bias=False),
                nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1), nn.Identity()]

    edges = nn.ModuleList(
        MixedOp(candidates(), mode=mode, generator=torch.Generator().manual_seed(0)) for _ in range(2)
    )
    return edges


def run_search(repeats, device, target_s, log=None):
    """One training step (forward and backward) of a small search cell with
    soft MixedOps (every candidate runs) and hard ones (one Gumbel-drawn
    candidate runs): time and peak extra memory, in units of the input."""
    C, shape = 16, (8, 16, 32, 32)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    steps = {}
    for mode in ("soft", "hard"):
        edges = _search_cell(mode, C).to(device)

        def step(edges=edges):
            out = edges[1](edges[0](x))
            out.square().mean().backward()
            for p in edges.parameters():
                p.grad = None
        steps[mode] = step
    times = median_times(steps, repeats, device, target_s)
    size = x.numel() * x.element_size()
    rows = {mode: {"time_s": times[mode], "peak_inputs": peak_extra_bytes(steps[mode], device) / size}
            for mode in steps}
    if log:
        log(f"\n{SEARCH}: one training step, 2 MixedOp edges x 5 candidates, input {list(shape)}")
        for mode, r in rows.items():
            log(f"  {mode:<5} {r['time_s'] * 1e3:>9.2f} ms  peak extra memory {r['peak_inputs']:.1f} inputs")
        log(f"  hard / soft: time {rows['hard']['time_s'] / rows['soft']['time_s']:.2f}x, "
            f"memory {rows['hard']['peak_inputs'] / rows['soft']['peak_inputs']:.2f}x")
    return {"shape": list(shape), "modes": rows}


def _no_grad(step):
    def run():
        with torch.no_grad():
            return step()
    return run


def run_benchmark(cases=None, dtypes=("float32", "bfloat16"), modes=MODES, contenders=CONTENDERS,
        repeats=15, device="cpu", target_s=0.01, log=None, grouped_contenders=GROUPED_CONTENDERS,
        mhc_contenders=MHC_CONTENDERS, malloc="default"):
    """Runs the benchmark; returns the JSON-ready report. `cases` names cases
    of CASES, "overhead", "search-cell", the grouped sets and the mHC cases
    (default: all of them). `malloc` says how the C allocator was set
    (:func:`~simplex_param.cli.timing.keep_freed_memory`), for the report."""
    device = torch.device(device)
    selected = [c for c in CASES if cases is None or c.name in cases]
    report = {"machine": machine_info(device, malloc), "repeats": repeats, "results": []}
    if selected and log:
        log(_header(contenders))
    report["results"] = [
        run_one(case, DTYPES[dt], mode, contenders, repeats, device, target_s, log)
        for case in selected
        for dt in dtypes
        for mode in modes
    ]
    if cases is None or OVERHEAD in cases:
        report[OVERHEAD] = run_overhead(contenders, repeats, device, target_s, log)
    if cases is None or SEARCH in cases:
        report[SEARCH] = run_search(repeats, device, target_s, log)
    grouped = [name for name in GROUPED_SETS if cases is None or name in cases]
    if grouped and log:
        log(bench_grouped.header())
    if grouped:
        report["grouped"] = [
            bench_grouped.run_grouped(name, DTYPES[dt], mode, tuple(grouped_contenders), repeats, device, target_s,
                                      log)
            for name in grouped
            for dt in dtypes
            for mode in modes
        ]
    mhc = [name for name in MHC_SETS if cases is None or name in cases]
    if mhc and log:
        log(bench_mhc.header())
    if mhc:
        report["mhc"] = [
            bench_mhc.run_mhc(name, DTYPES[dt], mode, tuple(mhc_contenders), repeats, device, target_s, log)
            for name in mhc
            for dt in dtypes
            for mode in modes
        ]
    return report


def machine_info(device, malloc="default"):
    cpu, family, model = platform.processor() or platform.machine(), None, None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    cpu = value
                elif key == "cpu family":
                    family = value
                elif key == "model":
                    model = value
                elif not key and family is not None:
                    break  # the end of CPU 0
    if family is not None:
        cpu = f"{cpu} (family {family}, model {model})"
    llc = last_level_cache_bytes()
    info = {
        "cpu": cpu,
        "last_level_cache_bytes": llc,
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "extension_loaded": extension_loaded(),
        "device": str(device),
        "malloc": malloc,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------

def _machine_line(m):
    llc = f"{m['last_level_cache_bytes'] / 2**20:.0f} MiB" if m["last_level_cache_bytes"] else "unknown"
    return (f"{m['cpu']}, last-level cache {llc}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, extension loaded: {m['extension_loaded']}, CPU kernels: {m['cpu_capability']}, "
            f"malloc: {m['malloc']}")


def _header(contenders):
    cols = "".join(f"{name:>22}" for name in contenders)
    return f"{'case':<14}{'K':>3} {'dtype':<9}{'mode':<8}{'floor us':>10}{cols}   (us, ratio to floor)"


def _row(r, contenders):
    cols = "".join(
        f"{r['contenders'][n]['time_s'] * 1e6:>13.1f} {r['contenders'][n]['ratio']:>6.2f}x" for n in contenders
    )
    return f"{r['case']:<14}{r['K']:>3} {r['dtype']:<9}{r['mode']:<8}{r['floor_s'] * 1e6:>10.1f}{cols}"


def memory_table(report):
    """Peak extra memory per contender, in units of one input's size."""
    results = report["results"]
    contenders = list(results[0]["contenders"]) if results else []
    lines = [f"{'case':<14}{'K':>3} {'dtype':<9}{'mode':<8}" + "".join(f"{n:>17}" for n in contenders)
             + "   (peak extra memory, in inputs)"]
    for r in results:
        size = r["numel"] * (4 if r["dtype"] == "float32" else 2)
        cols = "".join(f"{r['contenders'][n]['peak_bytes'] / size:>17.2f}" for n in contenders)
        lines.append(f"{r['case']:<14}{r['K']:>3} {r['dtype']:<9}{r['mode']:<8}{cols}")
    faulting = [r for r in results if any(c.get("page_faults", 0) >= 1 for c in r["contenders"].values())]
    if faulting:
        lines.append("")
        lines.append(f"{'case':<14}{'K':>3} {'dtype':<9}{'mode':<8}" + "".join(f"{n:>17}" for n in contenders)
                     + "   (page faults per call: first touches of fresh output pages)")
        for r in faulting:
            cols = "".join(f"{r['contenders'][n]['page_faults']:>17.0f}" for n in contenders)
            lines.append(f"{r['case']:<14}{r['K']:>3} {r['dtype']:<9}{r['mode']:<8}{cols}")
    compiles = [f"{r['case']}/{r['dtype']}/{r['mode']}: {r['contenders']['compile']['compile_s']:.1f} s"
                for r in results if "compile" in r["contenders"]]
    if compiles:
        lines.append("torch.compile time (excluded above): " + ", ".join(compiles))
    return "\n".join(lines)


def plot(report, path):
    """Bar chart of the ratios to the floor, one panel per mode."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or simplex_param[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    contenders = list(results[0]["contenders"])
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / len(contenders)
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in results if r["mode"] == mode]
        for i, name in enumerate(contenders):
            ax.bar([j + i * width for j in range(len(rows))],
                   [r["contenders"][name]["ratio"] for r in rows], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / copy floor")
        ax.set_title(f"{mode} ({report['machine']['cpu']}, {report['machine']['torch_threads']} threads)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([f"{r['case']}\nK={r['K']} {r['dtype']}" for r in rows], fontsize=8)
    axes[0, 0].legend(ncol=len(contenders), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------

def add_arguments(parser):
    """Adds the bench options to `parser` (the ``bench`` subcommand)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a reduced set ({', '.join(QUICK_CASES)}, {OVERHEAD}; float32), under a minute")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the ratios with matplotlib (optional extra)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per median (default 15, quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES] + [OVERHEAD, SEARCH, *GROUPED_SETS, *MHC_SETS],
                        help="run only these cases")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, help="run only these contenders")
    parser.add_argument("--grouped-contenders", nargs="+", choices=GROUPED_CONTENDERS,
                        help="contenders of the grouped sets (default: all; compile not on the many-small set)")
    parser.add_argument("--mhc-contenders", nargs="+", choices=MHC_CONTENDERS,
                        help="contenders of the mHC cases (default: all)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed memory for reuse, so that page faults do not depend on its "
                             "heap's state (default); default: glibc's own settings")
    return parser


def main(argv=None) -> int:
    """``python -m simplex_param bench``: runs the benchmark and prints the tables."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m simplex_param bench", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


def run(args) -> int:
    """Runs the benchmark for the parsed options of :func:`add_arguments`."""
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib (or simplex_param[plot])") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = timing.keep_freed_memory() if args.malloc == "keep" else "default"
    print(_machine_line(machine_info(torch.device(args.device), malloc)), flush=True)
    contenders = tuple(args.contenders or CONTENDERS)
    report = run_benchmark(
        cases=args.cases or (QUICK_CASES + [OVERHEAD] if args.quick else None),
        dtypes=("float32",) if args.quick else ("float32", "bfloat16"),
        contenders=contenders,
        repeats=args.repeats or (5 if args.quick else 15),
        device=args.device,
        target_s=0.003 if args.quick else 0.01,
        log=lambda line: print(line, flush=True),
        grouped_contenders=tuple(args.grouped_contenders or GROUPED_CONTENDERS),
        mhc_contenders=tuple(getattr(args, "mhc_contenders", None) or MHC_CONTENDERS),
        malloc=malloc,
    )
    if report["results"]:
        print()
        print(memory_table(report))
    print("\n" + _machine_line(report["machine"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
