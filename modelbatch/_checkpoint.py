"""Save and load a pack with its optimizer: ``mb.save`` / ``mb.load``."""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any

import torch

from ._batch import ModelBatch
from .optim import Optimizer

FORMAT = "modelbatch-checkpoint"
VERSION = 1


def save(
    path: str | os.PathLike, batch: ModelBatch, optimizer: Optimizer | None = None, **extra: Any
) -> None:
    """Write ``batch`` (all members), its optimizer and any ``extra`` picklable values to ``path``.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a
    truncated checkpoint behind.

    Example:
        >>> import torch, tempfile, os, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
        >>> opt = mb.optim.Adam(batch, lr=[1e-3, 1e-2, 1e-1, 1.0])
        >>> path = os.path.join(tempfile.mkdtemp(), "pack.pt")
        >>> mb.save(path, batch, opt, epoch=3)
        >>> batch2, opt2, extra = mb.load(path)
        >>> torch.equal(batch2.stack.weight, batch.stack.weight), extra["epoch"]
        (True, 3)
    """
    if not isinstance(batch, ModelBatch):
        raise TypeError(f"mb.save: expected a ModelBatch, got {type(batch).__name__}.")
    if optimizer is not None and optimizer.batch is not batch:
        raise ValueError(
            "mb.save: the optimizer belongs to another pack; pass the optimizer built on this batch."
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "n": batch.n,
        "template": batch.template,
        "backend": {"backend": batch.backend, "chunk_size": batch.chunk_size},
        "batch": batch.state_dict(),
        "optimizer": None
        if optimizer is None
        else {
            "class": f"{type(optimizer).__module__}:{type(optimizer).__qualname__}",
            "state": optimizer.state_dict(),
        },
        "extra": extra,
    }
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(
    path: str | os.PathLike,
    batch: ModelBatch | None = None,
    optimizer: Optimizer | None = None,
    map_location: str | torch.device | None = None,
) -> tuple[ModelBatch, Optimizer | None, dict[str, Any]]:
    """Read a checkpoint written by :func:`save`; returns ``(batch, optimizer, extra)``.

    With no ``batch``, the pack is rebuilt from the architecture stored in the file (its class
    must be importable). Given a ``batch`` (and ``optimizer``), the state is loaded into them,
    and a checkpoint of another architecture or pack size raises.
    """
    not_ours = f"mb.load: {os.fspath(path)!r} is not a ModelBatch checkpoint written by mb.save"
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ValueError(f"{not_ours} (torch.load: {exc}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{not_ours}.")
    saved_opt = payload["optimizer"]
    cls = None
    if saved_opt is not None:  # checked before anything is loaded into batch or optimizer
        module, name = saved_opt["class"].split(":")
        cls = getattr(importlib.import_module(module), name)
        if optimizer is not None and type(optimizer) is not cls:
            raise TypeError(
                f"mb.load: the checkpoint holds a {name} state but the optimizer is a "
                f"{type(optimizer).__name__}; pass an optimizer of the saved class (or none)."
            )
    if batch is None:
        device = map_location if map_location is not None else "cpu"
        model = payload["template"].to_empty(device=device)
        batch = ModelBatch([model] * payload["n"], **payload.get("backend", {}))
    elif type(batch.template) is not type(payload["template"]):
        raise ValueError(
            f"mb.load: the checkpoint holds {type(payload['template']).__name__} models but the batch "
            f"holds {type(batch.template).__name__}; load it into a pack of the same architecture."
        )
    batch.load_state_dict(payload["batch"])
    if cls is not None:
        if optimizer is None:
            optimizer = cls.from_state_dict(batch, saved_opt["state"])
        else:
            optimizer.load_state_dict(saved_opt["state"])
    return batch, optimizer, payload["extra"]
