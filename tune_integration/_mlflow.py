"""MLflowCallback: a Tune sweep as one MLflow parent run, every trial (every ModelBatch member) a child run.

Works with any Tune trainable. The driver only queues (well under 1 ms per result); a background
thread logs with batched ``log_batch`` calls, retries while the tracking server is away, and spills
what it never could log to a JSON-lines file that ``python -m modelbatch.mlflow replay`` replays.

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

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray.tune import Callback

from modelbatch.mlflow import MEMBER_TAG_KEYS, MLflowLogger, flatten, is_number

from ._outcome import TrialOutcomes
from ._relay import PACK_KEY

TUNE_TAG_KEYS = ("server", "server_node")  # what a slot server adds to its members' results: tags

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
        "step",  # optimizer steps so far: MLflow's step (training_iteration) is the x axis already
    }
)


def trial_name(trial: Any, limit: int = 60) -> str:
    """A short readable run name: the trial's number (Tune's count) and its config's values, no seeds.

    Example:
        >>> from types import SimpleNamespace
        >>> trial = SimpleNamespace(trial_id="a1b2", experiment_tag="7_lr=0.0031,width=64",
        ...                         config={"lr": 0.00312, "width": 64, "seed": 3})
        >>> trial_name(trial)
        'm007 lr=0.0031 width=64'
    """
    head = trial_number(trial)
    words = [str(trial.trial_id) if head is None else f"m{head:03d}"]
    for key, value in flatten(member_config(trial)).items():
        if key.rsplit("/", 1)[-1] == "seed" or not isinstance(value, (str, int, float)):
            continue
        words.append(f"{key}={value:.2g}" if isinstance(value, float) else f"{key}={value}")
    name = " ".join(words)
    return name if len(name) <= limit else name[: limit - 3] + "..."


def member_config(trial: Any) -> dict[str, Any]:
    """The trial's config as the user's space made it: without the key the searcher adds for the
    member's relay (``modelbatch_pack``, its pack label).

    Example:
        >>> from types import SimpleNamespace
        >>> member_config(SimpleNamespace(config={"lr": 0.1, "modelbatch_pack": "MLP 8-3 #ab12cd"}))
        {'lr': 0.1}
    """
    return {k: v for k, v in (trial.config or {}).items() if k != PACK_KEY}


def trial_number(trial: Any) -> int | None:
    """Tune's number of a trial (the start of its ``experiment_tag``, kept on resume); ``None``: none."""
    number = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(number) if number.isdigit() else None


