"""SlotServer: one per GPU (or per CPU node) of the packing service; trains its members' packs in lockstep.

A server hosts the members of every open sweep the service assigns to it: one
:class:`~._packs.Packs` per sweep (its recipe), one pack per architecture within it. Relay
trials join a slot, then ask for their next result one by one; when every live member of a
pack has asked, the server trains that pack one report interval (in a worker thread, so the
asyncio actor keeps serving joins, leaves and questions) and answers each member with its own
result. Because ``tune.report`` blocks until Tune decides whether a member continues, the
lockstep gives ASHA and friends each member's exact results. Packs take turns on the device:
of the packs ready to train, the one with the least device time so far goes next (:class:`Turns`;
a new pack starts level with the least-served one), so a pack of short reports is not held to the
pace of its neighbours' long ones.

A member whose relay has not asked for ``park_after_s`` while others of its pack wait (Tune
paused the trial, as HyperBand and PBT do, or its process died) is parked: taken out of the
pack with its state kept, so the others go on; it continues exactly when it asks again, or
from its checkpoint when Tune restarts it.

A member whose slot the service gives to another tenant (:meth:`~._policy.FairShare.preempt`) is
evicted: its state goes back to its relay in place of its next result (``{"parked": state}``),
and the relay queues for a slot again with it, so it continues exactly wherever it lands.

A server whose process dies is restarted by Ray (``max_restarts``, see :mod:`._service`) with
no sweeps; the service tells it each sweep again when a member joins, and each relay joins
again with the last checkpoint it holds (see :mod:`._relay`).

This module is import-light (no torch): relay trials deserialize the server's actor handle,
which imports the actor's class module. The engine side lives in :mod:`._packs`.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import cloudpickle


class SlotLost(RuntimeError):
    """A member asked a slot server that does not host it (the server restarted): join again."""


class UnknownSweep(RuntimeError):
    """The server does not know the sweep (it restarted since the sweep opened): add it again."""


SERVER_GONE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError)
"""A slot server gone for good: its process died past its restarts, or its node is gone (a server is
pinned to its node, so Ray cannot restart it elsewhere)."""
SERVER_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)
"""A call to a slot server that did not return: the server died, restarts, or its node is gone."""

Member = tuple[str, str]
"""``(sweep id, trial id)``: a member trial of one sweep (trial ids of two drivers may collide)."""
PackKey = tuple[str, int]
"""``(group, pack id)``: a pack of one recipe group on this server."""


class Turns:
    """The device, granted in turns: to the waiting pack with the least device time so far.

    A pack's first turn counts as much device time as the least-served pack known (so a new pack
    does not get the device for as long as the old ones have had it).

    Example:
        >>> async def order():
        ...     turns, ran = Turns(), []
        ...     turns.used.update(a=5.0, b=1.0)  # device seconds so far
        ...     await turns.acquire("x")  # the device is free: at once
        ...     async def run(key):
        ...         await turns.acquire(key)
        ...         ran.append(key)
        ...         turns.release(key, 1.0)
        ...     tasks = [asyncio.create_task(run(k)) for k in ("a", "b", "c")]
        ...     await asyncio.sleep(0)  # all three wait
        ...     turns.release("x", 1.0)
        ...     await asyncio.gather(*tasks)
        ...     return ran
        >>> asyncio.run(order())  # b (1 s) and the new c (level with b) before a (5 s)
        ['b', 'c', 'a']
    """

    def __init__(self) -> None:
        self.used: dict[Any, float] = {}
        self.waiting: list[tuple[float, int, asyncio.Future]] = []
        self.busy = False
        self.seq = 0

    def charge(self, key: Any, seconds: float) -> None:
        """Count ``seconds`` of device time to ``key``."""
        self.used[key] = self._used(key) + seconds

    def forget(self, key: Any) -> None:
        self.used.pop(key, None)

    async def acquire(self, key: Any) -> None:
        if not self.busy:
            self.busy = True
            return
        future = asyncio.get_running_loop().create_future()
        self.seq += 1
        heapq.heappush(self.waiting, (self._used(key), self.seq, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled: pass it on
                self._next()
            raise

    def release(self, key: Any, seconds: float) -> None:
        """End ``key``'s turn, which used the device ``seconds``; the next waiting pack's begins."""
        self.charge(key, seconds)
        self._next()

    def _next(self) -> None:
        while self.waiting:
            _, _, future = heapq.heappop(self.waiting)
            if not future.done():
                future.set_result(None)
                return
        self.busy = False

    def _used(self, key: Any) -> float:
        return self.used.get(key, min(self.used.values(), default=0.0))


class SlotServer:
    """Hosts the member trials the service assigns to it (an asyncio Ray actor).

    Sweeps whose recipes have the same fingerprint (:meth:`modelbatch.Recipe.fingerprint`) and
    the same slots form one *group*: their members share packs, whatever tenant they belong to.
    """

    def __init__(self, index: int) -> None:
        self.where = {"server": index, "server_node": ray.get_runtime_context().get_node_id()}
        self.groups: dict[str, Any] = {}  # group -> Packs of its sweeps
        self.group_of: dict[str, str] = {}  # sweep id -> group
        self.tenants: dict[str, str] = {}  # sweep id -> tenant
        self.options: dict[str, dict[str, Any]] = {}  # sweep id -> reports, callbacks, park_after_s, ...
        self.counts: dict[str, dict[str, int]] = {}  # sweep id -> parks, evictions
        self.waiting: dict[Member, asyncio.Future] = {}
        self.asked_at: dict[Member, float] = {}
        self.evicted: dict[Member, bytes] = {}  # states not yet handed to their relays
        self.watchdog: asyncio.Task | None = None
        self.ticking: set[PackKey] = set()
        self.tasks: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()  # one mutation or training at a time
        self.turns = Turns()  # which ready pack trains next
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-server")
        self.device = _device()
        self.pack_serial: dict[tuple[str, int], int] = {}  # (group, pack id) -> this server's pack number
        # a server Ray restarted numbers its packs from 0 again: its process id keeps them apart
        self.life = f"@{os.getpid()}" if ray.get_runtime_context().was_current_actor_reconstructed else ""
        self.budget: int | None = None  # bytes packs may fill (measured at the first sweep)

    def info(self) -> dict[str, Any]:
        """``server``, ``server_node``, ``device``."""
        return {**self.where, "device": self.device}

    def stats(self, sweep_id: str | None = None) -> dict[str, Any]:
        """:meth:`info` plus ``live`` and ``parked`` members, ``packs``, ``parks`` and ``evictions`` (of
        one sweep, or all).

        Also ``tenants`` (live members per tenant), ``pack_tenants`` (per pack: its label and live
        members per tenant), ``memory`` (bytes used and free on the device) and ``restarted``:
        whether Ray restarted this server after its process died.
        """
        sweeps = [sweep_id] if sweep_id is not None else list(self.group_of)
        chosen = {m for g in {self.group_of[s] for s in sweeps if s in self.group_of} for m in self._all(g)}
        chosen = {m for m in chosen if m[0] in sweeps}
        tenants: dict[str, int] = {}
        from ._packs import pack_label_of  # torch: only once a pack exists (not at import)

        pack_tenants = []
        for group, packs in self.groups.items():
            for pid, pack in packs.packs.items():
                members = [m for m in pack.live() if sweep_id is None or m[0] == sweep_id]
                if not members:
                    continue
                counts: dict[str, int] = {}
                for sweep, _ in members:
                    counts[self.tenants.get(sweep, "?")] = counts.get(self.tenants.get(sweep, "?"), 0) + 1
                label = pack_label_of(pack, pid)
                pack_tenants.append({"pack": label, "pack_id": self._pack_id(group, pid), "members": counts})
        for sweep, packs in ((s, self.groups[g]) for s, g in self.group_of.items()):
            live = sum(1 for m in packs.pack_of if m[0] == sweep)
            tenants[self.tenants[sweep]] = tenants.get(self.tenants[sweep], 0) + live
        device = (
            str(self.groups[self.group_of[sweep_id]].device) if sweep_id in self.group_of else self.device
        )
        return {
            **self.where,
            "device": device,
            "live": sum(1 for m in chosen if self._packs_of(m[0]).pack_of.get(m) is not None),
            "parked": sum(1 for m in chosen if m in self._packs_of(m[0]).parked),
            "packs": len(pack_tenants),
            "parks": sum(self.counts.get(s, {}).get("parks", 0) for s in sweeps),
            "evictions": sum(self.counts.get(s, {}).get("evictions", 0) for s in sweeps),
            "device_restores": sum(
                self.groups[g].device_restores
                for g in {self.group_of[s] for s in sweeps if s in self.group_of}
            ),  # PBT
            "tenants": tenants,
            "pack_tenants": pack_tenants,
            "memory": _memory(self.device),
            "restarted": ray.get_runtime_context().was_current_actor_reconstructed,
        }

    async def add_sweep(
        self, sweep_id: str, tenant: str, recipe: bytes, slots: Any, options: dict
    ) -> dict[str, Any]:
        """Host a sweep's members (``recipe``: cloudpickled).

        Returns the sweep's ``slots`` on this server, the measured ``member_bytes`` of one member
        and ``data_bytes`` of its recipe's data (``None``/0: not measured, no example configs), and
        this server's ``budget_bytes`` (the share of its device's memory that packs may fill).

        ``options``: ``reports``, ``checkpoint_every``, ``snapshot_every``, ``park_after_s`` (the
        sweep's own), ``callbacks`` (cloudpickled ``mb.callbacks.Callback`` list: run on this
        server's copy for the sweep's members), ``example_configs`` (for ``slots="auto"``) and
        ``fingerprint`` (the recipe's, or ``None``: its members share packs only with each other).
        """
        options = dict(options)
        fingerprint = options.pop("fingerprint", None)
        group = f"{fingerprint}/{slots}" if fingerprint is not None else f"sweep/{sweep_id}"
        async with self.lock:
            if sweep_id not in self.group_of:
                if group not in self.groups:
                    from ._packs import Packs  # torch: only in the server process

                    examples = options.get("example_configs", ())
                    self.groups[group] = await self._in_thread(
                        lambda: Packs(cloudpickle.loads(recipe), slots, example_configs=examples)
                    )
                self.group_of[sweep_id] = group
                self.tenants[sweep_id] = tenant
                self.counts[sweep_id] = {"parks": 0, "evictions": 0}
                callbacks = options.get("callbacks")
                self.options[sweep_id] = {
                    "callbacks": await self._in_thread(cloudpickle.loads, callbacks) if callbacks else (),
                    "reports": options.get("reports"),
                    "checkpoint_every": options.get("checkpoint_every", 1),
                    "snapshot_every": options.get("snapshot_every"),
                    "park_after_s": float(options.get("park_after_s", 30.0)),
                }
            if self.budget is None:
                self.budget = await self._in_thread(_budget, self.groups[group].device)
            packs = self.groups[group]
            return {
                "slots": packs.slots,
                "member_bytes": packs.member_bytes,
                "data_bytes": packs.data_bytes,
                "budget_bytes": self.budget,
            }

    async def drop_sweep(self, sweep_id: str) -> None:
        """Forget a closed sweep: its members' slots and parked states (idempotent)."""
        async with self.lock:
            group = self.group_of.pop(sweep_id, None)
            self.tenants.pop(sweep_id, None)
            self.options.pop(sweep_id, None)
            self.counts.pop(sweep_id, None)
            for member in [m for m in self.evicted if m[0] == sweep_id]:
                del self.evicted[member]
            if group is None:
                return
            packs = self.groups[group]
            gone = [m for m in self._all(group) if m[0] == sweep_id]
            touched = {packs.leave(m) for m in gone} - {None}
            if group not in self.group_of.values():
                del self.groups[group]
                for key in [k for k in self.turns.used if k[0] == group]:
                    self.turns.forget(key)
        for member in gone:
            self._answer(member, RuntimeError(f"ModelBatchSearcher: sweep {sweep_id} closed."))
        for pid in touched:
            self._maybe_tick((group, pid))  # other sweeps' members of those packs go on

    async def join(
        self,
        sweep_id: str,
        trial_id: str,
        config: dict[str, Any],
        state: bytes | None,
        key: str | None = None,
    ) -> None:
        """Put a member into a free slot of its architecture's pack (restored from ``state`` if given).

        ``key``: its architecture key, which finds that pack without a build (:meth:`Packs.join`).
        """
        async with self.lock:
            packs = self._packs(sweep_id)
            opts = self.options[sweep_id]
            limits = (opts["reports"], opts["checkpoint_every"], opts["snapshot_every"])
            member = (sweep_id, trial_id)
            await self._in_thread(packs.join, member, config, state, limits, opts["callbacks"], key)

    async def leave(self, sweep_id: str, trial_id: str) -> None:
        """Free the member's slot (idempotent)."""
        member = (sweep_id, trial_id)
        async with self.lock:
            packs = self._packs_of(sweep_id)
            pid = packs.leave(member) if packs is not None else None
            self.evicted.pop(member, None)
        self._answer(member, RuntimeError(f"ModelBatchSearcher: member {trial_id} left its slot."))
        if pid is not None:
            self._maybe_tick((self.group_of[sweep_id], pid))

    async def evict(self, sweep_id: str, trial_id: str) -> bool:
        """Take a member out so that its slot goes to another (the service preempts it); its relay
        gets ``{"parked": state}`` for its next result. ``False``: it was not training here."""
        member = (sweep_id, trial_id)
        async with self.lock:
            packs = self._packs_of(sweep_id)
            pid = packs.pack_of.get(member) if packs is not None else None
            blob = await self._in_thread(packs.evict, member) if packs is not None else None
            if blob is None:
                return False
            self.evicted[member] = blob
            self.counts[sweep_id]["evictions"] += 1
        if member in self.waiting:
            self._answer(member, {"parked": self.evicted.pop(member)})
        if pid is not None:
            self._maybe_tick((self.group_of[sweep_id], pid))  # the rest of its pack may be ready now
        return True

    async def next_result(self, sweep_id: str, trial_id: str) -> dict[str, Any]:
        """The member's next report once every live member of its pack has asked for theirs.

        Returns ``{"result": metrics, "checkpoint": bytes | None, "final": bool}``, or
        ``{"parked": state}`` when the member was evicted (:meth:`evict`).
        """
        member = (sweep_id, trial_id)
        if member in self.evicted:
            return {"parked": self.evicted.pop(member)}
        loop = asyncio.get_running_loop()
        if self.watchdog is None:
            self.watchdog = loop.create_task(self._park_absent_members())
        packs = self._packs_of(sweep_id)
        if packs is not None and member in packs.parked:
            async with self.lock:
                if member in packs.parked:
                    await self._in_thread(packs.unpark, member)
        pid = packs.pack_of.get(member) if packs is not None else None
        if pid is None:  # the server restarted since the member joined
            raise SlotLost(f"ModelBatchSearcher: member {trial_id} has no slot on server {self.where}.")
        future = loop.create_future()
        self.waiting[member], self.asked_at[member] = future, loop.time()
        self._maybe_tick((self.group_of[sweep_id], pid))
        return await future

    # ------------------------------------------------------------------ lockstep
    def _packs(self, sweep_id: str) -> Any:
        packs = self._packs_of(sweep_id)
        if packs is None:
            raise UnknownSweep(
                f"ModelBatchSearcher: server {self.where['server']} does not host sweep {sweep_id}."
            )
        return packs

    def _packs_of(self, sweep_id: str) -> Any:
        group = self.group_of.get(sweep_id)
        return self.groups.get(group) if group is not None else None

    def _all(self, group: str) -> list[Member]:
        """Every member of a group: training, stopped in a pack, or parked."""
        packs = self.groups.get(group)
        return [*packs.pack_of, *packs.parked] if packs is not None else []

    def _pack_id(self, group: str, pid: int) -> str:
        """``"<server>/<n>"``: the pack's number on this server (results' ``pack_id``);
        ``"<server>/<n>@<pid>"`` once Ray restarted the server."""
        serial = self.pack_serial.setdefault((group, pid), len(self.pack_serial))
        return f"{self.where['server']}/{serial}{self.life}"

    def _live(self, key: PackKey) -> dict[Member, int]:
        packs = self.groups.get(key[0])
        return packs.live(key[1]) if packs is not None else {}

    def _ready(self, key: PackKey) -> dict[Member, int]:
        """The pack's live members when every one of them waits for a result, else ``{}``."""
        live = self._live(key)
        return live if live and all(m in self.waiting for m in live) else {}

    def _maybe_tick(self, key: PackKey) -> None:
        if key in self.ticking or not self._ready(key):
            return
        self.ticking.add(key)
        task = asyncio.get_running_loop().create_task(self._tick(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tick(self, key: PackKey) -> None:
        group, pid = key
        live: dict[Member, int] = {}
        await self.turns.acquire(key)
        started = time.monotonic()
        try:
            async with self.lock:
                live = self._ready(key)  # members may have joined or left while this waited for the lock
                if not live:
                    return
                started = time.monotonic()
                where = {**self.where, "pack_id": self._pack_id(group, pid)}
                replies = await self._in_thread(self.groups[group].train, pid, where)
        except Exception as exc:
            for member in live:
                self._answer(member, exc)
            return
        finally:
            self.turns.release(key, time.monotonic() - started)
            self.ticking.discard(key)
        for member, reply in replies.items():
            reply["result"]["tenant"] = self.tenants.get(member[0])
            self._answer(member, reply)

    def _answer(self, member: Member, reply: Any) -> None:
        self.asked_at.pop(member, None)
        future = self.waiting.pop(member, None)
        if future is None or future.done():
            return
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    async def _park_absent_members(self) -> None:
        """Every few seconds: park the live members that keep the rest of their pack waiting too long."""
        loop = asyncio.get_running_loop()
        while True:
            after = [o["park_after_s"] for o in self.options.values()]
            await asyncio.sleep(max(min(after, default=30.0) / 4, 0.05))
            for group, packs in list(self.groups.items()):
                for pid in list(packs.packs):
                    key = (group, pid)
                    live = packs.live(pid)
                    asked = [self.asked_at[m] for m in live if m in self.waiting]
                    park_after = min(
                        (self.options[m[0]]["park_after_s"] for m in live if m[0] in self.options),
                        default=30.0,
                    )
                    if not asked or key in self.ticking or loop.time() - min(asked) < park_after:
                        continue
                    async with self.lock:
                        if self.groups.get(group) is not packs:
                            continue
                        for member in packs.live(pid):
                            if member not in self.waiting:
                                await self._in_thread(packs.park, member)
                                if member[0] in self.counts:
                                    self.counts[member[0]]["parks"] += 1
                    self._maybe_tick(key)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def _budget(device: Any) -> int:
    """The bytes of ``device`` that packs may fill: the same share of its free memory as ``"auto"``."""
    from ._packs import AUTO_MEMORY_FRACTION, free_memory

    return int(AUTO_MEMORY_FRACTION * free_memory(device))


def _device() -> str:
    """``"cuda"`` where this process sees a GPU (Ray sets ``CUDA_VISIBLE_DEVICES``), else ``"cpu"``.

    Asked of torch only when a GPU may be visible, so that a CPU server does not import it to start.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible or not ray.get_gpu_ids():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _memory(device: str) -> dict[str, int]:
    """``used`` and ``free`` bytes: the GPU's, or this process's resident set and the host's free memory."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"used": total - free, "free": free}
    used = free = 0
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return {"used": used, "free": free}
