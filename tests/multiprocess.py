"""One harness for every multi-process test: `run(fn, *args)` runs
`fn(rank, world_size, *args)` in `world_size` fresh processes joined in a
gloo process group, and returns what each rank's `fn` returned.

Each worker reports its result before teardown, to a file: written whole,
then renamed into place. It then meets the others at a barrier, destroys
the process group, and ends with `os._exit`, which skips the interpreter's
finalization and the C++ static destructors.

Why. A 2-process gloo test failed a fresh-clone CI run (issue 27): a worker
died by SIGABRT with "terminate called without an active exception", that
is a joinable std::thread destroyed, about 1.2 s before a passing run would
have ended. Nothing of this library starts a thread; torch's gloo process
group and its TCP store do. PyTorch's CI saw the same message from a gloo
test with the abort in interpreter finalization (frame _PyModule_ClearDict,
pytorch issue #65231), and pytorch PR #179291 (abandoned) describes gloo's
worker threads crashing finalization with SIGABRT. It did not reproduce
here: the old worker, 200 spawns in a row with faulthandler and a marker
after each stage (result saved, barrier, group destroyed, atexit), gave no
abort on an AMD EPYC Zen 4 with 2 cores under load. So the harness leaves
the cited cause nowhere to act: no interpreter finalization and no static
destructors (os._exit after a clean destroy_process_group()), no TCP store
(a FileStore), and a result that counts once it is whole on disk.

What still fails a test: a worker that raises, crashes or hangs before it
reports (the failure names its rank and shows its output), a deadline
passed, or a result the test rejects. A worker that dies after it reported
(in teardown) does not fail a correct run: it gives a TeardownWarning with
its output, so it is seen, never hidden.

The store is a FileStore in a private folder, not a TCP store: no port to
race for and no server thread. Workers start from a forkserver that has
imported torch and simplex_param once, so a run costs about a second, not
an interpreter start per rank.
"""
import datetime
import faulthandler
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300  # of the whole run, start-up included
GROUP_TIMEOUT_S = 120  # of each collective


class TeardownWarning(UserWarning):
    """A worker died after reporting its result, in teardown."""


def available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "simplex_param"])
    return ctx


def _worker(rank, world_size, folder, fn, args):
    log = open(os.path.join(folder, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(file=log, all_threads=True)  # a fatal signal prints every Python stack
    code = 1
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        result = fn(rank, world_size, *args)
        path = os.path.join(folder, f"rank{rank}.pt")
        with open(path + ".part", "wb") as f:
            torch.save(result, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".part", path)
        print(f"rank {rank}: result reported", flush=True)
        dist.barrier()  # every rank has reported before any tears down
        dist.destroy_process_group()
        print(f"rank {rank}: process group destroyed", flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        log.flush()
        os._exit(code)  # no interpreter finalization: see the module's docstring


def _describe(exitcode):
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _tail(path, lines=40):
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:]) or "(empty)\n"
    except OSError:
        return "(no output)\n"


def run(fn, *args, world_size=2, timeout=DEFAULT_TIMEOUT_S):
    """Runs `fn(rank, world_size, *args)` on `world_size` ranks of a gloo
    group; returns the ranks' results in rank order. `fn` must be a
    module-level function; its result and `args` go through torch.save
    and pickle. Raises AssertionError naming the rank that failed."""
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="simplex_param_mp_") as folder:
        procs = [ctx.Process(target=_worker, args=(r, world_size, folder, fn, args), name=f"rank{r}")
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                failed = [r for r, p in enumerate(procs)
                          if p.exitcode not in (None, 0) and not os.path.exists(os.path.join(folder, f"rank{r}.pt"))]
                if failed or time.monotonic() > deadline:
                    break
                for p in procs:
                    p.join(0.05)
        finally:
            late = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)

        problems = []
        for r, p in enumerate(procs):
            reported = os.path.exists(os.path.join(folder, f"rank{r}.pt"))
            log = os.path.join(folder, f"rank{r}.log")
            if not reported:
                why = (f"did not finish within {timeout} s" if r in late and time.monotonic() > deadline
                       else f"was stopped after another rank failed" if r in late
                       else _describe(p.exitcode))
                problems.append(f"rank {r} did not report a result: {why}; its output:\n{_tail(log)}")
            elif p.exitcode != 0:
                warnings.warn(TeardownWarning(
                    f"rank {r} reported its result, then died in teardown ({_describe(p.exitcode)}); "
                    f"its output:\n{_tail(log)}"))
        # The first failure first: a rank stopped because another failed is noise.
        problems.sort(key=lambda s: "was stopped after" in s)
        assert not problems, "\n".join(problems)
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
