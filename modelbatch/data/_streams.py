"""MemberStreams: each slot of a pack walks its own epochs, so members can join at any step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._hparams import check_member_index, check_positive_int
from ._sampler import MemberStep, _draw_epoch
from ._subsets import IndexLike, as_index

_API = "mb.data.MemberStreams"


@dataclass
class _Stream:
    seed: int
    subset: torch.Tensor | None
    generator: torch.Generator
    epoch_start: torch.Tensor  # generator state when the current epoch was drawn
    order: torch.Tensor
    position: int = 0
    epoch: int = 0


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
        index = None if subset is None else as_index(api, "subset", subset, self.n_samples)
        size = self.n_samples if index is None else index.numel()
        if size == 0 or (self.drop_last and size < self.batch_size):
            raise ValueError(
                f"{api}: the member has {size} samples; it needs at least one"
                + (
                    f" and, with drop_last=True, at least batch_size={self.batch_size}."
                    if self.drop_last
                    else "."
                )
            )
        generator = torch.Generator().manual_seed(int(seed))
        stream = _Stream(
            int(seed), index, generator, generator.get_state(), torch.empty(0, dtype=torch.int64)
        )
        self._streams[slot] = stream
        self._draw(stream)
        stream.epoch = 0

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
            if self._remaining(stream) == 0:
                self._draw(stream)
                stream.epoch += 1
            take = min(b, self._remaining(stream))
            indices[slot, :take] = stream.order[stream.position : stream.position + take]
            valid[slot, :take] = True
            stream.position += take
            full = full and (take == b or take == 0)
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
        slot = check_member_index(f"{_API}.load_member_state_dict", slot, self.n_slots)
        if state is None:
            self._streams[slot] = None
            return
        self.reset_member(slot, seed=state["seed"], subset=state["subset"])
        stream = self._streams[slot]
        stream.generator.set_state(state["epoch_start"])
        self._draw(stream)
        stream.epoch, stream.position = int(state["epoch"]), int(state["position"])

    def _size(self, stream: _Stream) -> int:
        return self.n_samples if stream.subset is None else stream.subset.numel()

    def _remaining(self, stream: _Stream) -> int:
        left = stream.order.numel() - stream.position
        return left - left % self.batch_size if self.drop_last else left

    def _draw(self, stream: _Stream) -> None:
        stream.epoch_start = stream.generator.get_state()
        perm = _draw_epoch(stream.generator, self._size(stream))
        stream.order = perm if stream.subset is None else stream.subset[perm]
        stream.position = 0
