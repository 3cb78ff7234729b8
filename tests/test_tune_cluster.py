"""A ModelBatchSearcher sweep on a 3-node Ray cluster, one (fake) GPU per node: one slot server per GPU."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from tune_recipes import assert_matches_fit, recipe  # noqa: E402

from tune_integration import ModelBatchSearcher  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    """Three nodes of 1 CPU and 1 fake GPU: Ray sets CUDA_VISIBLE_DEVICES, torch stays on the CPU."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_one_server_per_gpu_on_distinct_nodes_hosting_members_on_all(cluster, tmp_path):
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=2, reports=2, random_state=0)
    space = {"lr": tune.loguniform(1e-3, 3e-2), "seed": tune.randint(0, 10_000)}
    analysis = tune.run(
        searcher.trainable(),
        config=space,
        num_samples=9,
        search_alg=searcher,
        metric="val_loss",
        mode="min",
        storage_path=str(tmp_path),
        name="cluster",
        verbose=0,
    )
    stats = searcher.server_stats()
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(stats) == 3 and {s["server_node"] for s in stats} == nodes  # one server per node
    assert all(s["slots"] == 2 and s["device"] == "cpu" for s in stats)
    assert sum(s["members_hosted"] for s in stats) == 9 and all(s["members_hosted"] >= 1 for s in stats)
    df = analysis.dataframe()
    assert len(df) == 9 and (df["training_iteration"] == 2).all()
    assert set(df["server_node"]) == nodes  # members trained on every node
    frames = analysis.trial_dataframes
    for trial in analysis.trials[:3]:
        assert_matches_fit(rec, trial.config, frames[trial.trial_id])
