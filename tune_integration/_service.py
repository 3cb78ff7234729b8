"""The packing service: one per Ray cluster, shared by every sweep (its tenants).

``Service`` is a detached asyncio actor named ``service`` in the ``modelbatch`` namespace. It
owns the slot servers (one per GPU, else one per node with a CPU; see :func:`placements`),
which die with it, and assigns member trials to their slots with the fair-share policy of
:mod:`._policy`. The first sweep that needs it starts it (:func:`connect`); ``modelbatch
service start`` starts a long-lived one with an operator's settings.

Lifecycle, so that nothing a sweep leaves behind holds a CPU or GPU:

* a sweep is open from :meth:`Service.open_sweep` until :meth:`Service.close_sweep` (its
  searcher calls it when every sample completed, on ``shutdown()`` and when it starts another
  sweep), or until it *expires*: none of its member trials alive and no call from its driver for
  ``LEASE_S`` (a sweep ended by a time budget, a stopper, an error or Ctrl-C; a killed driver);
* each member's relay trial is pinged every ``PING_S``; a dead relay's slot is freed at once
  (Tune's ``on_trial_complete`` never comes for a killed driver);
* a service started by a sweep stops by itself ``IDLE_STOP_S`` after its last sweep closed,
  killing its servers (their CPUs/GPUs are free again).

Import-light (no torch): relay trials import this module to find the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._policy import FairShare, Tenant
from ._server import SERVER_GONE, SERVER_LOST, SlotLost, SlotServer, UnknownSweep

__all__ = ["SlotLost", "connect", "find_service"]

logger = logging.getLogger(__name__)

NAMESPACE = "modelbatch"
SERVICE_NAME = "service"
LEASE_S = 15.0
"""A sweep with no live member trial and no call from its driver for this long is closed."""
PING_S = 2.0
"""How often the service checks that each member's relay trial is alive."""
IDLE_STOP_S = 30.0
"""A service started by a sweep stops this long after its last sweep closed (``None``: never)."""
START_TIMEOUT_S = 300.0
"""How long a sweep waits for the first slot server to start (e.g. while GPUs are held by others)."""
ALL_START_S = 60.0
"""How long a sweep waits for every slot server to start before it opens with those that are up."""
SERVER_RESTARTS = 3
"""Times Ray restarts a slot server whose process died; its members then join it again."""
RESTART_TIMEOUT_S = 300.0
"""How long the service waits for a restarting slot server before it gives up on a call."""
LOOKUP_TIMEOUT_S = 120.0
HEAD_NODE = "node:__internal_head__"
"""The resource Ray gives the head node only: the service runs there (the cluster ends with it anyway)."""


class ServiceStopping(RuntimeError):
    """The service is stopping (idle); start a new one."""


def server_name(index: int) -> str:
    return f"server:{index}"


def default_tenant() -> str:
    """``user@host:pid`` of this process."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def find_service(timeout_s: float = LOOKUP_TIMEOUT_S) -> ray.actor.ActorHandle:
    """The cluster's packing service; waits for it while a searcher is still starting it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ModelBatchSearcher: no packing service (actor {SERVICE_NAME!r} in namespace "
                    f"{NAMESPACE!r}); a member trial must run in a sweep whose search_alg is the "
                    "ModelBatchSearcher that made its trainable (searcher.trainable())."
                ) from None
            time.sleep(0.2)


def connect(settings: dict[str, Any] | None = None) -> ray.actor.ActorHandle:
    """The cluster's packing service, started with ``settings`` if there is none.

    A running service keeps the settings it was started with. Concurrent callers get the same
    actor (``get_if_exists``); a service that is stopping (idle) is waited for and started anew.
    """
    deadline = time.monotonic() + LOOKUP_TIMEOUT_S
    while True:
        handle = (
            ray.remote(Service)
            .options(
                name=SERVICE_NAME,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                resources={HEAD_NODE: 0.001},  # it outlives any other node's loss
                max_concurrency=10_000,
            )
            .remote(settings or {})
        )
        try:
            if ray.get(handle.accepting.remote()):
                return handle
        except ray.exceptions.RayActorError:  # it exited between the lookup and the call
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("ModelBatchSearcher: the packing service kept stopping; try again.")
        time.sleep(0.2)


