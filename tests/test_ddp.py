"""DistributedDataParallel over Simplex-parametrized modules and a learned
soup: 2 processes on CPU with the gloo backend end with identical weights,
equal to one process trained on the whole batch."""
import pytest
import torch
from torch import nn

import multiprocess
import simplex_param as sp

pytestmark = [
    pytest.mark.skipif(not multiprocess.available(), reason="torch.distributed with gloo is not available"),
    pytest.mark.multiprocess,
]

WORLD = 2
STEPS = 4


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


def train_shard(rank, world_size, kind):
    """One rank's run (tests/multiprocess.py): DDP on its half of the batch."""
    model, xs, target = make_model_and_data(kind)
    if rank == 1:  # a different start, which DDP overwrites with rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ddp = nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * 4, rank * 4 + 4)  # equal shards: the mean of the shard losses is the full loss
    train(ddp, xs[..., shard, :], target[shard])
    return model.state_dict()


@pytest.mark.parametrize("kind", ["mixer", "soup"])
def test_ddp_gloo_two_processes(kind):
    states = multiprocess.run(train_shard, kind, world_size=WORLD)
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
