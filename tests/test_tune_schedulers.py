"""Tune's pausing and stopping schedulers with ModelBatchSearcher on a local Ray (2 CPUs).

HyperBand (synchronous) decides from the members' results in the order Tune added them, so the
same sweep under plain Tune (a function trainable training each config alone) must stop the same
configs at the same iterations; MedianStoppingRule's decisions depend on when each result arrives,
so there the sweep is laid out to leave it one choice (see its test) and every member is checked
against ``mb.fit``.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
import pandas as pd  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import HyperBandScheduler, MedianStoppingRule  # noqa: E402
from tune_recipes import Results, assert_matches_fit, open_sweeps, plain_member, recipe  # noqa: E402

from tune_integration import ModelBatchSearcher  # noqa: E402

pytestmark = pytest.mark.slow
LRS = [0.0005, 0.002, 0.004, 0.01, 0.03, 0.2]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(trainable, scheduler, tmp_path, search_alg=None, lrs=LRS, stop=None, max_concurrent_trials=None):
    """The sweep and every trial's results as Tune processed them."""
    results = Results()
    analysis = tune.run(
        trainable,
        max_concurrent_trials=max_concurrent_trials,
        config={"lr": tune.grid_search(lrs), "seed": 0},
        search_alg=search_alg,
        scheduler=scheduler,
        metric="val_loss",
        mode="min",
        stop=stop,
        reuse_actors=True,
        storage_path=str(tmp_path),
        verbose=0,
        callbacks=[results],
    )
    return analysis, {tid: pd.DataFrame(rows) for tid, rows in results.rows.items()}


def iterations(analysis) -> dict[float, int]:
    return {t.config["lr"]: t.last_result["training_iteration"] for t in analysis.trials}


def test_hyperband_pauses_and_stops_the_members_plain_tune_does_each_exact(tmp_path):
    """Brackets of 3 trials: one with milestone 4, one with milestone 2 (the best 2 go on to 4).

    ``stop_last_trials=False`` (members stop at ``stop``): Tune's default cleanup of a finished
    bracket stops only trials already PAUSED, so a member whose pause is still being saved then
    stays paused for ever; a pack's members report at the same moment, which makes that likely.
    """

    def hyperband():
        return HyperBandScheduler(max_t=4, reduction_factor=2, stop_last_trials=False)

    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=len(LRS), park_after_s=1.0)
    stop = {"training_iteration": 4}
    ours, rows = run(searcher.trainable(), hyperband(), tmp_path / "ours", search_alg=searcher, stop=stop)
    plain, _ = run(plain_member, hyperband(), tmp_path / "plain", stop=stop)
    assert iterations(ours) == iterations(plain)
    assert sorted(iterations(ours).values())[0] < 4  # HyperBand did stop some
    for trial in ours.trials:  # paused and continued: every iteration once, exact
        assert_matches_fit(rec, trial.config, rows[trial.trial_id])
    assert open_sweeps() == {}


def test_median_stopping_rule_stops_the_member_worse_than_the_median_each_exact(tmp_path):
    """Three members train to the end, then a fourth (lr 1e-6: it barely learns) runs alone.

    The rule compares a member at iteration t with the members that reached t: the first three
    never see three others (``min_samples_required=3``), whatever order their results arrive in;
    the fourth sees all three at t=2 (the grace period), is worse than their median, and stops
    there. ``max_concurrent_trials=3`` starts the fourth only when a slot frees.
    """
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=3)
    rule = MedianStoppingRule(time_attr="training_iteration", grace_period=2, min_samples_required=3)
    lrs = [0.004, 0.01, 0.03, 1e-6]
    analysis, rows = run(
        searcher.trainable(),
        rule,
        tmp_path,
        searcher,
        lrs,
        stop={"training_iteration": 6},
        max_concurrent_trials=3,
    )
    assert iterations(analysis) == {0.004: 6, 0.01: 6, 0.03: 6, 1e-6: 2}
    for trial in analysis.trials:
        assert_matches_fit(rec, trial.config, rows[trial.trial_id])
    assert open_sweeps() == {}
