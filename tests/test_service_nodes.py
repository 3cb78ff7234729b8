"""Clusters with (fake) GPUs: three drivers share two GPU servers at once; a GPU node that joins gets a
slot server of the packing service, and members; the members of a node that is lost continue exactly
on the servers that remain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.tune.search import SearchGenerator  # noqa: E402
from tune_recipes import assert_matches_fit, recipe  # noqa: E402

from tune_integration import ModelBatchSearcher  # noqa: E402
from tune_integration._server import SERVER_LOST  # noqa: E402

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("service_driver.py")


def test_three_drivers_share_two_gpu_servers_at_once_in_shared_packs_and_every_member_is_exact(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tenants = ("ann", "ben", "cat")
        barrier = tmp_path / "barrier"  # the three sweeps start together, once all drivers are up
        barrier.mkdir()
        args = ["--samples", "3", "--reports", "6", "--slots", "2", "--barrier", f"{barrier}:3"]
        drivers = {
            t: subprocess.Popen(
                [sys.executable, str(DRIVER), cluster.address, str(tmp_path / f"{t}.json"), t, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for t in tenants
        }
        for tenant, driver in drivers.items():
            output, _ = driver.communicate(timeout=600)
            assert driver.returncode == 0, f"{tenant}: {output[-3000:]}"
        rec = recipe()
        spans, pack_tenants, servers = {}, {}, set()
        for tenant in tenants:
            trials = json.loads((tmp_path / f"{tenant}.json").read_text())
            assert len(trials) == 3
            times = []
            for trial in trials.values():
                frame = pd.DataFrame(trial["results"])
                assert_matches_fit(rec, trial["config"], frame)
                times += frame["timestamp"].tolist()
                servers |= set(frame["server"])
                for pack in frame["pack_id"]:
                    pack_tenants.setdefault(pack, set()).add(tenant)
            spans[tenant] = (min(times), max(times))
        assert max(start for start, _ in spans.values()) <= min(
            end for _, end in spans.values()
        )  # all at once
        assert servers == {0, 1}  # both GPUs' servers trained members
        assert any(len(t) >= 2 for t in pack_tenants.values())  # members of several drivers in one pack
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_that_joins_mid_sweep_gets_a_server_and_trains_members_there():
    """The sweep is driven as Tune drives it (SearchGenerator); members join as relays do."""
    grown = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    ray.init(address=grown.address, log_to_driver=False)
    try:
        rec = recipe()
        searcher = ModelBatchSearcher(rec, slots_per_gpu=1, reports=2)
        SearchGenerator(searcher).set_search_properties("val_loss", "min", {"lr": 0.01})
        assert searcher.n_slots == 1
        grown.add_node(num_cpus=1, num_gpus=1)
        sweep, service = searcher._sweep.id, searcher._sweep.service
        deadline = time.monotonic() + 120
        while ray.get(service.status.remote())["sweeps"][sweep]["slots"] < 2:  # a server on the new node
            assert time.monotonic() < deadline, "no slot server started on the new node"
            time.sleep(0.5)
        job = ray.get_runtime_context().get_job_id()
        configs = {"a": {"lr": 0.01, "seed": 1}, "b": {"lr": 0.02, "seed": 2}}
        joined = {m: service.join.remote(job, m, c, None, None) for m, c in configs.items()}
        servers = {m: ray.get(ref)[0] for m, ref in joined.items()}
        results = {m: [] for m in configs}
        for _ in range(2):
            replies = {m: servers[m].next_result.remote(sweep, m) for m in configs}
            for m, ref in replies.items():
                results[m].append(ray.get(ref, timeout=120)["result"])
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert {r[0]["server_node"] for r in results.values()} == nodes  # one member on each node
        for m, config in configs.items():
            assert_matches_fit(rec, config, pd.DataFrame(results[m]))
        while searcher.n_slots < 2:  # as Tune calls suggest: the renewals' answer has the new slots
            assert time.monotonic() < deadline + 60, "the searcher's n_slots did not follow"
            searcher._renew()
            time.sleep(0.5)
        assert searcher.n_slots == 2 and searcher.searcher.max_concurrent == 2
        searcher.shutdown()
    finally:
        ray.shutdown()
        grown.shutdown()


def member_as_a_relay(
    service, job: str, member: str, config: dict, results: list, go: threading.Event
) -> None:
    """What a relay trial does (without Tune): join, take results, and when its server is gone join
    again with the last checkpoint it got, skipping results it already has. After its first result
    it waits for ``go`` (as a relay waits while Tune processes a result)."""
    state, reported = None, 0
    server, sweep, _ = ray.get(service.join.remote(job, member, config, None, None))
    while True:
        try:
            reply = ray.get(server.next_result.remote(sweep, member), timeout=300)
        except SERVER_LOST:
            server, sweep, _ = ray.get(service.join.remote(job, member, config, state, None))
            continue
        state = reply["checkpoint"] or state
        if reply["result"]["training_iteration"] > reported:
            results.append(reply["result"])
            reported = reply["result"]["training_iteration"]
        go.wait()
        if reply["final"]:
            ray.get(service.release.remote(sweep, member))
            return


def test_the_members_of_a_lost_node_continue_exactly_on_the_servers_left():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    doomed = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        rec = recipe()
        searcher = ModelBatchSearcher(rec, slots_per_gpu=1, reports=4)
        SearchGenerator(searcher).set_search_properties("val_loss", "min", {"lr": 0.01})
        assert searcher.n_slots == 2  # a server per GPU: one on each node
        service = searcher._sweep.service
        job = ray.get_runtime_context().get_job_id()
        configs = {"a": {"lr": 0.01, "seed": 1}, "b": {"lr": 0.02, "seed": 2}}
        results: dict[str, list] = {m: [] for m in configs}
        go = threading.Event()
        members = [
            threading.Thread(target=member_as_a_relay, args=(service, job, m, c, results[m], go), daemon=True)
            for m, c in configs.items()
        ]
        for thread in members:
            thread.start()
        deadline = time.monotonic() + 180
        while not all(results.values()):
            assert time.monotonic() < deadline, "the members did not start training"
            time.sleep(0.2)
        nodes = {r[0]["server_node"] for r in results.values()}
        assert len(nodes) == 2  # one member on each node
        cluster.remove_node(doomed)  # while both members wait after their first result
        go.set()
        for thread in members:
            thread.join(timeout=400)
        assert not any(thread.is_alive() for thread in members)
        head = ray.get_runtime_context().get_node_id()
        moved = [m for m in configs if results[m][0]["server_node"] != head]
        assert len(moved) == 1 and results[moved[0]][-1]["server_node"] == head  # onto the head's server
        for m, config in configs.items():
            assert [r["training_iteration"] for r in results[m]] == [1, 2, 3, 4]
            assert_matches_fit(rec, config, pd.DataFrame(results[m]))
        searcher.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
