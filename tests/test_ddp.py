"""DistributedDataParallel over Simplex-parametrized modules and a learned
soup: 2 processes on CPU with the gloo backend end with identical weights,
equal to one process trained on the whole batch."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import simplex_param as sp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
STEPS = 4
TIMEOUT_S = 120  # of the process group
JOIN_TIMEOUT_S = 300  # of the whole run, start-up of both workers included


class Mixer(nn.Module):
    """A 1-D simplex mix of inputs (fused combine), a row-stochastic linear map
    and a soft MixedOp with its own (architecture) weights."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(3))
        self.proj = nn.Linear(4, 2)
        sp.simplex(self, "mix", temperature=0.5)
        sp.simplex(self.proj, dim=1)
        self.mixed = sp.MixedOp([nn.Linear(2, 2), nn.Tanh(), nn.Identity()], map="sparsemax")
        with torch.no_grad():
            self.mixed.parametrizations.weight.original.copy_(torch.tensor([0.6, 0.3, 0.1]))

    def forward(self, xs):
        return self.mixed(self.proj(sp.combine(self, "mix", xs)))


def make_soup():
    """A learned soup of 3 small MLPs (frozen members, one row per tensor)."""
    members = [nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double() for _ in range(3)]
    return sp.LearnedSoup(members, temperature=0.5).double()


def make_model_and_data(kind="mixer"):
    """The model, its input with the batch in dim -2, and the target."""
    torch.manual_seed(0)
    if kind == "soup":
        return make_soup(), torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    model = Mixer().double()
    xs = torch.randn(3, 8, 4, dtype=torch.float64)  # K=3 inputs, batch of 8
    target = torch.randn(8, 2, dtype=torch.float64)
    return model, xs, target


def train(model, xs, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), target).backward()
        opt.step()


def worker(rank, port, out_dir, kind):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        model, xs, target = make_model_and_data(kind)
        if rank == 1:  # a different start, which DDP overwrites with rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * 4, rank * 4 + 4)  # equal shards: the mean of the shard losses is the full loss
        train(ddp, xs[..., shard, :], target[shard])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before the group is torn down
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["mixer", "soup"])
def test_ddp_gloo_two_processes(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # inherited by the workers: loopback only
    ctx = mp.start_processes(worker, args=(free_port(), str(tmp_path), kind), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the DDP workers did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    if kind == "mixer":
        assert "parametrizations.mix.original" in states[0]
        assert "mixed.parametrizations.weight.original" in states[0]
    else:  # the soup's only state: its (G, K) pre-weights
        assert list(states[0]) == ["parametrizations.weight.original"] and states[0][list(states[0])[0]].shape == (4, 3)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    model, xs, target = make_model_and_data(kind)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, xs, target)
    for key, value in model.state_dict().items():
        assert not torch.equal(value, start[key]), f"{key} did not train"
        torch.testing.assert_close(states[0][key], value, rtol=1e-10, atol=1e-12)
