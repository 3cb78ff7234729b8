"""Recipe data as a pack reads it: ``(X, y)`` tensors kept on the device, or a streamed ``Dataset``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from .._host import upload
from ._stream import StreamingGather, check_loader_kwargs
from ._streams import MemberStep

Data = tuple[torch.Tensor, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

SUPPORTED = (
    "a pair (X, y) of tensors with the same first dimension, or a map-style torch.utils.data.Dataset "
    "(with __len__ and __getitem__) whose items are (x, y) pairs"
)


def check_data(api: str, name: str, data: Any) -> Data | Dataset:
    """``data`` as ``(X, y)`` tensors, or the map-style ``Dataset`` itself after checking its first item."""
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"{api}: {name} is an IterableDataset ({type(data).__name__}); each member draws its own "
            f"shuffled batches by index, so {name} must be {SUPPORTED}. Wrap the data in a map-style Dataset."
        )
    if is_dataset(data):
        return _check_dataset(api, name, data)
    if not isinstance(data, Sequence) or isinstance(data, str) or len(data) != 2:
        raise TypeError(f"{api}: {name} must be {SUPPORTED}; got {type(data).__name__}.")
    X, y = (torch.as_tensor(t) for t in data)
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{api}: {name} has {X.shape[0]} inputs but {y.shape[0]} targets; X and y must have the same "
            "batch (first) dimension."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{api}: {name} is empty.")
    return X, y


def is_dataset(data: Any) -> bool:
    """A map-style dataset: a torch ``Dataset`` or an object with ``__len__`` and ``__getitem__``
    that is not a plain tuple/list (those are ``(X, y)`` pairs)."""
    if isinstance(data, IterableDataset):
        return False
    if isinstance(data, Dataset):
        return True
    return (
        not isinstance(data, (tuple, list, str, torch.Tensor))
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
    )


def _check_dataset(api: str, name: str, data: Any) -> Any:
    try:
        n = len(data)
    except TypeError as exc:
        raise TypeError(f"{api}: {name} must be {SUPPORTED}; len() failed: {exc}.") from exc
    if n == 0:
        raise ValueError(f"{api}: {name} is empty.")
    item = data[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"a {type(item).__name__}" + (
            f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
        )
        raise TypeError(
            f"{api}: {name}[0] is {got}; {name} must be {SUPPORTED}. Return (input, target) from __getitem__."
        )
    return data


def data_size(data: Data | Dataset) -> int:
    """Number of samples of recipe data."""
    return data[0].shape[0] if isinstance(data, tuple) else len(data)


def example_batch(data: Data | Dataset, size: int) -> Batch:
    """The first ``size`` samples as ``(x, y)`` tensors (collated for a dataset)."""
    if isinstance(data, tuple):
        return data[0][:size], data[1][:size]
    index = torch.arange(min(size, len(data))).unsqueeze(0)
    return tuple(t[0] for t in StreamingGather(data)(index))


class PackData:
    """One recipe dataset as a pack trainer reads it, in per-member steps or in shared chunks.

    ``(X, y)`` tensors are moved to ``device`` once (floating ones cast to ``dtype``) and indexed
    there; a ``Dataset`` stays where it is and each step's union of the members' indices is
    streamed through a ``DataLoader`` (:class:`StreamingGather`), then routed on the device.
    Both give every member the same samples, so results agree.
    """

    def __init__(
        self,
        data: Data | Dataset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        loader_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.size = data_size(data)
        self.tensors: Data | None = None
        self.gather: StreamingGather | None = None
        if isinstance(data, tuple):
            self.tensors = tuple(t.to(device, dtype if t.is_floating_point() else t.dtype) for t in data)
        else:
            pin = device.type == "cuda" if pin_memory is None else pin_memory
            self.gather = StreamingGather(
                data,
                num_workers=num_workers,
                pin_memory=pin,
                device=device,
                dtype=dtype,
                loader_kwargs=check_loader_kwargs("mb.Recipe", loader_kwargs),
            )

    def __len__(self) -> int:
        return self.size

    def steps(self, steps: Iterable[MemberStep]) -> Iterator[tuple[MemberStep, Batch]]:
        """``(step, (xs, ys))`` with ``[N, B, ...]`` inputs and targets per step, in order."""
        if self.gather is not None:
            yield from self._checked(self.gather.stream(steps))
            return
        X, y = self.tensors
        for step in steps:
            idx = upload(step.indices, torch.device(self.device))  # pinned, non-blocking: no host wait
            yield step, (X[idx], y[idx])

    def chunks(self, size: int) -> Iterator[Batch]:
        """The whole data in order, ``size`` samples at a time (shared by every member)."""
        if self.gather is None:
            X, y = self.tensors
            for lo in range(0, self.size, size):
                yield X[lo : lo + size], y[lo : lo + size]
            return
        steps = (
            MemberStep(
                torch.arange(lo, min(lo + size, self.size)).unsqueeze(0),
                None,
                torch.ones(1, dtype=torch.bool),
                -1,
                -1,
            )
            for lo in range(0, self.size, size)
        )
        for _, (xs, ys) in self.steps(steps):
            yield xs[0], ys[0]

    def _checked(self, batches: Iterator[tuple[MemberStep, Any]]) -> Iterator[tuple[MemberStep, Batch]]:
        for step, batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"mb.Recipe: a batch of the dataset collated to {type(batch).__name__}, not (x, y); "
                    f"the data must be {SUPPORTED}."
                )
            yield step, (batch[0], batch[1])
