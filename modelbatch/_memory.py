"""Memory estimate of a pack from one measured probe step, to size packs per device."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import optim as mb_optim
from ._backends import DEFAULT_CHUNK_SIZE
from ._batch import ModelBatch
from ._hparams import check_positive_int
from ._recipe import OPTIMIZERS

_API = "mb.estimate_memory"
PROBE_MEMBERS = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per member (the fields) and for a pack of ``n`` (:attr:`total`, :meth:`total_for`).

    ``activations`` are the tensors autograd saves for the backward, held from each forward to
    its backward, in the vmapped layout that ``"vmap"`` and ``"chunked"`` share;
    ``activations_loop`` the same for ``"loop"`` (no layout copies: often less). ``workspace`` is
    the rest of a vmapped step's peak (outputs, temporaries, gradients of activations): it scales
    with the members run at once, all ``n`` for ``"vmap"``, ``chunk_size`` for ``"chunked"``,
    one for ``"loop"``. Inputs are not counted.
    """

    n: int
    params: int
    buffers: int
    grads: int
    optimizer_state: int
    activations: int
    activations_loop: int
    workspace: int

    @property
    def total(self) -> int:
        """Estimated peak bytes of a training step of the pack of ``n`` with the ``"vmap"`` backend."""
        return self.total_for("vmap")

    def total_for(self, backend: str = "vmap", chunk_size: int | None = None) -> int:
        """Estimated peak bytes of a training step of the pack of ``n`` with ``backend``.

        ``"chunked"`` uses ``chunk_size`` (default as in :meth:`ModelBatch.set_backend`);
        ``"auto"`` may pick any backend, so it is counted as ``"vmap"``, the largest.
        """
        at_once = {"vmap": self.n, "auto": self.n, "loop": 1}.get(backend)
        if backend == "chunked":
            at_once = min(chunk_size or DEFAULT_CHUNK_SIZE, self.n)
        if at_once is None:
            raise ValueError(
                f"mb.MemoryEstimate.total_for: unknown backend {backend!r}; valid options are "
                "'vmap', 'chunked', 'loop', 'auto'."
            )
        activations = self.activations_loop if backend == "loop" else self.activations
        held = self.params + self.buffers + self.grads + self.optimizer_state + activations
        return self.n * held + at_once * self.workspace

    def __str__(self) -> str:
        def mb(b: int) -> str:
            return f"{b / 2**20:.2f} MB"

        return (
            f"MemoryEstimate(n={self.n}: {mb(self.total)} vmap, {mb(self.total_for('chunked'))} chunked, "
            f"{mb(self.total_for('loop'))} loop; per member params {mb(self.params)}, grads "
            f"{mb(self.grads)}, optimizer {mb(self.optimizer_state)}, activations {mb(self.activations)}, "
            f"workspace {mb(self.workspace)})"
        )


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _probe_step(batch: ModelBatch, x: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """Forward and backward of ``batch`` on ``x``: the bytes saved for the backward, and the peak bytes."""
    held = {t.untyped_storage().data_ptr() for t in [*batch.parameters(), *batch.buffers(), x]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = batch(x, in_dims=0)
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if leaves:
            sum(t.float().sum() for t in leaves).backward()

    for p in batch.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return sum(saved.values()), torch.cuda.max_memory_allocated(device) - base
    with _LiveBytes() as live:
        step()
    return sum(saved.values()), live.peak


def _make_optimizer(
    optimizer: str | Callable[[ModelBatch], mb_optim.Optimizer] | None, batch: ModelBatch
) -> mb_optim.Optimizer | None:
    if optimizer is None:
        return None
    if callable(optimizer):
        return optimizer(batch)
    cls = OPTIMIZERS.get(str(optimizer).lower())
    if cls is None:
        raise ValueError(
            f"{_API}: unknown optimizer {optimizer!r}; pass one of {sorted(OPTIMIZERS)}, None, or a "
            "callable building it from the pack, e.g. lambda b: mb.optim.SGD(b, lr=0.1, momentum=0.9)."
        )
    return cls(batch, lr=1e-3)


def _optimizer_bytes(opt: mb_optim.Optimizer | None) -> int:
    """The optimizer's per-member tensors: state (moments), step counts and hyperparameters."""
    if opt is None:
        return 0
    state = [t for per_param in opt.state.values() for t in per_param.values()]
    return _nbytes([*state, opt.steps, *opt.hparams.values()])


def estimate_memory(
    model_factory: Callable[[], nn.Module],
    batch_shape: Sequence[int] | torch.Tensor,
    optimizer: str | Callable[[ModelBatch], mb_optim.Optimizer] | None = "adam",
    n: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MemoryEstimate:
    """Estimate the memory of training a pack of ``n`` models from a probe step of two members.

    ``batch_shape`` is one member's input batch, e.g. ``(64, 3, 32, 32)`` (filled with ``randn``
    of ``dtype``), or an example batch tensor (integer token ids, ...). ``optimizer`` is
    ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``None`` or a callable building a
    :mod:`modelbatch.optim` optimizer from the pack (for options that add state, e.g. momentum).

    Weights, gradients and optimizer state are counted from the tensors themselves (exact).
    Activations are the bytes of the tensors autograd saves during the probe's forward, seen
    through ``torch.autograd.graph.saved_tensors_hooks`` (any device; a storage shared by several
    saved tensors is counted once; parameters, buffers and inputs are left out). The step's peak
    comes from ``torch.cuda.max_memory_allocated`` on CUDA, elsewhere from the tensor storages
    created during the step (kernels' internal scratch is not seen there).

    Example:
        >>> import torch, modelbatch as mb
        >>> est = mb.estimate_memory(lambda: torch.nn.Linear(10, 4), (32, 10), optimizer="adam", n=8)
        >>> est.params, est.grads, est.optimizer_state >= 2 * est.params
        (176, 176, True)
        >>> est.total >= 8 * (est.params + est.grads + est.optimizer_state + est.activations)
        True
    """
    check_positive_int(_API, "n (members in the pack)", n)
    if not callable(model_factory):
        raise TypeError(
            f"{_API}: model_factory must build one model (e.g. lambda: MyNet()), got {model_factory!r}."
        )
    device = torch.device(device)
    models = [model_factory().to(device=device, dtype=dtype) for _ in range(PROBE_MEMBERS)]
    if isinstance(batch_shape, torch.Tensor):
        one = batch_shape.to(device)
    else:
        one = torch.randn(*batch_shape, dtype=dtype, device=device)
    x = one.unsqueeze(0).expand(PROBE_MEMBERS, *one.shape).clone()
    batch = ModelBatch(models, backend="vmap").train()
    opt = _make_optimizer(optimizer, batch)

    saved, peak = _probe_step(batch, x, device)
    grads = _nbytes(p.grad for p in batch.parameters() if p.grad is not None)
    if opt is not None:
        opt.step()
    batch.set_backend("loop")
    saved_loop, _ = _probe_step(batch, x, device)

    def per_member(total: int) -> int:
        return -(-total // PROBE_MEMBERS)  # ceil

    return MemoryEstimate(
        n=n,
        params=per_member(_nbytes(batch.parameters())),
        buffers=per_member(_nbytes(batch.stacked_buffers().values())),
        grads=per_member(grads),
        optimizer_state=per_member(_optimizer_bytes(opt)),
        activations=per_member(saved),
        activations_loop=per_member(saved_loop),
        workspace=per_member(max(0, peak - saved - grads)),
    )
