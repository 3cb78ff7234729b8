"""ModelBatchSearcher: a Tune Searcher whose member trials train packed in per-GPU slot servers."""

from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray import cloudpickle
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.sample import Domain

import modelbatch as mb
from modelbatch._internal import (
    OPTIMIZER_KEYS,
    architecture_key,
    build_model,
    check_positive_int,
    member_seed,
    warn_renamed,
)

from . import _relay
from ._generator import accept_population_based_training
from ._lookahead import GroupingLookahead
from ._packs import PackFactory, load_member_state
from ._sampler import SpaceSampler
from ._service import (
    ServiceStopping,
    SweepClient,
    check_room_for_relays,
    connect,
    default_tenant,
    placements,
)
from ._space import (
    Resolvers,
    grid_points,
    is_placeholder,
    resolve,
    tune_resolvers,
    tune_run_locals,
    tune_search_generator,
)

logger = logging.getLogger(__name__)
API = "ModelBatchSearcher"
AUTO_SAMPLES = 8
"""Configs of the search space measured by ``slots_per_gpu="auto"`` (the largest member counts)."""


class SlotLimiter(ConcurrencyLimiter):
    """A ConcurrencyLimiter at the sweep's slots: restoring an experiment keeps today's number of slots.

    Tune 2.x starts members one at a time under a custom Searcher unless a ConcurrencyLimiter
    sits in its ``.searcher`` chain (``tune_controller._get_max_pending_trials``).
    """

    def set_state(self, state: dict) -> None:
        n_slots = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = n_slots


