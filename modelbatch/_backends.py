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
* ``"auto"``: times the others on the first training calls (see :class:`AutoSelector`), then
  keeps the fastest.

All of them update BatchNorm statistics once per call, in place, and draw independent dropout
masks per member. Results agree to round-off (float64: ~1e-15 relative), not bitwise.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from ._tied import tied_names

BACKENDS = ("auto", "vmap", "chunked", "loop")
DEFAULT_CHUNK_SIZE = 16
AUTO_CHUNK_SIZES = (4, 16, 64)
AUTO_ROUNDS = 4  # round 0 warms every candidate up (first-call costs); rounds 1.. are timed
AUTO_PRUNE = 2.0  # after a timed round, candidates this much slower than the best are dropped
AUTO_MAX_FORWARDS = 4  # a sample whose backward is never seen closes after this many forwards


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
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{api}: chunk_size must be an int >= 1, got {chunk_size!r}.")
    if backend == "auto":
        return None
    if backend == "chunked":
        return Choice("chunked", min(chunk_size or DEFAULT_CHUNK_SIZE, n))
    return Choice(backend)


def auto_candidates(n: int) -> list[Choice]:
    """The backends ``"auto"`` times for a pack of ``n``: vmap, a few chunk sizes below n, loop.

    A single member has nothing to vectorize: the loop (its own module, no vmap) is taken at once.
    """
    if n == 1:
        return [Choice("loop")]
    chunks = [Choice("chunked", c) for c in AUTO_CHUNK_SIZES if 1 < c < n]
    return [Choice("vmap"), *chunks, Choice("loop")]


