"""ModelBatchSearcher sweeps on a local Ray (2 CPUs): one Tune trial per member, packed in a slot server."""

from __future__ import annotations

import math
import os
import signal
import sys
from typing import ClassVar

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, tune  # noqa: E402
from ray.tune.execution.tune_controller import _get_max_pending_trials  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import SearchGenerator  # noqa: E402
from tune_recipes import (  # noqa: E402
    XV,
    YV,
    Results,
    assert_ends_as_in_fit,
    assert_matches_fit,
    history,
    member_without_torch,
    open_sweeps,
    recipe,
)
from wandb_files import read_runs  # noqa: E402

import modelbatch as mb  # noqa: E402
from tune_integration import ModelBatchSearcher, WandBCallback  # noqa: E402

pytestmark = pytest.mark.slow
SPACE = {
    "lr": tune.loguniform(1e-3, 3e-2),
    "weight_decay": tune.uniform(0.0, 0.1),
    "seed": tune.randint(0, 10_000),
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(searcher, tmp_path, name="sweep", trainable=None, **kw):
    kw.setdefault("config", SPACE)
    kw.setdefault("reuse_actors", True)  # a relay process serves member after member (faster)
    trainable = trainable or searcher.trainable()
    kw.update(search_alg=searcher, metric="val_loss", mode="min", storage_path=str(tmp_path), verbose=0)
    return tune.run(trainable, name=name, **kw)


def test_tune_run_one_trial_per_member_each_exact(tmp_path):
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=3, reports=3, random_state=0)
    analysis = run(searcher, tmp_path, num_samples=7, reuse_actors=False)
    trials = analysis.trials
    assert len(trials) == 7 and all(t.status == "TERMINATED" for t in trials)
    df = analysis.dataframe()
    assert len(df) == 7 and {"config/lr", "config/weight_decay", "config/seed"} <= set(df.columns)
    for column in ("loss", "val_loss", "val_acc", "training_iteration", "slot", "server", "pack"):
        assert column in df.columns
    assert (df["training_iteration"] == 3).all()
    assert len({t.config["seed"] for t in trials}) == 7
    best = analysis.get_best_trial("val_loss", "min", scope="last")
    assert best.last_result["val_loss"] == df["val_loss"].min()
    # every member equals its config trained alone, whichever slot it got and whenever it joined
    frames = analysis.trial_dataframes
    for trial in trials:
        assert_matches_fit(rec, trial.config, frames[trial.trial_id])
    # 7 members went through 3 slots; the best member's checkpoint gives back its model
    (stats,) = searcher.server_stats()
    assert stats["slots"] == 3 and stats["members_hosted"] == 7 and stats["live"] == 0
    model = searcher.model_from_checkpoint(best.checkpoint)
    import torch.nn.functional as F

    assert math.isclose(F.cross_entropy(model(XV), YV).item(), best.last_result["val_loss"], rel_tol=1e-12)
    assert open_sweeps() == {}  # the sweep left the service at the end


def test_tuner_with_asha_stops_members_early_and_reuses_their_slots(tmp_path):
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=4)
    tuner = tune.Tuner(
        searcher.trainable(),
        param_space=SPACE,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=ASHAScheduler(max_t=6, grace_period=1, reduction_factor=2),
            metric="val_loss",
            mode="min",
            num_samples=12,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 12 and not results.errors
    iterations = sorted(r.metrics["training_iteration"] for r in results)
    assert iterations[0] < 6 and iterations[-1] == 6  # ASHA stopped some members early
    assert results.get_best_result().metrics["val_loss"] == min(r.metrics["val_loss"] for r in results)
    (stats,) = searcher.server_stats()
    assert stats["slots"] == 4 and stats["members_hosted"] == 12


def test_searcher_chain_has_a_concurrency_limiter_at_the_sweeps_slots(tmp_path):
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=5)
    generator = SearchGenerator(searcher)
    assert _get_max_pending_trials(generator) == 5  # ray would start members one by one otherwise
    generator.set_search_properties("val_loss", "min", SPACE)
    try:
        assert searcher.n_slots == 5 and _get_max_pending_trials(generator) == 5
        assert searcher.inner_searcher is None  # none passed in; Tune's walk above found the limiter
    finally:
        searcher.shutdown()
    assert searcher.n_slots is None


