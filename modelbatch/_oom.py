"""Out of memory in a pack: undo the failed call, run fewer members at once, try again.

A pack that runs out of device memory in a training step (or an evaluation) does not lose its
members: :func:`shrink_on_oom` restores what the failed call changed (the pack's buffers, e.g.
BatchNorm statistics, and the random number generators, the members' own included, so dropout
draws again from the same state), frees the allocator's cached memory and retries the call with the pack's
:class:`~modelbatch.ModelBatch` on backend ``"chunked"`` with half as many members per chunk
(``"vmap"`` counts as one chunk of all members), down to one member at a time. Only calls that
apply no update are retried: a training step's forward, loss, backward and gradient clipping;
the optimizer step runs once, afterwards. The smaller chunks stay for the pack's lifetime.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ._backends import is_out_of_memory
from ._batch import ModelBatch

T = TypeVar("T")


def members_at_once(batch: ModelBatch) -> int:
    """Members the forward runs at once: all (``"vmap"``), the chunk size, or 1 (loop).

    For ``"auto"``, those of what its last call ran (the call that failed), all before any call.
    """
    backends = batch._backends
    choice = backends.fixed or backends.last
    if choice is None or choice.name == "vmap":
        return batch.n
    return choice.chunk_size if choice.name == "chunked" else 1


def shrink_on_oom(api: str, batch: ModelBatch, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, retried with half the members at once after each out-of-memory error.

    ``fn`` must change nothing but gradients, the pack's buffers and the random generators
    before it can fail (no optimizer step). When one member at a time still runs out of memory,
    raises ``torch.OutOfMemoryError`` starting with ``api``, with the pack as it was before.
    """
    while True:
        snapshot = _Snapshot(batch)
        try:
            return fn(*args)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            snapshot.restore()
            before = members_at_once(batch)
            if before <= 1:
                raise torch.OutOfMemoryError(
                    f"{api}: out of memory training a pack of {batch.n} members even one member at a "
                    f"time (backend {batch.backend!r}). Lower the slots per pack (mb.fit(n_slots=...), "
                    "ModelBatchSearcher(slots_per_gpu=...)), the batch size or the model size."
                ) from exc
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Out of the except block: the failed call's frames and tensors are released before the retry.
        size = max(1, before // 2)
        _free_cached_memory()
        batch.set_backend("chunked", chunk_size=size)
        warnings.warn(
            f"{api}: out of memory running {before} members at once ({reason}); retrying with "
            f"backend='chunked', chunk_size={size}.",
            RuntimeWarning,
            stacklevel=3,
        )


class _Snapshot:
    """The pack's buffers and the random generators' states before a call, to undo the call."""

    def __init__(self, batch: ModelBatch) -> None:
        self.buffers = {name: b.clone() for name, b in batch.stacked_buffers().items()}
        self.batch = batch
        self.cpu_rng = torch.get_rng_state()
        self.member_rng = [batch.rng_state(i) for i in range(batch.n)]
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for name, b in self.batch.stacked_buffers().items():
                b.copy_(self.buffers[name])
        torch.set_rng_state(self.cpu_rng)
        for i, state in enumerate(self.member_rng):
            self.batch.set_rng_state(i, state)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _free_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
