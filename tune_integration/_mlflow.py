"""MLflowCallback: a Tune sweep as one MLflow parent run, every trial (every ModelBatch member) a child run.

Works with any Tune trainable. The driver only queues (well under 1 ms per result); a background
thread logs with batched ``log_batch`` calls, retries while the tracking server is away, and spills
what it never could log to a JSON-lines file that ``python -m tune_integration.mlflow replay`` replays.

Example::

    from ray import tune
    from tune_integration import MLflowCallback

    def train(config):
        for i in range(10):
            tune.report({"loss": config["lr"] / (i + 1)})

    tune.run(train, config={"lr": tune.loguniform(1e-4, 1e-1)}, num_samples=16,
             callbacks=[MLflowCallback(tracking_uri=None, experiment_name="digits-sweep", metric="loss")])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from modelbatch._mlflow import MEMBER_TAG_KEYS, MLflowLogger, flatten, is_number

# What Tune adds to every result that is bookkeeping, not a metric of the member.
_NOT_METRICS = frozenset(
    {
        "training_iteration",  # the step
        "timestamp",
        "pid",
        "done",
        "trial_id",
        "date",
        "hostname",
        "node_ip",
        "experiment_tag",
        "experiment_id",
        "iterations_since_restore",
        "timesteps_since_restore",
        "time_since_restore",
        "checkpoint_dir_name",
        "should_checkpoint",
        "config",
    }
)


def split_result(result: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Tune result as (metrics, member tags): numbers (nested ones flattened with ``/``) and the
    member tags ``pack``, ``slot``, ``node``, ``signature``, ``server``, ``server_node`` or anything
    under ``result["modelbatch"]``.

    Example:
        >>> split_result({"loss": 0.5, "slot": 3, "modelbatch": {"pack": "p0"}, "extra": {"a": 1},
        ...               "done": False, "training_iteration": 2, "node_ip": "10.0.0.1"})
        ({'loss': 0.5, 'extra/a': 1}, {'slot': 3, 'pack': 'p0', 'node': '10.0.0.1'})
    """
    metrics: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    for key, value in result.items():
        if key in _NOT_METRICS:
            continue
        if key in MEMBER_TAG_KEYS:
            tags[key] = value
        elif isinstance(value, Mapping):
            if key == "modelbatch":
                tags.update(flatten(value))
            else:
                metrics.update((k, v) for k, v in flatten(value, key).items() if is_number(v))
        elif is_number(value):
            metrics[key] = value
    if "node" not in tags and (result.get("server_node") or result.get("node_ip")):
        tags["node"] = (
            result.get("server_node") or result["node_ip"]
        )  # a slot server's node, else the trial's
    return metrics, tags


class MLflowCallback(Callback):
    """Log a Tune sweep to MLflow: one parent run per sweep, one child run per trial.

    Each child run is named after its trial, has the trial's config as params (nested keys flattened
    with ``/``, values truncated to MLflow's limits), every result's numbers as metrics at
    ``step=training_iteration``, and the tags ``trial_id``, the member tags found in results
    (``pack``, ``slot``, ``node``, ``signature``, ``server``, ``server_node``, or a nested
    ``"modelbatch": {...}``), ``status`` (``finished``, ``stopped early``, ``errored`` — also for a
    last result with a NaN/inf — or ``interrupted``), ``status_reason`` and, with ``metric``,
    ``best_<metric>`` and ``best_iteration``. A trial stopped by the scheduler counts as
    ``finished`` if it met its ``stop`` criteria or reached ``max_iterations`` (default: the most
    iterations any trial of the sweep reached, e.g. ASHA's ``max_t``).

    Args:
        tracking_uri: ``None`` follows MLflow's default (``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db``); ``http://host:port`` logs to a tracking server.
        experiment_name: MLflow experiment (created if missing).
        metric, mode: the metric whose best value is tagged on each run and on the parent run.
        max_iterations: iterations after which a trial stopped by the scheduler counts as finished.
        log_artifacts: log each trial's last checkpoint directory as the artifact ``checkpoint``.
        **kwargs: more :class:`modelbatch.MLflowLogger` arguments (``run_name``, ``parent_run_id``,
            ``tags``, ``flush_interval``, ``close_timeout``, ``spill_path``, ``artifact_location``).

    If the server cannot be reached, results stay queued and are retried; at the end of the sweep the
    callback waits ``close_timeout`` seconds, then writes what is left to a spill file and warns with
    the replay command. How long one attempt may block is MLflow's own setting
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``); it never blocks the driver.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        *,
        metric: str | None = None,
        mode: str = "min",
        max_iterations: int | None = None,
        log_artifacts: bool = False,
        **kwargs: Any,
    ) -> None:
        self.logger_kwargs = dict(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            metric=metric,
            mode=mode,
            log_artifacts=log_artifacts,
            **kwargs,
        )
        MLflowLogger(**self.logger_kwargs)  # check the arguments now, not when the sweep starts
        self.max_iterations = max_iterations
        self.logger: MLflowLogger | None = None
        self._stopped_by_tune: dict[str, bool] = {}
        self._iterations: dict[str, int] = {}
        self._status: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune may pickle callbacks; the logger holds a thread
        return {**self.__dict__, "logger": None}

    @property
    def tracking_uri(self) -> str | None:
        return self.logger.tracking_uri if self.logger else self.logger_kwargs["tracking_uri"]

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self.logger = MLflowLogger(**self.logger_kwargs)
        self._stopped_by_tune, self._iterations, self._status = {}, {}, {}
        tags = {"num_samples": num_samples, "total_num_samples": total_num_samples}
        if stop is not None:
            tags["stop"] = stop
        self.logger.start(tags={k: v for k, v in tags.items() if v is not None})

    def _start(self, trial: Any) -> None:
        if trial.trial_id not in self._iterations:
            self._iterations[trial.trial_id] = 0
            self.logger.start_member(
                trial.trial_id, trial.config, name=str(trial), tags={"trial_id": trial.trial_id}
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        if tid not in self._iterations:
            self._start(trial)
        step = result.get("training_iteration") or 0
        metrics, tags = split_result(result)
        self.logger.log_member(tid, metrics, step=step, tags=tags)
        self._iterations[tid] = step
        self._stopped_by_tune[tid] = bool(result.get("done"))  # Tune sets done when it decides to stop

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        status, reason = self._completion(trial)
        self._log_checkpoint(trial)
        self._status[trial.trial_id] = status
        self.logger.end_member(trial.trial_id, status, reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        self._log_checkpoint(trial)
        reason = _error_reason(trial)
        self._status[trial.trial_id] = "errored"
        self.logger.end_member(trial.trial_id, "errored", reason)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.logger is None:
            return
        interrupted = [t for t in trials if t.trial_id in self._iterations and t.trial_id not in self._status]
        for trial in interrupted:
            self.logger.end_member(
                trial.trial_id, "interrupted", f"sweep ended with the trial {trial.status}"
            )
        if self.max_iterations is None and self._iterations:  # scheduler stops at its max_t count as finished
            most = max(self._iterations.values())
            for tid, status in self._status.items():
                if status == "stopped early" and self._iterations[tid] >= most:
                    self.logger.retag_member(
                        tid, "finished", f"reached {most} iterations, the most of the sweep"
                    )
        self.logger.close(status="interrupted" if interrupted else "finished")

    def _completion(self, trial: Any) -> tuple[str, str]:
        tid = trial.trial_id
        it = self._iterations.get(tid, 0)
        last = trial.last_result or {}
        for key, value in last.items():  # a diverged member (what mb.fit's NaN guard reports as errored)
            if isinstance(value, float) and not math.isfinite(value):
                return "errored", f"non-finite {key} ({value}) at iteration {it}"
        if not self._stopped_by_tune.get(tid, False):
            return "finished", "the trainable returned"
        for criterion, value in (getattr(trial, "stopping_criterion", None) or {}).items():
            reached = last.get(criterion)
            if is_number(reached) and reached >= value:
                return "finished", f"stop criterion {criterion} >= {value}"
        if self.max_iterations is not None and it >= self.max_iterations:
            return "finished", f"reached max_iterations={self.max_iterations}"
        return "stopped early", f"stopped by the scheduler at iteration {it}"

    def _log_checkpoint(self, trial: Any) -> None:
        checkpoint = trial.checkpoint if self.logger.log_artifacts else None
        if checkpoint is None:
            return
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
            self.logger.log_member_artifact(trial.trial_id, checkpoint.path, "checkpoint")
        else:  # remote storage: a local copy, deleted once uploaded
            self.logger.log_member_artifact(
                trial.trial_id, checkpoint.to_directory(), "checkpoint", delete=True
            )


def _error_reason(trial: Any) -> str:
    """``"ValueError: ..."`` of the trial's last error (from its local error files), else ``"errored"``."""
    try:
        from ray import cloudpickle

        with open(trial.pickled_error_file, "rb") as f:
            error = cloudpickle.load(f)
        error = getattr(error, "cause", None) or error  # RayTaskError wraps the trainable's exception
        return f"{type(error).__name__}: {error}".strip()[:1000]
    except Exception:
        pass
    try:
        with open(trial.error_file) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        return lines[-1][:1000]
    except Exception:
        return "errored"
