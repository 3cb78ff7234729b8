"""The registry actor: which slot server hosts which member trial (assigned lazily, when a relay asks).

Import-light on purpose (no torch): the relay trials import this module to find the registry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

NAMESPACE = "modelbatch"
_LOOKUP_TIMEOUT_S = 120.0


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
    goes to the server with the most free slots; when every slot is taken it waits for one.
    """

    def __init__(self, servers: list[ray.actor.ActorHandle]) -> None:
        self.servers = servers
        self.slots: list[int] | None = None  # asked when the first member joins (servers may still start)
        self.live = [0] * len(servers)
        self.assigned: dict[str, int] = {}
        self.changed = asyncio.Condition()

    async def join(self, trial_id: str, config: dict[str, Any], state: bytes | None) -> Any:
        """Put ``trial_id`` into a slot (restored from ``state`` when given); returns its server."""
        if trial_id in self.assigned:  # a restarted trial: its old slot is stale
            await self.release(trial_id)
        if self.slots is None:
            self.slots = [i["slots"] for i in await asyncio.gather(*(s.info.remote() for s in self.servers))]
        async with self.changed:
            await self.changed.wait_for(lambda: any(n < s for n, s in zip(self.live, self.slots)))
            index = max(range(len(self.servers)), key=lambda i: (self.slots[i] - self.live[i], -i))
            self.live[index] += 1
            self.assigned[trial_id] = index
        server = self.servers[index]
        try:
            await server.join.remote(trial_id, config, state)
        except BaseException:
            await self.release(trial_id)
            raise
        if self.assigned.get(trial_id) != index:  # released while joining
            await server.leave.remote(trial_id)
        return server

    async def release(self, trial_id: str) -> None:
        """Free the slot of ``trial_id`` (idempotent)."""
        async with self.changed:
            index = self.assigned.pop(trial_id, None)
            if index is None:
                return
            self.live[index] -= 1
            self.changed.notify_all()
        await self.servers[index].leave.remote(trial_id)

    async def stats(self) -> list[dict[str, Any]]:
        """One dict per server: its slots, live members, members hosted so far, packs, device, node."""
        return list(await asyncio.gather(*(s.stats.remote() for s in self.servers)))