def _vmapped(module: nn.Module, dims: tuple) -> Callable:
    def run(params: dict, buffers: dict, ids: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        def member(p: dict, b: dict, _id: torch.Tensor, a: tuple) -> Any:
            return functional_call(module, (p, b), a, kwargs)

        # The member ids give vmap a batched input even for a pack of parameter-free modules.
        return vmap(member, in_dims=(0, 0, 0, dims), randomness="different")(params, buffers, ids, args)

    return run


def _single(module: nn.Module) -> Callable:
    def run(params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        return functional_call(module, (params, buffers), args, kwargs)

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


class Executor:
    """Runs the forward of every member with one concrete backend.

    The step functions (vmapped over members, or one member for the loop) are built once per
    input layout and, with ``compile=True``, wrapped in ``torch.compile(dynamic=False)``.
    """

    def __init__(
        self, module: nn.Module, n: int, compile: bool = False, template: nn.Module | None = None
    ) -> None:
        self.module, self.n, self.compile = module, n, compile
        self._fns: dict[tuple, Callable] = {}
        self._slots: dict[str, tuple[dict, str]] = {}
        params, buffers = tied_names(module)
        self._aliases = {**params, **buffers}  # a tied tensor is swapped into every alias's slot too
        # Layers whose class the preparation pass swapped for a vmap-safe subclass: the loop runs no
        # vmap, so it runs them as their own class again (torch's fused kernels, e.g. aten::lstm).
        originals = dict(template.named_modules()) if template is not None else {}
        self._eager_classes = [
            (layer, type(originals[name]))
            for name, layer in module.named_modules()
            if name in originals
            and type(layer) is not type(originals[name])
            and isinstance(layer, type(originals[name]))
        ]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fns": {}, "_slots": {}}  # compiled functions cannot be copied

    def _fn(self, kind: str, dims: tuple) -> Callable:
        key = (kind, dims)
        fn = self._fns.get(key)
        if fn is None:
            fn = _vmapped(self.module, dims) if kind == "vmap" else _single(self.module)
            if self.compile:
                fn = torch.compile(fn, dynamic=False)
            self._fns[key] = fn
        return fn

    def run(self, choice: Choice, params: dict, buffers: dict, args: tuple, dims: tuple, kwargs: dict) -> Any:
        # The members given: all of the pack, or those ModelBatch.forward picked (see _members).
        n = _members(params, self.n)
        if choice.name == "loop" or n == 1:  # one member has nothing to vectorize
            return self._loop(n, params, buffers, args, dims, kwargs)
        size = choice.chunk_size or n
        ids = torch.arange(n)
        if size >= n:
            return self._fn("vmap", dims)(params, buffers, ids, args, kwargs)
        return self._chunked(size, params, buffers, ids, args, dims, kwargs)

    def _chunked(
        self,
        size: int,
        params: dict,
        buffers: dict,
        ids: torch.Tensor,
        args: tuple,
        dims: tuple,
        kwargs: dict,
    ) -> Any:
        fn = self._fn("vmap", dims)
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

    def _loop(self, n: int, params: dict, buffers: dict, args: tuple, dims: tuple, kwargs: dict) -> Any:
        # One unbind per tensor: its backward writes every member's gradient into one [N, ...] tensor.
        # A single member is a squeeze, whose backward is a view (no copy).
        split = _unbind if n > 1 else _squeeze
        members = {k: split(v) for k, v in params.items()}
        members |= {k: [v[i] for i in range(n)] for k, v in buffers.items()}  # views: updated in place
        a_members = [split(a) if d == 0 else None for a, d in zip(args, dims)]

        def inputs(i: int) -> tuple:
            return tuple(a if m is None else m[i] for a, m in zip(args, a_members))

        if self.compile:
            fn = self._fn("member", ())
            outputs = [
                fn({k: members[k][i] for k in params}, {k: members[k][i] for k in buffers}, inputs(i), kwargs)
                for i in range(n)
            ]
        else:
            outputs = self._swapped_loop(members, inputs, kwargs, n)
        return _combine(outputs, torch.stack if n > 1 else _unsqueeze)

    def _swapped_loop(self, members: dict, inputs: Callable[[int], tuple], kwargs: dict, n: int) -> list:
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
                outputs.append(self.module(*inputs(i), **kwargs))
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


class _Clock:
    """Time marks: ``perf_counter`` on CPU, CUDA events (resolved later, without stalling) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class _Sample:
    """One timing sample: the forwards run with ``choice`` since the last backward, and that backward."""

    choice: Choice
    clock: _Clock
    forwards: list[tuple[Any, Any]] = field(default_factory=list)
    backward_start: Any = None
    backward_end: Any = None

    def seconds(self) -> float:
        total = sum(self.clock.seconds(a, b) for a, b in self.forwards)
        if self.backward_end is not None:
            total += self.clock.seconds(self.backward_start, self.backward_end)
        return total


def _score(seconds: list[float]) -> float:
    """A candidate's time: the median of its samples, so that one sample slowed (or sped) by
    something else running on the machine does not decide alone."""
    return statistics.median(seconds)


class AutoSelector:
    """``backend="auto"``: each real training call is a timing sample for one candidate.

    Candidates (:func:`auto_candidates`) take turns, one per sample, over ``AUTO_ROUNDS`` rounds;
    round 0 is a warm-up and is not scored. A sample is the call's forward time plus the time of
    the backward that follows it: from the moment the gradient of the call's output is computed
    (a tensor hook) to the last gradient accumulated into a stacked parameter (post-accumulate
    hooks), so the loss, optimizer step and data loading in between are not counted. Several
    forwards before one backward (gradient accumulation) stay one sample of one candidate.

    No extra forward is ever run: every call returns the real output and updates BatchNorm
    statistics exactly once. Calls outside training (``eval()``, ``no_grad``) are not timed and
    run the best candidate so far. After a timed round, candidates over ``AUTO_PRUNE`` times
    slower than the best are dropped; after the last round the fastest (median of its timed
    samples, taken in turns with the others' so that a slow spell of the machine hits all of
    them) is kept for good. A candidate that raises on its first use (no vmap batching rule,
    out of memory in the forward) is dropped with a warning: the buffers it touched are restored
    and the call is rerun with the loop.
    """

    def __init__(self, candidates: Sequence[Choice]) -> None:
        self.candidates = list(candidates)
        self.round = 0
        self.queue = list(self.candidates)
        self.samples: dict[str, list[float]] = {c.label: [] for c in self.candidates}
        self.failed: dict[str, str] = {}
        self.working: set[str] = set()
        self.pending: _Sample | None = None
        self.decision: Choice | None = None
        self._hooks: list[Any] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pending": None, "_hooks": []}

    # -------------------------------------------------------------- reporting
    def timings_ms(self) -> dict[str, float]:
        """Median timed sample per candidate in ms (``inf`` for a candidate that failed)."""
        out = {label: _score(ts) * 1e3 for label, ts in self.samples.items() if ts}
        return out | dict.fromkeys(self.failed, math.inf)

    # -------------------------------------------------------------- running
    def run(
        self,
        executor: Executor,
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        trial: bool,
    ) -> Any:
        self.settle()
        if self.decision is not None:
            return executor.run(self.decision, params, buffers, args, dims, kwargs)
        if not trial:
            return self._run_safely(executor, self._best_so_far(), params, buffers, args, dims, kwargs)[0]
        device = next(iter(params.values())).device if params else torch.device("cpu")
        if self.pending is None:
            self.pending = _Sample(self.queue[0], _Clock(device))
            self._hook_parameters(params)
        sample = self.pending
        start = sample.clock.mark()
        out, used = self._run_safely(executor, sample.choice, params, buffers, args, dims, kwargs)
        if used != sample.choice:  # the candidate failed and was dropped: so is its sample
            self.pending = None
            return out
        sample.forwards.append((start, sample.clock.mark()))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._output_hook(sample))
        return out

    def settle(self) -> None:
        """Score the pending sample once its backward has run; move on; decide after the last round."""
        sample = self.pending
        if sample is None or (sample.backward_end is None and len(sample.forwards) < AUTO_MAX_FORWARDS):
            return
        self.pending = None
        if self.round > 0:
            self.samples[sample.choice.label].append(sample.seconds())
        if sample.choice in self.queue:
            self.queue.remove(sample.choice)
        if not self.queue:
            self._next_round()

    def _next_round(self) -> None:
        self.round += 1
        alive = [c for c in self.candidates if c.label not in self.failed]
        scored = {c.label: _score(self.samples[c.label]) for c in alive if self.samples[c.label]}
        if scored:
            best = min(scored.values())
            alive = [c for c in alive if scored.get(c.label, 0.0) <= AUTO_PRUNE * best]
        if self.round >= AUTO_ROUNDS or len(alive) <= 1:
            self.decision = min(alive, key=lambda c: scored.get(c.label, math.inf))
            self._remove_hooks()
        else:
            self.queue = alive

    def _best_so_far(self) -> Choice:
        alive = [c for c in self.candidates if c.label not in self.failed]
        timed = [c for c in alive if self.samples[c.label]]
        if timed:
            return min(timed, key=lambda c: _score(self.samples[c.label]))
        return alive[0]

    def _run_safely(
        self,
        executor: Executor,
        choice: Choice,
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
    ) -> tuple[Any, Choice]:
        while choice.label not in self.working:
            saved = {k: b.clone() for k, b in buffers.items()}
            try:
                out = executor.run(choice, params, buffers, args, dims, kwargs)
            except RuntimeError as exc:
                with torch.no_grad():
                    for k, b in buffers.items():
                        b.copy_(saved[k])
                self._drop(choice, exc)
                alive = [c for c in self.candidates if c.label not in self.failed]
                if not alive:
                    raise
                choice = alive[-1]  # the loop: the plainest way to run the model
                continue
            self.working.add(choice.label)
            return out, choice
        return executor.run(choice, params, buffers, args, dims, kwargs), choice

    def _drop(self, choice: Choice, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.failed[choice.label] = reason
        if choice in self.queue:
            self.queue.remove(choice)
        if len(self.failed) < len(self.candidates):
            warnings.warn(
                f"ModelBatch: backend {choice.label!r} failed on this model ({reason}); "
                "backend='auto' goes on without it.",
                RuntimeWarning,
                stacklevel=5,
            )
        if not self.queue and len(self.failed) < len(self.candidates):
            self._next_round()

    # -------------------------------------------------------------- hooks
    def _output_hook(self, sample: _Sample) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            if self.pending is sample and sample.backward_start is None:
                sample.backward_start = sample.clock.mark()

        return hook

    def _hook_parameters(self, params: dict) -> None:
        if self._hooks:
            return

        def hook(_param: torch.Tensor) -> None:
            sample = self.pending
            if sample is not None and sample.backward_start is not None:
                sample.backward_end = sample.clock.mark()

        for p in params.values():
            if p.requires_grad and p.is_leaf:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class Backends:
    """The backend state of one pack: a fixed :class:`Choice`, or an :class:`AutoSelector` still timing."""

    def __init__(
        self, module: nn.Module, n: int, compile: bool = False, template: nn.Module | None = None
    ) -> None:
        self.executor = Executor(module, n, compile, template)
        self.n = n
        self.fixed: Choice | None = Choice("vmap")
        self.auto: AutoSelector | None = None
        self.timings: dict[str, float] = {}

    def timings_ms(self) -> dict[str, float]:
        """What ``"auto"`` measured so far, or decided on (empty for a backend chosen by hand)."""
        self.current()
        return self.auto.timings_ms() if self.auto is not None else dict(self.timings)

    def set(self, api: str, backend: str, chunk_size: int | None = None) -> None:
        choice = resolve_backend(api, backend, chunk_size, self.n)
        if self.auto is not None:
            self.auto._remove_hooks()
        self.fixed, self.timings = choice, {}
        self.auto = AutoSelector(auto_candidates(self.n)) if choice is None else None

    def current(self) -> Choice | None:
        """The backend in use, or ``None`` while ``"auto"`` is still timing."""
        if self.auto is not None:
            self.auto.settle()
            if self.auto.decision is not None:
                self.fixed, self.timings = self.auto.decision, self.auto.timings_ms()
                self.auto = None
        return self.fixed

    def run(self, params: dict, buffers: dict, args: tuple, dims: tuple, kwargs: dict, trial: bool) -> Any:
        choice = self.current()
        if choice is not None:
            return self.executor.run(choice, params, buffers, args, dims, kwargs)
        return self.auto.run(self.executor, params, buffers, args, dims, kwargs, trial)