class ModelBatchSearcher(Searcher):
    """Tune sweeps where each GPU trains a pack and every member is a native Tune trial.

    One slot server per GPU of the cluster (one per node with a CPU when there is no GPU)
    trains the members of a :class:`modelbatch.Recipe` in packs, one pack per architecture
    (models whose parameter shapes differ get separate packs). Each member is a tiny Tune
    trial (``searcher.trainable()``) that relays its results, so schedulers (ASHA), stoppers,
    callbacks, checkpoints and resume work per member. A finished or stopped member's slot is
    refilled by the next suggestion at once. Each member trains exactly as that config would
    alone (``mb.fit(recipe, [config])``), whichever slot or server it lands in and whenever it
    joins.

    Args:
        recipe: how to train one member from its config; or a pack factory
            ``(n_slots, example_config) -> trainer`` with :class:`modelbatch.PackTrainer`'s
            slot API (``add``, ``train_report``, ``after_report``, ``member_state_dict``, ...; e.g.
            a ``PackTrainer`` subclass with its own ``_train_step``).
        searcher: an inner Tune ``Searcher`` (``OptunaSearch(...)``, ...) that suggests the
            configs and receives every member's results; ``None`` samples the search space as
            plain Tune does (every ``grid_search`` point ``num_samples`` times).
        slots_per_gpu: this sweep's members per server, or ``"auto"``: as many as fit in 80 %
            of the device's free memory, measured on a sample of the search space (the first
            configs of an inner searcher that owns its space; at most 64
            per GPU; on a CPU server at most 16 and 2 per core). When the packing service was
            started with ``--slots-per-gpu`` (a server's slots over all sweeps), members beyond
            this sweep's fair share wait for a slot.
        tenant: who runs the sweep (default ``user@host:pid``); results carry it.
        weight: the tenant's share of the slots under contention (relative to other tenants').
        max_slots: the most slots the tenant holds at once over the cluster (``None``: no cap).
        priority: tenants of a higher priority get free slots first.
        reports: end each member after this many reports (``None``: when Tune stops it,
            e.g. ``stop={"training_iteration": 20}`` or a scheduler's ``max_t``).
        callbacks: :class:`modelbatch.callbacks.Callback` objects run on the slot servers, as
            ``mb.fit(callbacks=...)`` runs them: ``on_report`` after each report of this sweep's
            members of a pack (it may stop members: e.g. ``mb.callbacks.EarlyStopping``) and
            ``on_member_stop``. A member a callback stops ends its Tune trial normally, its last
            result saying why in ``"stopped"``. Each server has its own copy (member ids there are
            ``(sweep id, trial id)``); a restarted server, or a member moved to another server,
            starts with the callbacks as they were passed here. Tune callbacks (``MLflowCallback``)
            go to ``tune.run(callbacks=...)``.
        checkpoint_every: a Tune checkpoint every this many reports and at a member's last
            report (``None``: none; then resume restarts members from scratch).
        group_ahead: configs drawn ahead from ``searcher`` to group members by architecture
            (``None``: 4x the sweep's slots when sampling the space, as many as its slots with
            an inner ``searcher``; ``0``: suggest in the inner searcher's order). When the space
            holds several architectures (e.g. ``width`` or ``dropout`` is searched), each free
            slot goes to the waiting config whose architecture most live members share, so that
            packs fill; an adaptive inner searcher then suggests up to this many configs before
            it sees their results. A space of one architecture is never drawn ahead.
        park_after_s: a member that keeps the rest of its pack waiting this long (Tune paused
            it, as HyperBand does, or its process died) is parked outside the pack with its
            state until it asks again: the others train on, and it continues exactly.
        random_state: seed of the sampling when ``searcher`` is ``None``.

    Results carry ``loss``, ``val_loss``, ``val_<metric>``, ``training_iteration``,
    ``step``, and where the member trained: ``server``, ``server_node``, ``pack`` (an
    architecture hash), ``slot`` and ``tenant``. A member's seed is ``config["seed"]`` (default 0);
    put ``"seed": tune.randint(0, 2**31 - 1)`` into the space for different initial weights.
    A member whose result is NaN or infinite reports it and ends, its last result saying why in
    ``"error"`` (``"non-finite loss (nan) at report 3"``, as ``mb.fit``'s history says it).

    Pass ``reuse_actors=True`` (``tune.run`` / ``TuneConfig``): a finished member's relay
    process then serves the next member instead of a new ~110 MB process starting (on 2 CPUs
    a 12-member sweep took 18 s instead of 44 s).

    Population-based training: pass ``scheduler=PopulationBasedTraining(...)`` (or ``PB2``)
    with ``search_alg=searcher``; the searcher then suggests the initial population only (Tune
    refuses other search algorithms with PBT). An exploited member continues from the donor's
    checkpoint with its new config, counting iterations on from the donor's as plain Tune does;
    within a server the donor's state is copied on the device (each member keeps its last two
    checkpoints at a perturbation step there). Keep ``checkpoint_every`` a divisor of
    ``perturbation_interval`` (1, the default): PBT exploits only checkpointed results. Mutate
    hyperparameters (lr, weight_decay, grad_clip, ...), not what changes the parameter shapes.
    PBT (and HyperBand) pause members often: pass ``park_after_s=1.0`` so that a paused member
    holds its pack back for a second, not 30.

    Sweeps share the cluster: one packing service per Ray cluster (detached actors in the
    ``modelbatch`` namespace, started by the first sweep that needs it, or by ``modelbatch
    service start``) runs the slot servers and hosts every sweep as a tenant. Under contention,
    each tenant gets slots in proportion to its ``weight`` (higher ``priority`` first; at most
    ``max_slots``); an idle tenant's share goes to the others. A sweep leaves the service when
    every sample has completed (Tune tells the searcher ``num_samples`` with the search space
    of ``tune.run(config=...)`` / ``Tuner(param_space=...)``), on :meth:`shutdown`, or, however
    it ended (time budget, stopper, error, Ctrl-C, driver killed), within ``LEASE_S`` seconds
    once none of its member trials lives. A service started by a sweep stops by itself
    ``IDLE_STOP_S`` seconds after its last sweep left, freeing every CPU and GPU.

    An operator's tenant settings (``modelbatch service start --tenants tenants.toml``) override
    ``weight``, ``max_slots`` and ``priority``.

    A second sweep with the same searcher starts afresh (with an inner ``searcher``, which keeps
    its first space as Tune's searchers do, it raises: create new ones).

    The space may hold what plain Tune's does: ``tune.sample_from``, classes and other objects
    (resolved in each member's config as Tune resolves them), optimizer hyperparameters nested
    under ``"optim"`` (see :class:`modelbatch.Recipe`). ``tune.with_parameters`` around
    :meth:`trainable` is refused: the data belongs in the Recipe.

    Example::

        searcher = ModelBatchSearcher(recipe, slots_per_gpu=16)
        analysis = tune.run(searcher.trainable(), config={"lr": tune.loguniform(1e-4, 1e-1)},
                            num_samples=64, search_alg=searcher, scheduler=ASHAScheduler(),
                            metric="val_loss", mode="min", stop={"training_iteration": 20})
        model = searcher.model_from_checkpoint(analysis.get_best_trial().checkpoint)
    """

    def __init__(
        self,
        recipe: mb.Recipe | PackFactory,
        searcher: Searcher | None = None,
        slots_per_gpu: int | str = "auto",
        *,
        reports: int | None = None,
        callbacks: Sequence[mb.callbacks.Callback] = (),
        checkpoint_every: int | None = 1,
        group_ahead: int | None = None,
        park_after_s: float = 30.0,
        random_state: Any = None,
        tenant: str | None = None,
        weight: float = 1.0,
        max_slots: int | None = None,
        priority: int = 0,
    ) -> None:
        _check_args(recipe, searcher, slots_per_gpu, reports, checkpoint_every, group_ahead, park_after_s)
        _check_tenancy(tenant, weight, max_slots, priority)
        _check_picklable(recipe)
        self.callbacks = mb.callbacks.check_callbacks(
            API, callbacks, " Tune callbacks (e.g. MLflowCallback) go to tune.run(callbacks=...)."
        )
        _check_picklable(self.callbacks, "callbacks")
        self.tenant = tenant if tenant is not None else default_tenant()
        self.weight, self.max_slots, self.priority = float(weight), max_slots, int(priority)
        self.park_after_s = float(park_after_s)
        self.recipe = recipe
        self.slots_per_gpu = slots_per_gpu
        self.reports, self.checkpoint_every = reports, checkpoint_every
        self.group_ahead = group_ahead
        self._searcher = searcher  # as passed (``inner_searcher``); None: the space sampler below
        self._inner = searcher if searcher is not None else SpaceSampler(random_state)
        self._ahead = GroupingLookahead(self._inner, self._architecture_key)
        self._limiter = SlotLimiter(self._ahead, max_concurrent=1)
        super().__init__()
        self._sweep: SweepClient | None = None
        self._space: dict[str, Any] | None = None
        self._num_samples: int | None = None
        self._completed: set[str] = set()
        # trial -> last training_iteration Tune processed in this run (not saved: after a driver
        # restart Tune's restored trials may lag it, and skipping would leave gaps)
        self._reported: dict[str, int] = {}
        self._last_stats: list[dict[str, Any]] = []
        self._releases: list[Any] = []
        self._slots_ref: Any = None
        self._resolvers: Resolvers | None = None  # Tune's placeholder resolvers of the running sweep
        self._tune_total: int | None = None  # trials Tune is to create, told at the first suggest

    # ------------------------------------------------------------------ public helpers
    def trainable(self) -> Any:
        """The member trial to pass to ``tune.run`` / ``tune.Tuner`` (a tiny relay, ``{"cpu": 0.01}``)."""
        return _relay.trainable()

    @property
    def inner_searcher(self) -> Searcher | None:
        """The searcher passed as ``searcher=`` (``OptunaSearch(...)``, ...); ``None`` if none."""
        return self._searcher

    @property
    def searcher(self) -> ConcurrencyLimiter:
        """Tune's wrapper chain, what Tune itself reads (the searcher you passed: :attr:`inner_searcher`).

        Tune walks a searcher's ``.searcher`` attribute down its wrappers (as it does for Ray's
        ``ConcurrencyLimiter`` and ``Repeater``): to find a ConcurrencyLimiter, whose
        ``max_concurrent`` members it starts at once (else one by one), and to save and restore
        each wrapper with the experiment. So this is a ConcurrencyLimiter at the sweep's slots,
        around the grouping lookahead, around the inner searcher.
        """
        return self._slot_limiter()

    def _slot_limiter(self) -> ConcurrencyLimiter:
        """The ConcurrencyLimiter at the sweep's slots (Tune reads its ``max_concurrent`` before the
        sweep opens: then the slots the servers will have)."""
        if self._sweep is None and isinstance(self.slots_per_gpu, int) and ray.is_initialized():
            n_slots = self.slots_per_gpu * max(len(placements()), 1)
            self._limiter.set_max_concurrency(min(n_slots, self.max_slots or n_slots))
        return self._limiter

    @property
    def n_slots(self) -> int | None:
        """This sweep's slots: members training at once over all servers (``None`` before its sweep opens).

        ``slots_per_gpu`` of each server, over the servers, at most ``max_slots``.
        """
        return None if self._sweep is None else self._sweep.n_slots

    @property
    def capacity(self) -> int | None:
        """Deprecated name of :attr:`n_slots` (FutureWarning); it will be removed in the next release."""
        warn_renamed(API, "capacity", "n_slots")
        return self.n_slots

    def server_stats(self) -> list[dict[str, Any]]:
        """One dict per server, as this sweep sees it: its ``slots`` there, ``live`` and ``parked`` members,
        ``members_hosted``, ...

        Also ``parks``, ``packs``, ``device``, ``server`` (its index), ``server_node`` and ``tenants``
        (live members per tenant on that server). Live while the sweep runs; afterwards the last
        numbers seen before the sweep closed.
        """
        if self._sweep is not None:
            self._last_stats = self._sweep.stats()
        return self._last_stats

    def shutdown(self) -> None:
        """Close this sweep in the packing service: its members' slots are freed at once.

        Done by itself when every sample completed and when another sweep starts; a sweep that
        ends otherwise (time budget, stopper, error, Ctrl-C, its driver killed) is closed by the
        service within ``LEASE_S`` seconds. The service stops when its last sweep closed.
        """
        if self._sweep is None:
            return
        try:
            ray.wait(self._releases, num_returns=len(self._releases), timeout=10)
            self._last_stats = self._sweep.stats()
        finally:
            self._sweep.close()
            self._sweep, self._releases = None, []

    def model_from_checkpoint(self, checkpoint: Any) -> torch.nn.Module:
        """The trained model of a member from its Tune checkpoint (needs a Recipe)."""
        if not isinstance(self.recipe, mb.Recipe):
            raise TypeError(
                f"{API}: model_from_checkpoint needs a mb.Recipe; this searcher has a pack factory."
            )
        state = load_member_state(_relay.read_checkpoint(checkpoint))
        slot = state["slot_state"]
        model = build_model(self.recipe, slot.config, slot.seed)
        model.load_state_dict(state["model"])
        return model

    # ------------------------------------------------------------------ Searcher API
    @property
    def metric(self) -> str | None:
        return self._inner.metric

    @property
    def mode(self) -> str | None:
        return self._inner.mode

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        spec = self._begin_sweep(metric, mode, config, spec)  # before any server starts
        self._space = config or self._space
        self._num_samples = spec.get("num_samples", self._num_samples)
        self.shutdown()  # a new sweep: the previous one's members leave
        self._start()
        accept_population_based_training(self)
        return self._limiter.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self._sweep is None:
            self._begin_sweep_without_space()
        accept_population_based_training(self)  # before Tune adds the trial (PBT checks it then)
        self._tell_tune_total()
        self._start()
        self._renew()
        return self._next_config(trial_id)

    def _next_config(self, trial_id: str) -> dict | str | None:
        """The limiter's next config with its architecture key for the relay to join with
        (``_relay.PACK_KEY``), computed once, when the lookahead drew the config."""
        config = self._limiter.suggest(trial_id)
        key = self._ahead.live_keys.get(trial_id)
        if isinstance(config, dict) and key is not None:
            config = {**config, _relay.PACK_KEY: key}
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._renew()
        iteration = result.get("training_iteration")
        if isinstance(iteration, int):  # a restarted member's relay skips what Tune already has
            self._reported[trial_id] = iteration
            if self._sweep is not None:
                self._sweep.service.reported.remote(self._sweep.id, {trial_id: iteration})
        self._limiter.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._sweep is not None:
            self._releases.append(self._sweep.service.release.remote(self._sweep.id, trial_id))
        self._limiter.on_trial_complete(trial_id, result=result, error=error)
        self._completed.add(trial_id)
        self._reported.pop(trial_id, None)
        if self._num_samples is not None and 0 < self._num_samples <= len(self._completed):
            self.shutdown()

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self._limiter.add_evaluated_point(*args, **kwargs)

    def on_pause(self, trial_id: str) -> None:
        self._limiter.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self._limiter.on_unpause(trial_id)

    def get_state(self) -> dict[str, Any]:
        return {
            "completed": sorted(self._completed),
            "num_samples": self._num_samples,
            "space": self._space,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._completed = set(state["completed"])
        self._num_samples = state["num_samples"]
        self._space = self._space or state["space"]
        if ray.is_initialized():
            self._start()  # resume: restored trials come back without passing suggest()

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            inner_path = os.path.join(directory, "inner")
            self._inner.save(inner_path)
            with open(inner_path, "rb") as f:
                inner = f.read()
        state = {
            "searcher": self.get_state(),
            "limiter": self._limiter.get_state(),
            "lookahead": self._ahead.get_state(),
            "inner": inner,
        }
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = cloudpickle.load(f)
        with tempfile.TemporaryDirectory() as directory:
            inner_path = os.path.join(directory, "inner")
            with open(inner_path, "wb") as f:
                f.write(state["inner"])
            self._inner.restore(inner_path)
        self._limiter.set_state(state["limiter"])
        self._ahead.set_state(state["lookahead"])
        self.set_state(state["searcher"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # the open sweep belongs to the run that opened it
        state["_sweep"], state["_releases"], state["_slots_ref"] = None, [], None
        state["_resolvers"] = None  # and Tune's placeholders to its tune.run call
        return state

    # ------------------------------------------------------------------ sweep start
    def _begin_sweep(self, metric: str | None, mode: str | None, config: dict, spec: dict) -> dict:
        """A new sweep (a reused searcher starts afresh); its checks; ``spec`` with Tune's trial count.

        Without an inner searcher, ``num_samples`` counts trials per ``grid_search`` point as in
        plain Tune: the spec passed on (and Tune's SearchGenerator, at the first suggestion)
        gets grid points x ``num_samples``.
        """
        if self._ahead.drawn or self._completed:  # this searcher ran a sweep before
            if not isinstance(self._inner, SpaceSampler):
                raise ValueError(
                    f"{API}: this searcher ran a sweep before, and its inner {type(self._inner).__name__} "
                    "keeps the search space of its first one (Tune's searchers take one sweep each: a "
                    "second tune.run with config= raises); create a new inner searcher and "
                    "ModelBatchSearcher for each sweep."
                )
            self._new_sweep()
        self._resolvers = tune_resolvers()
        _check_trainable(tune_run_locals().get("run_or_experiment"))
        num_samples = spec.get("num_samples")
        _check_sweep(self.recipe, metric, mode, config, num_samples, self._resolvers)
        if (
            isinstance(self._inner, SpaceSampler)
            and config
            and isinstance(num_samples, int)
            and num_samples > 0
        ):
            total = num_samples * grid_points(config)
            if total != num_samples:
                self._tune_total = total
                spec = {**spec, "num_samples": total}
        return spec

    def _begin_sweep_without_space(self) -> None:
        """The first suggestion of a sweep Tune gave no space (the inner searcher owns it)."""
        if self._num_samples is not None and 0 < self._num_samples <= len(self._completed):
            self._new_sweep()  # a second fit of this searcher
        run = tune_run_locals()
        _check_trainable(run.get("run_or_experiment"))
        samples = run.get("num_samples")  # Tune tells a searcher that owns its space nothing of it
        if isinstance(samples, int) and samples > 0:
            self._num_samples = self._ahead.limit = samples  # the sweep closes when they complete

    def _new_sweep(self) -> None:
        """Forget the trials of an earlier sweep of this searcher (Tune's searchers restore after this)."""
        self._completed.clear()
        self._reported.clear()
        self._tune_total = None
        self._limiter.live_trials.clear()
        self._limiter.num_unfinished_live_trials = 0
        self._limiter.cached_results.clear()
        self._ahead.reset()

    def _tell_tune_total(self) -> None:
        """Tune's SearchGenerator creates ``num_samples`` trials: tell it grid points x num_samples."""
        if self._tune_total is None:
            return
        generator = tune_search_generator(self)
        if generator is None:  # not driven by tune.run / Tuner.fit: its driver decides
            logger.warning(f"{API}: found no Tune SearchGenerator to run {self._tune_total} trials.")
            self._tune_total = None
            return
        generator._total_samples = max(generator._total_samples, self._tune_total)
        self._tune_total = None

    # ------------------------------------------------------------------ servers
    def _start(self) -> None:
        """Open this sweep in the cluster's packing service (started if there is none)."""
        if self._sweep is not None:
            return
        check_room_for_relays()
        if self.slots_per_gpu == "auto" and not self._space:  # the inner searcher owns the space
            examples = self._ahead.peek(AUTO_SAMPLES)  # its first configs, handed out as drawn
            if not examples:
                raise ValueError(
                    f"{API}: slots_per_gpu='auto' measures members on the first configs of the sweep, "
                    f"but the inner searcher {type(self._inner).__name__} suggested none before the "
                    "sweep started; pass an int slots_per_gpu."
                )
        elif self.slots_per_gpu == "auto":
            examples = self._example_configs()
        else:  # for the servers' memory admission, when the space is known here
            examples = self._example_configs(own_rng=True) if self._space else []
        spec = {
            "job_id": ray.get_runtime_context().get_job_id(),
            "tenant": self.tenant,
            "weight": self.weight,
            "max_slots": self.max_slots,
            "priority": self.priority,
            "recipe": cloudpickle.dumps(self.recipe),
            "slots": self.slots_per_gpu,
            "options": {
                "example_configs": examples,
                "checkpoint_every": self.checkpoint_every,
                "reports": self.reports,
                "callbacks": cloudpickle.dumps(self.callbacks) if self.callbacks else None,
                "park_after_s": self.park_after_s,
                "fingerprint": self.recipe.fingerprint() if isinstance(self.recipe, mb.Recipe) else None,
                "snapshot_every": _perturbation_interval(tune_run_locals().get("scheduler")),
            },
        }
        for attempt in range(3):
            service = connect()
            try:
                opened = ray.get(service.open_sweep.remote(spec))  # raises what a server raised
                break
            except (ServiceStopping, ray.exceptions.RayActorError):  # it went idle just now: a new one
                if attempt == 2:
                    raise
        self._sweep = SweepClient(service, opened["sweep"], opened["servers"], self.max_slots)
        self._set_slots(self._sweep.n_slots)
        slots = [s["slots"] for s in opened["servers"]]
        logger.info(
            f"{API}: sweep {self._sweep.id} of tenant {self.tenant!r} has {slots} slots on "
            f"{len(slots)} slot servers ({opened['servers'][0]['device'] if slots else '-'})."
        )

    def _set_slots(self, n_slots: int) -> None:
        self._ahead.ahead = self._group_ahead(n_slots)
        self._limiter.set_max_concurrency(n_slots)
        self._limiter._set_searcher_max_concurrency()

    def _renew(self) -> None:
        """Tell the service this sweep's driver is alive; follow its slots (servers join and leave)."""
        if self._sweep is None:
            return
        ref = self._slots_ref
        if ref is not None and ray.wait([ref], timeout=0)[0]:
            self._slots_ref = None
            try:
                total = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._sweep = None
                raise RuntimeError(
                    f"{API}: the packing service stopped while this sweep ran (`modelbatch service stop`, "
                    "or its process died); run the sweep again (tune.run(resume=True) / Tuner.restore "
                    "continues it from the members' checkpoints)."
                ) from exc
            if total:
                self._sweep.slots = total
                if self._sweep.n_slots != self._limiter.max_concurrent:
                    self._set_slots(self._sweep.n_slots)
        if self._slots_ref is None:
            self._slots_ref = self._sweep.renew()

    def _group_ahead(self, n_slots: int) -> int:
        if self.group_ahead is not None:
            return self.group_ahead
        # sampling the space is not adaptive: configs drawn ahead lose nothing
        return (4 if isinstance(self._inner, SpaceSampler) else 1) * n_slots

    def _architecture_key(self, config: dict[str, Any]) -> str | None:
        """The ``pack`` label members of this config train under (``None``: unknown)."""
        if not isinstance(self.recipe, mb.Recipe):
            return None  # a pack factory decides itself which configs share a pack
        config = resolve(config, self._resolvers, sample=False)
        if config is None:  # a sample_from value: Tune draws it in the trial
            return None
        try:
            return architecture_key(self.recipe, config, api=API)
        except Exception:  # a bad config: its member trial reports why when it joins a server
            return None

    def _example_configs(self, own_rng: bool = False) -> list[dict[str, Any]]:
        """Configs of the space for the servers to measure a member's memory on (``"auto"`` slots,
        admission). ``own_rng``: drawn with a generator of their own (the sweep's draws stay as they
        are) and ``[]`` where Tune's placeholders cannot be resolved yet (nothing to measure)."""
        sampler = SpaceSampler()
        sampler.set_search_properties(None, None, self._space or {})
        if isinstance(self._inner, SpaceSampler) and not own_rng:
            sampler.rng = self._inner.rng
        samples = sampler.samples(AUTO_SAMPLES)
        resolved = _resolved(samples, self._resolvers)
        if own_rng:
            return resolved
        if samples and not resolved:
            raise ValueError(
                f"{API}: slots_per_gpu='auto' measures members on configs of the search space, but "
                "Tune's placeholders in them (tune.sample_from, objects) could not be resolved outside "
                "tune.run / Tuner.fit; pass an int slots_per_gpu."
            )
        return resolved


def _perturbation_interval(scheduler: Any) -> int | None:
    """PBT's (and PB2's) ``perturbation_interval`` in reports, where it counts ``training_iteration``."""
    if not isinstance(scheduler, PopulationBasedTraining) or scheduler._time_attr != "training_iteration":
        return None
    return max(int(scheduler._perturbation_interval), 1)


def _check_args(
    recipe: Any,
    searcher: Any,
    slots_per_gpu: Any,
    reports: Any,
    checkpoint_every: Any,
    group_ahead: Any,
    park_after_s: Any,
) -> None:
    if isinstance(recipe, torch.nn.Module) or not (isinstance(recipe, mb.Recipe) or callable(recipe)):
        raise TypeError(
            f"{API}: recipe must be a mb.Recipe (how to train one member from its config), e.g. "
            "mb.Recipe(model=lambda cfg: MLP(cfg['hidden']), optimizer='adamw', loss=..., train_data=...), "
            f"or a pack factory (n_slots, example_config) -> PackTrainer; got {type(recipe).__name__}."
        )
    if isinstance(searcher, (type, SearchAlgorithm)) or not (
        searcher is None or isinstance(searcher, Searcher)
    ):
        raise TypeError(
            f"{API}: searcher must be a Tune Searcher instance (e.g. OptunaSearch()) or None, "
            f"got {searcher!r}."
        )
    if slots_per_gpu == "auto" and not isinstance(recipe, mb.Recipe):
        raise ValueError(
            f"{API}: slots_per_gpu='auto' measures a member of a mb.Recipe; with a pack factory pass an int."
        )
    if slots_per_gpu != "auto":
        check_positive_int(API, "slots_per_gpu", slots_per_gpu, alternative="'auto'")
    for name, value in (("reports", reports), ("checkpoint_every", checkpoint_every)):
        if value is not None:
            check_positive_int(API, name, value, alternative="None")
    if group_ahead is not None and (
        isinstance(group_ahead, bool) or not isinstance(group_ahead, int) or group_ahead < 0
    ):
        raise ValueError(f"{API}: group_ahead must be an int >= 0 or None, got {group_ahead!r}.")
    if isinstance(park_after_s, bool) or not isinstance(park_after_s, (int, float)) or not park_after_s > 0:
        raise ValueError(f"{API}: park_after_s must be a positive number of seconds, got {park_after_s!r}.")


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _check_picklable(recipe: Any, what: str = "recipe") -> None:
    """Ray sends the recipe and the callbacks to every slot server: fail now, not when the sweep starts."""
    try:
        cloudpickle.dump(recipe, _Discard())  # streamed and dropped: no copy of the data is kept
    except Exception as exc:
        raise TypeError(
            f"{API}: the {what} cannot be pickled for Ray, which sends it to every slot server "
            f"({type(exc).__name__}: {exc}). Create locks, open files and connections inside the function "
            "that uses them (the model factory, loss or metric), not in a closure, default argument or "
            f"global it captures; or check it with ray.cloudpickle.dumps({what})."
        ) from exc


def _check_tenancy(tenant: Any, weight: Any, max_slots: Any, priority: Any) -> None:
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ValueError(f"{API}: tenant must be a non-empty str or None (user@host:pid), got {tenant!r}.")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not (weight > 0 and math.isfinite(weight))
    ):
        raise ValueError(f"{API}: weight must be a positive number (the tenant's share), got {weight!r}.")
    if max_slots is not None:
        check_positive_int(API, "max_slots", max_slots, alternative="None")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{API}: priority must be an int (higher goes first), got {priority!r}.")


def _reported_metrics(recipe: mb.Recipe) -> set[str]:
    keys = {"loss", "step", "slot", "pack", "server", "server_node", "tenant", *AUTO_RESULT_KEYS}
    if recipe.val_data is not None:
        keys |= {"val_loss", *(f"val_{name}" for name in recipe.metrics)}
    return keys


def _check_trainable(trainable: Any) -> None:
    """Refuse ``tune.with_parameters(searcher.trainable(), ...)`` before any trial starts."""
    if getattr(trainable, "__qualname__", None) != "with_parameters.<locals>.inner":
        return
    closure = inspect.getclosurevars(trainable).nonlocals
    if closure.get("trainable") is not _relay.modelbatch_member:
        return
    names = ", ".join(f"{k}=..." for k in sorted(closure.get("keys", ())))
    raise ValueError(
        f"{API}: tune.with_parameters(searcher.trainable(), {names}) hands these objects to the member "
        "trials, which only relay results: the slot servers train every member from the mb.Recipe. Put "
        "the data into the Recipe (train_data=..., val_data=...; Ray sends it to each server once, and "
        "closures of its model factory, loss or metrics travel with it) and pass searcher.trainable() "
        "itself."
    )


def _misplaced_hparams(recipe: mb.Recipe, space: Any, path: tuple = ()) -> None:
    """A searched optimizer hyperparameter nested where the Recipe does not read it raises."""
    if not isinstance(space, dict) or "grid_search" in space:
        return
    names = {*recipe.hparam_names(), "betas"}
    for key, value in space.items():
        where = (*path, key)
        searched = (
            isinstance(value, Domain)
            or is_placeholder(value)
            or (isinstance(value, dict) and "grid_search" in value)
        )
        read = len(where) == 1 or (len(where) == 2 and where[0] in OPTIMIZER_KEYS)
        if searched and key in names and not read:
            at = "".join(f"[{k!r}]" for k in where)
            raise ValueError(
                f"{API}: the search space sets config{at}, but mb.Recipe reads the optimizer "
                f"hyperparameter {key!r} only at the top level of a config or in its dict under "
                f"{' or '.join(map(repr, OPTIMIZER_KEYS))}, so it would be ignored; write it as "
                f"{{{key!r}: ...}} or {{'optim': {{{key!r}: ...}}}}."
            )
        _misplaced_hparams(recipe, value, where)


def _resolved(configs: list[dict[str, Any]], resolvers: Resolvers | None) -> list[dict[str, Any]]:
    """``configs`` with Tune's placeholders resolved as in their trials, less those that cannot be."""
    return [c for c in (resolve(config, resolvers) for config in configs) if c is not None]


def _check_sweep(
    recipe: Any,
    metric: Any,
    mode: Any,
    space: dict | None,
    num_samples: Any,
    resolvers: Resolvers | None = None,
) -> None:
    """What Tune tells the searcher at the start of a sweep, and a sample of the space's configs.

    The sample is checked as its trials will see it (Tune's placeholders resolved); a config
    whose placeholders cannot be resolved here is left to its member's server.
    """
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(
            f"{API}: mode must be 'min' or 'max', got {mode!r}; pass it as tune.run(mode=...) or "
            "TuneConfig(mode=...)."
        )
    if num_samples == 0:
        raise ValueError(
            f"{API}: num_samples is 0; a sweep needs num_samples >= 1 (or -1 to run until stopped). "
            "Pass it as tune.run(num_samples=...) or TuneConfig(num_samples=...)."
        )
    if not isinstance(recipe, mb.Recipe):
        return  # a pack factory: its results and configs are its own
    _misplaced_hparams(recipe, space or {})
    reported = _reported_metrics(recipe)
    if isinstance(metric, str) and metric not in reported:
        named = sorted(k for k in reported if k in ("loss", "val_loss") or k.startswith("val_"))
        raise ValueError(
            f"{API}: metric {metric!r} is not among the results a member reports ({named}, plus "
            f"{sorted(reported - set(named))}). Pass one of them as tune.run(metric=...), or add it to "
            "mb.Recipe(metrics={name: fn}) (reported as 'val_<name>', needs val_data)."
        )
    try:
        sampler = SpaceSampler()
        sampler.set_search_properties(None, None, space or {})
        samples = _resolved(sampler.samples(AUTO_SAMPLES), resolvers)
    except Exception:  # a space only the inner searcher understands: it is checked by the servers
        samples = []
    for config in samples:
        where = f"{API}: config {config} (sampled from the search space)"
        recipe.hparams(config, api=where)
        build_model(recipe, config, member_seed(config, 0, where), api=where)
