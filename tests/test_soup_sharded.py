"""LearnedSoup sharded on FSDP2 (``mesh=``), 2 ranks on CPU with gloo, in
one spawned run: loss and the weights' gradient equal those of the
unsharded soup on the same global batch (averaged as DDP averages), ten
optimizer steps track it, each rank holds about half the member bytes,
members load from state_dicts and from safetensors files (row ranges
only), and save_merged writes a file the template loads."""
import os

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
K = 4
STEPS = 10


def make(dtype=torch.float64, norm=False):
    layers = [nn.Linear(8, 16)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).to(dtype)


def _members(dtype, norm=False):
    torch.manual_seed(0)
    states = []
    for _ in range(K):
        m = make(dtype, norm)
        if norm:
            with torch.no_grad():
                m[1].running_mean.uniform_(-1, 1)
                m[1].running_var.uniform_(0.5, 2)
        states.append(m.state_dict())
    return states


def _grad(soup):
    return soup.parametrizations.weight.original.grad


def _compare(rank, world, mesh, model_dtype, tol, states, norm=False, steps=STEPS, **kwargs):
    """The sharded soup on this rank's half of the batch against the
    unsharded one on the whole batch; returns (loss, alpha, nbytes ratio)."""
    sharded = sp.LearnedSoup(states, template=make(model_dtype, norm), mesh=mesh, temperature=0.5, **kwargs)
    dense = sp.LearnedSoup(states, template=make(model_dtype, norm), temperature=0.5, **kwargs)
    sharded.to(model_dtype)
    dense.to(model_dtype)
    if norm:
        sharded.eval()
        dense.eval()
    torch.manual_seed(1)
    x, y = torch.randn(8, 8, dtype=model_dtype), torch.randint(0, 4, (8,))
    half = slice(rank * 4, rank * 4 + 4)
    opts = [torch.optim.Adam(s.parameters(), lr=0.05) for s in (sharded, dense)]
    for step in range(steps):
        losses = [nn.functional.cross_entropy(sharded(x[half]), y[half]), nn.functional.cross_entropy(dense(x), y)]
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
        mean = losses[0].detach().clone()
        torch.distributed.all_reduce(mean)
        mean /= world
        torch.testing.assert_close(mean, losses[1].detach(), rtol=tol, atol=tol, msg=f"loss at step {step}")
        torch.testing.assert_close(_grad(sharded), _grad(dense), rtol=tol, atol=tol, msg=f"grad at step {step}")
        for opt in opts:
            opt.step()
        torch.testing.assert_close(sharded.weight, dense.weight, rtol=tol, atol=tol, msg=f"weight at step {step}")
    assert all(p.grad is None for p in sharded._sharded.parameters())
    return sharded, dense, sharded.member_nbytes() / dense.member_nbytes()


def soup_run(rank, world, folder):
    from safetensors.torch import load_file, save_file
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    states = _members(torch.float64)
    sharded, dense, out["ratio64"] = _compare(rank, world, mesh, torch.float64, 1e-10, states)

    # The merged model: gathered state_dict, and a file written one tensor at a time.
    merged = sharded.merged_state_dict()
    for key, value in dense.merged_state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-12, atol=1e-12)
    path = os.path.join(folder, "merged.safetensors")
    sharded.save_merged(path)
    torch.distributed.barrier()
    model = make(torch.float64)
    model.load_state_dict(load_file(path))
    model.eval()
    sharded.eval()
    x = torch.randn(6, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), sharded(x), rtol=1e-12, atol=1e-12)
    out["saved"] = sorted(load_file(path))
    # A training step after that forward without a backward (FSDP2 left the
    # root's parameters unsharded): the same gradient as the unsharded soup's.
    dense.eval()
    for soup, batch in ((sharded, x[rank * 3:rank * 3 + 3]), (dense, x)):
        soup.zero_grad()
        soup(batch).square().mean().backward()
    torch.testing.assert_close(_grad(sharded), _grad(dense), rtol=1e-10, atol=1e-10)

    # Members from safetensors files: rank 0 writes them, each rank reads its rows.
    paths = [os.path.join(folder, f"member{k}.safetensors") for k in range(K)]
    if rank == 0:
        for p, s in zip(paths, states):
            save_file(s, p)
    torch.distributed.barrier()
    from_files = sp.LearnedSoup(paths, template=make(torch.float64), mesh=mesh, temperature=0.5)
    for a, b in zip(from_files._members, sp.LearnedSoup(states, template=make(torch.float64), mesh=mesh,
                                                         temperature=0.5)._members):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    out["nbytes_files"] = from_files.member_nbytes()

    # float32, with BatchNorm (mixed buffers, eval mode), model granularity, bfloat16 storage.
    _, _, out["ratio32"] = _compare(rank, world, mesh, torch.float32, 1e-5, _members(torch.float32, True),
                                    norm=True, steps=3, granularity="model", dtype=torch.bfloat16)
    _, _, _ = _compare(rank, world, mesh, torch.float32, 1e-5, _members(torch.float32), steps=3)
    out["nbytes"] = sharded.member_nbytes()
    return out


def test_sharded_soup_two_ranks(tmp_path):
    results = multiprocess.run(soup_run, str(tmp_path), world_size=WORLD)
    for r in results:
        assert r["ratio64"] <= 0.55 and r["ratio32"] <= 0.6, r
        assert r["saved"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert r["nbytes_files"] == r["nbytes"]
