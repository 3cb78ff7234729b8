"""Backends: ways to run the forward of every member of a pack, with one API and the same results.

* ``"vmap"``: one ``torch.vmap`` over all members. Fastest for small models (and expected on GPU),
  but every member's intermediate tensors exist at once.
* ``"chunked"``: ``vmap`` over chunks of ``chunk_size`` members, one chunk after another. The chunks'
  outputs are concatenated; gradients reach the stacked parameters through one ``split``. It bounds
  the transient memory of the vmapped kernels (grouped convolutions); the tensors autograd saves
  for the backward are the same as with ``"vmap"``.
* ``"loop"``: a Python loop calling ``functional_call`` on each member's slice of the stacked
  parameters and buffers (one ``unbind``); the pack is still trained by the vectorized optimizer.
  It also runs layers that have no vmap batching rule.
* ``"auto"`` (the default): one of those, chosen by :func:`auto_choice` from facts that do not
  change with the machine's load, so a rerun makes the same choice and computes the same numbers.

All of them update BatchNorm statistics once per call, in place, and draw the same dropout masks:
each member's from its own stream (:mod:`modelbatch._dropout`). Results agree to round-off
(float64: ~1e-15 relative per step), not bitwise.

How ``"auto"`` decides (a cost model fitted to ``benchmarks/results/engine-cpu-2core-x86_64*.json``
and to the measurements quoted at each constant below; no timing at run time): the inputs are
the pack's member count ``n``, its architecture's *kind* and its parameters per member (both
read once from the skeleton when the pack is built, see :class:`Profile`), the device type of
the call's parameters, and whether the call trains (``module.training`` and grad enabled) or
infers (``eval()`` or ``torch.no_grad()``). The kinds are ``"recurrent"`` (any ``nn.RNNBase`` or
``nn.RNNCellBase``: LSTM, GRU, RNN and their cells), ``"dense"`` (every layer is a linear layer,
embedding, activation, dropout, flatten/identity, or a layer/batch norm over features, see
:data:`DENSE_LAYERS`; containers and modules without parameters of their own are judged by
their children) and ``"other"`` (convolutions, pooling, attention, any other layer class). Then:

1. ``n == 1``: ``"loop"`` (nothing to vectorize; the member's own module runs).
2. Not on the CPU (CUDA, ...): ``"vmap"`` for training and inference. Expected to be fastest
   (kernel-launch bound) but not measured in this project; out of memory there is handled by
   :func:`modelbatch._oom.shrink_on_oom` (``mb.fit``, ``PackTrainer``), which moves the pack to
   ``"chunked"`` with half as many members at once.
3. CPU, ``"recurrent"``: ``"loop"`` (nn.LSTM's fused kernel per member beats the plain-ops cell
   under vmap, training and inference).
4. CPU, ``"dense"`` with at most :data:`CPU_DENSE_MAX_PARAMS` parameters per member: ``"vmap"``
   (training and inference); larger: ``"loop"``.
5. CPU, ``"other"``: training with at most :data:`CPU_OTHER_MAX_PARAMS` parameters per member:
   ``"vmap"`` for ``n <= 16``, else ``"chunked"`` with chunks of 16; larger models, and every
   inference call: ``"loop"``.

Inference has its own rule because its costs differ (no backward, no optimizer step for the
vectorized optimizer to win back). Measured under ``torch.no_grad()`` in ``eval()`` (2 cores
shared with other work, so indicative; batch 64, interleaved, best of 7, speedup over a plain
loop; vmap / chunked:16 / pack loop): benchmark MLP
N=64 2.74x / 1.08x / 0.89x; the tutorial MLP (784-128-128-10) N=64 1.35x / 1.13x / 0.97x, N=10
0.95x (vmap) / 0.91x (loop); benchmark CNN N=64 0.67x / 0.88x / 1.00x; TransformerEncoderLayer
N=64 0.70x / 0.78x / 0.94x; LSTM N=64 0.57x / 0.64x / 0.84x.

A choice that raises on its first use (a layer without a vmap batching rule, e.g. ``.item()``
in a forward) is replaced by ``"loop"`` for good, with a ``RuntimeWarning``; the buffers the
failed call touched and the members' dropout streams are restored first. That depends only on
the model, so it repeats too. Out of memory is not such a failure: it propagates (see rule 2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from ._dropout import at_position, member_own_rates, rate_slots, snapshot
from ._grad_spares import unbind_parameter
from ._hparams import check_positive_int
from ._tied import tied_names

BACKENDS = ("auto", "vmap", "chunked", "loop")
DEFAULT_CHUNK_SIZE = 16
CPU_DENSE_MAX_PARAMS = 500_000
"""Largest dense member (parameters) that ``"auto"`` vmaps on CPU. Measured (2 cores, batch 32,
forward + backward + AdamW, interleaved, speedup over the plain loop, vmap / pack loop): MLP
256-w-w-10 with w=256 (134 K) 1.85x / 1.74x at N=16, 1.69x / 1.70x at N=8; w=512 (399 K) 1.61x /
1.43x at N=16, 1.13x / 1.14x at N=8; w=1024 (1.3 M) at N=8 0.46x / 0.59x, 0.40x / 0.64x and
0.51x / 0.70x in three runs (both slower than the plain loop: the optimizer's share grows), while
two runs on a machine loaded 4-6x over its cores gave vmap the lead. Above this size the loop."""
CPU_OTHER_MAX_PARAMS = 16_000
"""Largest convolutional / attention member (parameters) that ``"auto"`` vectorizes for training on
CPU. Measured (N=16 unless said, speedup over the plain loop, vmap / pack loop): the benchmark CNN
(1.4 K) and TransformerEncoderLayer d=32 (8.9 K) 1.3-1.9x in chunks of 16 at N >= 16; a 3-conv CNN
8-16-32 on 3x16x16 (6.4 K) 3.13x / 2.01x and 1.78x / 1.31x in two runs; 16-32-64 on 3x32x32 (24 K)
0.58x / 1.08x (N=8), 0.64x / 1.13x, and without its BatchNorms 1.12x / 1.43x, 0.76x / 1.20x.
Parameters stand in for the work per member here: the input size (not known when the pack is
built) weighs too, and the two measured CNNs differ in both."""
DENSE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.modules.dropout._DropoutNd,
    # every activation of torch.nn (nn.MultiheadAttention, also in that module, is no activation)
    nn.Threshold,
    nn.ReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GLU,
    nn.GELU,
    nn.Hardshrink,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.Softplus,
    nn.Softshrink,
    nn.PReLU,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softmin,
    nn.Softmax,
    nn.LogSoftmax,
)
"""Layers of a ``"dense"`` architecture (subclasses included)."""
RECURRENT_LAYERS: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)


@dataclass(frozen=True)
class Choice:
    """One concrete backend: ``"vmap"``, ``"loop"`` or ``"chunked"`` with its chunk size."""

    name: str
    chunk_size: int | None = None

    @property
    def label(self) -> str:
        return f"chunked:{self.chunk_size}" if self.name == "chunked" else self.name


def resolve_backend(api: str, backend: str, chunk_size: int | None, n: int) -> Choice | None:
    """Check a backend name and chunk size; ``None`` stands for ``"auto"``."""
    if backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{api}: unknown backend {backend!r}; valid options are {valid}.")
    if chunk_size is not None:
        if backend != "chunked":
            raise ValueError(
                f"{api}: chunk_size applies only to backend='chunked' (got backend={backend!r}); "
                "drop chunk_size or pass backend='chunked'."
            )
        check_positive_int(api, "chunk_size", chunk_size)
    if backend == "auto":
        return None
    if backend == "chunked":
        return Choice("chunked", min(chunk_size or DEFAULT_CHUNK_SIZE, n))
    return Choice(backend)


def _keywords(args: tuple, kwargs: dict, names: tuple[str, ...]) -> tuple[tuple, dict]:
    """Split ``args`` whose last ``len(names)`` entries are the per-member keyword inputs ``names``."""
    if not names:
        return args, kwargs
    cut = len(args) - len(names)
    return args[:cut], {**kwargs, **dict(zip(names, args[cut:]))}


def _vmapped(module: nn.Module, dims: tuple, names: tuple[str, ...]) -> Callable:
    def run(params: dict, buffers: dict, ids: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        def member(p: dict, b: dict, position: torch.Tensor, a: tuple) -> Any:
            with at_position(position):  # each member's dropout masks come from its own stream
                return functional_call(module, (p, b), *_keywords(a, kwargs, names))

        # The members' positions in the call give vmap a batched input even for a pack of
        # parameter-free modules, and tell dropout whose stream to draw from.
        return vmap(member, in_dims=(0, 0, 0, dims), randomness="different")(params, buffers, ids, args)

    return run


def _single(module: nn.Module, names: tuple[str, ...]) -> Callable:
    def run(params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        return functional_call(module, (params, buffers), *_keywords(args, kwargs, names))

    return run


def _combine(outputs: list[Any], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """Join the members' (or chunks') outputs leaf by leaf: stack for members, cat for chunks."""
    if type(outputs[0]) is torch.Tensor:  # the common case, without pytree's bookkeeping
        return join(outputs)
    flat, spec = pytree.tree_flatten(outputs[0])
    columns = zip(flat, *(pytree.tree_flatten(o)[0] for o in outputs[1:]))
    leaves = [join(list(col)) if isinstance(col[0], torch.Tensor) else col[0] for col in columns]
    return pytree.tree_unflatten(leaves, spec)


def _members(params: dict, n: int) -> int:
    """Members in this call: the stacked parameters' leading size (``n`` for a parameter-free module)."""
    return next(iter(params.values())).shape[0] if params else n