def placements() -> list[tuple[str, dict[str, Any]]]:
    """``(key, actor options)`` of each slot server the cluster can host now.

    One per GPU of each node (``num_gpus=1``); on a cluster without GPUs, one per alive node with
    a whole CPU (``num_cpus=1``). Keys name the node and the GPU, so a node that joins later gets
    servers of its own and existing ones keep theirs.
    """
    nodes = [n for n in ray.nodes() if n["Alive"]]
    out = []
    if any(n["Resources"].get("GPU", 0) >= 1 for n in nodes):
        for n in nodes:
            for k in range(int(n["Resources"].get("GPU", 0))):
                strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                out.append(
                    (f"{n['NodeID']}:gpu{k}", {"num_gpus": 1, "num_cpus": 0, "scheduling_strategy": strategy})
                )
        return out
    for n in nodes:
        if n["Resources"].get("CPU", 0) >= 1:
            strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            out.append((f"{n['NodeID']}:cpu", {"num_cpus": 1, "scheduling_strategy": strategy}))
    return out


def check_room_for_relays() -> None:
    """Fail at once on a cluster whose CPUs would all go to slot servers, leaving none to member trials."""
    from ._relay import RESOURCES

    total = ray.cluster_resources()
    servers = placements()
    if not servers:
        raise RuntimeError(
            "ModelBatchSearcher: the Ray cluster has no GPU and no node with a whole CPU to run a slot "
            "server on; add a node (ray.init(num_cpus=...)) or GPUs."
        )
    server_cpus = sum(options.get("num_cpus", 0) for _, options in servers)
    if total.get("CPU", 0) - server_cpus < RESOURCES["cpu"]:
        raise RuntimeError(
            f"ModelBatchSearcher: the cluster's {total.get('CPU', 0):g} CPUs all go to slot servers "
            f"({server_cpus:g}, one per node without a GPU), leaving none for the member trials "
            f"({RESOURCES['cpu']} CPU each); start Ray with more CPUs (ray.init(num_cpus=...)) or add a GPU."
        )


@dataclass
class _Server:
    key: str
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)
    alive: bool = True


@dataclass
class _Sweep:
    tenant: str
    job_id: str
    spec: dict[str, Any]
    slots: dict[int, int] = field(default_factory=dict)  # server -> the sweep's slots there
    renewed: float = field(default_factory=time.monotonic)
    members_hosted: dict[int, int] = field(default_factory=dict)


@dataclass
class _Member:
    sweep: str
    trial_id: str
    relay: Any
    watch: asyncio.Task | None = None


