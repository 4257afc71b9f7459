r"""The main job: learn the mixing weights of several branches on synthetic data.

``python -m simplex_param demo`` builds K branches, each a ``(batch, features)``
float32 tensor (the outputs of K frozen encoders, or K sensors), and a target
that is a noisy mixture of them with known weights :math:`w^*` on the simplex:

.. math::
    y = \sum_{k=1}^{K} w^*_k x_k + \varepsilon, \qquad
    \varepsilon \sim \mathcal{N}(0, \sigma^2)

Two identical models learn the weights by minimising the mean squared error
with Adam: one through :class:`simplex_param.SimplexFusion` (the softmax and
the weighted sum in one fused kernel), one through the hand-written recipe
``w = softmax(z); out = sum(w[k] * x[k])``. They start from the same uniform
weights and see the same batches, in alternating order, so their per-step times
are comparable; the medians are reported. The demo prints the true weights
beside the learned ones (it exits with status 1 if any is off by 0.02 or more),
the final loss against the noise floor :math:`\sigma^2`, the loss with a
branch missing at inference, the time per training step of both models, and
the summary of the learned weights (:func:`simplex_param.summary`). With
``--plot PATH`` a :class:`simplex_param.WeightLogger` follows the fused
model's weights, and the demo draws their trajectories, with the true weights
dashed, into ``PATH``.
"""
import argparse
import importlib.util
import statistics
import sys
import time

import torch
from torch import nn

from simplex_param import SimplexFusion, WeightLogger, extension_loaded, summary

__all__ = ["add_arguments", "run", "main", "positive_int", "progress"]

TOLERANCE = 0.02
NOISE = 0.1
POOL = 4  # distinct batches, cycled through (generating data is not what is timed)


class HandWrittenFusion(nn.Module):
    """The classic recipe the fused layer replaces: pre-weights, a softmax, a Python sum."""

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        self.pre_weights = nn.Parameter(torch.zeros(num_inputs))

    @property
    def weight(self) -> torch.Tensor:
        return torch.softmax(self.pre_weights, dim=0)

    def forward(self, inputs) -> torch.Tensor:
        w = torch.softmax(self.pre_weights, dim=0)
        return sum(w[k] * x for k, x in enumerate(inputs))


def positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--steps", type=positive_int(1), default=200, help="training steps (default: 200)")
    parser.add_argument("--inputs", type=positive_int(2), default=4, help="number of branches K (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data and the true weights (default: 0)")
    parser.add_argument("--device", default="cpu", help="device to train on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=positive_int(1), default=256, help="rows per branch tensor (default: 256)")
    parser.add_argument(
        "--features", type=positive_int(1), default=4096, help="columns per branch tensor (default: 4096)"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate, cosine-decayed (default: 0.05)")
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help="draw the weights converging to the true mixture into PATH (a .png; needs matplotlib)",
    )


def progress(steps: int):
    """A tqdm progress bar over the steps, or a plain stand-in when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(steps)
    return tqdm(total=steps, desc="training", unit="step", leave=True)


class _PlainProgress:
    def __init__(self, steps: int) -> None:
        self.steps, self.done, self.every = steps, 0, max(1, steps // 10)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == self.steps:
            print(f"training: {self.done}/{self.steps} steps", file=sys.stderr, flush=True)

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _make_data(args, device):
    gen = torch.Generator().manual_seed(args.seed)
    true = torch.distributions.Dirichlet(torch.full((args.inputs,), 2.0))
    torch.manual_seed(args.seed)  # Dirichlet samples from the global generator
    w_true = true.sample()
    batches = []
    for _ in range(POOL):
        xs = [torch.randn(args.batch, args.features, generator=gen) for _ in range(args.inputs)]
        y = sum(w * x for w, x in zip(w_true, xs)) + NOISE * torch.randn(args.batch, args.features, generator=gen)
        batches.append(([x.to(device) for x in xs], y.to(device)))
    return w_true, batches


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; returns the exit status."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"demo: error: --device {args.device!r} is not a device ({exc})", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("demo: error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if not (args.lr > 0):
        print(f"demo: error: --lr must be positive, got {args.lr}", file=sys.stderr)
        return 2
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        print("demo: error: --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2

    K = args.inputs
    w_true, batches = _make_data(args, device)
    size_mb = args.batch * args.features * 4 / 2**20
    path = "compiled fused kernel" if extension_loaded() else "pure-PyTorch fallback (no fused kernel)"
    print(
        f"simplex_param demo: learn the weights mixing {K} branches of ({args.batch}, {args.features}) "
        f"float32 ({size_mb:.1f} MiB each) on {device}"
    )
    print(
        f"  SimplexFusion runs the {path}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"seed {args.seed}, {args.steps} steps, Adam lr {args.lr} (cosine decay)"
    )

    models = {"fused": SimplexFusion(K).to(device), "hand-written": HandWrittenFusion(K).to(device)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    schedules = {
        name: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps) for name, opt in optimizers.items()
    }
    times = {name: [] for name in models}
    losses = {name: float("nan") for name in models}
    watched = nn.ModuleDict({"fused": models["fused"]})  # names the weights "fused.weight"
    logger = WeightLogger(watched, every=max(1, args.steps // 100)) if args.plot is not None else None

    def step(name, xs, y):
        model, optimizer = models[name], optimizers[name]
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(xs), y)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        times[name].append(time.perf_counter() - start)
        schedules[name].step()
        return loss

    bar = progress(args.steps)
    order = list(models)
    for i in range(args.steps):
        xs, y = batches[i % POOL]
        # Alternate which model goes first, so that neither always runs on a warm cache.
        step_losses = {name: step(name, xs, y) for name in (order if i % 2 == 0 else order[::-1])}
        if logger is not None:
            logger.step()
        if i % 10 == 0 or i == args.steps - 1:
            losses = {name: loss.item() for name, loss in step_losses.items()}
            bar.set_postfix(loss=f"{losses['fused']:.4f}")
        bar.update(1)
    bar.close()

    learned = {name: m.weight.detach().cpu() for name, m in models.items()}
    error = (learned["fused"] - w_true).abs()
    print()
    print(f"{'branch':>6}  {'true':>7}  {'learned (SimplexFusion)':>23}  {'learned (hand-written)':>22}  {'|error|':>7}")
    for k in range(K):
        print(
            f"{k:>6}  {w_true[k].item():>7.4f}  {learned['fused'][k].item():>23.4f}  "
            f"{learned['hand-written'][k].item():>22.4f}  {error[k].item():>7.4f}"
        )
    ok = bool(error.max() < TOLERANCE)
    print(f"max |learned - true| = {error.max().item():.4f} (required < {TOLERANCE}): {'OK' if ok else 'FAILED'}")
    print(
        f"final loss: {losses['fused']:.5f} fused, {losses['hand-written']:.5f} hand-written "
        f"(noise floor {NOISE**2:.5f})"
    )

    fuse = models["fused"].eval()
    xs, y = batches[0]
    with torch.no_grad():
        full = nn.functional.mse_loss(fuse(xs), y).item()
        missing = nn.functional.mse_loss(fuse([None] + xs[1:]), y).item()
    print(
        f"branch 0 missing at inference: loss {missing:.4f} with the weights renormalised over the "
        f"other {K - 1} (all present: {full:.4f})"
    )

    skip = min(5, args.steps // 5)  # warm-up steps left out of the medians
    med = {name: statistics.median(t[skip:]) * 1e3 for name, t in times.items()}
    print()
    print(f"time per training step (forward, loss, backward, Adam), median of {args.steps - skip} steps:")
    print(f"  SimplexFusion                        {med['fused']:8.3f} ms")
    print(f"  hand-written softmax + sum of w * x  {med['hand-written']:8.3f} ms")
    ratio = med["hand-written"] / med["fused"]
    verdict = "faster" if ratio > 1 else "slower"
    print(f"  SimplexFusion is {ratio:.2f}x the speed of the hand-written recipe ({verdict})")
    if logger is not None:
        logger.plot(args.plot, true={"fused.weight": w_true})
        print()
        print(f"wrote {args.plot}: the weights at {len(logger.history)} steps (sp.WeightLogger), the true ones dashed")
    print()
    print("the learned weights (sp.summary):")
    print(summary(watched))
    return 0 if ok else 1


def main(argv=None) -> int:
    """Entry point for ``python -m simplex_param.cli.demo``."""
    parser = argparse.ArgumentParser(prog="python -m simplex_param demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
