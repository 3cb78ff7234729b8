"""Count the ops that make the host wait for an accelerator: the probe behind ``tests/test_host_sync.py``."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "allclose"}
_ALWAYS |= {"unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
_PROBES: list[HostSyncCounter] = []


def note(name: str) -> None:
    """Count ``name`` in every open probe: the engine reports a read a CPU-only run cannot dispatch."""
    for probe in _PROBES:
        probe.counts[name] += 1


class HostSyncCounter(TorchDispatchMode):
    """Count, per op name, the dispatched ops that on CUDA block the host until the device catches up.

    Counted: reading a tensor's value (``item()``, ``int(t)``, ``bool(t)``, ``if t:``: all
    ``aten._local_scalar_dense``), ops whose output size depends on values (``nonzero``,
    ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``), ``equal``,
    ``is_nonzero``, and copies between the host and a device that are not ``non_blocking``.
    Ops that torch functions call inside (``clip_grad_norm_(..., error_if_nonfinite=True)``,
    ``t.isfinite().all()`` then ``bool``) are dispatched too, so they are counted.

    Warning: on a CPU-only machine a host-device copy cannot happen, and ``Tensor.tolist()`` /
    ``numpy()`` are not dispatched (on CUDA they dispatch a copy to the host, which is counted).
    The engine therefore reports its reads of device values (``modelbatch._host.to_host``) as
    ``"to_host"``; a ``tolist()`` elsewhere of a would-be-device tensor is only seen on a device.

    Example:
        >>> import torch
        >>> from modelbatch.testing import HostSyncCounter
        >>> t = torch.ones(4)
        >>> with HostSyncCounter() as probe:
        ...     _ = t * 2
        ...     _ = bool(t.isfinite().all()) and t.nonzero()
        >>> probe.total, dict(probe.counts)
        (2, {'_local_scalar_dense': 1, 'nonzero': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> HostSyncCounter:
        _PROBES.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _PROBES.remove(self)
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        """The number of counted ops."""
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _ALWAYS or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            self.counts[name] += 1
        elif name in {"_to_copy", "copy_"} and not kwargs.get("non_blocking", len(args) > 2 and args[2]):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            if isinstance(src, torch.Tensor) and (src.device.type == "cpu") != (dst.type == "cpu"):
                self.counts[f"{name}:{src.device.type}->{dst.type}"] += 1
        return func(*args, **kwargs)
