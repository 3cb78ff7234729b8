"""What a training step knows on the host, and how it reaches the device without making the host wait.

A steady step must not block the host on the device (``tests/test_host_sync.py`` counts it):
per-member flags and scalars live on the host (Python lists), a device tensor is read only when it
changed (:func:`host_list`), and host values go to the device by pinned, non-blocking copies
(:func:`upload`) or from a cache of small constant tensors (:func:`device_tensor`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from . import _sync_probe

_DEVICE_DATA: dict[int, weakref.ref] = {}
_LISTS: dict[int, tuple[weakref.ref, int, list]] = {}
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 256


def mark_device_data(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as values only the device knows (an overflow mask): reading it is a host sync.

    On a device the read is a device-to-host copy, which the probe counts; on a CPU-only machine
    :func:`to_host` reports the read to the probe instead, so the CPU tests count it too.
    """
    key = id(t)
    _DEVICE_DATA[key] = weakref.ref(t, lambda _ref: _DEVICE_DATA.pop(key, None))
    return t


def to_host(t: torch.Tensor) -> list:
    """``t.tolist()``: the one way the engine reads values that may live on the device."""
    ref = _DEVICE_DATA.get(id(t))
    if t.device.type == "cpu" and ref is not None and ref() is t:
        _sync_probe.note("to_host")
    return t.detach().reshape(-1).tolist()


def host_list(t: torch.Tensor) -> list:
    """``t.tolist()`` of the pack's ``[N]`` flags (``batch.active``), read again only when ``t`` changes.

    A change is a new tensor or an in-place write (its ``_version``); each read is counted by
    the probe as the sync it is when ``t`` lives on a device.
    """
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return to_host(mark_device_data(t))
    key = id(t)
    hit = _LISTS.get(key)
    if hit is None or hit[0]() is not t or hit[1] != version:
        values = to_host(mark_device_data(t))
        _LISTS[key] = hit = (weakref.ref(t, lambda _ref: _LISTS.pop(key, None)), version, values)
    return hit[2]


def check_mask_size(api: str, size: int, n: int) -> None:
    """Refuse a member mask that has neither one value per member nor a single one."""
    if size not in (1, n):
        raise ValueError(
            f"{api}: the mask has {size} values but the pack has {n} members; pass one bool per member."
        )


def member_flags(api: str, mask: torch.Tensor, active: list[bool]) -> list[bool]:
    """``active`` and the ``[N]`` (or one-element) ``mask``, on the host."""
    flags = to_host(mask)
    check_mask_size(api, len(flags), len(active))
    if len(flags) == 1:
        flags = flags * len(active)
    return [a and bool(f) for a, f in zip(active, flags)]


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host tensor ``t`` on ``device``, copied without the host waiting for the device."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)
    try:
        return t.pin_memory().to(device, non_blocking=True)
    except RuntimeError:  # no pinned memory for this accelerator: a plain copy
        return t.to(device)


def device_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached read-only tensor of ``values`` on ``device`` (member rows, masks): uploaded once."""
    key = (tuple(values), dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = upload(torch.tensor(key[0], dtype=dtype), device)
    return t
