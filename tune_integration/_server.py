"""SlotServer: one per GPU (or per CPU node) of the packing service; trains its members' packs in lockstep.

A server hosts the members of every open sweep the service assigns to it: one
:class:`~._packs.Packs` per sweep (its recipe), one pack per architecture within it. Relay
trials join a slot, then ask for their next result one by one; when every live member of a
pack has asked, the server trains that pack one report interval (in a worker thread, so the
asyncio actor keeps serving joins, leaves and questions) and answers each member with its own
result. Because ``tune.report`` blocks until Tune decides whether a member continues, the
lockstep gives ASHA and friends each member's exact results. Packs of different sweeps take
turns on the device.

A member whose relay has not asked for ``park_after_s`` while others of its pack wait (Tune
paused the trial, as HyperBand and PBT do, or its process died) is parked: taken out of the
pack with its state kept, so the others go on; it continues exactly when it asks again, or
from its checkpoint when Tune restarts it.

A server whose process dies is restarted by Ray (``max_restarts``, see :mod:`._service`) with
no sweeps; the service tells it each sweep again when a member joins, and each relay joins
again with the last checkpoint it holds (see :mod:`._relay`).

This module is import-light (no torch): relay trials deserialize the server's actor handle,
which imports the actor's class module. The engine side lives in :mod:`._packs`.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import cloudpickle


class SlotLost(RuntimeError):
    """A member asked a slot server that does not host it (the server restarted): join again."""


class UnknownSweep(RuntimeError):
    """The server does not know the sweep (it restarted since the sweep opened): add it again."""


PackKey = tuple[str, int]
"""``(sweep id, pack id)``: a pack of one sweep on this server."""


class SlotServer:
    """Hosts the member trials the service assigns to it (an asyncio Ray actor)."""

    def __init__(self, index: int) -> None:
        self.where = {"server": index, "server_node": ray.get_runtime_context().get_node_id()}
        self.sweeps: dict[str, Any] = {}  # sweep id -> Packs
        self.tenants: dict[str, str] = {}
        self.park_after: dict[str, float] = {}
        self.waiting: dict[tuple[str, str], asyncio.Future] = {}
        self.asked_at: dict[tuple[str, str], float] = {}
        self.watchdog: asyncio.Task | None = None
        self.ticking: set[PackKey] = set()
        self.tasks: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()  # one mutation or training at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-server")
        self.device = _device()

    def info(self) -> dict[str, Any]:
        """``server``, ``server_node``, ``device``."""
        return {**self.where, "device": self.device}

    def stats(self, sweep_id: str | None = None) -> dict[str, Any]:
        """:meth:`info` plus ``live`` and ``parked`` members, ``packs`` and ``parks`` (of one sweep, or all).

        Also ``tenants`` (live members per tenant), ``memory`` (bytes used and free on the device) and
        ``restarted``: whether Ray restarted this server after its process died.
        """
        chosen = [self.sweeps[sweep_id]] if sweep_id in self.sweeps else []
        if sweep_id is None:
            chosen = list(self.sweeps.values())
        tenants: dict[str, int] = {}
        for sid, packs in self.sweeps.items():
            tenants[self.tenants[sid]] = tenants.get(self.tenants[sid], 0) + len(packs.pack_of)
        device = str(self.sweeps[sweep_id].device) if sweep_id in self.sweeps else self.device
        return {
            **self.where,
            "device": device,
            "live": sum(len(p.pack_of) for p in chosen),
            "parked": sum(len(p.parked) for p in chosen),
            "packs": sum(len(p.packs) for p in chosen),
            "parks": sum(p.parks for p in chosen),
            "device_restores": sum(p.device_restores for p in chosen),  # see Packs (PBT)
            "tenants": tenants,
            "memory": _memory(self.device),
            "restarted": ray.get_runtime_context().was_current_actor_reconstructed,
        }

    async def add_sweep(self, sweep_id: str, tenant: str, recipe: bytes, slots: Any, options: dict) -> int:
        """Host a sweep's packs (``recipe``: cloudpickled); returns the sweep's slots on this server."""
        async with self.lock:
            if sweep_id not in self.sweeps:
                from ._packs import Packs  # torch: only in the server process

                options = dict(options)
                self.park_after[sweep_id] = float(options.pop("park_after_s", 30.0))
                self.sweeps[sweep_id] = await self._in_thread(
                    lambda: Packs(cloudpickle.loads(recipe), slots, **options)
                )
                self.tenants[sweep_id] = tenant
            return self.sweeps[sweep_id].slots

    async def drop_sweep(self, sweep_id: str) -> None:
        """Forget a closed sweep: its members' slots and parked states (idempotent)."""
        async with self.lock:
            packs = self.sweeps.pop(sweep_id, None)
            self.tenants.pop(sweep_id, None)
            self.park_after.pop(sweep_id, None)
        if packs is None:
            return
        for member in [*packs.pack_of, *packs.parked]:
            self._answer((sweep_id, member), RuntimeError(f"ModelBatchSearcher: sweep {sweep_id} closed."))

    async def join(self, sweep_id: str, trial_id: str, config: dict[str, Any], state: bytes | None) -> None:
        """Put a member into a free slot of its architecture's pack (restored from ``state`` if given)."""
        async with self.lock:
            packs = self._packs(sweep_id)
            await self._in_thread(packs.join, trial_id, config, state)

    async def leave(self, sweep_id: str, trial_id: str) -> None:
        """Free the member's slot (idempotent)."""
        async with self.lock:
            packs = self.sweeps.get(sweep_id)
            pid = packs.leave(trial_id) if packs is not None else None
        self._answer(
            (sweep_id, trial_id), RuntimeError(f"ModelBatchSearcher: member {trial_id} left its slot.")
        )
        if pid is not None:
            self._maybe_tick((sweep_id, pid))

    async def next_result(self, sweep_id: str, trial_id: str) -> dict[str, Any]:
        """The member's next report once every live member of its pack has asked for theirs.

        Returns ``{"result": metrics, "checkpoint": bytes | None, "final": bool}``.
        """
        loop = asyncio.get_running_loop()
        if self.watchdog is None:
            self.watchdog = loop.create_task(self._park_absent_members())
        packs = self.sweeps.get(sweep_id)
        if packs is not None and trial_id in packs.parked:
            async with self.lock:
                if trial_id in packs.parked:
                    await self._in_thread(packs.unpark, trial_id)
        pid = packs.pack_of.get(trial_id) if packs is not None else None
        if pid is None:  # the server restarted since the member joined
            raise SlotLost(f"ModelBatchSearcher: member {trial_id} has no slot on server {self.where}.")
        future = loop.create_future()
        self.waiting[sweep_id, trial_id], self.asked_at[sweep_id, trial_id] = future, loop.time()
        self._maybe_tick((sweep_id, pid))
        return await future

    # ------------------------------------------------------------------ lockstep
    def _packs(self, sweep_id: str) -> Any:
        packs = self.sweeps.get(sweep_id)
        if packs is None:
            raise UnknownSweep(
                f"ModelBatchSearcher: server {self.where['server']} does not host sweep {sweep_id}."
            )
        return packs

    def _live(self, key: PackKey) -> dict[str, int]:
        packs = self.sweeps.get(key[0])
        return packs.live(key[1]) if packs is not None else {}

    def _ready(self, key: PackKey) -> dict[str, int]:
        """The pack's live members when every one of them waits for a result, else ``{}``."""
        live = self._live(key)
        return live if live and all((key[0], m) in self.waiting for m in live) else {}

    def _maybe_tick(self, key: PackKey) -> None:
        if key in self.ticking or not self._ready(key):
            return
        self.ticking.add(key)
        task = asyncio.get_running_loop().create_task(self._tick(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tick(self, key: PackKey) -> None:
        sweep_id, pid = key
        live: dict[str, int] = {}
        try:
            async with self.lock:
                live = self._ready(key)  # members may have joined or left while this waited for the lock
                if not live:
                    return
                where = {**self.where, "tenant": self.tenants[sweep_id]}
                replies = await self._in_thread(self.sweeps[sweep_id].train, pid, where)
        except Exception as exc:
            for member in live:
                self._answer((sweep_id, member), exc)
            return
        finally:
            self.ticking.discard(key)
        for member, reply in replies.items():
            self._answer((sweep_id, member), reply)

    def _answer(self, member: tuple[str, str], reply: Any) -> None:
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
            await asyncio.sleep(max(min(self.park_after.values(), default=30.0) / 4, 0.05))
            for sweep_id, packs in list(self.sweeps.items()):
                park_after = self.park_after.get(sweep_id, 30.0)
                for pid in list(packs.packs):
                    key = (sweep_id, pid)
                    asked = [
                        self.asked_at[sweep_id, m] for m in packs.live(pid) if (sweep_id, m) in self.waiting
                    ]
                    if not asked or key in self.ticking or loop.time() - min(asked) < park_after:
                        continue
                    async with self.lock:
                        if self.sweeps.get(sweep_id) is not packs:
                            continue
                        for member in packs.live(pid):
                            if (sweep_id, member) not in self.waiting:
                                await self._in_thread(packs.park, member)
                    self._maybe_tick(key)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


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
