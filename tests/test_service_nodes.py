"""A GPU node that joins the cluster mid-sweep gets a slot server of the packing service, and members."""

from __future__ import annotations

import time

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.tune.search import SearchGenerator  # noqa: E402
from tune_recipes import assert_matches_fit, recipe  # noqa: E402

from tune_integration import ModelBatchSearcher  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_node_that_joins_mid_sweep_gets_a_server_and_trains_members_there():
    """The sweep is driven as Tune drives it (SearchGenerator); members join as relays do."""
    grown = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    ray.init(address=grown.address, log_to_driver=False)
    try:
        rec = recipe()
        searcher = ModelBatchSearcher(rec, slots_per_gpu=1, reports=2)
        SearchGenerator(searcher).set_search_properties("val_loss", "min", {"lr": 0.01})
        assert searcher.capacity == 1
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
        while searcher.capacity < 2:  # as Tune calls suggest: the renewals' answer has the new slots
            assert time.monotonic() < deadline + 60, "the searcher's capacity did not follow"
            searcher._renew()
            time.sleep(0.5)
        assert searcher.capacity == 2 and searcher.searcher.max_concurrent == 2
        searcher.shutdown()
    finally:
        ray.shutdown()
        grown.shutdown()
