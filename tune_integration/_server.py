"""SlotServer: one per GPU (or per CPU node); trains its member trials' packs in lockstep.

Relay trials join a slot, then ask for their next result one by one; when every live member of
a pack has asked, the server trains that pack one report interval (in a worker thread, so the
asyncio actor keeps serving joins, leaves and questions) and answers each member with its own
result. Because ``tune.report`` blocks until Tune decides whether a member continues, the
lockstep gives ASHA and friends each member's exact results.

A member whose relay has not asked for ``park_after_s`` while others of its pack wait (Tune
paused the trial, as HyperBand and PBT do, or its process died) is parked: taken out of the
pack with its state kept, so the others go on; it continues exactly when it asks again, or
from its checkpoint when Tune restarts it.

A server whose process dies is restarted by Ray (``max_restarts``, see :mod:`._launch`) with no
members; each relay then joins again with the last checkpoint it holds (see :mod:`._relay`).

This module is import-light (no torch): relay trials deserialize the server's actor handle,
which imports the actor's class module. The engine side lives in :mod:`._packs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from ._registry import SlotLost


class SlotServer:
    """Hosts the member trials assigned to it, one pack per architecture (an asyncio Ray actor).

    At most ``slots`` members live on the server at once (the registry enforces it).
    """

    def __init__(
        self,
        recipe: Any,
        slots: int | str,
        index: int,
        *,
        example_configs: Sequence[Mapping[str, Any]] = (),
        checkpoint_every: int | None = 1,
        reports: int | None = None,
        park_after_s: float = 30.0,
    ) -> None:
        from ._packs import Packs  # torch: only in the server process

        self.packs = Packs(
            recipe, slots, example_configs=example_configs, checkpoint_every=checkpoint_every, reports=reports
        )
        self.where = {"server": index, "server_node": ray.get_runtime_context().get_node_id()}
        self.park_after_s = park_after_s
        self.waiting: dict[str, asyncio.Future] = {}
        self.asked_at: dict[str, float] = {}
        self.watchdog: asyncio.Task | None = None
        self.ticking: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()  # one mutation or training at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-server")

    def info(self) -> dict[str, Any]:
        """``server``, ``server_node``, ``slots``, ``device``."""
        return {**self.where, "slots": self.packs.slots, "device": str(self.packs.device)}

    def stats(self) -> dict[str, Any]:
        """:meth:`info` plus ``live`` and ``parked`` members, ``packs``, ``members_hosted`` and ``parks``.

        Also ``restarted``: whether Ray restarted this server after its process died (the
        counts then start from the restart).
        """
        packs = self.packs
        counts = {"live": len(packs.pack_of), "parked": len(packs.parked), "packs": len(packs.packs)}
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        return {
            **self.info(),
            **counts,
            "members_hosted": packs.members_hosted,
            "parks": packs.parks,
            "restarted": restarted,
        }

    async def join(self, trial_id: str, config: dict[str, Any], state: bytes | None) -> None:
        """Put a member into a free slot of its architecture's pack (restored from ``state`` if given)."""
        async with self.lock:
            await self._in_thread(self.packs.join, trial_id, config, state)

    async def leave(self, trial_id: str) -> None:
        """Free the member's slot (idempotent)."""
        async with self.lock:
            pid = self.packs.leave(trial_id)
        self._answer(trial_id, RuntimeError(f"ModelBatchSearcher: member {trial_id} left its slot."))
        if pid is not None:
            self._maybe_tick(pid)

    async def next_result(self, trial_id: str) -> dict[str, Any]:
        """The member's next report once every live member of its pack has asked for theirs.

        Returns ``{"result": metrics, "checkpoint": bytes | None, "final": bool}``.
        """
        loop = asyncio.get_running_loop()
        if self.watchdog is None:
            self.watchdog = loop.create_task(self._park_absent_members())
        if trial_id in self.packs.parked:
            async with self.lock:
                if trial_id in self.packs.parked:
                    await self._in_thread(self.packs.unpark, trial_id)
        pid = self.packs.pack_of.get(trial_id)
        if pid is None:  # the server restarted since the member joined
            raise SlotLost(f"ModelBatchSearcher: member {trial_id} has no slot on server {self.where}.")
        future = loop.create_future()
        self.waiting[trial_id], self.asked_at[trial_id] = future, loop.time()
        self._maybe_tick(pid)
        return await future

    # ------------------------------------------------------------------ lockstep
    def _ready(self, pid: int) -> dict[str, int]:
        """The pack's live members when every one of them waits for a result, else ``{}``."""
        live = self.packs.live(pid)
        return live if live and all(m in self.waiting for m in live) else {}

    def _maybe_tick(self, pid: int) -> None:
        if pid in self.ticking or not self._ready(pid):
            return
        self.ticking.add(pid)
        task = asyncio.get_running_loop().create_task(self._tick(pid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tick(self, pid: int) -> None:
        live: dict[str, int] = {}
        try:
            async with self.lock:
                live = self._ready(pid)  # members may have joined or left while this waited for the lock
                if not live:
                    return
                replies = await self._in_thread(self.packs.train, pid, self.where)
        except Exception as exc:
            for member in live:
                self._answer(member, exc)
            return
        finally:
            self.ticking.discard(pid)
        for member, reply in replies.items():
            self._answer(member, reply)

    def _answer(self, member: str, reply: Any) -> None:
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
            await asyncio.sleep(max(self.park_after_s / 4, 0.05))
            for pid in list(self.packs.packs):
                asked = [self.asked_at[m] for m in self.packs.live(pid) if m in self.waiting]
                if not asked or pid in self.ticking or loop.time() - min(asked) < self.park_after_s:
                    continue
                async with self.lock:
                    for member in self.packs.live(pid):
                        if member not in self.waiting:
                            await self._in_thread(self.packs.park, member)
                self._maybe_tick(pid)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
