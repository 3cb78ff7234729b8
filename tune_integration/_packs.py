"""Packs: the engine side of a slot server (torch lives here, never in the relay trials).

A server holds one :class:`modelbatch.PackTrainer` per architecture signature; this module adds
members to the pack of their architecture, trains a pack one report interval, and turns each
member's report into a result and, when due, a checkpoint (opaque bytes for the relay).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import io
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import modelbatch as mb
from modelbatch._trainer import architecture_signature, build_model, member_seed, model_shapes
from modelbatch.data._source import example_batch

PackFactory = Callable[[int, Mapping[str, Any]], Any]
"""``(capacity, example_config) -> trainer`` with :class:`modelbatch.PackTrainer`'s slot API."""

AUTO_MAX_SLOTS = {"cuda": 64, "cpu": 16}
"""Upper bound of ``slots_per_gpu="auto"`` per device type (each member is also a ~110 MB trial process)."""
AUTO_SLOTS_PER_CPU = 2
"""On a CPU server ``"auto"`` also stays within this many members per core of its node: each live member
is a Tune trial process that costs ~2 CPU-seconds to start, which on few cores outweighs what larger
packs gain (a 64-config digits sweep on 2 cores: 23 s with 4 slots, 28 s with 8, 40 s with 16)."""
SNAPSHOTS_PER_MEMBER = 2
"""Device snapshots kept per member under PBT: PBT may exploit a donor's checkpoint of the perturbation
before its latest (the donor trained on before Tune processed its result)."""
AUTO_MEMORY_FRACTION = 0.8
"""Share of the device's free memory that ``"auto"`` fills."""


