r"""Learned model soups: the members' tensors mixed with learned simplex
weights, in one grouped call per forward.

A soup of K fine-tuned models of one architecture is the model whose every
tensor is ``sum_k w[g, k] * members[k][g]``, with ``w[g]`` a row of
probabilities (one row per tensor, or one for the whole model). The weights
are learned on held-out data, with the members frozen (Wortsman et al.,
"Model soups", 2022, the learned soup; AdaMerging learns the same layer-wise
coefficients).
"""
import copy
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import ops
from .parametrization import Simplex, check_simplex_map

__all__ = ["LearnedSoup"]

_GRANULARITIES = ("tensor", "model")


def _describe(t: Tensor) -> str:
    return f"shape {list(t.shape)} and dtype {t.dtype}"


def _check_same_architecture(states: list, names: list) -> None:
    """Every state_dict has the keys, shapes and dtypes of the first."""
    first = states[0]
    for i in range(1, len(states)):
        state = states[i]
        missing = [key for key in first if key not in state]
        if missing:
            raise ValueError(f"{names[i]} differs from {names[0]}: it lacks the key {missing[0]!r}")
        extra = [key for key in state if key not in first]
        if extra:
            raise ValueError(f"{names[i]} differs from {names[0]}: it has the key {extra[0]!r}, which {names[0]} lacks")
        for key, t in first.items():
            u = state[key]
            if not isinstance(u, Tensor):
                raise TypeError(f"{names[i]}[{key!r}] must be a Tensor, got {type(u).__name__}")
            if u.shape != t.shape or u.dtype != t.dtype:
                raise ValueError(
                    f"{names[i]} differs from {names[0]} at key {key!r}: {_describe(u)}, "
                    f"but {_describe(t)} in {names[0]}"
                )


def _skeleton(template: nn.Module) -> nn.Module:
    """A copy of `template` whose parameters and buffers are on the meta
    device: its code and structure, none of its memory."""
    memo = {}
    for p in template.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in template.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(template, memo)


def _given_buffer(state: dict, key: str, like: Tensor, where: str) -> Tensor:
    """``state[key]``, checked against the template's buffer ``like``, copied."""
    if key not in state:
        raise ValueError(f"buffers lacks the key {key!r}, a buffer of {where}")
    t = state[key]
    if not isinstance(t, Tensor):
        raise TypeError(f"buffers[{key!r}] must be a Tensor, got {type(t).__name__}")
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"buffers[{key!r}] has {_describe(t)}, but {_describe(like)} in {where}")
    return t.detach().clone()


class _SafetensorsState(Mapping):
    """The tensors of a safetensors file, read on demand: its keys, shapes
    and dtypes from the header (meta tensors, for the checks), whole tensors
    or row ranges from the file."""

    def __init__(self, path) -> None:
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise ImportError("members given as file paths need the safetensors package: "
                              "pip install safetensors") from e
        self.path = os.fspath(path)
        self._open = lambda: safe_open(self.path, framework="pt", device="cpu")
        with self._open() as f:
            self._meta = {}
            for key in f.keys():
                piece = f.get_slice(key)
                self._meta[key] = torch.empty(piece.get_shape(), dtype=_SAFETENSORS_DTYPES[piece.get_dtype()],
                                              device="meta")

    def __getitem__(self, key):
        return self._meta[key]

    def __iter__(self):
        return iter(self._meta)

    def __len__(self):
        return len(self._meta)

    def full(self, key: str) -> Tensor:
        with self._open() as f:
            return f.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        with self._open() as f:
            return f.get_slice(key)[start:stop]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _full(state, key: str) -> Tensor:
    """Whole tensor `key` of a state_dict or of a safetensors file."""
    return state.full(key) if isinstance(state, _SafetensorsState) else state[key]


