"""Timing and memory helpers shared by the benchmarks (``bench``,
``bench_grouped``) and the soup demo: medians of round-robin samples, the
peak extra memory of one call, and a device sync."""
import contextlib
import gc
import os
import statistics
import sys
import time

import torch

__all__ = ["sync", "median_times", "peak_extra_bytes", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it
# accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 * 2**20


def sync(device):
    """Waits for the work queued on a CUDA device; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> str:
    """Makes glibc's malloc keep freed memory for the next allocation, as a
    training loop's steady state or a caching allocator (jemalloc, tcmalloc)
    would: blocks up to 32 MiB come from the heap (no mmap), and the heap is
    never trimmed. By default glibc hands some freed blocks back to the
    kernel, depending on its heap's state, and the next call pays a page
    fault per fresh 4 KiB page: the same step took 3.5 or 10.2 ms in two
    processes (docs/benchmarks.md). Larger blocks are still mapped afresh
    each time. Returns what was set, for the report: "default" where the C
    library is not glibc, or refused."""
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "default"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 as the trim threshold turns trimming off (mallopt(3)).
    if mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        return "default"
    return "freed memory kept (glibc: blocks up to 32 MiB from the heap, no trimming)"


def _calls_per_sample(step, device, target_s):
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return max(1, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-7))))


def _minor_faults():
    """Minor page faults of this process so far (0 where the platform has no
    getrusage): a fresh page's first touch."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sample(step, calls, device, faults=None):
    if calls > 1:
        # One untimed call first: the step before (the floor's copy, say) may
        # have evicted this one's operands from the cache.
        step()
    sync(device)
    f0, t0 = _minor_faults(), time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    t1 = time.perf_counter()
    if faults is not None:
        faults.append((_minor_faults() - f0) / calls)
    return (t1 - t0) / calls


def median_times(steps, repeats, device, target_s, faults=None):
    """Median seconds per call of each step: a warm-up, then `repeats` samples
    taken round-robin, each of enough calls to last about `target_s`. The
    order rotates from one round to the next, and every other cycle of
    rotations runs it backwards: a rotation alone keeps the cyclic order, so
    the same step would always follow the floor's copy and pay for the
    cache it leaves dirty. `faults`, a dict, gets each step's median page
    faults per call."""
    for step in steps.values():
        step()
        step()
    calls = {name: _calls_per_sample(step, device, target_s) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    names = list(steps)
    fault_samples = {name: [] for name in steps}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        if (r // len(names)) % 2:
            order.reverse()
        for name in order:
            samples[name].append(_sample(steps[name], calls[name], device, fault_samples[name]))
    if faults is not None:
        faults.update({name: statistics.median(f) for name, f in fault_samples.items()})
    return {name: statistics.median(s) for name, s in samples.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's start/stop lines, written by C++ to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step, device):
    """Peak bytes allocated during one call (its results freed afterwards)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType

    with _quiet_stderr(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(allocations):
        current += size
        peak = max(peak, current)
    return peak
