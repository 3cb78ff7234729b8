"""A GPU node that joins the cluster mid-sweep gets a slot server of the packing service, and members."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from tune_recipes import recipe  # noqa: E402

from tune_integration import ModelBatchSearcher  # noqa: E402
from tune_integration._service import NAMESPACE, SERVICE_NAME  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_node_that_joins_mid_sweep_gets_a_server_and_members(tmp_path):
    grown = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    ray.init(address=grown.address, log_to_driver=False)

    class AddNode(tune.Callback):
        added = False

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not self.added:
                self.added = True
                grown.add_node(num_cpus=1, num_gpus=1)
                service = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
                deadline = time.monotonic() + 120
                while sum(s["slots"] for s in ray.get(service.status.remote())["sweeps"].values()) < 2:
                    assert time.monotonic() < deadline, "no server for the new node"  # the sweep waits
                    time.sleep(0.5)

    try:
        searcher = ModelBatchSearcher(recipe(), slots_per_gpu=1, reports=5, random_state=0)
        analysis = tune.run(
            searcher.trainable(),
            config={"lr": tune.loguniform(1e-3, 3e-2), "seed": tune.randint(0, 10_000)},
            num_samples=12,
            search_alg=searcher,
            metric="val_loss",
            mode="min",
            storage_path=str(tmp_path),
            verbose=0,
            reuse_actors=True,
            callbacks=[AddNode()],
        )
        df = analysis.dataframe()
        assert len(df) == 12 and df["server_node"].nunique() == 2  # members trained on the new node too
        assert len(searcher.server_stats()) == 2
    finally:
        ray.shutdown()
        grown.shutdown()
