r"""Seeing the weights train: :class:`WeightLogger` records the figures of
:func:`simplex_param.summary` every N steps, to CSV, to TensorBoard, and as
a plot of the weight trajectories.
"""
import csv
import os
from typing import Optional

import torch
from torch import nn

from .diagnostics import WeightRecord, WeightSummary, sum_errors, summary

__all__ = ["WeightLogger"]

COLUMNS = ["step", "name", "kind", "map", "temperature", "entropy", "effective_k", "support", "shape", "weights"]


class WeightLogger:
    r"""Records every simplex weight of ``model`` (what :func:`sp.summary
    <simplex_param.summary>` lists: the name, the weights, the entropy, the
    effective K, the support) every ``every`` steps.

    Call :meth:`step` once per training step, after the optimizer's step.
    The logger counts the steps and records when the count is a multiple of
    ``every``; it also records the starting weights, as step 0, when it is
    created. :meth:`record` records now, whatever the count.

    ``history`` holds what was recorded: a list of ``(step, WeightSummary)``
    pairs. With ``csv=path``, each record is also appended to that CSV file
    (created anew, one row per weight tensor and step; :meth:`read_csv` reads
    it back into an equal history). With ``tensorboard=`` a log directory or
    a ``torch.utils.tensorboard.SummaryWriter``, each record is also written
    as TensorBoard scalars ``{name}/entropy``, ``{name}/effective_k``,
    ``{name}/support`` and ``{name}/w{index}`` (this needs the
    ``tensorboard`` package, an optional extra). :meth:`plot` draws the
    weight trajectories with matplotlib.

    Args:
        model (nn.Module): the model whose weights are recorded.
        every (int, optional): record every this many steps. Default: ``1``.
        csv (str or path, optional): a CSV file to append the records to.
        tensorboard (str, path or SummaryWriter, optional): where to write
            TensorBoard events.

    Example::

        >>> fuse = sp.SimplexFusion(3)
        >>> logger = sp.WeightLogger(fuse, every=2)
        >>> opt = torch.optim.SGD(fuse.parameters(), lr=1.0)
        >>> for _ in range(4):
        ...     fuse([torch.zeros(2), torch.ones(2), torch.zeros(2)]).sum().neg().backward()
        ...     opt.step(); opt.zero_grad()
        ...     _ = logger.step()
        >>> [step for step, _ in logger.history]
        [0, 2, 4]
        >>> steps, w = logger.trajectory("weight")
        >>> w[:, 1]   # the weight of the input that lowers the loss grows
        tensor([0.3333, 0.6734, 0.8658], dtype=torch.float64)
    """

    def __init__(self, model: nn.Module, every: int = 1, *, csv=None, tensorboard=None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.model = model
        self.every = every
        self.steps = 0
        self.history: list = []
        self.csv = None if csv is None else os.fspath(csv)
        if self.csv is not None:
            with open(self.csv, "w", newline="") as f:
                _writer(f).writerow(COLUMNS)
        self._owns_writer = tensorboard is not None and not hasattr(tensorboard, "add_scalar")
        self.writer = _summary_writer(tensorboard)
        self.record()

    def step(self) -> bool:
        """Count one training step; record when the count is a multiple of
        ``every``. Returns whether it recorded."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.record()
        return True

    def record(self) -> WeightSummary:
        """Record the weights now, at the current step count, and return them."""
        records = summary(self.model)
        self.history.append((self.steps, records))
        if self.csv is not None:
            with open(self.csv, "a", newline="") as f:
                _writer(f).writerows(_csv_row(self.steps, r) for r in records)
        if self.writer is not None:
            for r in records:
                for figure in ("entropy", "effective_k", "support"):
                    self.writer.add_scalar(f"{r.name}/{figure}", getattr(r, figure), self.steps)
                for index, value in _entries(r.weights):
                    self.writer.add_scalar(f"{r.name}/w{index}", value, self.steps)
            self.writer.flush()
        return records

    def trajectory(self, name: str):
        """``(steps, weights)`` of the weight tensor ``name``: the steps at
        which it was recorded, and its weights stacked along a first
        dimension, float64."""
        found = [(step, r.weights) for step, records in self.history for r in records if r.name == name]
        if not found:
            known = sorted({r.name for _, records in self.history for r in records})
            raise KeyError(f"no weights named {name!r} were recorded; recorded: {known}")
        return [step for step, _ in found], torch.stack([w for _, w in found])

    def plot(self, path, *, names=None, true: Optional[dict] = None):
        """Draw the weight trajectories into an image file (PNG, SVG, PDF:
        matplotlib picks the format from the suffix), one panel per weight
        tensor, one line per weight. ``names`` limits the panels; ``true``
        maps a name to target weights, drawn as dashed lines. Returns
        ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("WeightLogger.plot needs matplotlib: pip install matplotlib") from error
        if names is None:
            names = list(dict.fromkeys(r.name for _, records in self.history for r in records))
        if not names:
            raise ValueError("plot: nothing was recorded (the model holds no simplex weights)")
        true = true or {}
        fig = Figure(figsize=(6.4, 3.2 * len(names)), layout="constrained")
        for ax, name in zip(fig.subplots(len(names), 1, squeeze=False)[:, 0], names):
            steps, weights = self.trajectory(name)
            weights = weights.reshape(len(steps), -1)
            for k in range(weights.shape[1]):
                (line,) = ax.plot(steps, weights[:, k].tolist(), label=f"w{k}")
                if name in true:
                    target = float(torch.as_tensor(true[name]).reshape(-1)[k])
                    ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=0.8)
            ax.set_title(name + ("  (dashed: true)" if name in true else ""))
            ax.set_xlabel("step")
            ax.set_ylabel("weight")
            if weights.shape[1] <= 10:
                ax.legend(loc="upper right", fontsize="small")
        fig.savefig(path)
        return path

    def close(self) -> None:
        """Close the TensorBoard writer the logger opened from a directory
        (one passed in is only flushed, after each record)."""
        if self._owns_writer:
            self.writer.close()

    @staticmethod
    def read_csv(path) -> list:
        """A CSV written by ``WeightLogger(..., csv=path)`` as the logger's
        ``history``: a list of ``(step, WeightSummary)`` pairs, equal to what
        was recorded. (A step at which the model held no simplex weight,
        such as a lazy layer's before its first call, left no row, so it is
        not read back.)"""
        history = []
        with open(path, newline="") as f:
            rows = csv.reader(f)
            if next(rows, None) != COLUMNS:
                raise ValueError(f"{os.fspath(path)} is not a WeightLogger CSV (its header is not {COLUMNS})")
            for row in rows:
                step, name, kind, map_, temperature, entropy, effective_k, support, shape, weights = row
                shape = [int(n) for n in shape.split()]
                values = torch.tensor([float(v) for v in weights.split()], dtype=torch.float64).reshape(shape)
                record = WeightRecord(
                    name=name, kind=kind, map=map_, temperature=float(temperature), weights=values,
                    entropy=float(entropy), effective_k=float(effective_k), support=float(support),
                    # A Birkhoff tensor's sum errors, from its weights, read back to the last bit.
                    **(sum_errors(values) if map_ == "sinkhorn" else {}),
                )
                if not history or history[-1][0] != int(step):
                    history.append((int(step), WeightSummary()))
                history[-1][1].append(record)
        return history


def _writer(f):
    return csv.writer(f, lineterminator="\n")


def _csv_row(step: int, r: WeightRecord) -> list:
    # repr of a Python float is the shortest text that reads back as the same float64.
    return [
        step, r.name, r.kind, r.map, repr(r.temperature), repr(r.entropy), repr(r.effective_k), repr(r.support),
        " ".join(str(n) for n in r.weights.shape), " ".join(repr(v) for v in r.weights.reshape(-1).tolist()),
    ]


def _entries(weights):
    """(index text, value) of every weight: ``k`` for a vector, ``r_k`` for rows."""
    flat = weights.reshape(-1, weights.shape[-1])
    for row, values in enumerate(flat.tolist()):
        for k, value in enumerate(values):
            yield (f"{k}" if flat.shape[0] == 1 and weights.dim() == 1 else f"{row}_{k}"), value


def _summary_writer(tensorboard):
    if tensorboard is None:
        return None
    if hasattr(tensorboard, "add_scalar"):
        return tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "WeightLogger(tensorboard=...) needs the tensorboard package: pip install tensorboard"
        ) from error
    return SummaryWriter(os.fspath(tensorboard))
