"""Routing samples to members: ``gather`` for in-memory tensors, ``StreamingGather`` for datasets."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from .._host import upload
from ._sampler import MemberSampler
from ._streams import MemberStep

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


LOADER_OWNED = ("dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator")
"""DataLoader arguments that the member streams decide; ``loader_kwargs`` may not set them."""


def check_loader_kwargs(api: str, loader_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``loader_kwargs`` as a dict, refusing the arguments that would change the members' batches."""
    if loader_kwargs is None:
        return {}
    if not isinstance(loader_kwargs, Mapping):
        raise TypeError(
            f"{api}: loader_kwargs must be a dict of DataLoader arguments, "
            f"got {type(loader_kwargs).__name__}."
        )
    owned = sorted(set(loader_kwargs) & {*LOADER_OWNED, "num_workers", "pin_memory"})
    if owned:
        raise ValueError(
            f"{api}: loader_kwargs sets {owned}; batches and order come from each member's seed "
            "(batch_size, subset, order), and num_workers / pin_memory have their own arguments. "
            "Pass only other DataLoader arguments (prefetch_factor, multiprocessing_context, ...)."
        )
    return dict(loader_kwargs)


class _Once:
    """A batch sampler over a generator of index lists: each ``iter()`` returns the current one."""

    def __init__(self, batches: Iterator[list[int]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches


class StreamingGather:
    """Fetch each step's samples from a map-style dataset once, then route them to the members.

    For data that does not fit on the device: per step the union of the members' indices is
    loaded once (``torch.unique``), moved to ``device`` (floating tensors cast to ``dtype``) and
    indexed into ``[N, B, ...]`` there. :meth:`epoch` and :meth:`stream` load through a
    ``DataLoader`` (``num_workers`` prefetching ahead and kept alive between calls,
    ``pin_memory``, further ``loader_kwargs`` such as ``prefetch_factor`` or
    ``multiprocessing_context``); calling the object on one step loads in this process.
    Tensors, tuples of tensors and ``TensorDataset`` are indexed directly (no DataLoader).
    :class:`mb.Recipe <modelbatch.Recipe>` streams a ``Dataset`` given as ``train_data`` /
    ``val_data`` through this class.

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
        *,
        dtype: torch.dtype | None = None,
        loader_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.device = None if device is None else torch.device(device)
        self.collate_fn = collate_fn
        self.dtype = dtype
        self.loader_kwargs = check_loader_kwargs(_API, loader_kwargs)
        self._tensors = self._tensor_fast_path(dataset)
        if self._tensors is None and (
            isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
        ):
            raise TypeError(
                f"{_API}: expected a map-style Dataset (with __getitem__), a tensor or a tuple of "
                f"tensors, got {type(dataset).__name__}. Wrap iterable data in a map-style Dataset."
            )
        self._feed = _Once(iter(()))
        self._persistent: DataLoader | None = None

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
        for step, batch in self.stream(sampler._iterate(e, commit=False)):
            sampler._commit(step)
            yield step, batch

    def stream(self, steps: Iterable[MemberStep]) -> Iterator[tuple[MemberStep, Any]]:
        """Iterate any steps (e.g. from :class:`MemberStreams`) as ``(step, batch)``, in order.

        Each step's union of indices is one batch of the ``DataLoader``; with ``num_workers``
        the steps are drawn ``prefetch_factor * num_workers`` ahead of the training loop, so
        draw them lazily from a sampler whose members do not change while this runs.

        Example:
            >>> import torch, modelbatch as mb
            >>> streams = mb.data.MemberStreams(10, n_slots=2, batch_size=4)
            >>> streams.reset_member(0, seed=0); streams.reset_member(1, seed=1)
            >>> data = [(torch.full((3,), float(i)), i) for i in range(10)]  # any map-style dataset
            >>> gather = mb.data.StreamingGather(data)
            >>> for step, (xs, ys) in gather.stream(streams.next_step() for _ in range(3)):
            ...     assert torch.equal(ys, step.indices) and torch.equal(xs[..., 0], ys.float())
            >>> xs.shape
            torch.Size([2, 4, 3])
        """
        if self._tensors is not None:
            for step in steps:
                yield step, self(step)
            return
        pending: deque[tuple[MemberStep, torch.Tensor]] = deque()
        for fetched in self._loader(self._unique_batches(steps, pending)):
            step, inverse = pending.popleft()
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
        """A loader over ``batches``; with workers, one loader whose workers live between calls."""
        self._feed._batches = batches
        if self._persistent is not None:
            return self._persistent
        kwargs = dict(self.loader_kwargs)
        if self.collate_fn is not None:
            kwargs["collate_fn"] = self.collate_fn
        if self.num_workers > 0:
            kwargs.setdefault("persistent_workers", True)
        # A private generator: the loader draws a worker seed per iteration, never from the global RNG.
        loader = DataLoader(
            self.dataset,
            batch_sampler=self._feed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
            **kwargs,
        )
        if loader.persistent_workers:
            self._persistent = loader
        return loader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_feed"], state["_persistent"] = _Once(iter(())), None  # worker processes stay here
        return state

    def _fetch(self, unique: list[int]) -> Any:
        if self._tensors is not None:
            index = torch.tensor(unique, dtype=torch.int64)
            rows = tuple(t[upload(index, t.device)] for t in self._tensors)
            return rows[0] if isinstance(self.dataset, torch.Tensor) else rows
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(unique) if getitems is not None else [self.dataset[i] for i in unique]
        return (self.collate_fn or default_collate)(samples)

    def _route(self, fetched: Any, inverse: torch.Tensor) -> Any:
        if isinstance(fetched, torch.Tensor):
            device = fetched.device if self.device is None else self.device
            dtype = self.dtype if self.dtype is not None and fetched.is_floating_point() else fetched.dtype
            moved = upload(fetched, device).to(dtype)  # pinned, non-blocking: the host waits for nothing
            return moved[upload(inverse, device)]
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
