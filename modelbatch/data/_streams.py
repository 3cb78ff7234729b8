"""Per-member streams: each member walks its own shuffled epochs, as its own DataLoader would.

``MemberStreams`` drives one ``_Stream`` per slot, members joining and leaving at any step;
:class:`MemberSampler <modelbatch.data.MemberSampler>` drives them in pack epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._hparams import check_member_index, check_positive_int
from ._subsets import IndexLike, as_index

_API = "mb.data.MemberStreams"
_FROM_STATE_DICT = "pass the saved state unchanged."


def _check_keys(api: str, state: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{api}: the state lacks {missing}; {_FROM_STATE_DICT}")


def _check_size(api: str, member: str, size: int, batch_size: int, drop_last: bool) -> None:
    """Refuse a member that would never train: no samples, or with ``drop_last`` not one whole batch."""
    if size == 0:
        raise ValueError(f"{api}: {member} has no samples; every member needs at least one.")
    if drop_last and size < batch_size:
        raise ValueError(
            f"{api}: {member} has {size} samples < batch_size={batch_size} with drop_last=True, so it "
            "would never train; use a smaller batch_size or drop_last=False."
        )


@dataclass(frozen=True)
class MemberStep:
    """One step of a pack: the per-member sample indices and which entries are real.

    ``indices`` ``[N, B]`` int64: member ``i`` trains on samples ``indices[i]`` this step.
    ``mask`` ``[N, B]`` bool marks the real entries (padding points at sample 0), or is ``None``
    when every member has a full batch. ``participating`` ``[N]`` bool: the member has at least
    one real sample. Feed them to ``batch(x, in_dims=0, participating=...)``,
    ``batch.compute_loss(..., target_in_dims=0, mask=...)`` and ``opt.step(mask=participating)``.
    """

    indices: torch.Tensor
    mask: torch.Tensor | None
    participating: torch.Tensor
    epoch: int
    step: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MemberStep:
        """The same step with its tensors on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return MemberStep(
            move(self.indices), move(self.mask), move(self.participating), self.epoch, self.step
        )


