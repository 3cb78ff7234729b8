"""Routing samples to members: ``gather`` for in-memory tensors, ``StreamingGather`` for datasets."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from ._sampler import MemberSampler, MemberStep

_API = "mb.data.StreamingGather"


def _indices_of(api: str, indices: torch.Tensor | MemberStep) -> torch.Tensor:
    if isinstance(indices, MemberStep):
        indices = indices.indices
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.is_floating_point():
        raise TypeError(
            f"{api}: expected a MemberStep or [N, B] int indices, got "
            f"{list(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}."
        )
    return indices


def gather(
    tensors: torch.Tensor | Sequence[torch.Tensor], indices: torch.Tensor | MemberStep
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Index in-memory tensors ``[n, ...]`` by per-member indices into ``[N, B, ...]``, one op each.

    Each tensor is indexed on its own device (``tensor[indices]``); a tuple in gives a tuple out.

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(10, 3), torch.arange(10)
        >>> step = next(iter(mb.data.MemberSampler(10, n_members=2, batch_size=4).epoch(0)))
        >>> xs, ys = mb.data.gather((X, y), step)
        >>> xs.shape, ys.shape
        (torch.Size([2, 4, 3]), torch.Size([2, 4]))
        >>> torch.equal(ys, step.indices)
        True
    """
    index = _indices_of("mb.data.gather", indices)
    if isinstance(tensors, torch.Tensor):
        return tensors[index.to(tensors.device)]
    return tuple(t[index.to(t.device)] for t in tensors)


class _Once:
    """A batch sampler over a generator of index lists (a DataLoader iterates it exactly once)."""

    def __init__(self, batches: Iterator[list[int]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches


class StreamingGather:
    """Fetch each step's samples from a map-style dataset once, then route them to the members.

    For data that does not fit on the device: per step the union of the members' indices is
    loaded once (``torch.unique``), moved to ``device`` and indexed into ``[N, B, ...]`` there.
    :meth:`epoch` loads through a ``DataLoader`` (``num_workers`` prefetching ahead,
    ``pin_memory``); calling the object on one step loads in this process. Tensors, tuples of
    tensors and ``TensorDataset`` are indexed directly (no DataLoader).

    Example:
        >>> import torch, modelbatch as mb
        >>> from torch.utils.data import TensorDataset
        >>> X, y = torch.randn(10, 3), torch.arange(10)
        >>> sampler = mb.data.MemberSampler(10, n_members=3, batch_size=4)
        >>> stream = mb.data.StreamingGather(TensorDataset(X, y))
        >>> for step, (xs, ys) in stream.epoch(sampler, 0):
        ...     assert torch.equal(xs, X[step.indices]) and torch.equal(ys, step.indices)
        >>> xs.shape
        torch.Size([3, 4, 3])
    """

    def __init__(
        self,
        dataset: Dataset | torch.Tensor | Sequence[torch.Tensor],
        num_workers: int = 0,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.device = None if device is None else torch.device(device)
        self.collate_fn = collate_fn
        self._tensors = self._tensor_fast_path(dataset)
        if self._tensors is None and not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"{_API}: expected a map-style Dataset (with __getitem__), a tensor or a tuple of "
                f"tensors, got {type(dataset).__name__}. Wrap iterable data in a map-style Dataset."
            )

    @staticmethod
    def _tensor_fast_path(dataset: Any) -> tuple[torch.Tensor, ...] | None:
        if isinstance(dataset, torch.Tensor):
            return (dataset,)
        if isinstance(dataset, TensorDataset):
            return tuple(dataset.tensors)
        if (
            isinstance(dataset, (tuple, list))
            and dataset
            and all(isinstance(t, torch.Tensor) for t in dataset)
        ):
            return tuple(dataset)
        return None

    def __call__(self, step: MemberStep | torch.Tensor) -> Any:
        """This step's samples as ``[N, B, ...]``, fetched in this process (no workers, no pinning)."""
        index = _indices_of(_API, step)
        unique, inverse = torch.unique(index.cpu(), return_inverse=True)
        return self._route(self._fetch(unique.tolist()), inverse)

    def epoch(self, sampler: MemberSampler, e: int) -> Iterator[tuple[MemberStep, Any]]:
        """Iterate ``sampler.epoch(e)`` as ``(step, batch)``, prefetching with the DataLoader's workers.

        The sampler's position advances only as steps are handed out here, so its
        ``state_dict()`` stays right although the workers fetch ahead.
        """
        sampler._enter(e)
        steps = sampler._iterate(e, commit=False)
        if self._tensors is not None or self.num_workers == 0:
            for step in steps:
                sampler._commit(step)
                yield step, self(step)
            return
        pending: deque[tuple[MemberStep, torch.Tensor]] = deque()
        for fetched in self._loader(self._unique_batches(steps, pending)):
            step, inverse = pending.popleft()
            sampler._commit(step)
            yield step, self._route(fetched, inverse)

    @staticmethod
    def _unique_batches(
        steps: Iterator[MemberStep], pending: deque[tuple[MemberStep, torch.Tensor]]
    ) -> Iterator[list[int]]:
        for step in steps:
            unique, inverse = torch.unique(step.indices, return_inverse=True)
            pending.append((step, inverse))
            yield unique.tolist()

    def _loader(self, batches: Iterator[list[int]]) -> DataLoader:
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        # A private generator: the loader draws a worker seed per iteration, never from the global RNG.
        return DataLoader(
            self.dataset,
            batch_sampler=_Once(batches),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
            **kwargs,
        )

    def _fetch(self, unique: list[int]) -> Any:
        if self._tensors is not None:
            index = torch.tensor(unique, dtype=torch.int64)
            rows = tuple(t[index.to(t.device)] for t in self._tensors)
            return rows[0] if isinstance(self.dataset, torch.Tensor) else rows
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(unique) if getitems is not None else [self.dataset[i] for i in unique]
        return (self.collate_fn or default_collate)(samples)

    def _route(self, fetched: Any, inverse: torch.Tensor) -> Any:
        if isinstance(fetched, torch.Tensor):
            device = fetched.device if self.device is None else self.device
            moved = fetched.to(device, non_blocking=fetched.is_pinned())
            return moved[inverse.to(device)]
        if isinstance(fetched, Mapping):
            return {key: self._route(value, inverse) for key, value in fetched.items()}
        if isinstance(fetched, (tuple, list)) and not _is_sample_list(fetched, inverse):
            return type(fetched)(self._route(value, inverse) for value in fetched)
        if isinstance(fetched, (tuple, list)):
            return [[fetched[j] for j in row] for row in inverse.tolist()]
        raise TypeError(
            f"{_API}: cannot route a collated value of type {type(fetched).__name__}; return tensors, "
            "tuples, lists or dicts of them from the dataset (or pass collate_fn=)."
        )


def _is_sample_list(value: Sequence[Any], inverse: torch.Tensor) -> bool:
    """A collated list of per-sample non-tensor values (e.g. strings), one per unique index."""
    unique_count = int(inverse.max()) + 1 if inverse.numel() else 0
    return len(value) == unique_count and not any(
        isinstance(v, (torch.Tensor, tuple, list, dict)) for v in value
    )
