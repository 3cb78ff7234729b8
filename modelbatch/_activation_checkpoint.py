"""Gradient (activation) checkpointing inside a pack: ``torch.utils.checkpoint`` under every backend.

torch recomputes a checkpointed region during the backward by calling its function again. In a
pack that call would go wrong twice: the module's parameter slots hold the stacked ``[N, ...]``
leaves again (``functional_call`` and the loop put them back after the forward), and under vmap
the region's inputs were batched tensors of a vmap level that no longer exists. So while a pack
runs its members (:func:`running_pack`), a checkpointed region records what it read — every
parameter and buffer slot of the pack's module, the function's bound arguments and closure, the
inputs — as plain tensors and their batch dims, and its recomputation re-enters ``torch.vmap``
over those (the loop backend: no vmap) with the same slots in place. The recomputed tensors are
then the ones the forward saved, op for op, and the gradients are those of the model run alone.

Both torch variants are covered: non-reentrant checkpointing with torch's own saved-tensor
frame, and reentrant (``use_reentrant=True``, Hugging Face's default) run as non-reentrant,
which gives the same gradients (if no input of the region requires a gradient, reentrant
checkpointing gives its parameters none: so does the pack). Outside a pack torch's functions
run unchanged. This relies on private torch APIs (``torch.utils.checkpoint._CheckpointFrame``,
``torch._C._functorch``); a torch without them raises a clear error on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils import _pytree as pytree

from . import _dropout

_functorch = torch._C._functorch
# The running pack's skeleton, and whether its reentrant regions always give gradients.
_PACK: contextvars.ContextVar[tuple[nn.Module, bool] | None] = contextvars.ContextVar(
    "modelbatch_pack", default=None
)
_INSTALL_LOCK = threading.Lock()
_ORIGINALS: dict[str, Any] = {}


@contextlib.contextmanager
def running_pack(module: nn.Module, inputs_require_grad: bool = False) -> Iterator[None]:
    """While the members of the pack whose skeleton is ``module`` run, checkpointing goes through here.

    ``inputs_require_grad``: reentrant regions give gradients even when none of their inputs
    requires one (what Hugging Face's ``enable_input_require_grads()`` hook is for).
    """
    if not _ORIGINALS:
        _install()
    token = _PACK.set((module, inputs_require_grad))
    try:
        yield
    finally:
        _PACK.reset(token)


def _install() -> None:
    """Route torch's two checkpoint implementations through the pack-aware ones (once per process).

    ``torch.utils.checkpoint.checkpoint`` looks both up in its module at every call, so code that
    imported ``checkpoint`` itself (Hugging Face does) is covered too. Outside a pack they
    delegate to torch's originals.
    """
    with _INSTALL_LOCK:
        if _ORIGINALS:
            return
        names = ("CheckpointFunction", "_checkpoint_without_reentrant_generator", "_CheckpointFrame")
        missing = [n for n in (*names, "_checkpoint_hook") if not hasattr(torch_checkpoint, n)]
        if missing:
            raise RuntimeError(
                f"mb.ModelBatch: gradient checkpointing inside a pack needs torch.utils.checkpoint's "
                f"{missing}, which this torch {torch.__version__} lacks; train without checkpointing "
                "(e.g. skip gradient_checkpointing_enable()) or use torch 2.4-2.13."
            )
        _ORIGINALS.update({n: getattr(torch_checkpoint, n) for n in names})
        torch_checkpoint.CheckpointFunction = _ReentrantInPack
        torch_checkpoint._checkpoint_without_reentrant_generator = _non_reentrant_generator


class _ReentrantInPack(torch_checkpoint.CheckpointFunction):
    """``CheckpointFunction`` (reentrant checkpointing); inside a pack, run as non-reentrant."""

    @classmethod
    def apply(cls, run_function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        pack = _PACK.get()
        if pack is None:
            return _ORIGINALS["CheckpointFunction"].apply(run_function, preserve_rng_state, *args)
        level = _functorch.maybe_current_level()
        if (
            torch.is_grad_enabled()
            and not pack[1]
            and not any(_physical(a, level)[0].requires_grad for a in args if isinstance(a, torch.Tensor))
        ):
            with torch.no_grad():  # reentrant semantics: nothing in the region gets a gradient
                return run_function(*args)
        return torch_checkpoint.checkpoint(
            run_function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
        )


def _non_reentrant_generator(
    fn: Any,
    preserve_rng_state: bool = True,
    context_fn: Any = torch_checkpoint.noop_context_fn,
    determinism_check: str = "default",
    debug: bool = False,
    early_stop: bool = True,
    *args: Any,
    **kwargs: Any,
) -> Iterator[None]:
    """torch's non-reentrant checkpoint frame with a recomputation that replays the pack's region."""
    pack = _PACK.get()
    if pack is None:
        yield from _ORIGINALS["_checkpoint_without_reentrant_generator"](
            fn, preserve_rng_state, context_fn, determinism_check, debug, early_stop, *args, **kwargs
        )
        return
    if not torch.is_grad_enabled():
        yield
        return
    if debug:
        raise ValueError(
            "mb.ModelBatch: torch.utils.checkpoint(debug=True) is not supported inside a pack; "
            "drop debug=True."
        )
    metadata_fn = torch_checkpoint._allowed_determinism_checks_to_fns[determinism_check]
    forward_context, recompute_context = context_fn()
    replay = _Replay(pack[0], fn, args, kwargs, preserve_rng_state, recompute_context)
    frame = _ORIGINALS["_CheckpointFrame"](replay, early_stop, None, metadata_fn)
    with torch_checkpoint._checkpoint_hook(frame), forward_context:
        yield
    frame.forward_completed = True


def _physical(t: torch.Tensor, level: int | None) -> tuple[torch.Tensor, int | None]:
    """``(tensor, batch dim)`` of a tensor batched at vmap ``level``; ``(t, None)`` if it is not."""
    if level is None or not _functorch.is_batchedtensor(t):
        return t, None
    if _functorch.maybe_get_level(t) != level:
        raise RuntimeError(
            "mb.ModelBatch: a checkpointed region reads a tensor batched by a vmap other than the "
            "pack's (a vmap inside the model); checkpoint outside that vmap, or drop checkpointing."
        )
    return _functorch._unwrap_batched(t, level)


class _Replay:
    """What a checkpointed region read during the forward, and its recomputation from it.

    Places are the parameter/buffer slots of every submodule, the function's bound arguments
    (``functools.partial``), its closure cells and the region's inputs; each tensor is kept
    unbatched with its batch dim and batched again, at a fresh vmap level, when replayed.
    """

    def __init__(
        self, module: nn.Module, fn: Any, args: tuple, kwargs: dict, preserve_rng: bool, context: Any
    ) -> None:
        self.level = _functorch.maybe_current_level()
        self.slots = [
            (table, key, value)
            for sub in module.modules()
            for table in (sub._parameters, sub._buffers)
            for key, value in table.items()
            if value is not None
        ]
        self.fn, partials = _unwrap_partials(fn)
        cells = [c for c in getattr(self.fn, "__closure__", None) or () if _holds_tensor(c)]
        self.cells = cells
        tree = ([v for _, _, v in self.slots], partials, [c.cell_contents for c in cells], args, kwargs)
        leaves, self.spec = pytree.tree_flatten(tree)
        self.tensors: list[torch.Tensor] = []  # unique unbatched tensors, passed to the replay's vmap
        self.dims: list[int | None] = []
        self.leaves: list[Any] = []  # a non-tensor leaf, or the index of its tensor
        seen: dict[int, int] = {}
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                self.leaves.append(leaf)
                continue
            if id(leaf) not in seen:
                physical, dim = _physical(leaf, self.level)
                seen[id(leaf)] = len(self.tensors)
                self.tensors.append(physical)
                self.dims.append(dim)
            self.leaves.append(_Index(seen[id(leaf)]))
        # The members' dropout streams as the region starts, and whose they are (the batched
        # positions become one more input of the replay's vmap): the recomputation draws the same masks.
        self.dropout = _dropout.current()
        self.dropout_states = _dropout.snapshot() if preserve_rng else None
        self.position: Any = None if self.dropout is None else self.dropout[1]
        if isinstance(self.position, torch.Tensor):
            physical, dim = _physical(self.position, self.level)
            self.position = _Index(len(self.tensors))
            self.tensors.append(physical)
            self.dims.append(dim)
        self.context = context
        self.rng = _RngState(self.tensors) if preserve_rng else None
        self.device_type = torch_checkpoint._infer_device_type(*self.tensors)
        self.autocast = torch_checkpoint._get_autocast_kwargs(self.device_type)

    def _autocast(self) -> contextlib.ExitStack:
        """The forward's autocast settings (device and CPU), as torch's recomputation restores them."""
        device_kwargs, cpu_kwargs = self.autocast
        stack = contextlib.ExitStack()
        if torch.amp.is_autocast_available(self.device_type):
            stack.enter_context(torch.amp.autocast(device_type=self.device_type, **device_kwargs))
        stack.enter_context(torch.amp.autocast("cpu", **cpu_kwargs))
        return stack

    def __call__(self, *_saved_inputs: Any) -> None:
        """The recomputation torch's checkpoint frame calls in the backward."""
        with self.rng or contextlib.nullcontext(), self._autocast(), self.context:
            if self.level is None:  # the loop backend: the members' own tensors, no vmap
                self._run(*self.tensors)
            else:
                torch.vmap(self._run, in_dims=tuple(self.dims), randomness="different")(*self.tensors)

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        leaves = [tensors[leaf.i] if isinstance(leaf, _Index) else leaf for leaf in self.leaves]
        slot_values, partials, cell_values, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        position = tensors[self.position.i] if isinstance(self.position, _Index) else self.position
        before = [table[key] for table, key, _ in self.slots]
        cells_before = [c.cell_contents for c in self.cells]
        with _dropout.replaying(self.dropout, self.dropout_states, position):
            try:
                for (table, key, _), value in zip(self.slots, slot_values):
                    table[key] = value
                for cell, value in zip(self.cells, cell_values):
                    cell.cell_contents = value
                _rewrap_partials(self.fn, partials)(*args, **kwargs)
            finally:
                for (table, key, _), value in zip(self.slots, before):
                    table[key] = value
                for cell, value in zip(self.cells, cells_before):
                    cell.cell_contents = value
        return torch.zeros(())


class _Index:
    """Marks a leaf as the ``i``-th unique tensor (so that tied tensors stay one tensor)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def _holds_tensor(cell: Any) -> bool:
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(contents))


def _unwrap_partials(fn: Any) -> tuple[Any, list[tuple[tuple, dict]]]:
    """``fn`` without its ``functools.partial`` layers, and each layer's bound arguments."""
    layers = []
    while isinstance(fn, functools.partial):
        layers.append((fn.args, dict(fn.keywords)))
        fn = fn.func
    return fn, layers


def _rewrap_partials(fn: Any, layers: list[tuple[tuple, dict]]) -> Any:
    for args, keywords in reversed(layers):
        fn = functools.partial(fn, *args, **keywords)
    return fn


class _RngState:
    """The random state at the region's forward, put back for its recomputation (as torch does)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        self.devices, self.states = torch_checkpoint.get_device_states(*tensors)
        self.fork: Any = None

    def __enter__(self) -> None:
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.devices:
            torch_checkpoint.set_device_states(self.devices, self.states)

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)
