"""MemberSampler: each member's ``_Stream`` driven in pack epochs, steps read from a table of the epoch."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from .._hparams import check_member_index, check_positive_int
from ._streams import _FROM_STATE_DICT, MemberStep, _check_keys, _check_size, _Stream
from ._subsets import IndexLike, Seeds, as_index, member_seeds

_API = "mb.data.MemberSampler"
_CONFIG = ("n_samples", "n_members", "batch_size", "order", "drop_last")
_STATE = (*_CONFIG, "seeds", "subsets", "epoch", "position", "epoch_steps", "waiting", "generator_states")


class MemberSampler:
    """Per-member batches for a pack: ``[N, B]`` sample indices per step, with padding masks.

    ``order="member"`` (default): member ``i``'s batches are exactly those of
    ``DataLoader(Subset(data, subsets[i]) or data, batch_size, shuffle=True, drop_last=drop_last,
    generator=torch.Generator().manual_seed(seed_i))`` iterated epoch after epoch (one generator
    carried across epochs; a loader with ``persistent_workers=True`` draws differently).
    ``order="shared"``: one permutation of all ``n_samples`` per epoch (from one generator seeded
    with ``seeds``) orders every member's samples: a different experiment, in which members with
    the same data see the same batches.

    ``seeds``: an int (member ``i`` gets ``seeds + i``) or one seed per member. ``subsets``: one
    index tensor (or bool mask) per member; sizes may differ. Short members' batches are padded
    (index 0, ``mask=False``) and a member whose epoch is over does not participate in the
    remaining steps of the pack epoch. ``len(sampler)`` is the number of steps of a pack epoch.

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> sampler = mb.data.MemberSampler(10, n_members=4, batch_size=4, seeds=0)
        >>> len(sampler)
        3
        >>> steps = list(sampler.epoch(0))
        >>> steps[0].indices.shape, steps[0].mask is None, steps[-1].mask.sum(dim=1).tolist()
        (torch.Size([4, 4]), True, [2, 2, 2, 2])
        >>> X[steps[0].indices].shape  # member i trains on X[indices[i]]
        torch.Size([4, 4, 3])
    """

    def __init__(
        self,
        n_samples: int,
        n_members: int,
        batch_size: int,
        *,
        seeds: Seeds = 0,
        order: Literal["member", "shared"] = "member",
        subsets: Sequence[IndexLike] | None = None,
        drop_last: bool = False,
    ) -> None:
        for name, value in (("n_samples", n_samples), ("n_members", n_members), ("batch_size", batch_size)):
            check_positive_int(_API, name, value)
        if order not in ("member", "shared"):
            raise ValueError(f"{_API}: order must be 'member' or 'shared', got {order!r}.")
        self.n_samples, self.n_members, self.batch_size = n_samples, n_members, batch_size
        self.order, self.drop_last = order, bool(drop_last)
        self._seeds = self._check_seeds(seeds)
        self._subsets = self._check_subsets(subsets)
        for i in range(n_members):
            _check_size(_API, f"member {i}", self._size(i), batch_size, self.drop_last)
        self._streams = self._new_streams()
        self._epoch, self._position, self._epoch_steps = -1, 0, 0
        self._waiting = torch.zeros(n_members, dtype=torch.bool)
        self._table = torch.zeros(n_members, 0, dtype=torch.int64)
        self._lengths = torch.zeros(n_members, dtype=torch.int64)

    # ------------------------------------------------------------------ checks
    def _check_seeds(self, seeds: Seeds) -> list[int]:
        values = member_seeds(_API, seeds, self.n_members)
        if self.order == "shared" and len(set(values)) > 1 and not isinstance(seeds, int):
            raise ValueError(
                f"{_API}: order='shared' uses one generator for all members, but seeds holds "
                f"{len(set(values))} different values; pass one int seed."
            )
        return values

    def _new_streams(self) -> list[_Stream]:
        """Every member's fresh stream; with ``order="shared"``, the one stream of all samples."""
        if self.order == "shared":
            return [_Stream(self._seeds[0], None, self.n_samples)]
        return [_Stream(seed, subset, self.n_samples) for seed, subset in zip(self._seeds, self._subsets)]

    def _check_subsets(self, subsets: Sequence[IndexLike] | None) -> list[torch.Tensor | None]:
        if subsets is None:
            return [None] * self.n_members
        if isinstance(subsets, torch.Tensor) or len(subsets) != self.n_members:
            got = "a tensor" if isinstance(subsets, torch.Tensor) else f"{len(subsets)} subsets"
            raise ValueError(
                f"{_API}: subsets must be a list of one index tensor per member; got {got} for "
                f"{self.n_members} members. Pass e.g. mb.data.bootstrap(n, {self.n_members})."
            )
        return [as_index(_API, f"subset {i}", s, self.n_samples) for i, s in enumerate(subsets)]

    # ------------------------------------------------------------------ sizes
    def _size(self, i: int) -> int:
        subset = self._subsets[i]
        return self.n_samples if subset is None else subset.numel()

    def _steps_of(self, size: int) -> int:
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def __len__(self) -> int:
        return max(self._steps_of(self._size(i)) for i in range(self.n_members))

    @property
    def seeds(self) -> list[int]:
        """Each member's seed."""
        return list(self._seeds)

    @property
    def subsets(self) -> list[torch.Tensor | None]:
        """Each member's sample indices (``None``: the whole dataset)."""
        return list(self._subsets)

    # ------------------------------------------------------------------ epochs
    def epoch(self, e: int) -> Iterator[MemberStep]:
        """The steps of pack epoch ``e``; the epoch in progress resumes after the last step handed out.

        That holds after :meth:`load_state_dict` too. A later ``e`` starts it (epochs skipped are
        drawn as if iterated); an earlier one raises. An epoch's draws are made when it starts, so
        leaving an epoch early and starting the next one continues as if it had been finished
        (a DataLoader loop left early skips RandomSampler's final draw).
        """
        self._enter(e)
        return self._iterate(e, commit=True)

    def _enter(self, e: int) -> None:
        if isinstance(e, bool) or not isinstance(e, int) or e < self._epoch:
            raise ValueError(
                f"{_API}.epoch: epoch {e!r} is before the current epoch {self._epoch}; epochs are "
                "drawn in order from each member's generator. Load an earlier state_dict to go back."
            )
        while self._epoch < e:
            self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch += 1
        self._position = 0
        self._waiting.zero_()
        self._epoch_steps = len(self)
        self._draw_table()

    def _draw_table(self) -> None:
        orders = self._draw_orders()
        width = self._epoch_steps * self.batch_size
        dtype = torch.int32 if self.n_samples < 2**31 else torch.int64
        self._table = torch.zeros(self.n_members, width, dtype=dtype)
        self._lengths = torch.zeros(self.n_members, dtype=torch.int64)
        for i, order in enumerate(orders):
            if order is None:
                continue
            used = min(order.numel(), self._steps_of(order.numel()) * self.batch_size)
            self._table[i, :used] = order[:used].to(dtype)
            self._lengths[i] = used

    def _draw_orders(self) -> list[torch.Tensor | None]:
        """Start every member's next epoch (members waiting for the next pack epoch draw nothing)."""
        if self.order == "shared":
            self._streams[0].draw()
            perm = self._streams[0].order
            rank = torch.empty_like(perm)
            rank[perm] = torch.arange(self.n_samples)
            return [None if w else self._shared_order(perm, rank, i) for i, w in enumerate(self._waiting)]
        for stream, waiting in zip(self._streams, self._waiting):
            if not waiting:
                stream.draw()
        return [None if w else stream.order for stream, w in zip(self._streams, self._waiting)]

    def _shared_order(self, perm: torch.Tensor, rank: torch.Tensor, i: int) -> torch.Tensor:
        subset = self._subsets[i]
        if subset is None:
            return perm
        return subset[torch.argsort(rank[subset], stable=True)]

    def _iterate(self, e: int, *, commit: bool) -> Iterator[MemberStep]:
        t = self._position
        while t < self._epoch_steps and self._epoch == e:
            if commit:
                self._position = t + 1
            yield self._step(t)
            t += 1

    def _step(self, t: int) -> MemberStep:
        b = self.batch_size
        indices = self._table[:, t * b : (t + 1) * b].to(torch.int64)
        valid = (t * b + torch.arange(b)).unsqueeze(0) < self._lengths.unsqueeze(1)
        mask = None if bool(valid.all()) else valid
        return MemberStep(indices, mask, valid.any(dim=1), self._epoch, t)

    def _commit(self, step: MemberStep) -> None:
        """Record that ``step`` was handed to the training loop (for prefetching consumers)."""
        if step.epoch == self._epoch:
            self._position = max(self._position, step.step + 1)

    # ------------------------------------------------------------------ members
    def reset_member(self, i: int, *, seed: int | None = None, subset: IndexLike | None = None) -> None:
        """Give slot ``i`` to a new member: its own generator from ``seed`` and its ``subset``.

        ``None`` keeps the slot's seed / subset (pass ``torch.arange(n_samples)`` for all data).
        The new member starts its first epoch with the next pack epoch; until then it does not
        participate. With ``order="shared"`` only the subset can change.

        Example:
            >>> import modelbatch as mb
            >>> sampler = mb.data.MemberSampler(8, n_members=2, batch_size=4)
            >>> it = sampler.epoch(0); _ = next(it)
            >>> sampler.reset_member(1, seed=42, subset=[0, 1, 2])
            >>> next(it).participating.tolist()
            [True, False]
        """
        api = f"{_API}.reset_member"
        i = check_member_index(api, i, self.n_members)
        if seed is not None and self.order == "shared":
            raise ValueError(f"{api}: order='shared' has one generator for all members; drop seed=.")
        new_subset = self._subsets[i] if subset is None else as_index(api, "subset", subset, self.n_samples)
        stream = _Stream(self._seeds[i] if seed is None else int(seed), new_subset, self.n_samples)
        _check_size(api, f"member {i}", stream.size, self.batch_size, self.drop_last)
        # Every argument is checked (the stream is built): only now does the slot change.
        self._seeds[i], self._subsets[i] = stream.seed, new_subset
        if self.order == "member":
            self._streams[i] = stream
        if self._epoch >= 0:
            self._waiting[i] = True
            self._lengths[i] = 0
            self._table[i] = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-epoch: positions, generator states, seeds, subsets."""
        return {
            "n_samples": self.n_samples,
            "n_members": self.n_members,
            "batch_size": self.batch_size,
            "order": self.order,
            "drop_last": self.drop_last,
            "seeds": list(self._seeds),
            "subsets": [None if s is None else s.clone() for s in self._subsets],
            "epoch": self._epoch,
            "position": self._position,
            "epoch_steps": self._epoch_steps,
            "waiting": self._waiting.clone(),
            "generator_states": [s.epoch_start.clone() for s in self._streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: ``epoch(state's epoch)`` continues after its last step.

        Example:
            >>> import modelbatch as mb
            >>> a = mb.data.MemberSampler(10, n_members=3, batch_size=3, seeds=7)
            >>> it = a.epoch(0); _ = next(it); saved = a.state_dict(); rest = list(it)
            >>> b = mb.data.MemberSampler(10, n_members=3, batch_size=3, seeds=7)
            >>> b.load_state_dict(saved)
            >>> all((x.indices == y.indices).all() for x, y in zip(rest, b.epoch(0)))
            True
        """
        api = f"{_API}.load_state_dict"
        _check_keys(api, state, _STATE)
        for key in _CONFIG:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"{api}: the state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}; build the sampler with the settings it was saved with."
                )
        counts = {key: len(state[key]) for key in ("subsets", "waiting", "generator_states")}
        n = self.n_members
        expected = {"subsets": n, "waiting": n, "generator_states": len(self._streams)}
        if counts != expected:
            raise ValueError(f"{api}: the state holds {counts} entries, not {expected}; {_FROM_STATE_DICT}")
        # Loaded into a copy that replaces this sampler once whole: a state that does not fit changes nothing.
        loaded = copy.copy(self)
        loaded._load(api, state)
        vars(self).update(vars(loaded))

    def _load(self, api: str, state: dict[str, Any]) -> None:
        self._seeds = member_seeds(api, state["seeds"], self.n_members)
        self._subsets = [
            None if s is None else as_index(api, f"subset {i}", s, self.n_samples)
            for i, s in enumerate(state["subsets"])
        ]
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._epoch_steps = int(state["epoch_steps"])
        self._waiting = torch.as_tensor(state["waiting"], dtype=torch.bool).clone()
        self._streams = self._new_streams()
        for stream, epoch_start in zip(self._streams, state["generator_states"]):
            stream.rewind(api, epoch_start)
        if self._epoch >= 0:
            self._draw_table()