def test_inner_optuna_search_receives_every_members_results(tmp_path):
    optuna_search = pytest.importorskip("ray.tune.search.optuna").OptunaSearch(seed=0)
    searcher = ModelBatchSearcher(recipe(), searcher=optuna_search, slots_per_gpu=3, reports=3)
    analysis = run(searcher, tmp_path, num_samples=6)
    assert len(analysis.trials) == 6
    study_trials = optuna_search._ot_study.trials
    assert len(study_trials) == 6
    for ot_trial in study_trials:
        assert ot_trial.state.name == "COMPLETE"
        assert sorted(ot_trial.intermediate_values) == [1, 2, 3]  # one per member report
    by_lr = {t.config["lr"]: t.last_result["val_loss"] for t in analysis.trials}
    assert sorted(by_lr) == sorted(t.params["lr"] for t in study_trials)
    assert sorted(by_lr.values()) == sorted(t.value for t in study_trials)


def test_mixed_architectures_train_in_separate_packs_with_auto_slots(tmp_path):
    space = {**SPACE, "hidden": tune.grid_search([8, 16])}
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu="auto", reports=2)
    relay = tune.with_resources(member_without_torch, {"cpu": 0.01})  # errors if a relay imports torch
    analysis = run(searcher, tmp_path, config=space, num_samples=3, trainable=relay)  # 2 grid points x 3
    assert 1 <= searcher.server_stats()[0]["slots"] <= 16
    df = analysis.dataframe()
    assert len(df) == 6 and (df["training_iteration"] == 2).all()
    hidden_by_pack = df.groupby("pack")["config/hidden"].unique()
    assert len(hidden_by_pack) == 2 and sorted(h for (h,) in hidden_by_pack) == [8, 16]
    # the grid alternates 8, 16, ...; free slots went to the architecture of the live members
    assert [t.config["hidden"] for t in analysis.trials][:3] == [8, 8, 8]


def test_a_member_with_nan_results_ends_and_the_others_stay_exact(tmp_path):
    rec = recipe()
    space = {"lr": 0.01, "seed": tune.grid_search([1, 2]), "scale": tune.grid_search([1.0, float("nan")])}
    searcher = ModelBatchSearcher(rec, slots_per_gpu=4, reports=3)
    analysis = run(searcher, tmp_path, config=space, num_samples=1)  # each of the 4 grid points once
    assert len(analysis.trials) == 4
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        assert trial.status == "TERMINATED"
        if math.isnan(trial.config["scale"]):
            assert trial.last_result["training_iteration"] == 1 and math.isnan(trial.last_result["val_loss"])
            assert trial.last_result["error"] == "non-finite loss (nan) at report 1"  # why it ended
        else:
            assert trial.last_result["training_iteration"] == 3
            assert_matches_fit(rec, trial.config, frames[trial.trial_id])


def test_callbacks_stop_members_on_the_servers_as_mb_fit_does_and_nan_errs_alike(tmp_path):
    """ModelBatchSearcher(callbacks=[EarlyStopping]) stops the members mb.fit stops, at the same report."""
    rec = recipe()
    # lr 0: val_loss never improves (stopped at report 3); scale nan: errored at report 1
    space = {"lr": tune.grid_search([0.0, 0.02]), "seed": 1, "scale": tune.grid_search([1.0, float("nan")])}
    early = mb.callbacks.EarlyStopping("val_loss", patience=2)
    searcher = ModelBatchSearcher(rec, slots_per_gpu=4, reports=6, callbacks=[early])
    results = Results()
    analysis = run(searcher, tmp_path, config=space, num_samples=1, callbacks=[results])
    trials = analysis.trials
    assert len(trials) == 4 and all(t.status == "TERMINATED" for t in trials)  # ended normally
    configs = [dict(t.config) for t in trials]
    rows = [sorted(results.rows[t.trial_id], key=lambda r: r["training_iteration"]) for t in trials]
    assert_ends_as_in_fit(rec, configs, [mb.callbacks.EarlyStopping("val_loss", patience=2)], 6, rows)
    ends = {(c["lr"], math.isnan(c["scale"])): r[-1] for c, r in zip(configs, rows)}
    assert ends[(0.0, False)]["stopped"] == "early stopped: val_loss did not improve for 2 reports"
    assert ends[(0.0, False)]["training_iteration"] == 3
    assert ends[(0.02, True)]["error"] == "non-finite loss (nan) at report 1"  # mb.fit's words
    assert ends[(0.02, False)]["training_iteration"] == 6 and "stopped" not in ends[(0.02, False)]
    assert all(t.last_result["done"] for t in trials)  # each trial's last result ends it
    assert early.best == {}  # the servers ran copies of the callback


