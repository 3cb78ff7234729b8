"""WandBCallback: a Tune sweep in Weights & Biases, one run per trial (per ModelBatch member), grouped.

Works with any Tune trainable. The driver only queues: runs start and log on a background thread
(``wandb.init`` takes 0.3-1 s a run). Unlike Ray's ``WandbLoggerCallback`` it starts no Ray actor
per trial, which a sweep of hundreds of packed members could not afford.

Example::

    from ray import tune
    from tune_integration import WandBCallback

    def train(config):
        for i in range(10):
            tune.report({"loss": config["lr"] / (i + 1)})

    tune.run(train, config={"lr": tune.loguniform(1e-4, 1e-1)}, num_samples=16,
             callbacks=[WandBCallback(project="digits-sweep", mode="offline")])
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from modelbatch._internal import WandBWriter
from modelbatch.mlflow import MEMBER_TAG_KEYS

from ._mlflow import TUNE_TAG_KEYS, member_config, split_result, trial_name
from ._outcome import TrialOutcomes

API = "WandBCallback"


class WandBCallback(Callback):
    """Log a Tune sweep to W&B: one run per trial, all in one group.

    Each run is named by ``member_name(trial)`` (default ``"m007 lr=0.0031 width=64"``), has the
    trial's config (without the searcher's ``modelbatch_pack`` key), every result's numbers (nested
    ones as ``val/acc``) at ``step=training_iteration``, the member tags of its results (``pack``,
    ``slot``, ``node``, ``signature``, ``server``, ``server_node``) and ``trial_id`` in its summary,
    and at its end ``summary["status"]`` and ``summary["status_reason"]`` in ``mb.fit``'s words
    (``finished``, ``stopped early``, ``errored``, ``interrupted``; the same as
    :class:`~tune_integration.MLflowCallback`). ``group`` defaults to Tune's experiment folder name.
    A resumed sweep (``tune.run(resume=True)``) continues each member's run (its id is kept in the
    callback's state, which Tune saves) without logging a step twice.

    Args:
        project: the W&B project.
        group: the runs' group (default: the sweep's experiment folder name, e.g. ``train_2026-12-01_...``).
        mode: ``"online"``, ``"offline"`` (no network; ``wandb sync`` uploads later) or ``"disabled"``.
        dir: where W&B writes its run folders (default: W&B's, the working directory).
        max_iterations: iterations after which a trial stopped by the scheduler counts as finished
            (default: the most any trial reached, e.g. ASHA's ``max_t``).
        member_name: a trial's run name.
        **init_kwargs: more ``wandb.init`` arguments (``entity``, ``tags``, ``notes``, ``settings``;
            W&B's console output is off unless ``settings`` says otherwise).
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        group: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,
        max_iterations: int | None = None,
        member_name: Callable[[Any], str] = trial_name,
        **init_kwargs: Any,
    ) -> None:
        for reserved in ("id", "name", "config", "resume", "reinit"):
            if reserved in init_kwargs:
                raise ValueError(f"{API}: {reserved}= is set per member by the callback; leave it out")
        self.writer = WandBWriter(API)
        init_kwargs.setdefault("settings", self.writer.wandb.Settings(silent=True))
        self.init_kwargs = dict(
            project=project, mode=mode, dir=None if dir is None else str(dir), **init_kwargs
        )
        self.group = group
        self.member_name = member_name
        self.outcomes = TrialOutcomes(max_iterations)
        self.sweep_key: str | None = None
        self._restored: dict[str, Any] | None = None
        self._names: dict[str, str] = {}  # run names of the trials started here

    def get_state(self) -> dict[str, Any] | None:
        """What a resumed sweep needs (Tune saves it in the experiment folder): the runs' key, members."""
        if self.sweep_key is None:
            return None
        return {"sweep_key": self.sweep_key, "group": self.group, **self.outcomes.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Called by Tune on resume, before :meth:`setup`."""
        self._restored = state

    def setup(self, **info: Any) -> None:
        state = self._restored or {}
        self._restored = None
        self.sweep_key = state.get("sweep_key") or uuid.uuid4().hex[:8]
        self.group = self.group or state.get("group")
        self.outcomes.set_state(state)
        self._names = {}

    def run_id(self, trial_id: str) -> str:
        """The W&B run id of a trial: the sweep's key and the trial's id, the same after a resume."""
        return f"{self.sweep_key}-{trial_id}"

    def _start(self, trial: Any) -> None:
        tid = trial.trial_id
        if tid in self._names:
            return
        self._names[tid] = self.member_name(trial)
        self.outcomes.start(trial)
        if self.group is None:
            self.group = getattr(trial, "experiment_dir_name", None) or f"sweep-{self.sweep_key}"
        self.writer.start(
            tid,
            id=self.run_id(tid),
            resume="allow",
            name=self._names[tid],
            group=self.group,
            config=member_config(trial),
            **self.init_kwargs,
        )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._start(trial)
        step = self.outcomes.report(trial, result)
        if step is None:
            return
        metrics, tags = split_result(result, (*MEMBER_TAG_KEYS, *TUNE_TAG_KEYS))
        self.writer.log(trial.trial_id, metrics, step=step, summary={"trial_id": trial.trial_id, **tags})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        status, reason = self.outcomes.complete(trial)
        self.writer.end(trial.trial_id, {"status": status, "status_reason": reason})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        status, reason = self.outcomes.error(trial)
        self.writer.end(trial.trial_id, {"status": status, "status_reason": reason})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.sweep_key is None:
            return
        for trial in self.outcomes.interrupted(trials):
            self._start(trial)
            reason = f"sweep ended with the trial {trial.status}"
            self.writer.end(trial.trial_id, {"status": "interrupted", "status_reason": reason})
        for tid, status in self.outcomes.final_statuses().items():
            if status != self.outcomes.status[tid] and tid in self._names:
                # ended "stopped early" at the most reports: the run is finished, so continue it to say so
                reason = f"reached {self.outcomes.iterations[tid]} reports, the most"
                name, group = self._names[tid], self.group
                self.writer.start(
                    tid, id=self.run_id(tid), resume="allow", name=name, group=group, **self.init_kwargs
                )
                self.writer.end(tid, {"status": status, "status_reason": reason})
        self.writer.close()
