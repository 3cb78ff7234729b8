"""Save and load a pack with its optimizer: ``mb.save`` / ``mb.load``."""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any

import torch

from ._batch import ModelBatch
from ._dropout import rate_slots, set_member_rates
from ._tied import retie, tied_names
from .optim import Optimizer

FORMAT = "modelbatch-checkpoint"
# 2: non-persistent buffers are saved too; 3: each member's dropout rates and stream; 4: float
# dropout rates (Hugging Face's attention_dropout) per member too, keyed by the attribute's path
# (a version-3 file holds the dropout modules' rates alone: its float rates were equal, in the template);
# 5: a Hugging Face config's float rates per member too (a version-4 file: model 0's in every member's config)
VERSION = 5


def _non_persistent_buffers(batch: ModelBatch) -> dict[str, torch.Tensor]:
    """Stacked buffers that ``state_dict()`` leaves out (BERT's ``position_ids``, rotary ``inv_freq``)."""
    persistent = batch.stack.state_dict(keep_vars=True)
    return {name: b.detach() for name, b in batch.stacked_buffers().items() if name not in persistent}


def save(
    path: str | os.PathLike, batch: ModelBatch, optimizer: Optimizer | None = None, **extra: Any
) -> None:
    """Write ``batch`` (all members), its optimizer and any ``extra`` picklable values to ``path``.

    Every buffer is kept, persistent or not (``register_buffer(..., persistent=False)``, which
    ``state_dict()`` leaves out), and so are each member's dropout rates and random stream: a
    loaded pack computes bitwise what the saved one did, dropout masks included. The file
    is written to a temporary name and renamed, so an interrupted save never leaves a truncated
    checkpoint behind.

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
        "buffers": _non_persistent_buffers(batch),
        "dropout": {
            "rates": batch.dropout_rates,
            "rng": [batch.rng_state(i) for i in range(batch.n)],
        },
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
    saved_buffers = payload.get("buffers")
    if batch is None:
        template = payload["template"]
        device = map_location if map_location is not None else "cpu"
        ties = tied_names(template)  # to_empty puts one new tensor in each slot
        model = retie(template.to_empty(device=device), ties)
        batch = ModelBatch([model] * payload["n"], **payload.get("backend", {}))
        if saved_buffers is None and _non_persistent_buffers(batch):
            raise ValueError(
                f"mb.load: {os.fspath(path)!r} was written by an older mb.save that left out the "
                f"non-persistent buffers {sorted(_non_persistent_buffers(batch))}; pass batch= (a "
                "ModelBatch built from your model class, whose constructor sets them) to load it."
            )
    elif type(batch.template) is not type(payload["template"]):
        raise ValueError(
            f"mb.load: the checkpoint holds {type(payload['template']).__name__} models but the batch "
            f"holds {type(batch.template).__name__}; load it into a pack of the same architecture."
        )
    batch.load_state_dict(payload["batch"])
    if saved_buffers is not None:
        _load_buffers(batch, saved_buffers)
    if payload.get("dropout") is not None:
        _load_dropout(batch, payload["dropout"], payload["template"])
    if cls is not None:
        if optimizer is None:
            optimizer = cls.from_state_dict(batch, saved_opt["state"])
        else:
            optimizer.load_state_dict(saved_opt["state"])
    return batch, optimizer, payload["extra"]


def _load_buffers(batch: ModelBatch, saved: dict[str, torch.Tensor]) -> None:
    """Copy the saved non-persistent buffers into ``batch`` (checked like ``load_state_dict``)."""
    targets = _non_persistent_buffers(batch)
    if saved.keys() != targets.keys():
        raise ValueError(
            f"mb.load: the checkpoint's non-persistent buffers {sorted(saved)} differ from the "
            f"pack's {sorted(targets)}; load it into a pack of the architecture it was saved from."
        )
    with torch.no_grad():
        for name, value in saved.items():
            if value.shape != targets[name].shape:
                raise ValueError(
                    f"mb.load: buffer {name!r} has shape {list(value.shape)} in the checkpoint but "
                    f"{list(targets[name].shape)} in the pack."
                )
            targets[name].copy_(value)


def _load_dropout(batch: ModelBatch, saved: dict[str, Any], template: torch.nn.Module) -> None:
    """Each member's dropout rates and random stream, as saved.

    A rate the file does not hold (a float rate in a version-3 file) is the template's, for all.
    """
    for key, (module, name) in rate_slots(template).items():
        rates = saved["rates"].get(key, [getattr(module, name)] * batch.n)
        set_member_rates(batch.stack, key, rates, "mb.load")
    for i, state in enumerate(saved["rng"]):
        batch.set_rng_state(i, state)
