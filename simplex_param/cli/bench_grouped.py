r"""The grouped cases of ``python -m simplex_param bench``: G tensors mixed
from K frozen members each, as a learned model soup does at every step.

Sets (K = 8 members):

- ``grouped-resnet18``: the 62 parameter tensors of a ResNet-18 (11.7M
  parameters per member);
- ``grouped-many-small``: G = 500 tensors of 1 to 64K elements, log-uniform.

Contenders, each ``(logits (G, K), groups) -> list of G tensors``:

- ``grouped``: :func:`~simplex_param.grouped_softmax_weighted_sum`, one call;
- ``loop``: a Python loop of single fused calls;
- ``recipe``: the model-soups recipe (``learned_bylayer.py``),
  ``sum(p_k * softmax(alpha_g)_k)`` per tensor;
- ``foreach``: the same with ``torch._foreach_mul`` / ``_foreach_add`` over
  the G tensors, one call per member;
- ``compile``: ``torch.compile`` of the recipe (not on the many-small set
  by default: its compile alone takes minutes, docs/benchmarks.md).

The members are frozen, so forward+backward computes the logits' gradient
only. The floor moves the bytes the op must: the forward reads K members and
writes one tensor, the backward reads the gradient and the K members.
"""
import math
import time

import torch

from simplex_param import grouped_softmax_weighted_sum, softmax_weighted_sum

from .timing import median_times, peak_extra_bytes, sync

GROUPED_SETS = ("grouped-resnet18", "grouped-many-small")
GROUPED_CONTENDERS = ("grouped", "loop", "recipe", "foreach", "compile")
K_MEMBERS = 8


def resnet18_shapes():
    """The parameter shapes of a ResNet-18 (ImageNet head): 62 tensors."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(c, c_in if first else c, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            if first and (stride != 1 or c_in != c):
                shapes += [(c, c_in, 1, 1), (c,), (c,)]
        c_in = c
    return shapes + [(1000, 512), (1000,)]


def many_small_shapes(G=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logs = torch.empty(G).uniform_(0, math.log(2**16), generator=gen)
    return [(int(math.exp(v)),) for v in logs.tolist()]


def _loop(logits, groups):
    return [softmax_weighted_sum(logits[g], group) for g, group in enumerate(groups)]


def _recipe(logits, groups):
    return [sum(p * a for p, a in zip(group, logits[g].softmax(-1))) for g, group in enumerate(groups)]


def _foreach(logits, groups):
    w = logits.softmax(-1)
    columns = [list(w[:, k].unbind(0)) for k in range(w.shape[1])]
    out = torch._foreach_mul([group[0] for group in groups], columns[0])
    for k in range(1, w.shape[1]):
        out = torch._foreach_add(out, torch._foreach_mul([group[k] for group in groups], columns[k]))
    return out


def _contender(name):
    return {
        "grouped": grouped_softmax_weighted_sum,
        "loop": _loop,
        "recipe": _recipe,
        "foreach": _foreach,
        "compile": None,
    }[name] or torch.compile(_recipe, dynamic=False)


def _step(fn, logits, groups, grads):
    if grads is None:
        return lambda: fn(logits, groups)
    return lambda: torch.autograd.grad(fn(logits, groups), [logits], grads)


def run_grouped(name, dtype, mode, contenders, repeats, device, target_s, log=None):
    """Times `contenders` and the floor on one grouped set; returns a result dict."""
    shapes = resnet18_shapes() if name == "grouped-resnet18" else many_small_shapes()
    if name == "grouped-many-small" and contenders == GROUPED_CONTENDERS:
        contenders = tuple(c for c in contenders if c != "compile")
    gen = torch.Generator().manual_seed(0)
    groups = [[torch.randn(s, generator=gen).to(device, dtype) for _ in range(K_MEMBERS)] for s in shapes]
    n = sum(group[0].numel() for group in groups)
    need_grad = mode != "fwd"
    logits = torch.randn(len(shapes), K_MEMBERS, generator=gen).to(device).requires_grad_(need_grad)
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes] if need_grad else None

    moved = (K_MEMBERS + 1) * n * (2 if need_grad else 1) * groups[0][0].element_size()
    src = torch.ones(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    steps = {"floor": lambda: dst.copy_(src)}
    compile_s = None
    for c in contenders:
        step = _step(_contender(c), logits, groups, grads)
        if c == "compile":
            torch._dynamo.reset()
            t0 = time.perf_counter()
            step()
            sync(device)
            compile_s = time.perf_counter() - t0
        steps[c] = step
    times = median_times(steps, repeats, device, target_s)
    del src, dst
    steps.pop("floor")
    mixed_bytes = n * groups[0][0].element_size()
    result = {
        "case": name, "K": K_MEMBERS, "G": len(shapes), "numel": n, "dtype": str(dtype).replace("torch.", ""),
        "mode": mode, "moved_bytes": moved, "floor_s": times["floor"], "contenders": {},
    }
    for c, step in steps.items():
        result["contenders"][c] = {
            "time_s": times[c],
            "ratio": times[c] / times["floor"],
            "peak_mixed": peak_extra_bytes(step, device) / mixed_bytes,
        }
        if c == "compile":
            result["contenders"][c]["compile_s"] = compile_s
    if log:
        cols = "".join(f"{c:>9} {e['time_s'] * 1e3:>8.2f} ms {e['ratio']:>5.2f}x {e['peak_mixed']:>4.1f}m"
                       for c, e in result["contenders"].items())
        log(f"{name:<19}{len(shapes):>4} {result['dtype']:<9}{mode:<8}{times['floor'] * 1e3:>8.2f} ms{cols}")
    return result


def header():
    return (f"\n{'grouped set':<19}{'G':>4} {'dtype':<9}{'mode':<8}{'floor':>11}"
            "   contender, time, ratio to floor, peak extra memory in mixed models (m)")