def split_result(
    result: Mapping[str, Any], tag_keys: Sequence[str] = (*MEMBER_TAG_KEYS, *TUNE_TAG_KEYS)
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Tune result as (metrics, member tags): numbers (nested ones flattened with ``/``) and the
    member tags ``tag_keys`` (``pack``, ``slot``, ``node``, ``signature``, ``server``,
    ``server_node``) or anything under ``result["modelbatch"]``.

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
        if key in tag_keys:
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

    Each child run is named by ``member_name(trial)`` (default :func:`trial_name`:
    ``"m007 lr=0.0031 width=64"``), has the trial's config as params (nested keys flattened
    with ``/``, values truncated to MLflow's limits), every result's numbers as metrics at
    ``step=training_iteration``, and the tags ``trial_id``, the member tags found in results
    (``pack``, ``slot``, ``node``, ``signature``, ``server``, ``server_node``, or a nested
    ``"modelbatch": {...}``), ``status`` (``finished``, ``stopped early``, ``errored`` — also for a
    last result with a NaN/inf or an ``"error"`` — or ``interrupted``), ``status_reason`` (in
    ``mb.fit``'s words: ``non-finite loss (nan) at report 3``; the reason in a last result's
    ``"error"`` or ``"stopped"``, which a slot server gives a member that a ``mb.callbacks``
    callback ended; ``stopped by the scheduler at report 2``) and, with ``metric``, the
    metrics ``best_<metric>`` and ``best_iteration``. The parent run has ``params`` and, at the end,
    the metrics ``members``, ``members_finished``, ``members_stopped_early``, ``members_errored`` and
    ``best_<metric>`` (tag ``best_member``). A resumed sweep (``tune.run(resume=True)``) continues
    the same parent run and each member's child run: the callback's state, saved by Tune in the
    experiment folder, holds the runs' key. A trial stopped by the scheduler counts as
    ``finished`` if it met its ``stop`` criteria or reached ``max_iterations`` (default: the most
    iterations any trial of the sweep reached, e.g. ASHA's ``max_t``).

    Args:
        tracking_uri: ``None`` follows MLflow's default (``MLFLOW_TRACKING_URI``, else
            ``sqlite:///mlflow.db``); ``http://host:port`` logs to a tracking server.
        experiment_name: MLflow experiment (created if missing).
        metric, mode: the metric whose best value is tagged on each run and on the parent run.
        max_iterations: iterations after which a trial stopped by the scheduler counts as finished.
        log_artifacts: log each trial's last checkpoint directory as the artifact ``checkpoint``.
        member_name: a trial's child run name (default :func:`trial_name`).
        **kwargs: more :class:`modelbatch.MLflowLogger` arguments (``run_name``, ``parent_run_id``,
            ``tags``, ``params``, ``flush_interval``, ``close_timeout``, ``spill_path``,
            ``artifact_location``, ``tag_keys``: more result keys logged as member tags, besides
            ``MEMBER_TAG_KEYS`` and ``TUNE_TAG_KEYS``; ``sweep_key``: a key kept with the experiment,
            so that even a sweep restarted before Tune saved anything continues the same parent run;
            ``view_params``: save an MLflow UI view of the sweep with a parallel-coordinates plot of
            these config keys against ``best_<metric>``, opened by :meth:`view_url`).

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
        member_name: Callable[[Any], str] = trial_name,
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
        extra = self.logger_kwargs.get("tag_keys", ())  # a str: MLflowLogger says what is wrong
        tag_keys = (*MEMBER_TAG_KEYS, *TUNE_TAG_KEYS, *extra)
        self.logger_kwargs["tag_keys"] = extra if isinstance(extra, str) else tag_keys
        self.sweep_key = self.logger_kwargs.pop("sweep_key", None)
        MLflowLogger(**self.logger_kwargs)  # check the arguments now, not when the sweep starts
        self.member_name = member_name
        self.logger: MLflowLogger | None = None
        self.outcomes = TrialOutcomes(max_iterations)
        self._best: dict[str, tuple[float, int]] = {}  # of members ended, or known from a resumed state
        self._restored: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune may pickle callbacks; the logger holds a thread
        return {**self.__dict__, "logger": None}

    @property
    def tracking_uri(self) -> str | None:
        return self.logger.tracking_uri if self.logger else self.logger_kwargs["tracking_uri"]

    def view_url(self, ui: str | None = None) -> str | None:
        """The sweep's saved view in the MLflow UI (with ``view_params``; see ``MLflowLogger.view_url``)."""
        return self.logger.view_url(ui) if self.logger else None

    def get_state(self) -> dict[str, Any] | None:
        """What a resumed sweep needs (Tune saves it in the experiment folder): the runs' key, members."""
        if self.logger is None:
            return None
        best = {**self._best}
        for tid in self.outcomes.iterations:
            if self.logger.best(tid) is not None:
                best[tid] = self.logger.best(tid)
        return {"sweep_key": self.logger.sweep_key, **self.outcomes.get_state(), "best": best}

    def set_state(self, state: dict[str, Any]) -> None:
        """Called by Tune on resume, before :meth:`setup`."""
        self._restored = state

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        state = self._restored or {}
        self._restored = None
        self.logger = MLflowLogger(
            **{**self.logger_kwargs, "sweep_key": state.get("sweep_key", self.sweep_key)}
        )
        self.outcomes.set_state(state)
        self._best = dict(state.get("best", {}))
        self._started: set[str] = set()
        tags = {"num_samples": num_samples, "total_num_samples": total_num_samples}
        if stop is not None:
            tags["stop"] = stop
        self.logger.start(tags={k: v for k, v in tags.items() if v is not None})

    def _start(self, trial: Any) -> None:
        tid = trial.trial_id
        if tid not in self._started:  # new, or started before a resume: the same child run either way
            self._started.add(tid)
            self.outcomes.start(trial)
            self.logger.start_member(
                tid,
                member_config(trial),
                name=self.member_name(trial),
                tags={"trial_id": tid},
                best=self._best.get(tid),
            )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._start(trial)
        step = self.outcomes.report(trial, result)
        if step is not None:
            metrics, tags = split_result(result, self.logger.tag_keys)
            self.logger.log_member(trial.trial_id, metrics, step=step, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        status, reason = self.outcomes.complete(trial)
        self._log_checkpoint(trial)
        self._end(trial.trial_id, status, reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start(trial)
        self._log_checkpoint(trial)
        self._end(trial.trial_id, *self.outcomes.error(trial))

    def _end(self, tid: str, status: str, reason: str) -> None:
        self.logger.end_member(tid, status, reason)
        if self.logger.best(tid) is not None:
            self._best[tid] = self.logger.best(tid)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.logger is None:
            return
        interrupted = self.outcomes.interrupted(trials)
        for trial in interrupted:
            self._start(trial)  # a member started before a resume and not since: its run ends too
            self.logger.end_member(
                trial.trial_id, "interrupted", f"sweep ended with the trial {trial.status}"
            )
        statuses = self.outcomes.final_statuses()
        for tid, status in statuses.items():
            if status != self.outcomes.status[tid] and tid in self._started:
                reason = f"reached {self.outcomes.iterations[tid]} reports, the most"
                self.logger.retag_member(tid, status, reason)
        summary = self._summary([*statuses.values()])
        self.logger.close(status="interrupted" if interrupted else "finished", summary=summary)

    def _summary(self, counts: list[str]) -> dict[str, Any]:
        """The parent run's metrics over every member of the sweep (those of earlier sessions too)."""
        summary: dict[str, Any] = {
            "members": len(self.outcomes.iterations),
            "members_finished": counts.count("finished"),
            "members_stopped_early": counts.count("stopped early"),
            "members_errored": counts.count("errored"),
        }
        metric, mode = self.logger.metric, self.logger.mode
        if metric is not None and self._best:
            pick = min if mode == "min" else max
            tid = pick(self._best, key=lambda t: self._best[t][0])
            summary[f"best_{metric}"] = self._best[tid][0]
            summary["best_member"] = tid
        return summary

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