def _unbind(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return t.unbind(0)


def _squeeze(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t.squeeze(0),)


def _unsqueeze(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes that ``ModelBatch(compile=...)`` takes besides ``True``/``False``."""


def check_compile(api: str, compile: bool | str) -> bool | str:
    """``compile`` itself when it is a bool or one of :data:`COMPILE_MODES`, else a ``ValueError``."""
    if isinstance(compile, bool) or compile in COMPILE_MODES:
        return compile
    raise ValueError(
        f"{api}: compile must be True, False or a torch.compile mode {list(COMPILE_MODES)}, got {compile!r}; "
        'e.g. compile="reduce-overhead" puts the compiled forward and backward in CUDA graphs.'
    )


class Executor:
    """Runs the forward of every member with one concrete backend.

    The step functions (vmapped over members, or one member for the loop) are built once per
    input layout and, with ``compile`` true (or a mode name), wrapped in
    ``torch.compile(dynamic=False, mode=...)``.
    """

    def __init__(
        self, module: nn.Module, n: int, compile: bool | str = False, template: nn.Module | None = None
    ) -> None:
        self.module, self.n, self.compile = module, n, compile
        self._fns: dict[tuple, Callable] = {}
        self._slots: dict[str, tuple[dict, str]] = {}
        params, buffers = tied_names(module)
        self._aliases = {**params, **buffers}  # a tied tensor is swapped into every alias's slot too
        self._rate_slots = list(rate_slots(module).values())  # (owner, name): set_member_rates keeps them
        # Layers whose class the preparation pass swapped for a vmap-safe subclass: the loop runs no
        # vmap, so it runs them as their own class again (torch's fused kernels, e.g. aten::lstm).
        originals = dict(template.named_modules()) if template is not None else {}
        self._eager_classes = [
            (layer, type(originals[name]))
            for name, layer in module.named_modules()
            if name in originals
            and type(layer) is not type(originals[name])
            and isinstance(layer, type(originals[name]))
            # the fused kernels draw inter-layer dropout from the global generator, not the member's
            and not (isinstance(layer, nn.RNNBase) and layer.dropout)
        ]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fns": {}, "_slots": {}}  # compiled functions cannot be copied

    def _fn(self, kind: str, dims: tuple, names: tuple[str, ...]) -> Callable:
        key = (kind, dims, names)
        fn = self._fns.get(key)
        if fn is None:
            fn = _vmapped(self.module, dims, names) if kind == "vmap" else _single(self.module, names)
            if self.compile:
                mode = self.compile if isinstance(self.compile, str) else None
                fn = torch.compile(fn, dynamic=False, mode=mode)
            self._fns[key] = fn
        return fn

    def run(
        self,
        choice: Choice,
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        names: tuple[str, ...] = (),
    ) -> Any:
        """The forward of every member; the last ``len(names)`` ``args`` are keyword inputs ``names``."""
        # The members given: all of the pack, or those ModelBatch.forward picked (see _members).
        n = _members(params, self.n)
        if choice.name == "loop" or n == 1:  # one member has nothing to vectorize
            return self._loop(n, params, buffers, args, dims, kwargs, names)
        size = choice.chunk_size or n
        ids = torch.arange(n)
        if size >= n:
            return self._fn("vmap", dims, names)(params, buffers, ids, args, kwargs)
        return self._chunked(size, params, buffers, ids, args, dims, kwargs, names)

    def _chunked(
        self,
        size: int,
        params: dict,
        buffers: dict,
        ids: torch.Tensor,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        names: tuple[str, ...],
    ) -> Any:
        fn = self._fn("vmap", dims, names)
        # One split per tensor: its backward writes every chunk's gradient into one [N, ...] tensor.
        p_chunks = {k: v.split(size) for k, v in params.items()}
        a_chunks = [a.split(size) if d == 0 else None for a, d in zip(args, dims)]
        outputs = []
        n = len(ids)
        for j, start in enumerate(range(0, n, size)):
            stop = min(start + size, n)
            p = {k: v[j] for k, v in p_chunks.items()}
            b = {k: v[start:stop] for k, v in buffers.items()}  # views: BatchNorm updates them in place
            a = tuple(a if c is None else c[j] for a, c in zip(args, a_chunks))
            outputs.append(fn(p, b, ids[start:stop], a, kwargs))
        return _combine(outputs, torch.cat)

    def _loop(
        self, n: int, params: dict, buffers: dict, args: tuple, dims: tuple, kwargs: dict, names: tuple
    ) -> Any:
        # One unbind per tensor: its backward writes every member's gradient into one [N, ...] tensor
        # (on CPU into the parameter's spare gradient memory: _grad_spares). A single member is a
        # squeeze, whose backward is a view (no copy).
        split, split_param = (_unbind, unbind_parameter) if n > 1 else (_squeeze, _squeeze)
        members = {k: split_param(v) for k, v in params.items()}
        members |= {k: [v[i] for i in range(n)] for k, v in buffers.items()}  # views: updated in place
        a_members = [split(a) if d == 0 else None for a, d in zip(args, dims)]

        def inputs(i: int) -> tuple:
            return tuple(a if m is None else m[i] for a, m in zip(args, a_members))

        if self.compile:
            fn = self._fn("member", (), names)
            outputs = []
            for i in range(n):
                with at_position(i), member_own_rates(self._rate_slots, i):
                    p, b = {k: members[k][i] for k in params}, {k: members[k][i] for k in buffers}
                    outputs.append(fn(p, b, inputs(i), kwargs))
        else:
            outputs = self._swapped_loop(members, inputs, kwargs, n, names)
        return _combine(outputs, torch.stack if n > 1 else _unsqueeze)

    def _swapped_loop(
        self, members: dict, inputs: Callable[[int], tuple], kwargs: dict, n: int, names: tuple
    ) -> list:
        """Call the module once per member with that member's tensors put in its slots.

        What ``functional_call`` does, without its per-call bookkeeping (it doubles a small model's
        forward time); the original tensors are put back even if the forward raises.
        """
        slots = [
            (*self._slot(alias), values)
            for name, values in members.items()
            for alias in (name, *self._aliases.get(name, ()))
        ]
        originals = [(table, leaf, table[leaf]) for table, leaf, _ in slots]
        prepared = [(layer, type(layer)) for layer, _ in self._eager_classes]
        rnns = [layer for layer, cls in self._eager_classes if issubclass(cls, nn.RNNBase)]
        outputs = []
        try:
            for layer, cls in self._eager_classes:
                layer.__class__ = cls
            for i in range(n):
                for table, leaf, values in slots:
                    table[leaf] = values[i]
                for rnn in rnns:  # nn.RNNBase reads its weights from a list refreshed by setattr only
                    rnn._init_flat_weights()
                args, member_kwargs = _keywords(inputs(i), kwargs, names)
                with at_position(i):
                    outputs.append(self.module(*args, **member_kwargs))
        finally:
            for table, leaf, original in originals:
                table[leaf] = original
            for layer, cls in prepared:
                layer.__class__ = cls
                if isinstance(layer, nn.RNNBase):
                    layer._init_flat_weights()
        return outputs

    def _slot(self, name: str) -> tuple[dict, str]:
        """The dict (``_parameters`` or ``_buffers`` of the owning submodule) and key holding ``name``."""
        slot = self._slots.get(name)
        if slot is None:
            *path, leaf = name.split(".")
            owner = self.module.get_submodule(".".join(path)) if path else self.module
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            slot = self._slots[name] = (table, leaf)
        return slot


@dataclass(frozen=True)
class Profile:
    """What ``"auto"`` knows of a pack before any call: its member count, architecture kind and size."""

    n: int
    kind: str  # "recurrent", "dense" or "other" (see the module docstring)
    params: int  # parameters (elements) per member

    @classmethod
    def of(cls, module: nn.Module, n: int) -> Profile:
        """The profile of ``n`` members shaped like ``module`` (weights may live on the meta device)."""
        return cls(n, architecture_kind(module), sum(p.numel() for p in module.parameters()))


def architecture_kind(module: nn.Module) -> str:
    """``"recurrent"``, ``"dense"`` or ``"other"``: the layer kinds ``"auto"`` tells apart."""
    layers = list(module.modules())
    if any(isinstance(layer, RECURRENT_LAYERS) for layer in layers):
        return "recurrent"

    def dense(layer: nn.Module) -> bool:
        if isinstance(layer, DENSE_LAYERS):
            return True
        # A container, or a model's own class, runs its children: those are judged instead. A
        # layer with parameters or buffers of its own, or with no children, runs code of its own.
        own = [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
        return not own and next(layer.children(), None) is not None

    return "dense" if all(map(dense, layers)) else "other"


def auto_choice(profile: Profile, device_type: str, training: bool) -> Choice:
    """The backend ``"auto"`` runs: a pure function of its arguments (rules in the module docstring)."""
    if profile.n == 1:
        return Choice("loop")
    if device_type != "cpu":
        return Choice("vmap")
    if profile.kind == "dense" and profile.params <= CPU_DENSE_MAX_PARAMS:
        return Choice("vmap")
    if profile.kind == "other" and training and profile.params <= CPU_OTHER_MAX_PARAMS:
        if profile.n <= DEFAULT_CHUNK_SIZE:
            return Choice("vmap")
        return Choice("chunked", DEFAULT_CHUNK_SIZE)
    return Choice("loop")


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError``, or a ``RuntimeError`` saying "out of memory" (other allocators)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _device_type(params: dict, buffers: dict) -> str:
    for t in (*params.values(), *buffers.values()):
        return t.device.type
    return "cpu"


class Backends:
    """The backend state of one pack: a fixed :class:`Choice`, or ``"auto"`` (``fixed`` is ``None``)."""

    def __init__(
        self, module: nn.Module, n: int, compile: bool | str = False, template: nn.Module | None = None
    ) -> None:
        self.executor = Executor(module, n, compile, template)
        self.n = n
        self.profile = Profile.of(template if template is not None else module, n)
        self.fixed: Choice | None = Choice("vmap")
        self.failed: dict[str, str] = {}  # "auto": choices that raised on first use, with the reason
        self.working: set[str] = set()  # "auto": choices that ran once
        self.last: Choice | None = None  # what the last call ran

    def set(self, api: str, backend: str, chunk_size: int | None = None) -> None:
        self.fixed = resolve_backend(api, backend, chunk_size, self.n)
        self.failed, self.working, self.last = {}, set(), None

    def choice(self, training: bool, device_type: str = "cpu") -> Choice:
        """What a call runs: the fixed backend, or what ``"auto"`` chooses for such a call."""
        if self.fixed is not None:
            return self.fixed
        choice = auto_choice(self.profile, device_type, training)
        return Choice("loop") if choice.label in self.failed else choice

    def labels(self, params: dict, buffers: dict) -> dict[str, str]:
        """``{"training": label, "inference": label}`` on the device of the stacked tensors given."""
        device = _device_type(params, buffers)
        return {kind: self.choice(kind == "training", device).label for kind in ("training", "inference")}

    def run(
        self,
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        training: bool,
        names: tuple[str, ...] = (),
    ) -> Any:
        """The forward of every member (see :meth:`Executor.run`) with the backend for this call."""
        choice = self.last = self.choice(training, _device_type(params, buffers))
        call = (params, buffers, args, dims, kwargs, names)
        if self.fixed is not None or choice.name == "loop" or choice.label in self.working:
            return self.executor.run(choice, *call)
        return self._first_use(choice, call)

    def _first_use(self, choice: Choice, call: tuple) -> Any:
        """Run ``"auto"``'s choice once; if it raises (not out of memory), undo and run the loop."""
        buffers = call[1]
        saved = {k: b.clone() for k, b in buffers.items()}
        restore_streams = snapshot()
        try:
            out = self.executor.run(choice, *call)
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            with torch.no_grad():
                for k, b in buffers.items():
                    b.copy_(saved[k])
            restore_streams()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.failed[choice.label] = reason
            warnings.warn(
                f"mb.ModelBatch: backend {choice.label!r} failed on this model ({reason}); backend='auto' "
                "runs 'loop' instead. Pass backend='loop' to choose it without this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            self.last = Choice("loop")
            return self.executor.run(self.last, *call)
        self.working.add(choice.label)
        return out