class _SoupGrad(torch.autograd.Function):
    """Joins the soup's weights to the graph of a sharded forward, through
    the template's input: its backward runs once every layer's gradient is
    in, after FSDP2's reduce-scatter (registered on that input) has left
    each rank the mean gradient of its shard of every parameter. The
    weights' gradient is then the local dot products (the grouped op's
    backward on the local shards), all-reduced once: ``(G, K)`` values."""

    @staticmethod
    def forward(ctx, w, x, state):
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        leaf, outs, params, mesh = ctx.state
        ctx.state = None
        grads = []
        for p, out in zip(params, outs):
            g = p.grad
            grads.append(torch.zeros_like(out) if g is None else g.to_local().to(out.dtype))
            p.grad = None  # the template's gradients are the soup's business only
        (d,) = torch.autograd.grad(outs, leaf, grads)
        torch.distributed.all_reduce(d, group=mesh.get_group())
        return d, grad_x, None


class LearnedSoup(nn.Module):
    r"""A model whose tensors are learned convex combinations of K members'.

    .. math::
        \theta_g = \sum_{k=1}^{K} w_{g,k}\, \theta^{(k)}_g, \qquad
        w_{g,\cdot} = \mathrm{map}(z_{g,\cdot} / T)

    The soup behaves like the template: ``soup(*args, **kwargs)`` runs the
    template's forward (through :func:`torch.func.functional_call`) on the
    mixed tensors, computed by **one** :func:`~simplex_param.grouped_weighted_sum`
    call per forward (the parameters and, by default, the floating buffers).
    The members are frozen and held once, without copies
    (unless ``dtype`` asks for one); they get no gradients and no gradient
    writes. Its parameter is ``weight``, the ``(G, K)`` (or ``(1, K)``)
    probabilities, parametrized by :class:`~simplex_param.Simplex`: assign
    probabilities to it (``soup.weight = p``) to choose the starting point;
    with ``output_scale=True``, also ``beta``.

    Args:
        members: K modules of one architecture, or K state_dicts together
            with ``template``.
        template (nn.Module, optional): the architecture, required with
            state_dicts (default: the first member). Only its code is used,
            and its non-persistent buffers (outside state_dict), copied.
        granularity (str): ``"tensor"`` (default) learns one row of K weights
            per mixed tensor, ``"model"`` one row for them all.
        temperature (float): of the map. Default: ``1.0``.
        map (str): a map onto the simplex (see :class:`~simplex_param.Simplex`);
            ``"softmax"`` by default.
        alpha, learn_alpha: the map's alpha, fixed or learned (see
            :class:`~simplex_param.Simplex`).
        dtype (torch.dtype, optional): store the members in this floating
            dtype (for example ``torch.bfloat16``, to halve their memory); the
            mixed tensors are cast back to the template's dtypes.
        buffers (str, int, nn.Module or dict): ``"mix"`` (default): floating buffers (such as
            BatchNorm's running statistics) are mixed with the same weights,
            without a gradient: those of the first parameter of their own
            module (BatchNorm's weight), else the mean of the rows; integer
            buffers (``num_batches_tracked``) come from the first member. An
            int ``k``: every buffer is taken from member ``k``, unmixed. A
            module or a state_dict (for example the base model the members
            were fine-tuned from, as the model-soups recipe runs): its
            buffers are used as they are, copied once here; it must hold
            every persistent buffer of the template with its shape and
            dtype, and its other entries (parameters) are ignored.
        output_scale (bool): learn a scalar ``beta`` (a parameter, 1 at the
            start) that multiplies the template's output, the logits, as
            the model-soups recipe does. ``soup.beta`` is ``None`` without
            it. Default: ``False``.
            In train mode a BatchNorm uses the batch's statistics, and its
            updates of the buffers are dropped: each forward gets fresh
            mixes and copies.

    Example::

        >>> members = [nn.Linear(3, 2) for _ in range(4)]
        >>> soup = sp.LearnedSoup(members)
        >>> soup.weight.shape                       # one row per tensor: weight and bias
        torch.Size([2, 4])
        >>> soup(torch.randn(5, 3)).shape
        torch.Size([5, 2])
        >>> merged = nn.Linear(3, 2)
        >>> _ = merged.load_state_dict(soup.merged_state_dict())
    """

    def __init__(
        self,
        members,
        *,
        template: Optional[nn.Module] = None,
        granularity: str = "tensor",
        temperature: float = 1.0,
        map: str = "softmax",
        alpha: Optional[float] = None,
        learn_alpha: bool = False,
        dtype: Optional[torch.dtype] = None,
        buffers="mix",
        output_scale: bool = False,
        mesh=None,
    ) -> None:
        super().__init__()
        if not isinstance(output_scale, bool):
            raise TypeError(f"output_scale must be a bool, got {type(output_scale).__name__}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if isinstance(members, (nn.Module, Mapping, str, bytes)) or not isinstance(members, Sequence):
            raise TypeError("members must be a sequence of modules, of state_dicts or of safetensors paths, "
                            f"got {type(members).__name__}")
        K = len(members)
        if K < 1:
            raise ValueError("members must contain at least one model")
        if all(isinstance(m, nn.Module) for m in members):
            template = members[0] if template is None else template
            states = [m.state_dict(keep_vars=True) for m in members]
        elif all(isinstance(m, Mapping) for m in members):
            if template is None:
                raise TypeError("template is required when members are state_dicts: the module they are state_dicts of")
            states = [dict(m) for m in members]
        elif all(isinstance(m, (str, os.PathLike)) for m in members):
            if template is None:
                raise TypeError("template is required when members are safetensors files: the module they hold")
            states = [_SafetensorsState(m) for m in members]
        else:
            raise TypeError("members must be all modules, all state_dicts or all safetensors paths, not a mix")
        if not isinstance(template, nn.Module):
            raise TypeError(f"template must be an nn.Module, got {type(template).__name__}")
        mix_buffers = isinstance(buffers, str) and buffers == "mix"
        if isinstance(buffers, nn.Module):
            buffer_state = buffers.state_dict(keep_vars=True)
        elif isinstance(buffers, Mapping):
            buffer_state = dict(buffers)
        else:
            buffer_state = None
            if not mix_buffers and (isinstance(buffers, bool) or not isinstance(buffers, int) or not 0 <= buffers < K):
                shown = repr(buffers) if isinstance(buffers, (str, int, float)) else f"a {type(buffers).__name__}"
                raise ValueError(
                    f"buffers must be 'mix', a member index in [0, {K - 1}], a module or a state_dict, got {shown}"
                )

        reference_state = template.state_dict(keep_vars=True)
        first = "members[0]" if template is members[0] else "template"
        _check_same_architecture([reference_state, *states], [first] + [f"members[{k}]" for k in range(K)])
        buffer_ids = {id(b) for b in template.buffers()}
        # Tied tensors (one object under several keys) are mixed once.
        canonical, seen = {}, {}
        for key, t in reference_state.items():
            canonical[key] = seen.setdefault(id(t), key)
        self._keys = list(reference_state)
        self._canonical = canonical
        self._template_dtypes = {key: t.dtype for key, t in reference_state.items()}

        # Mixed: the floating parameters (one row each), then, with
        # buffers="mix", the floating buffers; fixed: the rest.
        params, mixed_buffers, self._fixed_keys = [], [], []
        for key, t in reference_state.items():
            if canonical[key] != key:
                continue
            if not t.dtype.is_floating_point:
                self._fixed_keys.append(key)
            elif id(t) not in buffer_ids:
                params.append(key)
            else:
                (mixed_buffers if mix_buffers else self._fixed_keys).append(key)
        if not params:
            raise ValueError("the template has no floating parameters to mix")
        self._param_keys = params
        self._mixed_keys = params + mixed_buffers
        # A buffer takes the row of the first parameter of its own module
        # (BatchNorm's statistics: its weight's), else the mean row (-1).
        module_of = {key: key.rpartition(".")[0] for key in params}
        self._buffer_rows = [
            next((g for g, p in enumerate(params) if module_of[p] == key.rpartition(".")[0]), -1)
            for key in mixed_buffers
        ]
        source = buffers if isinstance(buffers, int) and not isinstance(buffers, bool) else 0
        # Plain attributes, not buffers: not in state_dict, not synchronised
        # by DistributedDataParallel; moved by _apply.
        self._mesh = mesh
        sharded, rows = None, {key: None for key in self._mixed_keys}  # the rows of dim 0 this rank keeps
        if mesh is not None:
            sharded, param_rows = self._shard_template(template, mesh, params)
            rows.update(param_rows)  # buffers stay whole: FSDP2 does not shard them
        # Not a submodule either: its sharded parameters are no parameters of the soup.
        object.__setattr__(self, "_sharded", sharded)
        self._members = [[self._load(states[k], key, rows[key], dtype) for k in range(K)] for key in self._mixed_keys]
        # Copies (small): a module in train mode updates buffers in place.
        self._fixed = {key: _full(states[source], key).detach().clone() for key in self._fixed_keys}
        if buffer_state is not None:
            # The given model's buffers, as they are (the recipe's base model's).
            for key in self._fixed_keys:
                if id(reference_state[key]) in buffer_ids:
                    self._fixed[key] = _given_buffer(buffer_state, key, reference_state[key], first)
        # Non-persistent buffers (outside state_dict) come from the template.
        persistent = {id(t) for t in reference_state.values()}
        self._fixed.update({name: b.detach().clone() for name, b in template.named_buffers() if id(b) not in persistent})
        # Not a submodule: its (meta) tensors are no parameters of the soup.
        object.__setattr__(self, "_template", _skeleton(template))
        self._template.train(self.training)

        self.num_members = K
        self.granularity = granularity
        self.map = check_simplex_map(map)
        rows = len(params) if granularity == "tensor" else 1
        self.weight = nn.Parameter(torch.zeros(rows, K))
        parametrize.register_parametrization(self, "weight", Simplex(dim=-1, temperature=temperature, map=map, alpha=alpha, learn_alpha=learn_alpha))
        if output_scale:
            # The recipe's beta: nn.Parameter(torch.tensor(1.0)).
            self.beta = nn.Parameter(torch.ones(()))
        else:
            self.register_parameter("beta", None)

    def reset_parameters(self) -> None:
        """The constructor's start: zero pre-weights, every row uniform
        (:math:`1/K` for each member), and ``beta = 1``."""
        nn.init.zeros_(self.parametrizations.weight.original)
        if self.beta is not None:
            nn.init.ones_(self.beta)

    @staticmethod
    def _load(state, key: str, rows, dtype) -> Tensor:
        """Member tensor `key`: whole (no copy unless `dtype` asks for one),
        or only the rows `rows` of dim 0 (a copy, so the whole can be freed;
        read alone from a safetensors file)."""
        if rows is None:
            t = _full(state, key).detach()
            return t if dtype is None else t.to(dtype)
        start, stop = rows
        if isinstance(state, _SafetensorsState):
            t = state.rows(key, start, stop)
        else:
            t = state[key].detach()[start:stop]
        return t.to(dtype) if dtype is not None else t.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def _shard_template(template: nn.Module, mesh, params: list):
        """The template's skeleton sharded by FSDP2 (``fully_shard``) on
        `mesh`, its storage allocated on the CPU, and for each parameter the
        rows ``(start, stop)`` of dim 0 that this rank's shard holds."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if mesh.ndim != 1:
            raise ValueError(f"mesh must be a 1-D device mesh, got {mesh.ndim} dimensions")
        sharded = _skeleton(template)
        fully_shard(sharded, mesh=mesh)
        sharded.to_empty(device=mesh.device_type)
        named = dict(sharded.named_parameters())
        rows = {}
        for key in params:
            p = named[key]
            shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
            rows[key] = (offset[0], offset[0] + shape[0]) if len(shape) else None
        for key, p in named.items():
            p.requires_grad_(True)
        return sharded, rows

    def member_nbytes(self) -> int:
        """The bytes of member storage this rank holds (every member's mixed
        tensors; with a mesh, their local shards)."""
        return sum(t.numel() * t.element_size() for group in self._members for t in group)

    @property
    def temperature(self) -> float:
        """The map's temperature (that of the ``Simplex`` on ``weight``, which
        :func:`~simplex_param.set_temperature` changes)."""
        return float(self.parametrizations.weight[0].temperature)

    @property
    def mixed_names(self) -> list:
        """The names of the mixed parameters: at ``"tensor"`` granularity, row
        g of ``weight`` is ``mixed_names[g]``'s."""
        return list(self._param_keys)

    def extra_repr(self) -> str:
        scale = ", output_scale=True" if self.beta is not None else ""
        return (f"members={self.num_members}, tensors={len(self._param_keys)}, granularity={self.granularity!r}, "
                f"temperature={self.temperature}, map={self.map!r}{scale}")

    def train(self, mode: bool = True):
        super().train(mode)
        self._template.train(mode)
        if getattr(self, "_sharded", None) is not None:
            self._sharded.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        # .to(device), .double(), ...: the members, the fixed tensors and the
        # dtypes the mixes are cast to all follow.
        super()._apply(fn, recurse)
        self._members = [[fn(t) for t in group] for group in self._members]
        self._fixed = {key: fn(t) for key, t in self._fixed.items()}
        self._template_dtypes = {key: fn(torch.empty(0, dtype=d)).dtype for key, d in self._template_dtypes.items()}
        return self

    def mixed(self) -> dict:
        """The soup's tensors by name: the mixed parameters (differentiable
        with respect to ``weight``), the mixed buffers and the fixed tensors."""
        w = self.weight  # the map of the pre-weights, (rows, K)
        if self.granularity == "model":
            w = w.expand(len(self._param_keys), self.num_members)
        if self._buffer_rows:
            rows = torch.cat([w, w.mean(0, keepdim=True)]).detach()
            w = torch.cat([w, rows[self._buffer_rows]])
        # In train mode a module may update buffers in place (BatchNorm's
        # num_batches_tracked): it gets copies, so the soup's stay as loaded.
        tensors = {key: t.clone() for key, t in self._fixed.items()} if self.training else dict(self._fixed)
        outs = ops.grouped_weighted_sum(w, self._members)
        for g, (key, out) in enumerate(zip(self._mixed_keys, outs)):
            out = out if g < len(self._param_keys) else out.detach()  # buffers: no gradient
            tensors[key] = out.to(self._template_dtypes[key])
        return tensors

    def forward(self, *args, **kwargs):
        if self._sharded is not None:
            out = self._sharded_forward(args, kwargs)
        else:
            out = torch.func.functional_call(self._template, self.mixed(), args, kwargs)
        if self.beta is None:
            return out
        if not isinstance(out, Tensor):
            raise TypeError(
                f"output_scale=True multiplies the template's output by beta, so the output must be a Tensor "
                f"(the logits), got {type(out).__name__}"
            )
        return self.beta * out

    def _rows(self):
        """The weights of the parameters' rows (differentiable) and of every
        mixed tensor's (the buffers' detached)."""
        w = self.weight
        if self.granularity == "model":
            w = w.expand(len(self._param_keys), self.num_members)
        if not self._buffer_rows:
            return w, w
        rows = torch.cat([w, w.mean(0, keepdim=True)]).detach()
        return w, torch.cat([w, rows[self._buffer_rows]])

    def _sharded_forward(self, args, kwargs):
        """FSDP2's forward of the sharded template on this rank's mixes: one
        grouped call mixes the local shards, which are written into the
        template's shards; FSDP2 all-gathers them layer by layer. The weights'
        gradient is taken after FSDP2's reduce-scatter (see _SoupGrad)."""
        w, all_rows = self._rows()
        G = len(self._param_keys)
        leaf = w.detach().requires_grad_(w.requires_grad)
        weights = torch.cat([leaf, all_rows[G:].detach()]) if len(all_rows) > G else leaf
        with torch.enable_grad():
            outs = ops.grouped_weighted_sum(weights, self._members)
        # FSDP2 leaves the root's parameters unsharded after a forward (for
        # the backward): after one without a backward (under no_grad, an
        # evaluation), they must be sharded again before the shards are written.
        self._sharded.reshard()
        named = dict(self._sharded.named_parameters())
        buffers = dict(self._sharded.named_buffers())
        with torch.no_grad():
            for g, key in enumerate(self._mixed_keys):
                target = named[key].to_local() if g < G else buffers[key]
                target.copy_(outs[g])
            for key, t in self._fixed.items():
                buffers[key].copy_(t)
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        at = next((i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.is_floating_point()), None)
        if w.requires_grad and torch.is_grad_enabled():
            if at is None:
                raise TypeError("with a mesh, the template's forward must take a floating tensor argument: "
                                "the weights' gradient is joined to the graph through it")
            params = [named[key] for key in self._param_keys]
            flat[at] = _SoupGrad.apply(w, flat[at], (leaf, outs[:G], params, self._mesh))
            args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
        return self._sharded(*args, **kwargs)

    @torch.no_grad()
    def merged_state_dict(self) -> dict:
        """The final soup as a plain state_dict of the template: loaded into
        the template, it gives the soup's outputs (in eval mode). With
        ``output_scale=True`` the soup's output is ``soup.beta`` times the
        template's: ``beta`` is not in this state_dict (the template has no
        place for it); read it from ``soup.beta``."""
        if self._sharded is not None:
            return {key: t for key, t in self._merged_items()}
        tensors = self.mixed()
        return {key: tensors[self._canonical[key]].detach().clone() for key in self._keys}

    @torch.no_grad()
    def save_merged(self, path) -> None:
        """Writes the merged model (:meth:`merged_state_dict`) to the
        safetensors file `path`, one tensor at a time: with a mesh, each
        tensor is mixed from the local shards and all-gathered, written by
        rank 0 and dropped, so no rank holds more than one full tensor (every
        rank must call it). ``template.load_state_dict(safetensors.torch.load_file(path))``
        loads it."""
        import json

        rank0 = self._sharded is None or torch.distributed.get_rank(self._mesh.get_group()) == 0
        # The header first: every shape and dtype is known without mixing.
        header, offset, dtypes = {}, 0, {v: k for k, v in _SAFETENSORS_DTYPES.items()}
        named = dict(self._sharded.named_parameters()) if self._sharded is not None else {}
        for key in self._keys:
            canon = self._canonical[key]
            if canon in self._fixed:
                shape, dtype = self._fixed[canon].shape, self._fixed[canon].dtype
            elif canon in named:
                shape, dtype = named[canon].shape, self._template_dtypes[canon]
            else:
                shape, dtype = self._members[self._mixed_keys.index(canon)][0].shape, self._template_dtypes[canon]
            if dtype not in dtypes:
                raise TypeError(f"save_merged: safetensors has no dtype {dtype} (key {key!r})")
            size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[key] = {"dtype": dtypes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        f = open(path, "wb") if rank0 else None
        try:
            if rank0:
                f.write(len(text).to_bytes(8, "little") + text)
            for key in self._keys:  # a tied tensor is mixed again under each of its keys
                t = self._merged_one(self._canonical[key])
                if rank0 and t.numel():
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                del t
        finally:
            if f is not None:
                f.close()

    @torch.no_grad()
    def _merged_one(self, key: str) -> Tensor:
        """The merged tensor `key` (a canonical key), whole."""
        if key in self._fixed:
            return self._fixed[key].clone()
        _, all_rows = self._rows()
        g = self._mixed_keys.index(key)
        out = ops.grouped_weighted_sum(all_rows[g:g + 1].detach(), [self._members[g]])[0]
        out = out.to(self._template_dtypes[key])
        if self._sharded is not None and g < len(self._param_keys):
            from torch.distributed.tensor import DTensor, Shard

            p = dict(self._sharded.named_parameters())[key]
            out = DTensor.from_local(out, self._mesh, [Shard(0)], run_check=False, shape=p.shape,
                                     stride=p.stride()).full_tensor()
        return out

    @torch.no_grad()
    def _merged_items(self):
        """The merged tensors one at a time, in the template's key order
        (with a mesh, each all-gathered in turn)."""
        for key in self._keys:
            yield key, self._merged_one(self._canonical[key])
