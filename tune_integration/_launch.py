"""Start and stop one sweep's slot servers (one per GPU, else one per CPU node) and its registry."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._registry import NAMESPACE, Registry, actor_prefix, registry_name, server_name
from ._server import SlotServer

START_TIMEOUT_S = 300.0
SERVER_RESTARTS = 3
"""Times Ray restarts a slot server whose process died; its members then join it again."""


@dataclass
class Fleet:
    """A running sweep's registry and slot servers (``info``: one dict per server)."""

    registry: Any
    servers: list[Any]
    info: list[dict[str, Any]]

    @property
    def capacity(self) -> int:
        """Member trials that can train at once: the sum of the servers' slots."""
        return sum(i["slots"] for i in self.info)

    def stats(self) -> list[dict[str, Any]]:
        return ray.get(self.registry.stats.remote())

    def shutdown(self) -> None:
        for actor in [self.registry, *self.servers]:
            ray.kill(actor, no_restart=True)


def server_placements() -> list[dict[str, Any]]:
    """Actor options of each slot server: one per GPU of the cluster, else one per node with a CPU."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return [{"num_gpus": 1, "num_cpus": 0} for _ in range(gpus)]
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise RuntimeError(
            "ModelBatchSearcher: the Ray cluster has no GPU and no node with a whole CPU to run a slot "
            "server on; add a node (ray.init(num_cpus=...)) or GPUs."
        )
    return [
        {"num_cpus": 1, "scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)}
        for n in nodes
    ]


def start_fleet(
    recipe: Any,
    slots: int | str,
    *,
    example_configs: Sequence[Mapping[str, Any]],
    checkpoint_every: int | None,
    reports: int | None,
    park_after_s: float,
    timeout_s: float = START_TIMEOUT_S,
) -> Fleet:
    """Start the servers (waiting until each is up and sized) and the registry that assigns them."""
    kill_stale()
    server_cls = ray.remote(SlotServer)
    kwargs = {
        "example_configs": list(example_configs),
        "checkpoint_every": checkpoint_every,
        "reports": reports,
        "park_after_s": park_after_s,
    }
    servers = [
        server_cls.options(
            name=server_name(i), namespace=NAMESPACE, max_restarts=SERVER_RESTARTS, **options
        ).remote(recipe, slots, i, **kwargs)
        for i, options in enumerate(server_placements())
    ]
    registry = (
        ray.remote(Registry).options(name=registry_name(), namespace=NAMESPACE, num_cpus=0).remote(servers)
    )
    ready = [s.info.remote() for s in servers]
    try:
        _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        if pending:
            raise RuntimeError(
                f"ModelBatchSearcher: {len(pending)} of {len(servers)} slot servers did not start in "
                f"{timeout_s:.0f} s; are the cluster's GPUs held by other actors or trials?"
            )
        info = ray.get(ready)  # raises what a server's constructor raised
    except BaseException:
        for actor in [registry, *servers]:
            ray.kill(actor, no_restart=True)
        raise
    return Fleet(registry, servers, info)


def kill_stale(timeout_s: float = 30.0) -> None:
    """Kill this job's registry and servers left by a sweep that did not end cleanly (interrupted runs)."""
    prefix = actor_prefix()
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
    ]
    for name in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + timeout_s
    for name in names:  # a killed actor's name is freed asynchronously
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
