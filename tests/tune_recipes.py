"""A tiny float64 recipe for the Tune tests, and helpers to start Ray and compare with mb.fit.

The recipe is built by tests/recipes.py's ``small_recipe``. Ray workers cannot import the tests
folder, so this module and that one are pickled by value (their functions and classes travel with
the recipe to the slot servers).
"""

from __future__ import annotations

import sys

import pandas as pd
import recipes
import torch
import torch.nn.functional as F
from ray import cloudpickle, tune
from torch import nn

import modelbatch as mb

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(recipes)  # recipe() calls it on the workers

X = torch.randn(192, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
XV, YV = X[:48] + 0.1, Y[:48]


class Net(nn.Module):
    """An MLP whose output is multiplied by ``scale`` (a buffer): ``scale=nan`` makes a diverging member.

    ``act``: the activation's class (a search space may hold classes).
    """

    def __init__(self, hidden: int = 8, scale: float = 1.0, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, hidden), act(), nn.Linear(hidden, 3))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def make_model(cfg: dict) -> nn.Module:
    return Net(cfg.get("hidden", 8), cfg.get("scale", 1.0), cfg.get("act", nn.Tanh))


class FailingLoss:
    """Cross-entropy that raises at its ``after + 1``-th call in a process: a recipe that breaks mid-sweep."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError(f"FailingLoss: this recipe breaks after {self.after} steps")
        return F.cross_entropy(output, target)


def recipe(**kw) -> mb.Recipe:
    settings = dict(
        model=make_model,
        train_data=(X, Y),
        optimizer="adamw",
        val_data=(XV, YV),
        metrics={"acc": mb.metrics.accuracy},
    )
    return recipes.small_recipe(**{**settings, **kw})


def history(trial_dataframe: pd.DataFrame) -> pd.DataFrame:
    """A trial's results by training_iteration (a resumed trial's repeated rows: the last one)."""
    return trial_dataframe.drop_duplicates("training_iteration", keep="last").sort_values(
        "training_iteration"
    )


def assert_matches_fit(
    rec: mb.Recipe, config: dict, trial_dataframe: pd.DataFrame, rtol: float = 1e-10
) -> None:
    """The member's results equal ``mb.fit(rec, [config])`` for as many reports."""
    got = history(trial_dataframe)
    ref = mb.fit(rec, [config], reports=int(got["training_iteration"].max()), progress=False)
    assert got["training_iteration"].tolist() == ref["training_iteration"].tolist()
    for column in ("loss", "val_loss", "val_acc"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()), torch.tensor(ref[column].to_numpy()), rtol=rtol, atol=0
        )


def assert_ends_as_in_fit(
    rec: mb.Recipe, configs: list, callbacks: list, reports: int, results: list
) -> None:
    """Members ended by a sweep (``results[i]``: config ``i``'s results, in order) end as in ``mb.fit``.

    ``mb.fit(rec, configs, reports, callbacks=callbacks)`` stops the same members at the same
    report for the same reason (a last result's ``"error"`` or ``"stopped"``; else ``finished``),
    with the same metrics up to it.
    """
    ref = mb.fit(rec, configs, reports=reports, callbacks=callbacks, progress=False)
    for i, got in enumerate(results):
        expected = ref[ref["member"] == i]
        last = got[-1]
        status = f"errored: {last['error']}" if "error" in last else last.get("stopped", "finished")
        assert (last["training_iteration"], status) == (
            expected["training_iteration"].iloc[-1],
            expected["status"].iloc[-1],
        ), configs[i]
        assert not any("error" in r or "stopped" in r for r in got[:-1])
        for column in ("loss", "val_loss", "val_acc"):
            torch.testing.assert_close(
                torch.tensor([r[column] for r in got], dtype=torch.float64),
                torch.tensor(expected[column].to_numpy()),
                rtol=1e-10,
                atol=0,
                equal_nan=True,
            )


class Results(tune.Callback):
    """A Tune callback keeping every result in the order Tune processed it: ``rows[trial_id]``.

    A trial's ``progress.csv`` is no such record when Tune restarts trials (pauses, PBT's
    exploits): its CSV logger may replace the file with an older copy from the storage path.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows.setdefault(trial.trial_id, []).append(dict(result))


def member_without_torch(config: dict) -> None:
    """The relay trainable, then a check that its process never imported torch (else the trial errors)."""
    from tune_integration._relay import modelbatch_member

    modelbatch_member(config)
    if "torch" in sys.modules:
        raise AssertionError("the relay trial process imported torch")


def open_sweeps() -> dict:
    """The packing service's open sweeps (``{}`` when no service runs): what a sweep may leave behind."""
    import ray

    if not ray.is_initialized():
        return {}
    try:
        service = ray.get_actor("service", namespace="modelbatch")
        return ray.get(service.status.remote())["sweeps"]
    except (ValueError, ray.exceptions.RayActorError):  # none, or it stopped meanwhile
        return {}


def plain_member(config: dict) -> None:
    """One member as a plain Tune function trainable: trained alone by the engine, a checkpoint per report.

    Restored from a checkpoint (``max_failures``, a pause, PBT's exploit), it goes on from that
    state with this trial's config: a changed lr is set as torch's ``param_group["lr"]`` is (the
    way Tune's PBT examples load a checkpoint, then apply the new config).
    """
    import os
    import tempfile

    rec = recipe()
    trainer = mb.PackTrainer(rec, 1, example_config=config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        trainer.add("member", config)
    else:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "member.pt"), weights_only=False)
        trainer.restore_member(state)
        trainer.optimizer.set_hparam("lr", config["lr"], member=0)
        trainer.slots[0].config = dict(config)
    while True:
        result = trainer.train_report()["member"]
        with tempfile.TemporaryDirectory() as directory:
            torch.save(trainer.member_state_dict("member"), os.path.join(directory, "member.pt"))
            tune.report(
                {k: v for k, v in result.items() if k != "training_iteration"},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )
