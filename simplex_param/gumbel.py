r"""Gumbel-softmax weights: the stochastic map of architecture search (SNAS,
GDAS).

With :math:`x = z / T` and :math:`G_k` independent standard Gumbel noise,

.. math::
    w^{\mathrm{soft}} = \mathrm{softmax}(x + G), \qquad
    w^{\mathrm{hard}} = \mathrm{onehot}(\arg\max_k\, (x_k + G_k))

The hard sample picks input :math:`k` with probability
:math:`\mathrm{softmax}(x)_k` (the Gumbel-max trick). Its gradient is the
straight-through one: the value is the one-hot vector, the gradient that of
:math:`w^{\mathrm{soft}}`, so
:math:`\partial L / \partial z = J_{\mathrm{softmax}(x + G)}^\top\,
\partial L / \partial w \,/\, T`.
"""
from typing import Optional

import torch
from torch import Tensor

from . import checks

__all__ = ["gumbel_softmax"]


def _gumbel_noise(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard Gumbel noise, -log(E) with E ~ Exp(1), always finite: E is
    kept at least the smallest normal number, so that a draw of exactly 0
    cannot give +inf (and a NaN weight)."""
    e = torch.empty_like(like).exponential_(generator=generator)
    return -e.clamp_min_(torch.finfo(like.dtype).tiny).log()


def gumbel_softmax(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    hard: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Gumbel-softmax weights over the last dimension of ``logits``.

    Args:
        logits (Tensor): pre-weights ``(K,)`` or ``(*P, K)``, any floating dtype.
        temperature (float or Tensor, optional): ``T`` in :math:`x = z / T`,
            a positive finite number or a 0-D floating tensor. Default: ``1.0``.
        hard (bool, optional): a one-hot sample with the straight-through
            gradient instead of the relaxed weights. Default: ``False``.
        generator (torch.Generator, optional): the source of the noise, for
            reproducible samples. Default: PyTorch's global generator.

    Returns:
        Weights of the shape and dtype of ``logits``, on the simplex. ``-inf``
        logits get weight 0; a row of all ``-inf`` gives NaN, as
        :func:`torch.softmax` does.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> w = sp.gumbel_softmax(torch.zeros(4), hard=True, generator=g)
        >>> w.sum().item(), (w == 1).sum().item()
        (1.0, 1)
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating Tensor, got {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, Tensor) else ""))
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension, the last holding the K weights, got a 0-D tensor")
    temperature = checks.check_temperature(temperature)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    perturbed = logits / temperature + _gumbel_noise(logits, generator)
    soft = torch.softmax(perturbed, -1)
    if not hard:
        return soft
    index = perturbed.argmax(-1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    # The value is exactly the one-hot (soft - soft.detach() is exactly 0);
    # the gradient is the soft weights'.
    return one_hot + (soft - soft.detach())