def _draw_epoch(generator: torch.Generator, n: int) -> torch.Tensor:
    """The draws of one epoch of ``DataLoader(shuffle=True, generator=generator)`` over ``n`` samples.

    A new DataLoader iterator first draws its workers' base seed from the generator; the
    RandomSampler then draws ``randperm(n)`` and, once the epoch is exhausted, one more
    ``randperm(n)`` that it slices to nothing (``num_samples % n == 0``).
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    perm = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return perm


class _Stream:
    """One member's epochs, one drawn at a time: the current epoch's ``order`` and ``position`` in it.

    ``epoch_start`` is the generator state the current epoch was drawn from (the fresh state
    before the first :meth:`draw`): with ``seed`` and ``subset`` it is all a checkpoint needs.
    """

    def __init__(self, seed: int, subset: torch.Tensor | None, n_samples: int) -> None:
        self.seed, self.subset = seed, subset
        self.size = n_samples if subset is None else subset.numel()
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = self.generator.get_state()
        self.order = torch.empty(0, dtype=torch.int64)
        self.epoch, self.position = -1, 0

    def rewind(self, api: str, epoch_start: torch.Tensor) -> None:
        """Put the generator back to ``epoch_start``; the next :meth:`draw` redraws that epoch."""
        try:
            self.generator.set_state(epoch_start)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{api}: not a generator state ({err}); {_FROM_STATE_DICT}") from err
        self.epoch_start = epoch_start.clone()

    def draw(self) -> None:
        """Start the next epoch: draw its order from the generator, at position 0."""
        self.epoch_start = self.generator.get_state()
        perm = _draw_epoch(self.generator, self.size)
        self.order = perm if self.subset is None else self.subset[perm]
        self.epoch, self.position = self.epoch + 1, 0

    def remaining(self, batch_size: int, drop_last: bool) -> int:
        """How many samples of this epoch are still to train on (drop_last: whole batches only)."""
        left = self.order.numel() - self.position
        return left - left % batch_size if drop_last else left

    def take(self, batch_size: int, drop_last: bool) -> torch.Tensor:
        """The next batch of this epoch (short at its end; empty once it is over)."""
        start = self.position
        self.position += min(batch_size, self.remaining(batch_size, drop_last))
        return self.order[start : self.position]


class MemberStreams:
    """Per-slot batch streams for a pack whose members join and leave at any step.

    A slot is empty until :meth:`reset_member` gives it a member (a seed and an optional
    subset). From then on, each :meth:`next_step` hands that member the next batch of
    ``DataLoader(Subset(data, subset) or data, batch_size, shuffle=True, drop_last=drop_last,
    generator=torch.Generator().manual_seed(seed))`` iterated epoch after epoch — its own
    epochs, independent of when it joined or of the other slots. A member's last batch of an
    epoch may be short (``mask``); empty slots have ``participating=False``. Unlike
    :class:`MemberSampler` (pack epochs, members start together), this suits continuous batching.

    Example:
        >>> import modelbatch as mb
        >>> streams = mb.data.MemberStreams(10, n_slots=2, batch_size=4)
        >>> streams.reset_member(0, seed=0)
        >>> step = streams.next_step()
        >>> step.participating.tolist(), step.indices.shape
        ([True, False], torch.Size([2, 4]))
        >>> streams.reset_member(1, seed=1)        # joins now, starts its own epoch 0
        >>> streams.next_step().participating.tolist()
        [True, True]
    """

    def __init__(self, n_samples: int, n_slots: int, batch_size: int, *, drop_last: bool = False) -> None:
        for name, value in (("n_samples", n_samples), ("n_slots", n_slots), ("batch_size", batch_size)):
            check_positive_int(_API, name, value)
        self.n_samples, self.n_slots, self.batch_size = n_samples, n_slots, batch_size
        self.drop_last = bool(drop_last)
        self._streams: list[_Stream | None] = [None] * n_slots

    def reset_member(self, slot: int, *, seed: int, subset: IndexLike | None = None) -> None:
        """Start a new member in ``slot``: its own generator from ``seed``, its ``subset`` (None: all)."""
        api = f"{_API}.reset_member"
        slot = check_member_index(api, slot, self.n_slots)
        stream = self._new_stream(api, seed, subset)
        stream.draw()
        self._streams[slot] = stream

    def _new_stream(self, api: str, seed: int, subset: IndexLike | None) -> _Stream:
        index = None if subset is None else as_index(api, "subset", subset, self.n_samples)
        size = self.n_samples if index is None else index.numel()
        _check_size(api, "the member", size, self.batch_size, self.drop_last)
        return _Stream(int(seed), index, self.n_samples)

    def remove(self, slot: int) -> None:
        """Empty ``slot``: it no longer participates."""
        self._streams[check_member_index(f"{_API}.remove", slot, self.n_slots)] = None

    def next_step(self) -> MemberStep:
        """The next batch of every slot: ``[n_slots, B]`` indices, mask (None: all full), participating."""
        b = self.batch_size
        indices = torch.zeros(self.n_slots, b, dtype=torch.int64)
        valid = torch.zeros(self.n_slots, b, dtype=torch.bool)
        full = True  # every participating slot has a whole batch (kept in Python: no tensor read)
        for slot, stream in enumerate(self._streams):
            if stream is None:
                continue
            if stream.remaining(b, self.drop_last) == 0:
                stream.draw()
            batch = stream.take(b, self.drop_last)
            indices[slot, : batch.numel()] = batch
            valid[slot, : batch.numel()] = True
            full = full and batch.numel() in (0, b)
        participating = valid.any(dim=1)
        return MemberStep(indices, None if full else valid, participating, epoch=-1, step=-1)

    def member_state_dict(self, slot: int) -> dict[str, Any] | None:
        """Slot ``slot``'s stream (seed, subset, epoch, position) to continue it in another slot or pack."""
        stream = self._streams[check_member_index(f"{_API}.member_state_dict", slot, self.n_slots)]
        if stream is None:
            return None
        return {
            "seed": stream.seed,
            "subset": None if stream.subset is None else stream.subset.clone(),
            "epoch_start": stream.epoch_start.clone(),
            "epoch": stream.epoch,
            "position": stream.position,
        }

    def load_member_state_dict(self, slot: int, state: dict[str, Any] | None) -> None:
        """Continue a stream saved by :meth:`member_state_dict` in ``slot``."""
        api = f"{_API}.load_member_state_dict"
        slot = check_member_index(api, slot, self.n_slots)
        self._streams[slot] = None if state is None else self._restored(api, state)

    def _restored(self, api: str, state: dict[str, Any]) -> _Stream:
        _check_keys(api, state, ("seed", "subset", "epoch_start", "epoch", "position"))
        stream = self._new_stream(api, state["seed"], state["subset"])
        stream.rewind(api, state["epoch_start"])
        stream.draw()
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= stream.size:
            raise ValueError(
                f"{api}: epoch {epoch}, position {position} is past {stream.size} samples; {_FROM_STATE_DICT}"
            )
        stream.epoch, stream.position = epoch, position
        return stream
