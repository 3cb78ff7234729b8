"""The registry actor: which slot server hosts which member trial (assigned lazily, when a relay asks).

Import-light on purpose (no torch): the relay trials import this module to find the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray

NAMESPACE = "modelbatch"
_LOOKUP_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 300.0
"""How long the registry waits for a restarting slot server before it gives up on a call."""


class SlotLost(RuntimeError):
    """A member asked a slot server that does not host it (the server restarted): join again."""


def actor_prefix(job_id: str | None = None) -> str:
    """Name prefix of this driver job's registry and slot servers.

    Member trials are created by the driver, so they share its job id and find the registry
    by name even when Tune restores the searcher from a pickle (``Tuner.restore``).
    """
    job_id = job_id or ray.get_runtime_context().get_job_id()
    return f"modelbatch:{job_id}:"


def registry_name(job_id: str | None = None) -> str:
    return actor_prefix(job_id) + "registry"


def server_name(index: int, job_id: str | None = None) -> str:
    return actor_prefix(job_id) + f"server:{index}"


def find_registry(timeout_s: float = _LOOKUP_TIMEOUT_S) -> ray.actor.ActorHandle:
    """The registry of this job's sweep; waits for it while the searcher is still starting it."""
    name, deadline = registry_name(), time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ModelBatchSearcher: no registry actor {name!r} in namespace {NAMESPACE!r}; a "
                    "member trial must run in a sweep whose search_alg is the ModelBatchSearcher "
                    "that made its trainable (searcher.trainable())."
                ) from None
            time.sleep(0.2)


class Registry:
    """Assigns member trials to slot servers and frees their slots (an asyncio Ray actor).

    A server takes at most its ``slots`` live members (of all its packs together). A member
    goes to a server with a free slot: the one hosting most live members of its architecture
    (the searcher tells each member's architecture key beforehand, :meth:`expect`), then the
    one with most free slots. When every slot is taken it waits for one.

    A member that joins again (its relay lost its server, or Tune restarted the trial) gives
    up its old slot first. Calls to a restarting server are retried until it is back (up to
    ``RESTART_TIMEOUT_S``); a server that died for good gets no more members. The registry
    also keeps the last ``training_iteration`` Tune processed of each member (the searcher tells
    it), so that a restarted trial skips the results Tune already has.
    """

    def __init__(self, servers: list[ray.actor.ActorHandle]) -> None:
        self.servers = servers
        self.slots: list[int] | None = None  # asked when the first member joins (servers may still start)
        self.live = [0] * len(servers)
        self.assigned: dict[str, int] = {}
        self.keys: dict[str, str] = {}  # member -> architecture key, when the searcher told it
        self.last_reported: dict[str, int] = {}
        self.changed = asyncio.Condition()

    async def join(self, trial_id: str, config: dict[str, Any], state: bytes | None) -> tuple[Any, int]:
        """Put ``trial_id`` into a slot (restored from ``state`` when given).

        Returns its server and the member's last ``training_iteration`` Tune processed (0: none).
        """
        await self._free(trial_id)  # a rejoining member or restarted trial: its old slot is stale
        if self.slots is None:
            infos = await asyncio.gather(*(self._call(i, "info") for i in range(len(self.servers))))
            self.slots = [i["slots"] for i in infos]
        while True:
            async with self.changed:
                await self.changed.wait_for(self._has_free_slot)
                index = self._server_for(trial_id)
                self.live[index] += 1
                self.assigned[trial_id] = index
            try:
                await self._call(index, "join", trial_id, config, state)
            except ray.exceptions.ActorDiedError:  # gone for good (restarts used up): try another server
                await self._free(trial_id)
                continue
            except BaseException:
                await self._free(trial_id)
                raise
            break
        if self.assigned.get(trial_id) != index:  # released while joining
            await self._call(index, "leave", trial_id)
        return self.servers[index], self.last_reported.get(trial_id, 0)

    def expect(self, trial_id: str, key: str) -> None:
        """The architecture key of a member about to join (members of one key share a pack)."""
        self.keys[trial_id] = key

    def _server_for(self, trial_id: str) -> int:
        """A server with a free slot: most live members of the member's architecture, then most free slots."""
        key = self.keys.get(trial_id)
        same = [0] * len(self.servers)
        if key is not None:
            for member, index in self.assigned.items():
                same[index] += self.keys.get(member) == key
        free = [i for i in range(len(self.servers)) if self.live[i] < self.slots[i]]
        return max(free, key=lambda i: (same[i], self.slots[i] - self.live[i], -i))

    def reported(self, iterations: dict[str, int]) -> None:
        """The searcher's note of the last ``training_iteration`` Tune processed, per member trial."""
        for trial_id, iteration in iterations.items():
            self.last_reported[trial_id] = max(iteration, self.last_reported.get(trial_id, 0))

    async def release(self, trial_id: str) -> None:
        """Free the slot of a member that is done (idempotent)."""
        self.last_reported.pop(trial_id, None)
        self.keys.pop(trial_id, None)
        await self._free(trial_id)

    async def stats(self) -> list[dict[str, Any]]:
        """One dict per server: its slots, live members, members hosted so far, packs, device, node.

        Counts start again when a server restarts; a server that died for good has ``"died": True``.
        """
        return list(await asyncio.gather(*(self._stats(i) for i in range(len(self.servers)))))

    async def _stats(self, index: int) -> dict[str, Any]:
        try:
            return await self._call(index, "stats")
        except ray.exceptions.ActorDiedError:
            return {"server": index, "slots": 0, "live": 0, "parked": 0, "died": True}

    async def _free(self, trial_id: str) -> None:
        async with self.changed:
            index = self.assigned.pop(trial_id, None)
            if index is None:
                return
            self.live[index] -= 1
            self.changed.notify_all()
        with contextlib.suppress(ray.exceptions.ActorDiedError):  # its members are gone with it
            await self._call(index, "leave", trial_id)

    def _has_free_slot(self) -> bool:
        if not any(s > 0 for s in self.slots):
            raise RuntimeError(
                "ModelBatchSearcher: every slot server died and used up its restarts; see the servers' "
                "logs (out of host memory?) and run the sweep again (tune.run(resume=True) continues it)."
            )
        return any(n < s for n, s in zip(self.live, self.slots))

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        """``servers[index].method(*args)``, waiting for the server while it restarts."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                return await getattr(self.servers[index], method).remote(*args)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            except ray.exceptions.ActorDiedError:
                if self.slots is not None:
                    self.slots[index] = 0  # no more members for it
                raise
