"""Packs: the engine side of a slot server (torch lives here, never in the relay trials).

A server holds one :class:`modelbatch.PackTrainer` per architecture signature; this module adds
members to the pack of their architecture, trains a pack one report interval, and turns each
member's report into a result and, when due, a checkpoint (opaque bytes for the relay). Which
members end after a report (their report limit, a NaN/inf, their sweep's callbacks) the pack
decides itself (:meth:`modelbatch.PackTrainer.after_report`), as ``mb.fit`` does.
"""

from __future__ import annotations

import copy
import io
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import modelbatch as mb
from modelbatch._internal import (
    architecture_signature,
    build_model,
    config_signature,
    example_batch,
    member_seed,
    pack_label,
)

Limits = tuple[int | None, int | None, int | None]
"""A member's ``(reports, checkpoint_every, snapshot_every)``: see :meth:`Packs.join`."""
PackFactory = Callable[[int, Mapping[str, Any]], Any]
"""``(n_slots, example_config) -> trainer`` with :class:`modelbatch.PackTrainer`'s slot API."""

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
    """The packs of one recipe on a server: at most ``slots`` members each, one pack per architecture.

    A pack is created for the first member of an architecture and dropped when its last member
    leaves. Members are keyed by any hashable id (the server uses ``(sweep id, trial id)``: sweeps
    of one recipe fingerprint share these packs); each member has its own report limit, checkpoint
    and snapshot intervals (its sweep's; the constructor's by default). A parked member waits
    outside its pack, its state kept in memory, until it comes back (:meth:`unpark`): exact, like
    a checkpoint.

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
        self.snapshot_of: dict[Any, list[str]] = {}
        self.device_restores = 0
        self.device = recipe.resolve_device() if isinstance(recipe, mb.Recipe) else _default_device()
        self.slots = slots if slots != "auto" else auto_slots(recipe, example_configs, self.device)
        self.member_bytes: int | None = None  # memory of one member and of the data (None: not measured)
        self.data_bytes = 0
        if isinstance(recipe, mb.Recipe) and example_configs:
            try:
                self.member_bytes, self.data_bytes = member_memory(recipe, example_configs, self.device)
            except Exception:  # a config the sample could not build: members are admitted unmeasured,
                if slots == "auto":  # and the build error comes with the member that has it
                    raise
        self.packs: dict[int, Any] = {}
        self.pack_of: dict[Any, int] = {}
        self.parked: dict[Any, dict[str, Any]] = {}
        self.limits: dict[Any, Limits] = {}
        self.callbacks: dict[Any, Sequence[mb.callbacks.Callback]] = {}  # per member: its sweep's
        self.keys: dict[Any, str | None] = {}  # member -> its architecture key (None: unknown)
        self.next_pack = 0

    def live(self, pid: int) -> dict[Any, int]:
        """``member -> slot`` of the pack's members still training (``{}`` for a dropped pack)."""
        pack = self.packs.get(pid)
        return pack.live() if pack is not None else {}

    def join(
        self,
        trial_id: Any,
        config: dict[str, Any],
        state: bytes | None,
        limits: Limits | None = None,
        callbacks: Sequence[mb.callbacks.Callback] = (),
        key: str | None = None,
    ) -> int:
        """Add a member (restored from ``state`` if given) to its architecture's pack; returns the pack id.

        A member restored from another member's state (population-based training's exploit) goes
        on from that state with ``config``'s hyperparameters. ``limits``: the member's ``(reports,
        checkpoint_every, snapshot_every)`` (it ends after that many reports; ``None`` each: no end,
        no checkpoints, no snapshots); by default the constructor's. ``callbacks``: its sweep's
        :class:`modelbatch.callbacks.Callback` objects (one list per sweep: they see that sweep's
        members of a pack together). ``key``: the config's
        :func:`~modelbatch._internal.architecture_key` (the searcher's), which finds its pack by the
        packs' labels; without one each pack with room builds the config's model on the meta device
        to compare. The pack checks the member's architecture either way when it adds it.
        """
        self.leave(trial_id)  # a restarted trial: drop its stale slot
        self.keys[trial_id] = key
        if state is None:
            pid = self._pack_for(config, key)
            self.packs[pid].add(trial_id, config)
        else:
            snapshot = self.snapshots.get(_snapshot_token(state)) if self.snapshots else None
            self.device_restores += snapshot is not None
            saved = _unshared(snapshot) if snapshot is not None else load_member_state(state)
            pid = self._restore(trial_id, saved, config)
        self.pack_of[trial_id] = pid
        self.limits[trial_id] = limits or (self.reports, self.checkpoint_every, self.snapshot_every)
        self.callbacks[trial_id] = callbacks
        return pid

    def leave(self, trial_id: Any) -> int | None:
        """Free the member's slot (or forget it, parked); returns its pack id (``None`` if none)."""
        self.parked.pop(trial_id, None)
        self.limits.pop(trial_id, None)
        self.callbacks.pop(trial_id, None)
        self.keys.pop(trial_id, None)
        return self._take_out(trial_id)

    def park(self, trial_id: Any) -> None:
        """Take a member out of its pack, keeping its state, so the others train on without it."""
        pid = self.pack_of[trial_id]
        state = member_state_dict(self.packs[pid], trial_id)
        self._take_out(trial_id)
        self.parked[trial_id] = state

    def evict(self, trial_id: Any) -> bytes | None:
        """Take a training (or parked) member out for good, its state serialized for its relay to
        join again with (``None``: it is not training here, e.g. it just finished)."""
        state = self.parked.get(trial_id)
        pid = self.pack_of.get(trial_id)
        if state is None and (pid is None or trial_id not in self.packs[pid].live()):
            return None
        if state is None:
            state = member_state_dict(self.packs[pid], trial_id)
        self.leave(trial_id)
        return _dumps(state)

    def _take_out(self, trial_id: Any) -> int | None:
        pid = self.pack_of.pop(trial_id, None)
        if pid is not None:
            pack = self.packs[pid]
            pack.remove(trial_id)
            if len(pack.free_slots()) == n_slots(pack):
                del self.packs[pid]
        return pid

    def unpark(self, trial_id: Any) -> int:
        """Put a parked member back into a pack of its architecture; returns the pack id."""
        pid = self.pack_of[trial_id] = self._restore(trial_id, self.parked.pop(trial_id))
        return pid

    def train(self, pid: int, where: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
        """Train the pack one report interval: ``{member: {"result", "checkpoint", "final"}}``.

        A member ends (``"final"``) as in ``mb.fit``: with a NaN or infinite result, when one of its
        sweep's callbacks stops it, or at its last report. The result of a member that errored
        says why in ``"error"`` (``"non-finite loss (nan) at report 3"``); one that a callback
        stopped, in ``"stopped"`` (``"early stopped: val_loss did not improve for 3 reports"``).
        """
        pack = self.packs[pid]
        label = pack_label_of(pack, pid)
        reports = pack.train_report()
        ended = {}
        for callbacks, max_reports, members in self._rules(reports):
            ended.update(pack.after_report(members, callbacks, max_reports=max_reports))
        replies = {}
        for member, report in reports.items():
            result = {**report, "slot": pack.slot_of(member), "pack": label, **where}
            end = ended.get(member)
            if end is not None and end.kind != "finished":
                result["error" if end.error else "stopped"] = end.reason
            it = report["training_iteration"]
            final = end is not None
            every, snapshot_every = self._limits(member)[1:]
            due = every is not None and (final or it % every == 0)
            blob = None
            if due:
                state = member_state_dict(pack, member)
                if snapshot_every and it % snapshot_every == 0 and not final:
                    state["snapshot"] = self._snapshot(
                        member, member_state_dict(pack, member, on_device=True)
                    )
                blob = _dumps(state)
            replies[member] = {"result": result, "checkpoint": blob, "final": final}
        return replies

    def _limits(self, member: Any) -> Limits:
        return self.limits.get(member, (self.reports, self.checkpoint_every, self.snapshot_every))

    def _rules(self, reports: Mapping[Any, Any]) -> list[tuple[Sequence[Any], int | None, dict[Any, Any]]]:
        """The round's reports by the rules that end their members: ``(callbacks, max_reports, reports)``
        for each sweep (members of one sweep share its callbacks and report limit)."""
        groups: dict[tuple[int, int | None], tuple[Sequence[Any], int | None, dict[Any, Any]]] = {}
        for member, report in reports.items():
            callbacks, max_reports = self.callbacks.get(member, ()), self._limits(member)[0]
            key = (id(callbacks), max_reports)
            groups.setdefault(key, (callbacks, max_reports, {}))[2][member] = report
        return list(groups.values())

    def _snapshot(self, member: Any, state: dict[str, Any]) -> str:
        """Keep ``state`` (on the device) among the member's latest snapshots; returns its token."""
        keys = self.snapshot_of.setdefault(member, [])
        keys.append(uuid.uuid4().hex)
        self.snapshots[keys[-1]] = state
        if len(keys) > SNAPSHOTS_PER_MEMBER:
            self.snapshots.pop(keys.pop(0), None)
        while len(self.snapshots) > SNAPSHOTS_PER_MEMBER * self.slots:  # members gone: the oldest go
            del self.snapshots[next(iter(self.snapshots))]
        return keys[-1]

    def _restore(self, trial_id: Any, state: dict[str, Any], config: Mapping[str, Any] | None = None) -> int:
        saved = state["slot_state"]
        state["slot_state"] = replace(saved, member_id=trial_id)
        same = config is None or dict(config) == saved.config
        if not same:  # the state's architecture must be the config's (whose key the member has)
            self._check_architecture(trial_id, saved, config)
        pid = self._pack_for(saved.config, self.keys.get(trial_id))
        self.packs[pid].restore_member(state, None if same else dict(config))
        return pid

    def _check_architecture(self, trial_id: Any, saved: Any, config: Mapping[str, Any]) -> None:
        """A member continuing another's state with a new config must keep that state's architecture."""
        if not isinstance(self.recipe, mb.Recipe):
            return  # a pack factory's trainer checks its members itself
        api = "ModelBatchSearcher"
        before = config_signature(self.recipe, saved.config, saved.seed, api=api)
        if config_signature(self.recipe, config, saved.seed, api=api) == before:
            return
        changed = sorted(k for k in {*config, *saved.config} if config.get(k) != saved.config.get(k))
        raise ValueError(
            f"ModelBatchSearcher: member {_name(trial_id)} continues from the state of member "
            f"{_name(saved.member_id)} "
            f"(population-based training's exploit) with a config whose model has another architecture "
            f"(changed: {changed}); a state loads only into its own architecture. Mutate only "
            "hyperparameters that keep the parameter shapes (lr, weight_decay, ...) in hyperparam_mutations."
        )

    def _pack_for(self, config: Mapping[str, Any], key: str | None = None) -> int:
        """A pack with room for the config's architecture (a new one if none): found by ``key``
        (a Recipe's packs' labels) where given, else by each pack's ``accepts``."""
        by_key = key is not None and isinstance(self.recipe, mb.Recipe)
        for pid, pack in self.packs.items():
            if pack.free_slots() and (pack_label_of(pack, pid) == key if by_key else pack.accepts(config)):
                return pid
        pid, self.next_pack = self.next_pack, self.next_pack + 1
        if isinstance(self.recipe, mb.Recipe):
            self.packs[pid] = mb.PackTrainer(self.recipe, self.slots, example_config=config)
        else:
            self.packs[pid] = self.recipe(self.slots, config)
        return pid


def member_state_dict(pack: Any, member: Any, **kwargs: Any) -> dict[str, Any]:
    """``pack.member_state_dict(member)``; until the next release, a pack factory's own trainer
    with only the name before (``member_state``) is called by that, with a FutureWarning."""
    if hasattr(pack, "member_state_dict"):
        return pack.member_state_dict(member, **kwargs)
    _warn_old_slot_api("member_state()", "member_state_dict()")
    return pack.member_state(member, **kwargs)


def n_slots(pack: Any) -> int:
    """``pack.n_slots``; until the next release, a pack factory's own trainer with only the name
    before (``capacity``) is read by that, with a FutureWarning."""
    if hasattr(pack, "n_slots"):
        return pack.n_slots
    _warn_old_slot_api("capacity", "n_slots")
    return pack.capacity


def _warn_old_slot_api(old: str, new: str) -> None:
    warnings.warn(
        f"ModelBatchSearcher: the pack factory's trainer has {old} but no {new}; {old} is the deprecated "
        f"name of {new} (same meaning): rename it, the old name will not be read after the next release.",
        FutureWarning,
        stacklevel=3,
    )


def pack_label_of(pack: Any, pid: int) -> str:
    """A pack's ``pack`` label: its signature's (a pack factory's trainer without one: its id)."""
    return pack_label(str(getattr(pack, "signature", pid)))


def _name(member: Any) -> str:
    """A member's trial id (the server keys members by ``(sweep id, trial id)``)."""
    return str(member[-1] if isinstance(member, tuple) else member)


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
    """A member state written by a server (:meth:`modelbatch.PackTrainer.member_state_dict`)."""
    return torch.load(io.BytesIO(blob), weights_only=False)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_slots(
    recipe: mb.Recipe | PackFactory, configs: Sequence[Mapping[str, Any]], device: torch.device
) -> int:
    """Members that fit in ``AUTO_MEMORY_FRACTION`` of the device's free memory (at most ``AUTO_MAX_SLOTS``).

    One member's memory is :func:`member_memory` of ``configs`` (a sample of the search space);
    the pack's copy of the training and validation tensors is taken off the budget first.
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
    per_member, data_bytes = member_memory(recipe, configs, device)
    budget = AUTO_MEMORY_FRACTION * free_memory(device) - data_bytes
    cap = AUTO_MAX_SLOTS["cuda" if device.type == "cuda" else "cpu"]
    if device.type != "cuda":
        cap = min(cap, AUTO_SLOTS_PER_CPU * (os.cpu_count() or 1))
    return max(1, min(cap, int(budget // max(per_member, 1))))


def member_memory(
    recipe: mb.Recipe, configs: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[int, int]:
    """``(bytes per member, bytes of the recipe's data on the device)`` for the largest of ``configs``.

    One member's memory (weights, gradients, Adam-sized optimizer state, activations of one
    batch and the step's workspace) is measured with :func:`modelbatch.estimate_memory` once per
    architecture among ``configs``. Data tensors live on the device for the whole sweep (counted
    once per recipe); a ``Dataset`` is streamed a batch at a time (not counted).
    """
    X = example_batch(recipe.train_data, recipe.batch_size)[0]
    example = X.to(recipe.dtype if X.is_floating_point() else X.dtype)
    models = {}  # one per architecture: hyperparameters do not change a member's memory
    for config in configs:
        model = build_model(recipe, config, member_seed(config, 0, "ModelBatchSearcher"))
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
    data = [t for d in (recipe.train_data, recipe.val_data) if isinstance(d, tuple) for t in d]
    itemsize = torch.finfo(recipe.dtype).bits // 8
    data_bytes = sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in data)
    return per_member, data_bytes


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
