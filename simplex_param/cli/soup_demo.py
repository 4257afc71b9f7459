r"""``python -m simplex_param soup``: a learned model soup on a synthetic task.

K classifiers are fine-tuned from one pre-trained model, with different seeds
and data subsets; some of them on another task (the labels permuted), members
a uniform soup should not trust. A :class:`~simplex_param.LearnedSoup`
then learns one row of K weights per tensor on held-out data, the members
frozen. The demo prints the test accuracy of the best member, of the uniform
soup and of the learned soup, then the time per training step and the peak
extra memory of the soup's step against the model-soups recipe (Wortsman et
al., 2022: ``sum(alpha_k * p_k)`` per tensor, in Python). No downloads; under
a minute on 2 CPU cores. ``--ranks N`` shards the soup across N processes
(``soup_ranks.py``).
"""
import argparse
import statistics
import time

import torch
from torch import nn

from simplex_param import LearnedSoup

from .demo import positive_int, progress
from .timing import peak_extra_bytes

__all__ = ["add_arguments", "run", "main"]

FEATURES, CLASSES = 32, 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", type=positive_int(2), default=6, help="number of members K (default: 6)")
    parser.add_argument("--noisy", type=positive_int(0), default=2,
                        help="members fine-tuned on another task, the labels permuted (default: 2)")
    parser.add_argument("--hidden", type=positive_int(1), default=1024, help="hidden width of the MLPs (default: 1024)")
    parser.add_argument("--steps", type=positive_int(1), default=150, help="soup training steps (default: 150)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the soup (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--ranks", type=positive_int(1), default=1,
                        help="processes (gloo, CPU) the soup is sharded across by FSDP2; above 1, the timing and "
                             "the recipe comparison are skipped (default: 1, one process, unsharded)")


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def _task(seed: int, n: int):
    """Inputs and the labels of a fixed random teacher network."""
    gen = torch.Generator().manual_seed(1000)
    w0 = torch.randn(FEATURES, CLASSES, generator=gen)
    w1, w2 = torch.randn(FEATURES, 64, generator=gen), torch.randn(64, CLASSES, generator=gen) / 8
    x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w0 + torch.tanh(x @ w1) @ w2).argmax(1)


def _fit(model, x, y, steps, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def make_members(args):
    """A pre-trained model, then K fine-tuned copies of it (`noisy` of them on
    permuted labels), each from its own seed and data subset."""
    torch.manual_seed(args.seed)
    x, y = _task(args.seed, 6000)
    base = _fit(_mlp(args.hidden), x[:1000], y[:1000], 150, 1e-3, args.seed)
    members = []
    for k in range(args.members):
        gen = torch.Generator().manual_seed(args.seed * 100 + k)
        idx = torch.randperm(len(x), generator=gen)[:2000]
        labels = y[idx].clone()
        if k >= args.members - args.noisy:  # another task: the labels permuted
            labels = torch.randperm(CLASSES, generator=gen)[labels]
        member = _mlp(args.hidden)
        member.load_state_dict(base.state_dict())
        members.append(_fit(member, x[idx], labels, 200, 1e-3, args.seed * 100 + k).eval())
    return members


def _recipe_step(members, template, alpha, x, y):
    """One training step of the model-soups recipe (learned_bylayer.py), with
    the members frozen as in the soup (the recipe's own members require
    grad, which would add a gradient per member tensor)."""
    names = [n for n, _ in template.named_parameters()]
    paramslist = [tuple(p.detach() for p in m.parameters()) for m in members]
    params = tuple(sum(pi * ai for pi, ai in zip(p, alpha[j].softmax(-1))) for j, p in enumerate(zip(*paramslist)))
    out = torch.func.functional_call(template, dict(zip(names, params)), (x,))
    nn.functional.cross_entropy(out, y).backward()


def _median_time(step, repeats=15):
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    if args.ranks > 1:
        from . import soup_ranks

        return soup_ranks.run(args)
    t_start = time.perf_counter()
    print(f"simplex_param soup: K={args.members} MLPs ({args.noisy} fine-tuned on another task), "
          f"hidden width {args.hidden}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    members = make_members(args)
    x_held, y_held = _task(args.seed + 1, 1000)
    x_test, y_test = _task(args.seed + 2, 5000)

    accuracies = [_accuracy(m, x_test, y_test) for m in members]
    uniform = LearnedSoup(members).eval()
    soup = LearnedSoup(members).eval()
    opt = torch.optim.Adam(soup.parameters(), lr=args.lr)
    bar = progress(args.steps)
    for _ in range(args.steps):
        loss = nn.functional.cross_entropy(soup(x_held), y_held)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
    bar.close()

    best = max(range(len(members)), key=accuracies.__getitem__)
    results = {
        f"best member ({best})": accuracies[best],
        "uniform soup": _accuracy(uniform, x_test, y_test),
        "learned soup": _accuracy(soup, x_test, y_test),
    }
    print("member test accuracies: " + ", ".join(f"{a:.3f}" for a in accuracies))
    for name, acc in results.items():
        print(f"  {name:<18} {acc:.3f}")
    gain = results["learned soup"] - results["uniform soup"]
    print(f"learned soup - uniform soup: {gain:+.3f} ({100 * gain:+.1f} points)")
    w = soup.weight.detach()
    print("learned weight per member, mean over the tensors: " + ", ".join(f"{v:.3f}" for v in w.mean(0)))

    # One training step of each, on a small batch: the parameters, not the
    # activations, dominate the memory.
    x_held, y_held = x_held[:32], y_held[:32]
    template = members[0]
    alpha = torch.zeros(w.shape, requires_grad=True)

    def soup_step():
        nn.functional.cross_entropy(soup(x_held), y_held).backward()

    def recipe_step():
        _recipe_step(members, template, alpha, x_held, y_held)

    model_bytes = sum(p.numel() * p.element_size() for p in template.parameters())
    print(f"one training step (batch {len(x_held)}; one model is {model_bytes / 2**20:.2f} MiB):")
    for name, step in (("LearnedSoup", soup_step), ("model-soups recipe", recipe_step)):
        seconds = _median_time(step)
        peak = peak_extra_bytes(step, torch.device("cpu"))
        print(f"  {name:<19} {seconds * 1e3:8.2f} ms   peak extra memory {peak / 2**20:7.2f} MiB "
              f"({peak / model_bytes:.1f} models)")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simplex_param soup", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