class Service:
    """The packing service actor (see the module docstring). Methods are called by searchers, relays, the CLI.

    Settings: ``slots_per_gpu`` (int: every server's slots over all sweeps; ``None``: sized for
    its sweeps, the most slots any open sweep has there), ``idle_stop_s`` (``None``: run until
    stopped), ``memory_budget_gib`` (at most this much of a server's device memory for packs;
    ``None``: 80 % of its free memory; members are admitted by their measured memory),
    ``tenants`` (``{name: {"weight", "max_slots", "priority"}}``: an operator's values, which
    override what a sweep asks for).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = {
            "slots_per_gpu": None,
            "idle_stop_s": IDLE_STOP_S,
            "memory_budget_gib": None,
            "tenants": {},
            **settings,
        }
        self.policy = FairShare()
        self.servers: list[_Server] = []
        self.sweeps: dict[str, _Sweep] = {}
        self.job_sweep: dict[str, str] = {}
        self.members: dict[str, _Member] = {}
        self.last_reported: dict[str, int] = {}
        self.changed = asyncio.Condition()
        self.stopping = False
        self.idle_since = time.monotonic()
        self.monitor: asyncio.Task | None = None
        self.servers_lock = asyncio.Lock()
        self.starting: dict[int, asyncio.Future] = {}
        self.opening = 0
        self.joining: set[str] = set()
        self.member_locks: dict[str, asyncio.Lock] = {}
        self.tasks: set[asyncio.Task] = set()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # ------------------------------------------------------------------ tenants' sweeps
    async def accepting(self) -> bool:
        """Whether the service takes new sweeps (``False`` while it stops)."""
        if self.monitor is None:
            self.monitor = asyncio.get_running_loop().create_task(self._monitor())
        return not self.stopping

    async def start_servers(self) -> list[dict[str, Any]]:
        """Start a slot server for every GPU (or CPU node) now; returns their info."""
        await self._ensure_servers()
        return [s.info for s in self.servers if s.alive]

    async def open_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Open a sweep; ``spec``: ``job_id``, ``tenant``, ``weight``, ``max_slots``, ``priority``,
        ``recipe`` (cloudpickled bytes), ``slots``, ``options`` (the servers' per-sweep settings).

        Returns ``{"sweep": id, "servers": [info of each server, with the sweep's "slots"]}``. A
        sweep already open for the same driver job is closed first (an interrupted run's).
        """
        if self.stopping:
            raise ServiceStopping("ModelBatchSearcher: the packing service is stopping; connect again.")
        self.opening += 1  # not idle while servers start for it
        try:
            return await self._open_sweep(spec)
        finally:
            self.opening -= 1
            self.idle_since = time.monotonic()

    async def _open_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        old = self.job_sweep.get(spec["job_id"])
        if old is not None:
            await self.close_sweep(old)
        await self._ensure_servers()
        if not any(s.alive for s in self.servers):
            raise RuntimeError("ModelBatchSearcher: every slot server of the packing service died.")
        sweep_id = uuid.uuid4().hex[:8]
        tenant = spec["tenant"]
        override = self.settings["tenants"].get(tenant, {})
        self.policy.add_sweep(
            sweep_id,
            tenant,
            caps={},
            weight=float(override.get("weight", spec.get("weight", 1.0))),
            max_slots=override.get("max_slots", spec.get("max_slots")),
            priority=int(override.get("priority", spec.get("priority", 0))),
        )
        # its lease starts once it is open: adding it to the servers (measuring members for "auto"
        # slots) may take longer than LEASE_S on a busy machine, with no driver renewing it yet
        sweep = self.sweeps[sweep_id] = _Sweep(tenant, spec["job_id"], spec, renewed=float("inf"))
        self.job_sweep[spec["job_id"]] = sweep_id
        try:
            for index, server in enumerate(self.servers):
                if server.alive:
                    await self._add_sweep_to(index, sweep_id)
        except BaseException:
            await self.close_sweep(sweep_id)
            raise
        sweep.renewed = time.monotonic()
        logger.info(f"ModelBatchSearcher: sweep {sweep_id} of {tenant} opened with slots {sweep.slots}.")
        return {"sweep": sweep_id, "servers": self._sweep_servers(sweep_id)}

    async def close_sweep(self, sweep_id: str) -> None:
        """Close a sweep (idempotent): its members leave their slots, its packs are dropped."""
        sweep = self.sweeps.pop(sweep_id, None)
        if sweep is None:
            return
        if not self.sweeps:  # idle from now (not from the last time it was), while the servers drop it
            self.idle_since = time.monotonic()
        if self.job_sweep.get(sweep.job_id) == sweep_id:
            del self.job_sweep[sweep.job_id]
        self.policy.remove_sweep(sweep_id)
        for member in [m for m, rec in self.members.items() if rec.sweep == sweep_id]:
            self._forget(member)
        for member in [m for m in self.last_reported if m.startswith(sweep_id + ":")]:
            del self.last_reported[member]
        for member in [m for m in self.member_locks if m.startswith(sweep_id + ":")]:
            del self.member_locks[member]
        await asyncio.gather(
            *(self._quiet_call(i, "drop_sweep", sweep_id) for i, s in enumerate(self.servers) if s.alive)
        )
        if not self.sweeps:
            self.idle_since = time.monotonic()
        await self._kick()
        logger.info(f"ModelBatchSearcher: sweep {sweep_id} of {sweep.tenant} closed.")

    def renew(self, sweep_id: str) -> int | None:
        """The driver of the sweep is alive; returns the sweep's slots over all servers (``None``: closed)."""
        sweep = self.sweeps.get(sweep_id)
        if sweep is None:
            return None
        sweep.renewed = time.monotonic()
        return sum(sweep.slots.values())

    def reported(self, sweep_id: str, iterations: dict[str, int]) -> None:
        """The searcher's note of the last ``training_iteration`` Tune processed, per member trial."""
        for trial_id, iteration in iterations.items():
            member = f"{sweep_id}:{trial_id}"
            self.last_reported[member] = max(iteration, self.last_reported.get(member, 0))

    # ------------------------------------------------------------------ members
    async def join(
        self,
        job_id: str,
        trial_id: str,
        config: dict[str, Any],
        state: bytes | None,
        relay: Any,
        key: str | None = None,
        restored_at: int = 0,
    ) -> tuple[Any, str, int]:
        """Put a member trial of the sweep of driver ``job_id`` into a slot (restored from ``state``).

        ``key``: its architecture key (the searcher's, ``None``: unknown); members of one key go
        to a server that hosts their pack, which they join without building their model again.
        ``restored_at``: the ``training_iteration`` of the member's own checkpoint it restores from.

        Waits while the tenant's share or the servers are full. Returns its server, its sweep id
        and the member's last ``training_iteration`` Tune processed (0: none). The server is
        ``None`` for a member restored at its sweep's last report (``reports``): it is done (a
        sweep interrupted after that result, before Tune ended the trial), nothing is trained.
        """
        sweep_id = self.job_sweep.get(job_id)
        if sweep_id is None:
            raise RuntimeError(
                "ModelBatchSearcher: this member trial's sweep is not open in the packing service (it "
                "ended, or the service restarted); run the sweep again (tune.run(resume=True) continues it)."
            )
        member = f"{sweep_id}:{trial_id}"
        await self._leave(member)  # a rejoining member or restarted trial: its old slot is stale
        last = self.sweeps[sweep_id].spec["options"].get("reports")
        if last is not None and restored_at >= last:
            return None, sweep_id, max(restored_at, self.last_reported.get(member, 0))
        record = self.members[member] = _Member(sweep_id, trial_id, relay)
        if relay is not None:
            record.watch = asyncio.get_running_loop().create_task(self._watch(member))
        self.joining.add(member)
        try:
            while True:
                self.policy.request(member, sweep_id, self._pack_key(sweep_id, key))
                await self._kick()
                async with self.changed:
                    await self.changed.wait_for(
                        lambda: member in self.policy.placed or self.members.get(member) is not record
                    )
                async with self._lock_of(member):
                    if self.members.get(member) is not record or member not in self.policy.placed:
                        raise RuntimeError(f"ModelBatchSearcher: member {trial_id} left (sweep closed?).")
                    index = self.policy.placed[member][1]
                    try:
                        await self._server_join(index, sweep_id, trial_id, config, state, key)
                    except SERVER_GONE:  # gone for good: try another server
                        continue
                    except BaseException:
                        self._forget(member)
                        await self._kick()
                        raise
                sweep = self.sweeps.get(sweep_id)
                if sweep is not None:
                    sweep.members_hosted[index] = sweep.members_hosted.get(index, 0) + 1
                return self.servers[index].handle, sweep_id, self.last_reported.get(member, 0)
        finally:
            self.joining.discard(member)
            if self.policy.queue:  # its slot may be preempted now (a joining member's is not)
                await self._kick()

    async def release(self, sweep_id: str, trial_id: str) -> None:
        """Free the slot of a member that is done (idempotent)."""
        member = f"{sweep_id}:{trial_id}"
        self.last_reported.pop(member, None)
        await self._leave(member)
        self.member_locks.pop(member, None)

    # ------------------------------------------------------------------ status
    async def sweep_stats(self, sweep_id: str) -> list[dict[str, Any]]:
        """One dict per server, as the sweep sees it: its ``slots`` there, ``live``/``parked`` members,
        ``packs``, ``members_hosted``, ``parks``, ``restarted``, ``device``, ``server``, ``server_node``."""
        sweep = self.sweeps.get(sweep_id)
        if sweep is None:
            return []
        out = []
        for index, server in enumerate(self.servers):
            if index not in sweep.slots:
                continue
            try:
                stats = await self._call(index, "stats", sweep_id)
            except SERVER_GONE:
                stats = {**server.info, "live": 0, "parked": 0, "died": True}
            out.append(
                {**stats, "slots": sweep.slots[index], "members_hosted": sweep.members_hosted.get(index, 0)}
            )
        return out

    async def status(self) -> dict[str, Any]:
        """Everything ``modelbatch service status`` prints: servers, tenants, sweeps, settings."""
        servers = []
        for index, server in enumerate(self.servers):
            row = {**server.info, "alive": server.alive, "n_slots": self.policy.server_slots(index)}
            if server.alive:
                with contextlib.suppress(*SERVER_LOST):
                    row |= await self._call(index, "stats", None)
            servers.append(row)
        shares = self.policy.shares()
        configured = {  # an operator's tenants that have not run a sweep yet
            name: Tenant(name, float(v.get("weight", 1.0)), v.get("max_slots"), int(v.get("priority", 0)))
            for name, v in self.settings["tenants"].items()
        }
        tenants = {
            name: {
                "weight": t.weight,
                "max_slots": t.max_slots,
                "priority": t.priority,
                "live": self.policy.live(tenant=name),
                "queued": self.policy.queued(tenant=name),
                "share": shares.get(name, 0.0),
                "slot_seconds": t.slot_seconds,
            }
            for name, t in {**configured, **self.policy.tenants}.items()
        }
        sweeps = {
            sid: {
                "tenant": s.tenant,
                "slots": sum(s.slots.values()),
                "live": self.policy.live(sweep=sid),
                "queued": self.policy.queued(sweep=sid),
            }
            for sid, s in self.sweeps.items()
        }
        return {"servers": servers, "tenants": tenants, "sweeps": sweeps, "settings": dict(self.settings)}

    async def stop(self) -> None:
        """Close every sweep, kill the servers and exit (their CPUs/GPUs are free again)."""
        self.stopping = True
        for sweep_id in list(self.sweeps):
            await self.close_sweep(sweep_id)
        for server in self.servers:
            with contextlib.suppress(Exception):
                ray.kill(server.handle, no_restart=True)
        self.servers = []
        me = ray.get_runtime_context().current_actor
        asyncio.get_running_loop().call_later(0.2, lambda: ray.kill(me, no_restart=True))

    # ------------------------------------------------------------------ internals
    async def _monitor(self) -> None:
        """Every second: expire sweeps whose driver is gone, add servers for new GPUs/nodes, stop idle."""
        last = time.monotonic()
        while not self.stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            late, last = now - last > 5.0, now  # this loop was held up: renewals may be queued behind it
            for sweep_id, sweep in list(self.sweeps.items()):
                members = sum(m.sweep == sweep_id for m in self.members.values())
                if not late and not members and now - sweep.renewed > LEASE_S:
                    logger.info(
                        f"ModelBatchSearcher: sweep {sweep_id} expired: no member trial alive and no word "
                        f"from its driver for {now - sweep.renewed:.0f} s."
                    )
                    await self.close_sweep(sweep_id)
            idle_stop = self.settings["idle_stop_s"]
            idle = not self.sweeps and not self.opening
            if idle and idle_stop is not None and now - self.idle_since > idle_stop:
                await self.stop()
                return
            with contextlib.suppress(Exception):  # the cluster's nodes may be changing
                if self.sweeps and len(placements()) > len(self.servers):
                    await self._ensure_servers()

    async def _watch(self, member: str) -> None:
        """Ping the member's relay trial until it leaves; a dead relay's slot is freed."""
        record = self.members.get(member)
        while self.members.get(member) is record:
            try:
                await record.relay.__ray_ready__.remote()
            except ray.exceptions.RayActorError:
                if self.members.get(member) is record:
                    logger.info(f"ModelBatchSearcher: member {member}'s trial died; its slot is free.")
                    await self._leave(member, record)
                return
            await asyncio.sleep(PING_S)

    async def _ensure_servers(self) -> None:
        """Start a server for each placement that has none; wait until at least one is up."""
        async with self.servers_lock:
            known = {s.key for s in self.servers}
            for key, options in placements():
                if key in known:
                    continue
                index = len(self.servers)
                handle = (
                    ray.remote(SlotServer)
                    .options(
                        name=server_name(index),
                        namespace=NAMESPACE,
                        max_restarts=SERVER_RESTARTS,
                        max_concurrency=10_000,
                        **options,
                    )
                    .remote(index)
                )
                self.servers.append(_Server(key, handle))
                self.policy.add_server(index, self.settings["slots_per_gpu"])
            for index, server in enumerate(self.servers):
                if server.alive and not server.info and index not in self.starting:
                    task = asyncio.ensure_future(self._server_info(index, server.handle.info.remote()))
                    self.starting[index] = task
            starting = list(self.starting.values())
            if starting:  # every server, for a while; then the first one, however long it takes
                await asyncio.wait(starting, timeout=ALL_START_S)
            if not any(s.info for s in self.servers) and starting:
                await asyncio.wait(starting, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not any(s.info for s in self.servers):
                raise RuntimeError(
                    f"ModelBatchSearcher: no slot server started in {START_TIMEOUT_S:.0f} s; are the "
                    "cluster's GPUs (or CPUs) held by other actors or trials?"
                )

    async def _server_info(self, index: int, ref: Any) -> None:
        """Wait for a starting server; once up, the open sweeps get their slots on it."""
        try:
            self.servers[index].info = await ref
        except ray.exceptions.RayActorError:
            self.servers[index].alive = False
            return
        finally:
            self.starting.pop(index, None)
        for sweep_id in list(self.sweeps):
            with contextlib.suppress(Exception):  # a sweep closed meanwhile, or the server died
                await self._add_sweep_to(index, sweep_id)
        await self._kick()

    async def _add_sweep_to(self, index: int, sweep_id: str, again: bool = False) -> None:
        """Tell a server (that is up) about an open sweep; the sweep's slots there go to the policy.

        ``again``: the server restarted and forgot the sweep.
        """
        sweep = self.sweeps.get(sweep_id)
        if sweep is None or not self.servers[index].info or (index in sweep.slots and not again):
            return
        spec = sweep.spec
        hosted = await self._call(
            index, "add_sweep", sweep_id, sweep.tenant, spec["recipe"], spec["slots"], spec["options"]
        )
        member, data, budget = hosted["member_bytes"], hosted["data_bytes"], hosted["budget_bytes"]
        if self.settings["memory_budget_gib"] is not None:  # an operator's cap
            budget = min(budget, int(self.settings["memory_budget_gib"] * 2**30))
        if member is not None and member + data > budget:
            device = self.servers[index].info.get("device")
            raise RuntimeError(
                f"ModelBatchSearcher: one member of this sweep needs ~{(member + data) / 2**30:.2f} GiB "
                f"(mb.estimate_memory, data included) but slot server {index} ({device}) has "
                f"{budget / 2**30:.2f} GiB for packs; use a smaller model or batch_size, or a larger device."
            )
        sweep.slots[index] = hosted["slots"]  # its members in flight there; the server's n_slots bound those
        self.policy.set_memory(index, budget)
        if sweep_id in self.policy.sweeps:
            self.policy.set_cap(sweep_id, index, hosted["slots"], member_bytes=member, data_bytes=data)

    async def _server_join(
        self, index: int, sweep_id: str, trial_id: str, config: dict, state: bytes | None, key: str | None
    ) -> None:
        try:
            await self._call(index, "join", sweep_id, trial_id, config, state, key)
        except UnknownSweep:  # the server restarted since the sweep opened: tell it the sweep again
            await self._add_sweep_to(index, sweep_id, again=True)
            await self._call(index, "join", sweep_id, trial_id, config, state, key)

    def _server_died(self, index: int) -> None:
        """A server gone for good: its members' slots are freed (their relays join again elsewhere)."""
        if index >= len(self.servers) or not self.servers[index].alive:  # gone with a stopping service
            return
        self.servers[index].alive = False
        for member in self.policy.remove_server(index):
            if member not in self.joining:  # a joining member asks for another slot itself
                self._forget(member)

    async def _leave(self, member: str, record: _Member | None = None) -> None:
        """Free the member's slot on its server and forget it (idempotent).

        ``record``: only if the member is still that record (not a restarted trial that joined since).
        """
        async with self._lock_of(member):
            if record is not None and self.members.get(member) is not record:
                return
            placed = self.policy.placed.get(member)
            self._forget(member)
            if placed is not None:
                sweep_id, index = placed
                await self._quiet_call(index, "leave", sweep_id, member.split(":", 1)[1])
        await self._kick()

    def _park(self, member: str, index: int, granted: str) -> None:
        """Evict a member whose slot went to ``granted``: its relay gets its state and joins again."""
        logger.info(
            f"ModelBatchSearcher: member {member} parked on server {index}; its slot goes to {granted}."
        )
        sweep_id, trial_id = member.split(":", 1)
        # Submitted now, before the receiver can join, so that the server frees the slot first.
        ref = self.servers[index].handle.evict.remote(sweep_id, trial_id)
        task = asyncio.get_running_loop().create_task(self._evicted(ref))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _evicted(self, ref: Any) -> None:
        with contextlib.suppress(*SERVER_LOST):  # a dead server: its members rejoin anyway
            await ref

    def _lock_of(self, member: str) -> asyncio.Lock:
        """Joins and leaves of one member run one at a time (a dead trial's leave vs its retry's join)."""
        return self.member_locks.setdefault(member, asyncio.Lock())

    def _forget(self, member: str) -> None:
        self.policy.release(member)
        record = self.members.pop(member, None)
        if record is not None and record.watch is not None and record.watch is not asyncio.current_task():
            record.watch.cancel()

    async def _kick(self) -> None:
        """Give free slots to waiting members, and slots of over-share tenants' members (parked) to
        members of tenants under their share; wake them."""
        self.policy.assign()
        for parked, granted, index in self.policy.preempt(keep=self.joining - self.policy.queue.keys()):
            self._park(parked, index, granted)
        async with self.changed:
            self.changed.notify_all()

    def _pack_key(self, sweep_id: str, key: str | None) -> str | None:
        """What a member of architecture ``key`` packs with: that architecture within its recipe
        group (sweeps of one recipe fingerprint and slots share packs on a server, see
        :class:`~._server.SlotServer`)."""
        if key is None:
            return None
        spec = self.sweeps[sweep_id].spec
        fingerprint = spec["options"].get("fingerprint")
        group = f"{fingerprint}/{spec['slots']}" if fingerprint is not None else sweep_id
        return f"{group}|{key}"

    def _sweep_servers(self, sweep_id: str) -> list[dict[str, Any]]:
        slots = self.sweeps[sweep_id].slots
        return [{**self.servers[i].info, "slots": n} for i, n in slots.items()]

    async def _quiet_call(self, index: int, method: str, *args: Any) -> Any:
        with contextlib.suppress(*SERVER_LOST):
            return await self._call(index, method, *args)

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        """``servers[index].method(*args)``, waiting for the server while it restarts."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                return await getattr(self.servers[index].handle, method).remote(*args)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            except SERVER_GONE:
                self._server_died(index)
                raise


class SweepClient:
    """A driver's handle on its open sweep: its slots, stats, lease and close.

    While the sweep is open, a daemon thread renews its lease every ``RENEW_EVERY_S`` as long as
    a Tune run (``tune.run`` / ``Tuner.fit``) is on a stack of this process: a sweep that ended
    however Tune ended it, or whose driver died, stops renewing and expires (``LEASE_S``).
    """

    RENEW_EVERY_S = 2.0

    def __init__(
        self, service: Any, sweep_id: str, servers: list[dict[str, Any]], max_slots: int | None
    ) -> None:
        self.service, self.id, self.max_slots = service, sweep_id, max_slots
        self.slots = sum(s["slots"] for s in servers)  # over all servers; grows as servers join
        self._closed = threading.Event()
        self._renewed = time.monotonic()
        threading.Thread(target=self._heartbeat, name=f"modelbatch-sweep-{sweep_id}", daemon=True).start()

    @property
    def n_slots(self) -> int:
        """Members of this sweep training at once: its slots over all servers (at most ``max_slots``)."""
        return self.slots if self.max_slots is None else min(self.slots, self.max_slots)

    def renew(self) -> Any:
        """Renew the sweep's lease (at most every ``RENEW_EVERY_S``); the reply (its slots) or ``None``."""
        now = time.monotonic()
        if now - self._renewed < self.RENEW_EVERY_S:
            return None
        self._renewed = now
        return self.service.renew.remote(self.id)

    def stats(self) -> list[dict[str, Any]]:
        return ray.get(self.service.sweep_stats.remote(self.id))

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.get(self.service.close_sweep.remote(self.id), timeout=60)

    def _heartbeat(self) -> None:
        while not self._closed.wait(self.RENEW_EVERY_S):
            if not ray.is_initialized():
                return
            if tune_running():
                with contextlib.suppress(Exception):  # the service or Ray going away: the lease lapses
                    self.service.renew.remote(self.id)


def is_tune_run(frame: Any) -> bool:
    """Whether ``frame`` is a call of ``ray.tune.tune.run`` (``Tuner.fit`` calls it too)."""
    return frame.f_code.co_name == "run" and frame.f_globals.get("__name__") == "ray.tune.tune"


def tune_running() -> bool:
    """Whether a thread of this process is inside Tune's run loop (``ray.tune.tune.run``)."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if is_tune_run(frame):
                return True
            frame = frame.f_back
    return False