class _Interrupt(tune.Callback):
    """Sends SIGINT (Ctrl+C) to the driver after ``after`` results: Tune saves the experiment and stops.

    Once per instance and process: ``Tuner.restore`` brings back a pickled copy of the callback.
    """

    sent: ClassVar[set[str]] = set()

    def __init__(self, after: int) -> None:
        self.after, self.seen, self.key = after, 0, os.urandom(8).hex()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1
        if self.seen >= self.after and self.key not in self.sent:
            self.sent.add(self.key)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to self")
def test_resume_after_interruption_completes_every_member_exactly(tmp_path):
    rec = recipe()
    first = ModelBatchSearcher(rec, slots_per_gpu=3, reports=4, random_state=1)
    wandb = tmp_path / "wandb-runs"  # each member's W&B run, continued by the resumed sweep
    callbacks = [WandBCallback("resume", mode="offline", dir=wandb), _Interrupt(after=5)]
    interrupted = run(first, tmp_path, name="resume", num_samples=6, callbacks=callbacks)
    done = [t.last_result.get("training_iteration", 0) for t in interrupted.trials]
    assert len(done) < 6 or min(done) < 4  # interrupted before the end

    second = ModelBatchSearcher(rec, slots_per_gpu=3, reports=4)
    callbacks = [WandBCallback("resume", mode="offline", dir=wandb)]
    analysis = run(second, tmp_path, name="resume", num_samples=6, resume=True, callbacks=callbacks)
    assert len(analysis.trials) == 6
    runs = {r.summary["trial_id"]: r for r in read_runs(wandb).values()}
    assert sorted(runs) == sorted(t.trial_id for t in analysis.trials)
    assert {r.group for r in runs.values()} == {"resume"}
    assert max(r.files for r in runs.values()) == 2  # a member's run continued after the resume
    for trial in analysis.trials:
        logged = runs[trial.trial_id]
        assert logged.config == {k: v for k, v in trial.config.items() if k != "modelbatch_pack"}
        assert [step for step, _ in logged.steps("val_loss")] == [1, 2, 3, 4]  # each step once
        frame = analysis.trial_dataframes[trial.trial_id].drop_duplicates("training_iteration", keep="last")
        assert [v for _, v in logged.steps("val_loss")] == pytest.approx(list(frame["val_loss"]), rel=1e-6)
        assert (logged.summary["status"], logged.summary["status_reason"]) == (
            "finished",
            "the trainable returned",
        )
    assert {t.trial_id for t in interrupted.trials} <= {t.trial_id for t in analysis.trials}
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        assert trial.status == "TERMINATED" and trial.last_result["training_iteration"] == 4
        # no iteration missing; one logged before the interruption may repeat after the resume
        assert sorted(set(frames[trial.trial_id]["training_iteration"])) == [1, 2, 3, 4]
        assert_matches_fit(rec, trial.config, history(frames[trial.trial_id]))
    assert open_sweeps() == {}


def test_tuner_restore_after_interruption_completes_every_member_exactly(tmp_path):
    """Tuner.restore brings back a pickled copy of the searcher; its servers still find the members."""
    rec = recipe()
    first = ModelBatchSearcher(rec, slots_per_gpu=3, reports=3, random_state=2)
    tuner = tune.Tuner(
        first.trainable(),
        param_space=SPACE,
        tune_config=tune.TuneConfig(
            search_alg=first, metric="val_loss", mode="min", num_samples=5, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="restore", verbose=0, callbacks=[_Interrupt(after=4)]
        ),
    )
    done = [r.metrics.get("training_iteration", 0) for r in tuner.fit()]
    assert len(done) < 5 or min(done) < 3  # interrupted before the end
    second = ModelBatchSearcher(rec, slots_per_gpu=3, reports=3)
    results = tune.Tuner.restore(str(tmp_path / "restore"), trainable=second.trainable()).fit()
    assert len(results) == 5 and not results.errors
    for result in results:
        assert result.metrics["training_iteration"] == 3
        assert sorted(set(result.metrics_dataframe["training_iteration"])) == [1, 2, 3]  # no gap
        assert_matches_fit(rec, result.config, history(result.metrics_dataframe))
    assert open_sweeps() == {}


