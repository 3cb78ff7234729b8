"""The search space means what it means in plain Tune: placeholders, objects, nested keys, grids, reuse.

Each sweep runs twice where it matters: under plain Tune (a trainable that records its config)
and under ModelBatchSearcher, whose members must get the same kind of configs and each train
exactly as ``mb.fit(recipe, [config])``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from torch import nn  # noqa: E402
from tune_recipes import assert_matches_fit, open_sweeps, recipe  # noqa: E402

import modelbatch as mb  # noqa: E402
from tune_integration import ModelBatchSearcher  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(trainable, tmp_path, name, **kw):
    kw.update(metric="val_loss", mode="min", storage_path=str(tmp_path), name=name, verbose=0)
    return tune.run(trainable, reuse_actors=True, **kw)


def _plain_configs(space, tmp_path, num_samples):
    """The configs plain Tune (its own search algorithm) hands its trials for this space."""

    def record(config):
        tune.report({"val_loss": 0.0})

    return [t.config for t in _run(record, tmp_path, "plain", config=space, num_samples=num_samples).trials]


def _lr(config):
    return config["optim"]["lr"]


def test_placeholders_objects_nested_lr_and_grid_x_num_samples_as_in_plain_tune(tmp_path):
    # classes in a choice (Tune's object placeholders), a nested lr from a conditional sample_from
    # (a function placeholder, resolved in the trial) and a grid of 2 points x num_samples=2
    space = {
        "hidden": tune.grid_search([4, 8]),
        "act": tune.choice([nn.Tanh, nn.ReLU]),
        "optim": {"lr": tune.sample_from(lambda config: 0.01 if config["hidden"] == 4 else 0.03)},
        "seed": tune.randint(0, 1000),
    }
    plain = _plain_configs(space, tmp_path, num_samples=2)
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu="auto", reports=2, random_state=0)
    analysis = _run(
        searcher.trainable(), tmp_path, "packed", config=space, num_samples=2, search_alg=searcher
    )
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    packed = [t.config for t in analysis.trials]
    assert Counter(c["hidden"] for c in packed) == Counter(c["hidden"] for c in plain) == {4: 2, 8: 2}
    for config in plain + packed:
        assert config["act"] in (nn.Tanh, nn.ReLU) and _lr(config) == {4: 0.01, 8: 0.03}[config["hidden"]]
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        flat = {k: v for k, v in trial.config.items() if k != "optim"}
        assert_matches_fit(
            rec, {**flat, "lr": _lr(trial.config)}, frames[trial.trial_id]
        )  # its lr took effect


def test_the_recipe_reads_optimizer_hyperparameters_nested_under_optim():
    rec = recipe()
    nested = mb.fit(rec, [{"optim": {"lr": 0.03, "betas": (0.8, 0.9)}, "seed": 1}], reports=2, progress=False)
    flat = mb.fit(rec, [{"lr": 0.03, "beta1": 0.8, "beta2": 0.9, "seed": 1}], reports=2, progress=False)
    torch.testing.assert_close(
        torch.tensor(nested["val_loss"]), torch.tensor(flat["val_loss"]), rtol=0, atol=0
    )
    assert (
        rec.hparams({"optimizer": {"lr": 0.5}})["lr"]
        == 0.5
        == rec.hparams({"optimizer": "x", "lr": 0.5})["lr"]
    )
    with pytest.raises(ValueError, match=r"^mb.Recipe: lr is set in config and config\['optim'\]; set it"):
        rec.hparams({"lr": 0.1, "optim": {"lr": 0.2}})


def test_a_searcher_runs_a_second_sweep_afresh(tmp_path):
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=2, reports=1, random_state=0)
    space = {"lr": tune.uniform(1e-3, 3e-2), "seed": tune.randint(0, 1000)}
    for name in ("first", "second"):
        analysis = _run(
            searcher.trainable(), tmp_path, name, config=space, num_samples=2, search_alg=searcher
        )
        assert len(analysis.trials) == 2 and all(t.status == "TERMINATED" for t in analysis.trials)
        frames = analysis.trial_dataframes
        for trial in analysis.trials:
            assert_matches_fit(rec, trial.config, frames[trial.trial_id])
    assert open_sweeps() == {}  # the second sweep left the service too


def test_auto_slots_measure_the_first_configs_of_a_searcher_that_owns_its_space(tmp_path):
    """``OptunaSearch(space=...)`` (Tune gets no space): the same configs as under plain Tune with
    the same seeded Optuna, each member exact, the slots measured on the searcher's first configs."""
    from ray.tune.search.optuna import OptunaSearch

    def optuna():
        space = {"lr": tune.loguniform(1e-3, 1e-1), "seed": tune.randint(0, 1000)}
        return OptunaSearch(space, metric="val_loss", mode="min", seed=7)

    def record(config):
        tune.report({"val_loss": 0.0})

    plain = _run(record, tmp_path, "plain", search_alg=optuna(), num_samples=3)
    rec = recipe()
    searcher = ModelBatchSearcher(rec, searcher=optuna(), slots_per_gpu="auto", reports=2)
    analysis = _run(searcher.trainable(), tmp_path, "packed", search_alg=searcher, num_samples=3)
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert sorted(t.config["lr"] for t in analysis.trials) == sorted(t.config["lr"] for t in plain.trials)
    frames = analysis.trial_dataframes
    for trial in analysis.trials:
        assert_matches_fit(rec, trial.config, frames[trial.trial_id])
    (server,) = searcher.server_stats()
    assert server["slots"] >= 3 and server["members_hosted"] == 3
    assert open_sweeps() == {}


def test_tune_with_parameters_around_the_member_trial_is_refused_before_any_trial(tmp_path):
    searcher = ModelBatchSearcher(recipe(), slots_per_gpu=2, reports=1)
    tuner = tune.Tuner(
        tune.with_parameters(searcher.trainable(), data=[1, 2, 3]),
        param_space={"lr": tune.uniform(1e-3, 3e-2)},
        tune_config=tune.TuneConfig(search_alg=searcher, metric="val_loss", mode="min", num_samples=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="wp", verbose=0),
    )
    with pytest.raises(
        ValueError,
        match=r"^ModelBatchSearcher: tune.with_parameters\(searcher.trainable\(\), "
        r"data=...\).*Put the data into the Recipe",
    ):
        tuner.fit()
    assert open_sweeps() == {}
