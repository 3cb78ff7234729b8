"""PackTrainer: members of one recipe train in the slots of one pack; they join and leave between reports."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._architecture import (
    architecture_signature,
    build_model,
    build_seeded,
    config_signature,
    member_seed,
    model_shapes,
)
from ._batch import ModelBatch
from ._clip import clip_grad_norm_
from ._deprecated import renamed_kwarg, warn_renamed
from ._host import mark_device_data, to_host, upload
from ._hparams import check_positive_int
from ._oom import shrink_on_oom
from ._recipe import Recipe
from .callbacks import Callback, NaNGuard
from .data import MemberStep, MemberStreams
from .data._source import PackData
from .optim.lr_scheduler import PerMember


@dataclass
class Slot:
    """One member living in a slot of the pack."""

    member_id: Any
    config: dict[str, Any]
    seed: int
    iteration: int = 0
    steps: int = 0
    stopped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ended:
    """Why a member ended after a report (:meth:`PackTrainer.after_report`)."""

    reason: str
    """``"finished"`` (its last report), a callback's reason, or an error's
    (``"non-finite loss (nan) at report 3"``)."""
    error: bool = False
    """Whether it errored (a NaN/inf, or a callback's ``control.stop(..., error=True)``)."""

    @property
    def kind(self) -> str:
        """``"finished"``, ``"stopped"`` (by a callback) or ``"errored"``."""
        return "errored" if self.error else "finished" if self.reason == "finished" else "stopped"

    @property
    def status(self) -> str:
        """As ``mb.fit``'s ``status`` column says it: ``finished``, the reason, or ``errored: <reason>``."""
        return f"errored: {self.reason}" if self.error else self.reason


class _Stops:
    """The control that callbacks stop members of one round through (the first stop of a member counts)."""

    def __init__(self, members: Mapping[Any, Any]) -> None:
        self.members = members
        self.ended: dict[Any, Ended] = {}

    def stop(self, member_id: Any, reason: str, *, error: bool = False) -> None:
        if member_id in self.members:
            self.ended.setdefault(member_id, Ended(str(reason), bool(error)))


class PackTrainer:
    """Trains the members of one recipe (one architecture) in the ``n_slots`` slots of a pack.

    Members join free slots with :meth:`add` and leave with :meth:`remove`; a freed slot is
    reset (weights, optimizer state, schedule, data stream) when the next member joins, so each
    member trains exactly as it would alone, whichever slot it lands in and whenever it joins.
    :meth:`train_report` trains every live member for ``recipe.steps_per_report`` steps and
    returns one metrics dict per member; :meth:`after_report` then ends the members that are done.

    Out of memory: a training step or evaluation that raises ``torch.OutOfMemoryError`` (or a
    ``RuntimeError`` saying "out of memory") is undone (buffers and random generators restored;
    the optimizer has not stepped yet), the allocator's cache is freed and the call is retried
    with the pack on backend ``"chunked"`` with half as many members at once, down to one; a
    ``RuntimeWarning`` says so, and the smaller chunks stay. No member is lost and results stay
    exact. Out of memory with one member at a time raises ``torch.OutOfMemoryError``
    ("mb.PackTrainer: out of memory ...") with every member as before that step.

    Example:
        >>> import torch, modelbatch as mb
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="sgd",
        ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), val_data=(X, y),
        ...     batch_size=16, steps_per_report=4)
        >>> trainer = mb.PackTrainer(recipe, n_slots=4, example_config={"lr": 0.1})
        >>> slot = trainer.add("a", {"lr": 0.1, "seed": 0})
        >>> sorted(trainer.train_report()["a"])
        ['loss', 'step', 'training_iteration', 'val_loss']

    Names: *members* are the models (a member keeps its id from :meth:`add` to :meth:`remove`);
    *slots* are the places of the pack that members train in (``n_slots`` of them; slot ``i`` holds
    the weights ``batch.member(i)`` returns). ``capacity=`` / :attr:`capacity` and :meth:`member_state` are
    the deprecated names of ``n_slots`` and :meth:`member_state_dict` (until the next release).
    """

    def __init__(
        self,
        recipe: Recipe,
        n_slots: int | None = None,
        example_config: Mapping[str, Any] | None = None,
        *,
        capacity: int | None = None,
    ) -> None:
        api = "mb.PackTrainer"
        n_slots = renamed_kwarg(api, "capacity", "n_slots", capacity, n_slots)
        check_positive_int(api, "n_slots", n_slots)
        if example_config is None:
            raise TypeError(
                f"{api}: missing example_config, a config of the pack's architecture (e.g. its first "
                "member's): mb.PackTrainer(recipe, n_slots=4, example_config={...})."
            )
        self.recipe = recipe
        self.n_slots = n_slots
        self.device = recipe.resolve_device()
        template = build_model(recipe, example_config, member_seed(example_config, 0, "mb.PackTrainer"))
        self.signature = architecture_signature(template)
        self.batch = ModelBatch([template] * n_slots, backend=recipe.backend).to(self.device)
        self.batch.active.fill_(False)
        self.slots: list[Slot | None] = [None] * n_slots
        self.example_config = dict(example_config)
        hp = recipe.hparams(example_config)
        cls = recipe.optimizer_class
        self.optimizer = cls.from_state_dict(self.batch, self._initial_optimizer_state(cls, hp))
        self.schedule = PerMember(self.optimizer, self._schedule_factory) if recipe.lr_schedule else None
        self.train_data = self._pack_data(recipe.train_data)
        self.val = None
        if recipe.val_data is not None:
            same = recipe.val_data is recipe.train_data  # k-fold: one copy, one set of loader workers
            self.val = self.train_data if same else self._pack_data(recipe.val_data)
        self.sampler = MemberStreams(len(self.train_data), n_slots, recipe.batch_size)
        self.members_hosted = 0

    @property
    def capacity(self) -> int:
        """Deprecated name of :attr:`n_slots` (FutureWarning); it will be removed in the next release."""
        warn_renamed("mb.PackTrainer", "capacity", "n_slots")
        return self.n_slots

    # ------------------------------------------------------------------ slots
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def live(self) -> dict[Any, int]:
        """``member_id -> slot`` of members still training."""
        return {s.member_id: i for i, s in enumerate(self.slots) if s is not None and s.stopped is None}

    def accepts(self, config: Mapping[str, Any]) -> bool:
        """Whether a member with this config has the pack's architecture."""
        return config_signature(self.recipe, config, api="mb.PackTrainer.accepts") == self.signature

    def add(self, member_id: Any, config: Mapping[str, Any], seed: int | None = None) -> int:
        """Put a new member into a free slot (fresh weights from its seed, fresh optimizer state)."""
        config = dict(config)
        seed = member_seed(config, 0, "mb.PackTrainer.add") if seed is None else seed
        model, rng = build_seeded(self.recipe, config, seed)
        slot = self._occupy(member_id, config, seed, model, model)
        # Its dropout masks: those a plain script draws after torch.manual_seed(seed) and the factory.
        self.batch.set_rng_state(slot, {"seed": torch.tensor(seed), "cpu": rng})
        return slot

    def _occupy(
        self,
        member_id: Any,
        config: dict[str, Any],
        seed: int,
        model: nn.Module,
        weights: nn.Module | Mapping[str, torch.Tensor],
    ) -> int:
        """A free slot for a member whose model (``model``: its architecture) gets ``weights``."""
        api = "mb.PackTrainer.add"
        free = self.free_slots()
        if not free:
            raise RuntimeError(f"{api}: all {self.n_slots} slots are taken; remove a member first.")
        if member_id in self.live():
            raise ValueError(f"{api}: member {member_id!r} is already in the pack.")
        if architecture_signature(model) != self.signature:
            raise ValueError(
                f"{api}: member {member_id!r} builds a model of another architecture than this pack; "
                "put configs with different parameter shapes into separate packs."
            )
        slot = free[0]
        self.batch.load_member(slot, weights)
        if weights is not model:  # weights of a saved state: the dropout rates are its config's
            self.batch.load_member_rates(slot, model)
        self.optimizer.reset_member(slot)
        for name, value in self.recipe.hparams(config).items():
            self.optimizer.set_hparam(name, value, member=slot)
        self.slots[slot] = Slot(member_id=member_id, config=config, seed=seed)
        if self.schedule is not None:
            self.schedule.reset_member(slot, lr=float(self.optimizer.hparams["lr"][slot]))
        subset = self.recipe.subset(config) if self.recipe.subset is not None else None
        # order="shared": every member walks the same order (data seed 0), whatever its own seed.
        self.sampler.reset_member(slot, seed=seed if self.recipe.order == "member" else 0, subset=subset)
        self.batch.unfreeze(slot)
        self.members_hosted += 1
        return slot

    def stop(self, member_id: Any, reason: str) -> None:
        """Stop training a member (it keeps its slot and weights until :meth:`remove`)."""
        slot = self.live().get(member_id)
        if slot is None:
            return
        self.slots[slot].stopped = reason
        self.batch.freeze(slot)

    def after_report(
        self,
        reports: Mapping[Any, Mapping[str, Any]],
        callbacks: Sequence[Callback] = (),
        *,
        max_reports: int | None = None,
        nan_guard: bool = True,
    ) -> dict[Any, Ended]:
        """End the members that are done after a round of :meth:`train_report`; returns why, by member.

        The rules, in this order (a member's first reason counts): a NaN or infinite value in its
        report ends it as errored (``nan_guard``; :meth:`mb.callbacks.NaNGuard.reason`); each
        callback's ``on_report(reports, control)`` may stop members; a member at its
        ``max_reports``-th report is ``"finished"``. Each ended member is stopped (:meth:`stop`;
        it keeps its slot until :meth:`remove`) and every callback's ``on_member_stop`` gets it
        with :attr:`Ended.status`. ``mb.fit`` and the slot servers both end members here.

        Example:
            >>> import torch, modelbatch as mb
            >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
            >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="sgd",
            ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), batch_size=8)
            >>> trainer = mb.PackTrainer(recipe, n_slots=2, example_config={"lr": 0.1})
            >>> _ = trainer.add("a", {"lr": 0.1}), trainer.add("b", {"lr": 0.2})
            >>> reports = trainer.train_report()
            >>> reports["b"]["loss"] = float("nan")  # as a diverging member reports it
            >>> ended = trainer.after_report(reports, max_reports=2)
            >>> {m: e.status for m, e in ended.items()}, list(trainer.live())
            ({'b': 'errored: non-finite loss (nan) at report 1'}, ['a'])
            >>> {m: e.kind for m, e in trainer.after_report(trainer.train_report(), max_reports=2).items()}
            {'a': 'finished'}
        """
        control = _Stops(reports)
        for callback in [NaNGuard()] * nan_guard + list(callbacks):
            callback.on_report(reports, control)
        for member_id, report in reports.items():
            if max_reports is not None and report["training_iteration"] >= max_reports:
                control.stop(member_id, "finished")
        for member_id, ended in control.ended.items():
            self.stop(member_id, ended.status)
            for callback in callbacks:  # before remove: a callback may still read the member's slot
                callback.on_member_stop(member_id, ended.status, reports[member_id])
        return control.ended

    def remove(self, member_id: Any) -> None:
        """Free the slot of ``member_id``; the next :meth:`add` reuses it."""
        for i, s in enumerate(self.slots):
            if s is not None and s.member_id == member_id:
                self.batch.freeze(i)
                self.sampler.remove(i)
                self.slots[i] = None
                return

    def slot_of(self, member_id: Any) -> int:
        for i, s in enumerate(self.slots):
            if s is not None and s.member_id == member_id:
                return i
        raise KeyError(f"mb.PackTrainer: member {member_id!r} is not in this pack.")

    # ------------------------------------------------------------------ training
    def train_report(self) -> dict[Any, dict[str, float]]:
        """Train every live member ``steps_per_report`` steps, then evaluate; returns metrics per member."""
        live = self.live()
        if not live:
            return {}
        self.batch.train()
        sums = torch.zeros(self.n_slots, dtype=torch.float64, device=self.device)
        counts = torch.zeros(self.n_slots, dtype=torch.float64, device=self.device)
        # The steps are drawn lazily: a streamed dataset's loader workers fetch a few steps ahead.
        steps = (self.sampler.next_step() for _ in range(self.recipe.steps_per_report))
        for step, (xs, ys) in self.train_data.steps(steps):
            losses, participating = self._train_step(step, xs, ys)
            sums += torch.where(participating, losses.detach().to(torch.float64), 0.0)
            counts += participating.to(torch.float64)
        train_loss = to_host(mark_device_data(sums / counts.clamp_min(1)))  # the report's one read
        val = shrink_on_oom("mb.PackTrainer", self.batch, self.evaluate) if self.val is not None else {}
        reports = {}
        for member_id, slot in live.items():
            state = self.slots[slot]
            state.iteration += 1
            state.steps += self.recipe.steps_per_report
            report = {"loss": train_loss[slot], "training_iteration": state.iteration, "step": state.steps}
            report.update({name: values[slot] for name, values in val.items()})
            reports[member_id] = report
        return reports

    def _train_step(
        self, step: MemberStep, xs: torch.Tensor, ys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every participating member on its own batch ``xs[i], ys[i]``."""
        # Who trains is decided on the host (the sampler's mask, the pack's cached active flags): the
        # forward, the optimizer and the schedule then read no device values; the device gets a copy.
        live = step.participating.to(torch.bool) & torch.tensor(self.batch.active_flags())
        mask = None if step.mask is None else upload(step.mask, self.device)
        losses = shrink_on_oom("mb.PackTrainer", self.batch, self._gradients, xs, ys, live, mask)
        self.optimizer.step(mask=live)
        if self.schedule is not None:
            self.schedule.step(mask=live)
        return losses, upload(live, self.device)

    def _gradients(
        self, xs: torch.Tensor, ys: torch.Tensor, participating: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Forward, per-member losses, backward and clipping of one step; applies no update."""
        self.optimizer.zero_grad()
        out = self.batch(xs, in_dims=0, participating=participating)
        losses = self.batch.compute_loss(out, ys, self.recipe.loss, target_in_dims=0, mask=mask)
        losses.sum().backward()
        clip = self._clip_norms()
        if clip is not None:
            clip_grad_norm_(self.batch, clip)
        return losses.detach()

    def _clip_norms(self) -> list[float] | None:
        values = []
        for s in self.slots:
            value = None if s is None else s.config.get("grad_clip", self.recipe.grad_clip)
            values.append(math.inf if value is None else float(value))
        return None if all(math.isinf(v) for v in values) else values

    @torch.no_grad()
    def evaluate(self, chunk: int = 4096) -> dict[str, list[float]]:
        """Validation loss and metrics per slot (eval mode): the whole set, or each member's subset.

        Only live members are computed; the other slots' values are NaN. The set is evaluated
        ``chunk`` samples at a time (a dataset is streamed chunk by chunk) and the chunks' means
        are weighted by their sizes.
        """
        live = torch.zeros(self.n_slots, dtype=torch.bool)
        live[list(self.live().values())] = True
        totals = (
            self._evaluate_subsets(chunk, live)
            if self.recipe.val_subset is not None
            else self._evaluate_all(chunk, live)
        )
        if not totals:
            return {}
        flat = to_host(mark_device_data(torch.stack(list(totals.values()))))  # the evaluation's one read
        alive = live.tolist()
        return {
            name: [
                v if a else math.nan for v, a in zip(flat[i * self.n_slots : (i + 1) * self.n_slots], alive)
            ]
            for i, name in enumerate(totals)
        }

    def _evaluate_all(self, chunk: int, live: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``[N]`` float64 means on the device, name by name."""
        self.batch.eval()
        totals: dict[str, torch.Tensor] = {}
        for xb, yb in self.val.chunks(chunk):
            out = self.batch(xb, participating=live)
            weight = xb.shape[0] / len(self.val)
            values = {"val_loss": self.batch.compute_loss(out, yb, self.recipe.loss, target_in_dims=None)}
            for name, fn in self.recipe.metrics.items():
                values[f"val_{name}"] = torch.vmap(fn, in_dims=(0, None))(out, yb)
            for name, v in values.items():
                totals[name] = totals.get(name, 0) + v.detach().to(torch.float64) * weight
        self.batch.train()
        return totals

    def _evaluate_subsets(self, chunk: int, live: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each live member on its own validation indices, ``[N, V]`` padded and masked, in column chunks.

        A member's indices fill the front of its row, so each chunk's valid entries are a prefix whose
        length the host knows: a metric is computed on ``out[slot, :k]`` (no mask indexing, no read).
        """
        subsets = [None if s is None else self.recipe.val_subset(s.config) for s in self.slots]
        width = max((len(s) for s in subsets if s is not None), default=1)
        idx = torch.zeros(self.n_slots, width, dtype=torch.long)
        mask = torch.zeros(self.n_slots, width, dtype=torch.bool)
        for slot, subset in enumerate(subsets):
            if subset is not None:
                idx[slot, : len(subset)] = torch.as_tensor(subset, dtype=torch.long)
                mask[slot, : len(subset)] = True
        counts = mask.sum(dim=1).to(torch.float64).clamp_min(1)
        names = ["val_loss", *(f"val_{name}" for name in self.recipe.metrics)]
        totals = {name: torch.zeros(self.n_slots, dtype=torch.float64, device=self.device) for name in names}
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        columns = ((idx[:, lo : lo + chunk], mask[:, lo : lo + chunk]) for lo in range(0, width, chunk))
        steps = (MemberStep(i, m, m.any(dim=1), -1, -1) for i, m in columns)
        self.batch.eval()
        for step, (xs, ys) in self.val.steps(steps):
            sizes = step.mask.sum(dim=1)  # on the host: the sampler's mask
            weights = upload(sizes / counts, self.device)
            prefixes = sizes.tolist()
            out = self.batch(xs, in_dims=0, participating=live)
            losses = self.batch.compute_loss(
                out, ys, self.recipe.loss, target_in_dims=0, mask=upload(step.mask, self.device)
            )
            totals["val_loss"] += losses.detach().to(torch.float64) * weights
            for name, fn in self.recipe.metrics.items():
                per_slot = [
                    torch.as_tensor(fn(out[slot, :k], ys[slot, :k]), dtype=torch.float64, device=self.device)
                    if k > 0
                    else zero
                    for slot, k in enumerate(prefixes)
                ]
                totals[f"val_{name}"] += torch.stack(per_slot) * weights
        self.batch.train()
        empty = torch.tensor([s is None or len(s) == 0 for s in subsets])
        for name in names[1:]:  # a metric of a member without validation samples is undefined
            totals[name] = torch.where(upload(empty, self.device), math.nan, totals[name])
        return totals

    # ------------------------------------------------------------------ member state
    def member_state_dict(self, member_id: Any, on_device: bool = False) -> dict[str, Any]:
        """What continues this member elsewhere: weights, optimizer, schedule, data, dropout stream.

        Tensors are copied to the CPU, or with ``on_device=True`` kept on the pack's device (for a
        :meth:`restore_member` on the same device: a device-to-device copy). Named as torch's
        ``state_dict`` (and the optimizers', schedules' and data streams' ``member_state_dict``).

        Example:
            >>> import torch, modelbatch as mb
            >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
            >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="sgd",
            ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), batch_size=8)
            >>> a = mb.PackTrainer(recipe, n_slots=2, example_config={"lr": 0.1})
            >>> _ = a.add("m", {"lr": 0.1}), a.train_report()
            >>> b = mb.PackTrainer(recipe, n_slots=3, example_config={"lr": 0.1})
            >>> b.restore_member(a.member_state_dict("m")), b.train_report()["m"]["training_iteration"]
            (0, 2)
        """
        slot = self.slot_of(member_id)

        def copied(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone() if on_device else t.detach().cpu().clone()

        opt_state = {k: {n: copied(t[slot]) for n, t in st.items()} for k, st in self.optimizer.state.items()}
        return {
            "slot_state": copy.deepcopy(self.slots[slot]),
            "model": {k: copied(v) for k, v in self.batch.member(slot).state_dict().items()},
            "hparams": {k: float(v[slot]) for k, v in self.optimizer.hparams.items()},
            "optimizer_state": opt_state,
            "optimizer_step": float(self.optimizer.steps[slot]),
            "schedule": None if self.schedule is None else self.schedule.member_state_dict(slot),
            "sampler": self.sampler.member_state_dict(slot),
            "rng": self.batch.rng_state(slot),
        }

    def member_state(self, member_id: Any, on_device: bool = False) -> dict[str, Any]:
        """Deprecated name of :meth:`member_state_dict` (FutureWarning); removed in the next release."""
        warn_renamed("mb.PackTrainer", "member_state()", "member_state_dict()")
        return self.member_state_dict(member_id, on_device=on_device)

    def restore_member(self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> int:
        """Put a member saved by :meth:`member_state_dict` into a free slot; it continues where it stopped.

        ``config``: the member's config from now on (``None``: the saved one). Population-based
        training continues a member from another's state with new hyperparameters: each optimizer
        hyperparameter whose value in ``config`` differs from the saved config's is set as a changed
        ``param_group[name]`` is in torch (an lr schedule goes on from it), and the config's other
        per-member settings (``grad_clip``) apply from the next step. Its model must have the saved
        one's architecture. A state that fails to load (a part missing or of the wrong shape) raises
        with the slot free again: nothing of it is left in the pack, and the other members are untouched.
        """
        saved: Slot = state["slot_state"]
        config = dict(saved.config if config is None else config)
        shapes = model_shapes(self.recipe, config, saved.seed)  # its weights come from the state
        slot = self._occupy(saved.member_id, config, saved.seed, shapes, state["model"])
        try:
            self._load_member_state(slot, saved, config, state)
        except BaseException:
            self.remove(saved.member_id)
            raise
        return slot

    def _load_member_state(
        self, slot: int, saved: Slot, config: dict[str, Any], state: Mapping[str, Any]
    ) -> None:
        """The rest of :meth:`restore_member`: optimizer, schedule, data stream, random stream, config."""
        with torch.no_grad():
            for name, st in state["optimizer_state"].items():
                target = self.optimizer._param_state(name, self.batch.stacked_parameters()[name])
                for key, t in st.items():
                    if t.shape != target[key][slot].shape:  # copy_ would broadcast it silently
                        raise ValueError(
                            f"mb.PackTrainer.restore_member: the state's optimizer {name}.{key} has shape "
                            f"{list(t.shape)}, the pack's member has {list(target[key][slot].shape)}; "
                            "restore a state saved by member_state_dict of a pack of this recipe."
                        )
                    target[key][slot].copy_(t)
        self.optimizer.steps[slot] = state["optimizer_step"]
        for name, value in state["hparams"].items():
            self.optimizer.set_hparam(name, value, member=slot)
        if self.schedule is not None and state["schedule"] is not None:
            self.schedule.load_member_state_dict(slot, state["schedule"])
        self.sampler.load_member_state_dict(slot, state["sampler"])
        if "rng" in state:  # saved before members had their own dropout streams: a fresh one
            self.batch.set_rng_state(slot, state["rng"])
        self.slots[slot] = replace(copy.deepcopy(saved), config=config, stopped=None)
        if config != saved.config:
            before = self.recipe.hparams(saved.config)
            for name, value in self.recipe.hparams(config).items():
                if before.get(name) != value:
                    self.optimizer.set_hparam(name, value, member=slot)

    # ------------------------------------------------------------------ helpers
    def _pack_data(self, data: Any) -> PackData:
        """Recipe data on this pack's device: tensors moved once, a dataset streamed by a loader."""
        r = self.recipe
        return PackData(
            data,
            device=self.device,
            dtype=r.dtype,
            num_workers=r.num_workers,
            pin_memory=r.pin_memory,
            loader_kwargs=r.loader_kwargs,
        )

    def _initial_optimizer_state(self, cls: type, hp: Mapping[str, float]) -> dict[str, Any]:
        return {
            "hparams": {k: torch.full((self.n_slots,), v, dtype=torch.float64) for k, v in hp.items()},
            "flags": {**_default_flags(cls), **self.recipe.flags()},
            "steps": torch.zeros(self.n_slots, dtype=torch.float64),
            "state": {},
        }

    def _schedule_factory(self, index: int, torch_optimizer: torch.optim.Optimizer) -> Any:
        slot = self.slots[index]
        config = slot.config if slot is not None else self.example_config
        return self.recipe.lr_schedule(config, torch_optimizer)


def _default_flags(cls: type) -> dict[str, bool]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if isinstance(p.default, bool)}