class Packs:
    """The packs of one server: at most ``slots`` members each, one pack per architecture.

    A pack is created for the first member of an architecture and dropped when its last member
    leaves. Members are keyed by Tune trial id. A parked member waits outside its pack, its
    state kept in memory, until it comes back (:meth:`unpark`): exact, like a checkpoint.

    ``snapshot_every`` (population-based training's ``perturbation_interval``): a member's
    checkpoint at every this many reports is also kept on the device (its latest
    ``SNAPSHOTS_PER_MEMBER``; ``SNAPSHOTS_PER_MEMBER * slots`` in all at most). A member restored from
    such a checkpoint (PBT's exploit: the donor's) gets that state by a copy on the device, not
    from the checkpoint's bytes; any other checkpoint is loaded from its bytes, as exactly.
    """

    def __init__(
        self,
        recipe: mb.Recipe | PackFactory,
        slots: int | str,
        *,
        example_configs: Sequence[Mapping[str, Any]] = (),
        checkpoint_every: int | None = 1,
        reports: int | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        self.recipe = recipe
        self.checkpoint_every, self.reports = checkpoint_every, reports
        self.snapshot_every = snapshot_every
        self.snapshots: dict[str, dict[str, Any]] = {}  # a checkpoint's token -> its state on the device
        self.snapshot_of: dict[str, list[str]] = {}
        self.device_restores = 0
        self.device = recipe.resolve_device() if isinstance(recipe, mb.Recipe) else _default_device()
        self.slots = slots if slots != "auto" else auto_slots(recipe, example_configs, self.device)
        self.packs: dict[int, Any] = {}
        self.pack_of: dict[str, int] = {}
        self.parked: dict[str, dict[str, Any]] = {}
        self.next_pack = 0
        self.members_hosted = 0
        self.parks = 0

    def live(self, pid: int) -> dict[str, int]:
        """``member -> slot`` of the pack's members still training (``{}`` for a dropped pack)."""
        pack = self.packs.get(pid)
        return pack.live() if pack is not None else {}

    def join(self, trial_id: str, config: dict[str, Any], state: bytes | None) -> int:
        """Add a member (restored from ``state`` if given) to its architecture's pack; returns the pack id.

        A member restored from another member's state (population-based training's exploit) goes
        on from that state with ``config``'s hyperparameters.
        """
        self.leave(trial_id)  # a restarted trial: drop its stale slot
        if state is None:
            pid = self._pack_for(config)
            self.packs[pid].add(trial_id, config)
        else:
            snapshot = self.snapshots.get(_snapshot_token(state)) if self.snapshots else None
            self.device_restores += snapshot is not None
            saved = _unshared(snapshot) if snapshot is not None else load_member_state(state)
            pid = self._restore(trial_id, saved, config)
        self.pack_of[trial_id] = pid
        self.members_hosted += 1
        return pid

    def leave(self, trial_id: str) -> int | None:
        """Free the member's slot (or forget it, parked); returns its pack id (``None`` if none)."""
        self.parked.pop(trial_id, None)
        pid = self.pack_of.pop(trial_id, None)
        if pid is not None:
            pack = self.packs[pid]
            pack.remove(trial_id)
            if len(pack.free_slots()) == pack.capacity:
                del self.packs[pid]
        return pid

    def park(self, trial_id: str) -> None:
        """Take a member out of its pack, keeping its state, so the others train on without it."""
        pid = self.pack_of[trial_id]
        state = self.packs[pid].member_state(trial_id)
        self.leave(trial_id)
        self.parked[trial_id] = state
        self.parks += 1

    def unpark(self, trial_id: str) -> int:
        """Put a parked member back into a pack of its architecture; returns the pack id."""
        pid = self.pack_of[trial_id] = self._restore(trial_id, self.parked.pop(trial_id))
        return pid

    def train(self, pid: int, where: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Train the pack one report interval: ``{member: {"result", "checkpoint", "final"}}``.

        A member with a NaN or infinite result ends with it; that result's ``"error"`` says why
        (``"non-finite loss (nan) at report 3"``).
        """
        pack = self.packs[pid]
        label = pack_label(str(getattr(pack, "signature", pid)))
        replies = {}
        for member, report in pack.train_report().items():
            result = {**report, "slot": pack.slot_of(member), "pack": label, **where}
            it = report["training_iteration"]
            bad = [(k, v) for k, v in report.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:  # the member ends; its last result says why
                result["error"] = f"non-finite {bad[0][0]} ({bad[0][1]}) at report {it}"
            finite = not bad
            final = not finite or (self.reports is not None and it >= self.reports)
            if final:
                pack.stop(member, "finished" if finite else result["error"])
            every = self.checkpoint_every
            due = every is not None and (final or it % every == 0)
            blob = None
            if due:
                state = pack.member_state(member)
                if self.snapshot_every and it % self.snapshot_every == 0 and not final:
                    state["snapshot"] = self._snapshot(member, pack.member_state(member, on_device=True))
                blob = _dumps(state)
            replies[member] = {"result": result, "checkpoint": blob, "final": final}
        return replies

    def _snapshot(self, member: str, state: dict[str, Any]) -> str:
        """Keep ``state`` (on the device) among the member's latest snapshots; returns its token."""
        keys = self.snapshot_of.setdefault(member, [])
        keys.append(uuid.uuid4().hex)
        self.snapshots[keys[-1]] = state
        if len(keys) > SNAPSHOTS_PER_MEMBER:
            self.snapshots.pop(keys.pop(0), None)
        while len(self.snapshots) > SNAPSHOTS_PER_MEMBER * self.slots:  # members gone: the oldest go
            del self.snapshots[next(iter(self.snapshots))]
        return keys[-1]

    def _restore(self, trial_id: str, state: dict[str, Any], config: Mapping[str, Any] | None = None) -> int:
        saved = state["slot_state"]
        state["slot_state"] = replace(saved, member_id=trial_id)
        pid = self._pack_for(saved.config)
        if config is None or dict(config) == saved.config:
            self.packs[pid].restore_member(state)
        else:
            self._check_architecture(trial_id, saved, config)
            self.packs[pid].restore_member(state, dict(config))
        return pid

    def _check_architecture(self, trial_id: str, saved: Any, config: Mapping[str, Any]) -> None:
        """A member continuing another's state with a new config must keep that state's architecture."""
        if not isinstance(self.recipe, mb.Recipe):
            return  # a pack factory's trainer checks its members itself
        before = architecture_signature(model_shapes(self.recipe, saved.config, saved.seed))
        if architecture_signature(model_shapes(self.recipe, config, saved.seed)) == before:
            return
        changed = sorted(k for k in {*config, *saved.config} if config.get(k) != saved.config.get(k))
        raise ValueError(
            f"ModelBatchSearcher: member {trial_id} continues from the state of member {saved.member_id} "
            f"(population-based training's exploit) with a config whose model has another architecture "
            f"(changed: {changed}); a state loads only into its own architecture. Mutate only "
            "hyperparameters that keep the parameter shapes (lr, weight_decay, ...) in hyperparam_mutations."
        )

    def _pack_for(self, config: Mapping[str, Any]) -> int:
        for pid, pack in self.packs.items():
            if pack.free_slots() and pack.accepts(config):
                return pid
        pid, self.next_pack = self.next_pack, self.next_pack + 1
        if isinstance(self.recipe, mb.Recipe):
            self.packs[pid] = mb.PackTrainer(self.recipe, self.slots, example_config=config)
        else:
            self.packs[pid] = self.recipe(self.slots, config)
        return pid


def pack_label(signature: str) -> str:
    """A short readable name of an architecture signature: the results' ``pack``, the grouping key.

    The model class, the output sizes of its weight tensors, its dropout rates and a hash of the
    whole signature (which tells apart architectures the readable part does not).

    Example:
        >>> from torch import nn
        >>> from modelbatch._trainer import architecture_signature
        >>> net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.2), nn.Linear(64, 10))
        >>> pack_label(architecture_signature(net))[:-8]
        'Sequential 64-10 p=0.2'
    """
    digest = hashlib.sha1(signature.encode()).hexdigest()[:6]
    try:
        name, shapes, settings = signature.split("|", 2)
        sizes = re.findall(r"weight:\((\d+)[,)]", shapes)
        rates = sorted(
            {s["p"] for _, s in ast.literal_eval(settings) if isinstance(s.get("p"), float) and s["p"]}
        )
    except (ValueError, SyntaxError, TypeError, AttributeError):
        return digest
    dropout = f"p={'/'.join(f'{r:g}' for r in rates)}" if rates else ""
    return " ".join(w for w in (name.rsplit(".", 1)[-1], "-".join(sizes), dropout, f"#{digest}") if w)


def _dumps(state: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def _unshared(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot to restore from: its tensors are only read, the rest (schedule, data position) copied."""
    kept = ("model", "optimizer_state")
    return {k: v if k in kept else copy.deepcopy(v) for k, v in snapshot.items()}


def _snapshot_token(blob: bytes) -> str | None:
    """The snapshot token in a checkpoint, read without its tensors (``None``: none)."""
    return torch.load(io.BytesIO(blob), weights_only=False, map_location="meta").get("snapshot")


def load_member_state(blob: bytes) -> dict[str, Any]:
    """A member state written by a server (:meth:`modelbatch.PackTrainer.member_state`)."""
    return torch.load(io.BytesIO(blob), weights_only=False)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_slots(
    recipe: mb.Recipe | PackFactory, configs: Sequence[Mapping[str, Any]], device: torch.device
) -> int:
    """Members that fit in ``AUTO_MEMORY_FRACTION`` of the device's free memory (at most ``AUTO_MAX_SLOTS``).

    One member's memory (weights, gradients, Adam-sized optimizer state, activations of one
    batch and the step's workspace) is measured with :func:`modelbatch.estimate_memory` for each
    of ``configs`` (a sample of the search space); the largest counts. The pack's copy of the
    training and validation tensors is taken off the budget first (a ``Dataset`` is streamed).
    """
    if not isinstance(recipe, mb.Recipe):
        raise ValueError(
            "ModelBatchSearcher: slots_per_gpu='auto' measures a member of a mb.Recipe; with a pack "
            "factory pass an int slots_per_gpu."
        )
    if not configs:
        raise ValueError(
            "ModelBatchSearcher: slots_per_gpu='auto' needs a sample of the search space to measure a "
            "member; pass the space to tune.run(config=...) / Tuner(param_space=...) or an int slots_per_gpu."
        )
    X = example_batch(recipe.train_data, recipe.batch_size)[0]
    example = X.to(recipe.dtype if X.is_floating_point() else X.dtype)
    models = {}  # one per architecture: hyperparameters do not change a member's memory
    for config in configs:
        model = build_model(recipe, config, member_seed(config, 0))
        models.setdefault(architecture_signature(model), model)
    per_member = 0
    for model in models.values():
        estimate = mb.estimate_memory(
            lambda model=model: copy.deepcopy(model),
            example,
            optimizer="adam",
            n=1,
            dtype=recipe.dtype,
            device=device,
        )
        per_member = max(per_member, estimate.total)
    # Tensors live on the device for the whole sweep; a Dataset is streamed a batch at a time.
    data = [t for d in (recipe.train_data, recipe.val_data) if isinstance(d, tuple) for t in d]
    itemsize = torch.finfo(recipe.dtype).bits // 8
    data_bytes = sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in data)
    budget = AUTO_MEMORY_FRACTION * free_memory(device) - data_bytes
    cap = AUTO_MAX_SLOTS["cuda" if device.type == "cuda" else "cpu"]
    if device.type != "cuda":
        cap = min(cap, AUTO_SLOTS_PER_CPU * (os.cpu_count() or 1))
    return max(1, min(cap, int(budget // max(per_member, 1))))


def free_memory(device: torch.device) -> int:
    """Free bytes of ``device``: ``torch.cuda.mem_get_info`` on CUDA, the host's available memory else."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