def test_a_member_restored_at_its_last_report_is_done_without_training_more():
    """Interrupted after a member's last result but before Tune ended its trial, a resumed sweep
    restores the trial from that result's checkpoint: the member is done at once (in one loaded
    run of the test above it trained one report past ``reports``)."""
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2, reports=3)
    SearchGenerator(searcher).set_search_properties("val_loss", "min", {"lr": 0.01, "seed": 1})
    service, job = searcher._sweep.service, ray.get_runtime_context().get_job_id()
    config = {"lr": 0.01, "seed": 1}
    server, _, reported = ray.get(service.join.remote(job, "done", config, None, None, None, 3))
    assert server is None and reported == 3
    server, sweep, _ = ray.get(service.join.remote(job, "one-left", config, None, None, None, 2))
    assert server is not None  # one report to go: it trains
    ray.get(service.release.remote(sweep, "one-left"))
    searcher.shutdown()
    assert open_sweeps() == {}


def test_a_member_that_stops_asking_is_parked_and_continues_exactly_when_back():
    """A paused trial (HyperBand, PBT) must not stall its pack: it is parked, then restored exactly."""
    from tune_integration._server import SlotServer

    rec = recipe()
    configs = {"a": {"lr": 0.01, "seed": 1}, "b": {"lr": 0.02, "seed": 2}}
    server = ray.remote(SlotServer).remote(0)
    options = {"checkpoint_every": None, "reports": 3, "park_after_s": 0.3}
    ray.get(server.add_sweep.remote("s", "tenant", cloudpickle.dumps(rec), 2, options))
    ray.get([server.join.remote("s", m, c, None) for m, c in configs.items()])
    results = {m: [] for m in configs}
    for _ in range(3):  # "b" does not ask: "a" trains on alone once "b" is parked
        results["a"].append(ray.get(server.next_result.remote("s", "a"), timeout=60)["result"])
    assert ray.get(server.stats.remote("s"))["parked"] == 1
    for _ in range(3):  # "b" comes back where it stopped
        results["b"].append(ray.get(server.next_result.remote("s", "b"), timeout=60)["result"])
    stats = ray.get(server.stats.remote("s"))
    assert stats["parks"] == 1 and stats["parked"] == 0
    ray.kill(server)
    for member, config in configs.items():
        assert_matches_fit(rec, config, pd.DataFrame(results[member]))


def test_a_pack_factory_replaces_the_recipe_on_a_server():
    """The escape hatch: any trainer with PackTrainer's slot API, here a PackTrainer subclass."""
    import modelbatch as mb
    from tune_integration._server import SlotServer

    rec = recipe()

    class Trainer(mb.PackTrainer):
        def train_report(self):
            return {m: {**r, "custom": 1.0} for m, r in super().train_report().items()}

    server = ray.remote(SlotServer).remote(0)
    factory = cloudpickle.dumps(lambda n_slots, config: Trainer(rec, n_slots, config))
    ray.get(server.add_sweep.remote("s", "tenant", factory, 2, {}))
    config = {"lr": 0.01, "seed": 3}
    ray.get(server.join.remote("s", "m", config, None))
    results = [ray.get(server.next_result.remote("s", "m"), timeout=60)["result"] for _ in range(2)]
    ray.kill(server)
    assert [r["custom"] for r in results] == [1.0, 1.0]
    assert_matches_fit(rec, config, pd.DataFrame(results))
    with pytest.raises(TypeError, match=r"^ModelBatchSearcher: model_from_checkpoint needs a mb\.Recipe"):
        ModelBatchSearcher(lambda c, cfg: None, slots_per_gpu=1).model_from_checkpoint(None)
