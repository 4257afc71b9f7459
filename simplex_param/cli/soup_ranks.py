r"""``python -m simplex_param soup --ranks N``: the soup demo with the soup
sharded across N processes on the CPU (gloo), by FSDP2 on a 1-D DeviceMesh.

Every rank builds the same members (same seeds; a checksum, gathered, checks
that they are identical), builds ``LearnedSoup(members, mesh=mesh)``, which
keeps only its rows of each member tensor, and drops the whole members.
Each step, every rank takes its share of the global batch (the whole
held-out set, as in one process); its loss is its share's sum times
``N / batch``, so that FSDP2's mean of the gradients over the ranks (as DDP
averages) is the gradient of the mean loss over the global batch, the loss
of one process. The test accuracies are counted on each rank's share of the
test set and summed. Rank 0 prints what one process prints, less the timing
and the comparison with the model-soups recipe, plus each rank's
``member_nbytes()`` next to the unsharded soup's.

The parent waits for the ranks with a deadline: a rank that fails or does
not finish in time ends the run with exit code 1 and a message naming it.
"""
import datetime
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from simplex_param import LearnedSoup

from .demo import progress

__all__ = ["run", "launch"]

TIMEOUT_S = 900  # the whole run, start-up included
GROUP_TIMEOUT_S = 120  # each collective


def run(args) -> int:
    threads = max(1, torch.get_num_threads() // args.ranks)
    print(f"simplex_param soup: K={args.members} MLPs ({args.noisy} fine-tuned on another task), "
          f"hidden width {args.hidden}, torch {torch.__version__}, {args.ranks} ranks (gloo, CPU, the soup "
          f"sharded by FSDP2), {threads} thread{'s' if threads > 1 else ''} each", flush=True)
    return launch(_soup, args.ranks, (args,), threads=threads)


def launch(fn, ranks: int, args=(), *, threads: int = 1, timeout: float = TIMEOUT_S) -> int:
    """Runs ``fn(rank, ranks, *args)`` in `ranks` spawned processes joined in a
    gloo process group (a FileStore in a private folder: no port to pick).
    Returns 0 when every rank ends cleanly, else 1, with a message on stderr
    naming every rank that has failed when the first failure is seen, or the
    ranks still running at the deadline (those are killed). `fn` must be a module-level function."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="simplex_param_soup_") as folder:
        store = os.path.join(folder, "store")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, ranks, store, threads, args), name=f"rank{r}")
                 for r in range(ranks)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while failure is None and any(p.exitcode is None for p in procs):
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    failure = _failures(procs, failed)
                elif time.monotonic() > deadline:
                    late = [str(r) for r, p in enumerate(procs) if p.exitcode is None]
                    failure = f"rank{'s' * (len(late) > 1)} {', '.join(late)} did not finish within {timeout:g} s"
                else:
                    multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], 0.5)
            if failure is None:
                failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
                if failed:
                    failure = _failures(procs, failed)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
    if failure is not None:
        print(f"simplex_param soup: {failure}; the run is stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def _failures(procs, failed) -> str:
    """Every rank that has failed by now: when one rank crashes, the others'
    collectives fail right after it, and which exit is seen first is a race."""
    return ", ".join(f"rank {r} failed ({_describe(procs[r].exitcode)})" for r in failed)


def _describe(exitcode) -> str:
    if exitcode < 0:
        return f"killed by signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _rank_main(fn, rank, ranks, store, threads, args):
    code = 1
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        fn(rank, ranks, *args)
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:
        print(f"simplex_param soup: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # No interpreter finalization, where gloo's threads have aborted a
        # process after a clean run (tests/multiprocess.py tells the story).
        os._exit(code)


def _soup(rank, ranks, args):
    from torch.distributed.device_mesh import init_device_mesh

    from .soup_demo import _accuracy, _task, make_members

    t_start = time.perf_counter()
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    mesh = init_device_mesh("cpu", (ranks,))
    members = make_members(args)  # the same seeds on every rank: the same members
    checksum = sum(p.double().sum().item() for m in members for p in m.parameters())
    sums = [None] * ranks
    dist.all_gather_object(sums, checksum)
    if len(set(sums)) != 1:
        raise RuntimeError(f"the ranks built different members (checksums {sums})")
    x_held, y_held = _task(args.seed + 1, 1000)
    x_test, y_test = _task(args.seed + 2, 5000)
    accuracies = [_accuracy(m, x_test, y_test) for m in members]
    unsharded_nbytes = LearnedSoup(members).member_nbytes()
    soup = LearnedSoup(members, mesh=mesh).eval()  # copies this rank's rows of each member tensor
    del members  # so each rank now holds only its shards

    def share(t):
        return t.tensor_split(ranks)[rank]

    @torch.no_grad()
    def soup_accuracy() -> float:
        correct = (soup(share(x_test)).argmax(1) == share(y_test)).sum()
        dist.all_reduce(correct)
        return correct.item() / len(x_test)

    uniform = soup_accuracy()  # the soup starts uniform: every row 1/K
    opt = torch.optim.Adam(soup.parameters(), lr=args.lr)
    x, y = share(x_held), share(y_held)
    if lead:
        try:  # a thread lock for tqdm, not its multiprocessing one: a semaphore that os._exit would leak
            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())
        except ImportError:
            pass
    bar = progress(args.steps) if lead else None
    for _ in range(args.steps):
        total = nn.functional.cross_entropy(soup(x), y, reduction="sum")
        opt.zero_grad()
        (total * (ranks / len(x_held))).backward()  # FSDP2 averages over the ranks: the global mean's gradient
        opt.step()
        total = total.detach()
        dist.all_reduce(total)
        if lead:
            bar.set_postfix(loss=f"{total.item() / len(x_held):.3f}")
            bar.update()
    if lead:
        bar.close()

    best = max(range(len(accuracies)), key=accuracies.__getitem__)
    results = {
        f"best member ({best})": accuracies[best],
        "uniform soup": uniform,
        "learned soup": soup_accuracy(),
    }
    nbytes = [None] * ranks
    dist.all_gather_object(nbytes, soup.member_nbytes())
    say("member test accuracies: " + ", ".join(f"{a:.3f}" for a in accuracies))
    for name, acc in results.items():
        say(f"  {name:<18} {acc:.3f}")
    gain = results["learned soup"] - results["uniform soup"]
    say(f"learned soup - uniform soup: {gain:+.3f} ({100 * gain:+.1f} points)")
    w = soup.weight.detach()
    say("learned weight per member, mean over the tensors: " + ", ".join(f"{v:.3f}" for v in w.mean(0)))
    say(f"member bytes per rank (member_nbytes()), against {unsharded_nbytes:,} for the unsharded soup:")
    for r, n in enumerate(nbytes):
        say(f"  rank {r}: {n:,} bytes ({n / unsharded_nbytes:.3f} of the unsharded soup's)")
    say("with --ranks > 1 the timing of one step and the comparison with the model-soups recipe are skipped")
    say(f"total {time.perf_counter() - t_start:.1f} s (rank 0, after start-up)", flush=True)
