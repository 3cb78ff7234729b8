"""MLflow logging of a sweep: one parent run, one child run per member; buffered, never blocking, lossless.

:class:`MLflowLogger` is the core shared by ``mb.fit(..., mlflow=...)`` and integrations' callbacks
(through :mod:`modelbatch.mlflow`, the public names of this module). The caller's thread only appends
to an in-memory queue (a few microseconds per report); a background thread turns the queue into
``MlflowClient.log_batch`` calls within MLflow's per-call limits (1000 metrics, 100 params, 100 tags;
see :func:`limits`). If the tracking server is unreachable or errors, the points stay queued and are
retried; if it never comes back, :meth:`close` writes what is left to a JSON-lines spill file and warns
with the command that replays it::

    python -m modelbatch.mlflow replay mlflow-spill-<id>.jsonl --tracking-uri http://host:5000

Runs: the parent run (one per sweep) carries the sweep's params and tags and, at the end, the
metrics ``members`` and ``best_<metric>`` (tag ``best_member``); each member's child run (tag
``mlflow.parentRunId``) has the member's config as params (nested keys flattened with ``/``,
truncated to MLflow's limits), every report as metrics at ``step=training_iteration``, the metrics
``best_<metric>`` and ``best_iteration`` (sortable in the runs table) and the tags ``status``
(``finished``, ``stopped early``, ``errored`` or ``interrupted``), ``status_reason`` and the member
tags it was given (``pack``, ``slot``, ``node``, ``signature``). A logger given the ``sweep_key`` of
an earlier one continues its runs (a resumed sweep: one parent run, one child run per member).

Example:
    >>> import tempfile, torch, modelbatch as mb
    >>> from mlflow import MlflowClient
    >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="adam",
    ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), val_data=(X, y),
    ...     batch_size=16, steps_per_report=4)
    >>> history = mb.fit(recipe, [{"lr": 1e-3}, {"lr": 1e-2}], reports=3, progress=False,
    ...     mlflow={"tracking_uri": uri, "experiment_name": "demo"})
    >>> client = MlflowClient(uri)
    >>> runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    >>> members = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    >>> len(runs), [r.data.tags["status"] for r in members]
    (3, ['finished', 'finished'])
    >>> [m.step for m in client.get_metric_history(members[0].info.run_id, "val_loss")]
    [1, 2, 3]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import collections
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ._architecture import pack_label
from .callbacks import Callback, Control

_log = logging.getLogger("modelbatch.mlflow")

RUN_KEY_TAG = "modelbatch.run_key"  # finds a run again after a create_run whose answer was lost
MEMBER_TAG_KEYS = ("pack", "slot", "node", "signature")  # the member tags mb.fit sets (start_member)
SPILL_FORMAT = "modelbatch-mlflow-spill/1"
REPLAY_COMMAND = "python -m modelbatch.mlflow replay"
# member status -> MLflow run status
RUN_STATUS = {
    "finished": "FINISHED",
    "stopped early": "FINISHED",
    "errored": "FAILED",
    "interrupted": "KILLED",
}
# errors that retrying the same request cannot fix: that chunk is kept aside for the spill file
_PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
}
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the MLflow UI's saved views: experiment tags (MLflow 3.x)


# ---------------------------------------------------------------------------- values and keys
class Limits(NamedTuple):
    """MLflow's limits on one ``log_batch`` call and on keys and values (see :func:`limits`)."""

    metrics_per_batch: int
    params_tags_per_batch: int
    entities_per_batch: int
    request_bytes: int
    key_length: int
    param_value_length: int
    tag_value_length: int


@functools.cache
def limits() -> Limits:
    """MLflow's own limits, read from ``mlflow.utils.validation`` on first use (importing mlflow takes
    seconds; ``import modelbatch`` does not pay them).

    Example:
        >>> limits().metrics_per_batch, limits().key_length
        (1000, 250)
    """
    from mlflow.utils import validation as v

    return Limits(
        metrics_per_batch=v.MAX_METRICS_PER_BATCH,
        params_tags_per_batch=v.MAX_PARAMS_TAGS_PER_BATCH,
        entities_per_batch=v.MAX_ENTITIES_PER_BATCH,
        request_bytes=int(0.9 * v.MAX_BATCH_LOG_REQUEST_SIZE),  # room for what _chunk's estimate misses
        key_length=v.MAX_ENTITY_KEY_LENGTH,
        param_value_length=v.MAX_PARAM_VAL_LENGTH,
        tag_value_length=v.MAX_TAG_VAL_LENGTH,
    )


def clean_key(key: Any) -> str:
    """A valid MLflow metric/param/tag name: allowed characters only, no empty or dot path parts, ≤250 chars.

    Example:
        >>> clean_key("val/acc@top:1"), clean_key("a//b/"), clean_key("x" * 300) == "x" * 250
        ('val/acc_top_1', 'a/_/b/_', True)
    """
    text = _BAD_KEY_CHARS.sub("_", str(key))
    text = "/".join(p if p not in ("", ".", "..") else "_" for p in text.split("/"))
    return text[: limits().key_length]


def flatten(mapping: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts as one flat dict with ``sep``-joined keys (``{"a": {"b": 1}}`` -> ``{"a/b": 1}``).

    Example:
        >>> flatten({"lr": 0.1, "net": {"width": 64, "act": {"name": "relu"}}})
        {'lr': 0.1, 'net/width': 64, 'net/act/name': 'relu'}
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def _truncate(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_value(value: Any) -> str:
    return _truncate(value, limits().param_value_length)


def _tag_value(value: Any) -> str:
    return _truncate(value, limits().tag_value_length)


def is_number(value: Any) -> bool:
    """Whether ``value`` is logged as a metric: a real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def member_status(reason: str) -> str:
    """The status tag for an ``mb.fit`` stop reason: ``finished``, ``stopped early`` or ``errored``.

    Example:
        >>> member_status("finished"), member_status("early stopped: ..."), member_status("errored: nan")
        ('finished', 'stopped early', 'errored')
    """
    if reason in RUN_STATUS:
        return reason
    if reason.startswith("errored"):
        return "errored"
    return "stopped early"


def _now_ms() -> int:
    return int(time.time() * 1000)


def sweep_view(
    name: str, run_key_prefix: str, params: Sequence[str], metric: str, mode: str, created_ms: int
) -> str:
    """An MLflow UI saved view (the value of a ``mlflow.sharedViewState.<id>`` experiment tag).

    It shows the runs whose ``modelbatch.run_key`` starts with ``run_key_prefix`` (a sweep's members),
    best ``best_<metric>`` first with that metric and ``params`` as columns, and one chart section: a
    parallel-coordinates plot of ``params`` against ``best_<metric>`` over all those runs, and the
    members' ``metric`` curves by step. The format is the one the UI of MLflow 3.17 writes when a user
    saves a view (compressed JSON, ``deflate;`` + base64); older UIs do not list saved views.
    """
    section, best = "modelbatch-sweep", f"best_{metric}"
    chart = {"runsCountToCompare": 1000, "metricSectionId": section, "deleted": False, "isGenerated": False}
    charts = [
        {"uuid": "modelbatch-parallel", "type": "PARALLEL", **chart, "showAllRuns": True,
         "selectedParams": list(params), "selectedMetrics": [best]},
        {"uuid": "modelbatch-curve", "type": "LINE", **chart, "displayName": metric, "metricKey": metric,
         "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "range": {},
         "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
         "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True},
    ]  # fmt: skip
    state = {
        "searchFilter": f"tags.`{RUN_KEY_TAG}` LIKE '{run_key_prefix}%'",
        "orderByKey": f"metrics.`{best}`",
        "orderByAsc": mode == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{best}`", *(f"params.`{p}`" for p in params), "tags.`status`"],
        "runsHiddenMode": "SHOWALL",
        "compareRunCharts": charts,
        "compareRunSections": [
            {"uuid": section, "name": name, "display": True, "isReordered": False, "deleted": False}
        ],
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    packed = zlib.compress(json.dumps(state, separators=(",", ":")).encode())
    blob = "deflate;" + base64.b64encode(packed).decode("ascii")
    return json.dumps({"name": name, "createdAt": created_ms, "updatedAt": created_ms, "state": blob})


# ---------------------------------------------------------------------------- the writer (any thread)
@dataclass
class _Run:
    """A run and what is still to be written to it; a row of the spill file."""

    key: str
    name: str | None
    parent: str | None = None  # key of the parent run
    start_time: int = field(default_factory=_now_ms)
    run_id: str | None = None
    owned: bool = True  # False for a parent run given by the user: never created nor terminated here
    create_attempted: bool = False
    reopen: bool = False  # a resumed sweep's run: found by its key tag and set RUNNING again
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    artifacts: list[tuple[str, str | None, bool]] = field(default_factory=list)  # path, artifact dir, delete
    status: str | None = None  # pending MLflow status to set at the end
    end_time: int | None = None

    def pending(self) -> bool:
        return bool(
            (self.owned and self.run_id is None)
            or self.params
            or self.tags
            or self.metrics
            or self.artifacts
            or self.status
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "parent": self.parent,
            "start_time": self.start_time,
            "run_id": self.run_id,
            "owned": self.owned,
            "params": self.params,
            "tags": self.tags,
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "status": self.status,
            "end_time": self.end_time,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> _Run:
        run = cls(key=row["key"], name=row.get("name"), parent=row.get("parent"))
        run.start_time, run.run_id, run.owned = row["start_time"], row.get("run_id"), row.get("owned", True)
        run.create_attempted = True  # it may exist already: look it up by its key tag first
        run.params, run.tags = dict(row.get("params", {})), dict(row.get("tags", {}))
        run.metrics = [tuple(m) for m in row.get("metrics", [])]
        run.artifacts = [tuple(a) for a in row.get("artifacts", [])]
        run.status, run.end_time = row.get("status"), row.get("end_time")
        return run


class _Aborted(Exception):
    pass


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


class _Writer:
    """Writes the pending state of runs to MLflow; every call is retried safely (idempotent) on failure.

    Only the flushing thread calls :meth:`flush`; other threads touch ``runs`` under ``lock``.
    """

    def __init__(self, tracking_uri: str, experiment_name: str | None, artifact_location: str | None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.experiment_id: str | None = None
        self.runs: dict[str, _Run] = {}
        self.experiment_tags: dict[str, str] = {}  # to set on the experiment (the sweep's saved view)
        self.rejected: list[tuple[_Run, str]] = []  # chunks MLflow refused, with the reason
        self.lock = threading.Lock()
        self.connections = 4 if tracking_uri.startswith(("http://", "https://")) else 1  # sqlite: one writer

    def resolve_experiment(self) -> str:
        if self.experiment_id is not None:
            return self.experiment_id
        name = self.experiment_name
        if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            self.experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
            return self.experiment_id
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    name, artifact_location=self.artifact_location
                )
            except Exception as exc:  # created meanwhile by someone else
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise RuntimeError(
                    f"mb.MLflowLogger: experiment {name!r} is deleted; restore it "
                    "(mlflow experiments restore) or pass another experiment_name."
                )
            self.experiment_id = experiment.experiment_id
        self.experiment_name = name
        return self.experiment_id

    def flush(self, check: Callable[[], None] = lambda: None) -> None:
        """Write everything pending; raises on the first transient failure (nothing is dropped).

        The sweep run goes first (members need its id); against a tracking server, members are
        written by ``connections`` threads at once: a server's latency, not its work, dominates.
        """
        with self.lock:
            runs = [r for r in self.runs.values() if r.pending()]
            experiment_tags = dict(self.experiment_tags)
        for key, value in experiment_tags.items():
            check()
            self.client.set_experiment_tag(self.resolve_experiment(), key, value)
            with self.lock:
                if self.experiment_tags.get(key) is value:
                    del self.experiment_tags[key]
        first, members = [r for r in runs if r.parent is None], [r for r in runs if r.parent is not None]
        self._flush_runs(first, check)
        width = min(self.connections, len(members))
        if width <= 1:
            self._flush_runs(members, check)
            return
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._flush_runs, args=(members[i::width], check, errors), daemon=True)
            for i in range(width)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _flush_runs(self, runs: list[_Run], check: Callable[[], None], errors: list | None = None) -> None:
        try:
            for run in runs:
                check()
                self._flush_run(run, check)
        except BaseException as exc:
            if errors is None:
                raise
            errors.append(exc)

    def _flush_run(self, run: _Run, check: Callable[[], None]) -> None:
        if run.run_id is None:
            if not run.owned:
                return
            self._create(run)
        while True:
            check()
            with self.lock:
                metrics, params, tags = self._chunk(run)
            if not (metrics or params or tags):
                break
            if not self._send(run, metrics, params, tags):
                continue
            with self.lock:
                del run.metrics[: len(metrics)]
                for k, v in params:
                    if run.params.get(k) is v:
                        del run.params[k]
                for k, v in tags:
                    if run.tags.get(k) is v:
                        del run.tags[k]
        while run.artifacts:
            check()
            path, artifact_path, delete = run.artifacts[0]
            if os.path.isdir(path):
                self.client.log_artifacts(run.run_id, path, artifact_path)
            elif os.path.exists(path):
                self.client.log_artifact(run.run_id, path, artifact_path)
            else:
                _log.warning(
                    "mb.MLflowLogger: artifact %s of run %s does not exist; skipped.", path, run.name
                )
            with self.lock:
                run.artifacts.pop(0)
            if delete:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(True)
        if run.status:
            check()
            if run.owned:
                self._terminate(run.run_id, run.status, run.end_time)
            with self.lock:
                run.status = None

    def _terminate(self, run_id: str, status: str, end_time: int | None) -> None:
        """``set_terminated`` without its extra get_run and its "View run at" line on stdout per run."""
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        if store is None or not hasattr(store, "update_run_info"):  # pragma: no cover - other MLflow versions
            self.client.set_terminated(run_id, status, end_time=end_time)
            return
        from mlflow.entities import RunStatus

        store.update_run_info(
            run_id, run_status=RunStatus.from_string(status), end_time=end_time, run_name=None
        )

    def _reopen(self, run_id: str) -> None:
        """A run ended by an interrupted session back to RUNNING (no end time) for the resumed one."""
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        if store is None or not hasattr(store, "update_run_info"):  # pragma: no cover - other MLflow versions
            self.client.update_run(run_id, status="RUNNING")
            return
        from mlflow.entities import RunStatus

        store.update_run_info(run_id, run_status=RunStatus.RUNNING, end_time=None, run_name=None)

    def _send(self, run: _Run, metrics: list, params: list, tags: list) -> bool:
        """One log_batch call; a refusal that no retry can fix puts the chunk aside (spilled at close)."""
        from mlflow.entities import Metric, Param, RunTag

        try:
            self.client.log_batch(
                run.run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in tags],
                synchronous=True,
            )
            return True
        except Exception as exc:
            if _error_code(exc) not in _PERMANENT_ERRORS:
                raise
            aside = _Run(key=run.key, name=run.name, parent=run.parent, run_id=run.run_id, owned=False)
            aside.metrics, aside.params, aside.tags = list(metrics), dict(params), dict(tags)
            with self.lock:
                self.rejected.append((aside, str(exc)))
                del run.metrics[: len(metrics)]
                for k, _ in params:
                    run.params.pop(k, None)
                for k, _ in tags:
                    run.tags.pop(k, None)
            _log.warning(
                "mb.MLflowLogger: MLflow refused a batch of run %s (%s); kept for the spill file.",
                run.name,
                exc,
            )
            return False

    @staticmethod
    def _chunk(run: _Run) -> tuple[list, list, list]:
        """The next log_batch call's content: within MLflow's count and request-size limits."""
        limit = limits()
        budget, room = limit.request_bytes, limit.entities_per_batch
        metrics = []
        for m in run.metrics[: limit.metrics_per_batch]:
            budget -= len(m[0]) + 90
            if budget < 0:
                break
            metrics.append(m)
        room -= len(metrics)
        out: list[list] = [metrics]
        for items in (run.params, run.tags):
            chosen = []
            for k, v in items.items():
                if len(chosen) >= min(limit.params_tags_per_batch, room):
                    break
                budget -= len(k) + len(v) + 40
                if budget < 0:
                    break
                chosen.append((k, v))
            room -= len(chosen)
            out.append(chosen)
        return out[0], out[1], out[2]

    def _create(self, run: _Run) -> None:
        experiment_id = self.resolve_experiment()
        if run.create_attempted:  # a lost answer, or an earlier session, may have created it
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run.key}'", max_results=1
            )
            if found:
                run.run_id = found[0].info.run_id
                if run.reopen and found[0].info.status != "RUNNING":
                    self._reopen(run.run_id)
                return
        tags = {RUN_KEY_TAG: run.key}
        if run.parent is not None:
            parent = self.runs.get(run.parent)
            if parent is None or parent.run_id is None:
                raise RuntimeError(f"mb.MLflowLogger: parent of run {run.name!r} does not exist yet.")
            tags["mlflow.parentRunId"] = parent.run_id
        run.create_attempted = True
        created = self.client.create_run(
            experiment_id, start_time=run.start_time, tags=tags, run_name=run.name
        )
        run.run_id = created.info.run_id

    def snapshot(self) -> list[dict[str, Any]]:
        """Every run with something unwritten (and the parents they need), as spill rows."""
        with self.lock:
            rows, needed = [], set()
            for run, _ in self.rejected:
                needed.add(run.key)
            for run in self.runs.values():
                if run.pending():
                    needed.add(run.key)
            for run in self.runs.values():
                if run.key in needed and run.parent is not None:
                    needed.add(run.parent)
            for run in self.runs.values():
                if run.key in needed:
                    rows.append(run.to_json())
            for run, reason in self.rejected:
                rows.append({**run.to_json(), "rejected": reason})
            return rows


# ---------------------------------------------------------------------------- the logger (caller's thread)
@dataclass
class _Member:
    key: str
    best: float | None = None
    best_step: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    ended: bool = False


class MLflowLogger:
    """Log a sweep to MLflow: one parent run, one child run per member; buffered and failure-tolerant.

    The calling thread only queues; a background thread writes with ``MlflowClient.log_batch``
    every ``flush_interval`` seconds. Use one logger for one sweep: :meth:`start`, then per member
    :meth:`start_member`, :meth:`log_member` (each report), :meth:`end_member`; :meth:`close` at the end
    flushes everything (waiting at most ``close_timeout`` seconds for an unreachable server) and
    otherwise writes a spill file, which ``python -m modelbatch.mlflow replay FILE`` replays.

    Args:
        tracking_uri: MLflow tracking URI; ``None`` follows MLflow's own default
            (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). ``http://host:port`` for a server.
        experiment_name: created if missing; ``None``: ``MLFLOW_EXPERIMENT_NAME``/``_ID``, else ``Default``.
        run_name: name of the parent run (default ``"<experiment>-<date>"``).
        parent_run_id: nest the members under this existing run instead of a new parent run.
        tags: extra tags of the parent run.
        params: params of the parent run (e.g. the search space, the searcher); flattened like configs.
        metric, mode: the metric whose best value each member and the parent log (``best_<metric>``).
        sweep_key: continue the sweep of an earlier logger (its :attr:`sweep_key`): its parent run and
            the child run of each member started again are found and reopened instead of created.
        log_artifacts: log per-member artifacts (``mb.fit``: the final state_dict).
        flush_interval: seconds between background writes.
        close_timeout: seconds :meth:`close` waits for an unreachable server before spilling.
        spill_path: where to write what could not be logged (default ``./mlflow-spill-<id>.jsonl``).
        artifact_location: artifact root of the experiment if this logger creates it.
        view_params: with ``metric``, save an MLflow UI view of this sweep (experiment tag
            ``mlflow.sharedViewState.<id>``; in the UI's *Views* menu, named after the parent run):
            the members only, best ``best_<metric>`` first, and a parallel-coordinates plot of these
            params (e.g. the searched ones) against ``best_<metric>``. :meth:`view_url` opens it.
        tag_keys: report keys that :meth:`log_member` logs as member tags, not metrics (default none):
            e.g. :data:`MEMBER_TAG_KEYS` (``pack``, ``slot``, ``node``, ``signature``), for an
            integration whose reports carry them, and that integration's own.

    Example:
        >>> import tempfile, modelbatch as mb
        >>> from mlflow import MlflowClient
        >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        >>> logger = mb.MLflowLogger(uri, "manual", metric="loss", mode="min")
        >>> logger.start()
        >>> logger.start_member("a", {"lr": 0.1, "net": {"width": 8}}, tags={"slot": 0})
        >>> for it, loss in enumerate([0.9, 0.5, 0.7], start=1):
        ...     logger.log_member("a", {"loss": loss}, step=it)
        >>> logger.end_member("a", "stopped early", reason="patience")
        >>> logger.close()
        >>> run = MlflowClient(uri).get_run(logger.run_id("a"))
        >>> run.data.params, run.data.metrics["best_loss"], run.data.tags["status"], run.info.status
        ({'lr': '0.1', 'net/width': '8'}, 0.5, 'stopped early', 'FINISHED')
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        metric: str | None = None,
        mode: str = "min",
        log_artifacts: bool = False,
        flush_interval: float = 1.0,
        close_timeout: float = 60.0,
        spill_path: str | os.PathLike | None = None,
        artifact_location: str | None = None,
        sweep_key: str | None = None,
        view_params: Sequence[str] | None = None,
        tag_keys: Sequence[str] = (),
    ) -> None:
        api = "mb.MLflowLogger"
        if mode not in ("min", "max"):
            raise ValueError(f"{api}: mode must be 'min' or 'max', got {mode!r}.")
        if view_params is not None and (metric is None or isinstance(view_params, str)):
            raise ValueError(
                f"{api}: view_params must be a list of param names and needs metric=... (the plot's "
                f"axis), got view_params={view_params!r}, metric={metric!r}."
            )
        if isinstance(tag_keys, str):
            raise TypeError(f"{api}: tag_keys must be a list of report keys, got {tag_keys!r}.")
        if not flush_interval > 0 or not close_timeout >= 0:
            raise ValueError(f"{api}: flush_interval must be > 0 and close_timeout >= 0.")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.params = dict(params or {})
        self.metric, self.mode = metric, mode
        self.log_artifacts = log_artifacts
        self.flush_interval, self.close_timeout = flush_interval, close_timeout
        self.resumed = sweep_key is not None
        self.sweep_key = sweep_key or uuid.uuid4().hex
        self.spill_path = (
            Path(spill_path) if spill_path else Path.cwd() / f"mlflow-spill-{self.sweep_key[:8]}.jsonl"
        )
        self.artifact_location = artifact_location
        self.view_params = None if view_params is None else [clean_key(p) for p in view_params]
        self.tag_keys = tuple(dict.fromkeys(tag_keys))
        self.view_id = "modelbatch" + hashlib.sha1(self.sweep_key.encode()).hexdigest()[:16]
        self._members: dict[Any, _Member] = {}
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._state = "new"
        self._writer: _Writer | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._best: tuple[float, Any] | None = None
        self._spilled: Path | None = None

    def __repr__(self) -> str:
        return f"MLflowLogger(tracking_uri={self.tracking_uri!r}, experiment_name={self.experiment_name!r})"

    # -- driver API ------------------------------------------------------------------------
    def start(self, tags: Mapping[str, Any] | None = None) -> None:
        """Start the sweep: its parent run (created in the background) and the writer thread."""
        if self._state != "new":
            raise RuntimeError("mb.MLflowLogger.start: this logger already ran a sweep; create a new one.")
        import mlflow

        self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()
        self._writer = _Writer(self.tracking_uri, self.experiment_name, self.artifact_location)
        name = self.run_name or f"{self.experiment_name or 'sweep'}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = _Run(key=self.sweep_key, name=name, create_attempted=self.resumed, reopen=self.resumed)
        if self.parent_run_id is not None:
            parent.run_id, parent.owned = self.parent_run_id, False
        parent.params = {clean_key(k): _param_value(v) for k, v in flatten(self.params).items()}
        parent.tags = {clean_key(k): _tag_value(v) for k, v in {**self.tags, **(tags or {})}.items()}
        self._writer.runs[parent.key] = parent
        if self.view_params is not None:
            view = sweep_view(name, f"{self.sweep_key}-", self.view_params, self.metric, self.mode, _now_ms())
            self._writer.experiment_tags[VIEW_TAG_PREFIX + self.view_id] = view
        self._state = "running"
        self._thread = threading.Thread(target=self._work, name="modelbatch-mlflow", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda s: s is not None and s._at_exit())(ref())
        atexit.register(self._atexit)

    def start_member(
        self,
        member_id: Any,
        config: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        best: tuple[float, int] | None = None,
    ) -> None:
        """Open the child run of ``member_id`` with its config as params (flattened, truncated).

        ``best``: the ``(value, step)`` of its best ``metric`` logged before (a resumed member).
        """
        self._check_running("start_member")
        if member_id in self._members:
            return
        digest = hashlib.sha1(repr(member_id).encode()).hexdigest()[:16]  # the same in a resumed sweep
        member = self._members[member_id] = _Member(key=f"{self.sweep_key}-{digest}")
        if best is not None:
            member.best, member.best_step = float(best[0]), int(best[1])
        params = {clean_key(k): _param_value(v) for k, v in flatten(config or {}).items()}
        member_tags = {clean_key(k): _tag_value(v) for k, v in (tags or {}).items()}
        member.tags.update(member_tags)
        self._put(("start", member.key, name or str(member_id), params, member_tags, _now_ms()))

    def log_member(
        self,
        member_id: Any,
        metrics: Mapping[str, Any],
        step: int,
        *,
        tags: Mapping[str, Any] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue one report of ``member_id``: every real-number value as a metric at ``step``, the
        values of :attr:`tag_keys` as member tags (with ``tags``)."""
        member = self._members.get(member_id)
        if member is None or self._state != "running":
            self.start_member(member_id)  # raises after close()
            member = self._members[member_id]
        found = [k for k in self.tag_keys if k in metrics]
        if found:
            tags = {**{k: metrics[k] for k in found}, **(tags or {})}
            metrics = {k: v for k, v in metrics.items() if k not in found}
        ts = _now_ms() if timestamp_ms is None else timestamp_ms
        step = int(step)
        points = [(_key(k), float(v), ts, step) for k, v in metrics.items() if is_number(v)]
        if self.metric is not None:
            value = metrics.get(self.metric)
            if is_number(value) and math.isfinite(value):
                better = member.best is None or (
                    value < member.best if self.mode == "min" else value > member.best
                )
                if better:
                    member.best, member.best_step = float(value), step
        if tags:
            self.set_member_tags(member_id, tags)
        self._inbox.append(("metrics", member.key, points))
        if len(self._inbox) > 20_000:
            self._wake.set()

    def set_member_tags(self, member_id: Any, tags: Mapping[str, Any]) -> None:
        """Set tags of ``member_id``'s run (only changed values are sent)."""
        member = self._members[member_id]
        changed = {}
        for k, v in tags.items():
            value = _tag_value(v)
            key = _key(k)
            if member.tags.get(key) != value:
                member.tags[key] = changed[key] = value
        if changed:
            self._inbox.append(("tags", member.key, changed))

    def log_member_artifact(
        self,
        member_id: Any,
        path: str | os.PathLike,
        artifact_path: str | None = None,
        *,
        delete: bool = False,
    ) -> None:
        """Upload a file or directory into ``member_id``'s run (in the background; ``delete`` it after)."""
        self._put(("artifact", self._members[member_id].key, os.fspath(path), artifact_path, delete))

    def end_member(
        self,
        member_id: Any,
        status: str = "finished",
        reason: str | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Close ``member_id``'s run as ``finished``, ``stopped early``, ``errored`` or ``interrupted``."""
        if status not in RUN_STATUS:
            raise ValueError(
                f"mb.MLflowLogger.end_member: status must be one of {sorted(RUN_STATUS)}, got {status!r}."
            )
        member = self._members.get(member_id)
        if member is None or member.ended:
            return
        member.ended = True
        final = {"status": status, "status_reason": reason or status, **(tags or {})}
        if member.best is not None:
            best = {f"best_{self.metric}": member.best, "best_iteration": member.best_step}
            self._inbox.append(
                ("metrics", member.key, [(k, float(v), _now_ms(), member.best_step) for k, v in best.items()])
            )
            better = self._best is None or (
                member.best < self._best[0] if self.mode == "min" else member.best > self._best[0]
            )
            if better:
                self._best = (member.best, member_id)
        self.set_member_tags(member_id, final)
        self._put(("end", member.key, RUN_STATUS[status], _now_ms()))

    def retag_member(self, member_id: Any, status: str, reason: str | None = None) -> None:
        """Change the status tag of an ended member (e.g. once the sweep knows it ran to the end)."""
        self.set_member_tags(member_id, {"status": status, "status_reason": reason or status})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is in MLflow; ``False`` if ``timeout`` passed first."""
        if self._state != "running":
            return self._spilled is None
        done = threading.Event()
        self._put(("flush", done))
        return done.wait(timeout)

    def best(self, member_id: Any) -> tuple[float, int] | None:
        """``(value, step)`` of ``member_id``'s best ``metric`` so far (``None``: none yet)."""
        member = self._members.get(member_id)
        return None if member is None or member.best is None else (member.best, member.best_step)

    def close(
        self,
        status: str = "finished",
        timeout: float | None = None,
        *,
        summary: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """End the sweep: members still open end with ``status``; flush; spill what the server did not take.

        The parent run gets the metrics ``members`` and ``best_<metric>``, the tag ``best_member``,
        and ``summary`` (numbers as metrics, anything else as tags; they replace those computed here).
        Returns the spill file's path if one was written, else ``None``.
        """
        if status not in RUN_STATUS:
            raise ValueError(
                f"mb.MLflowLogger.close: status must be one of {sorted(RUN_STATUS)}, got {status!r}."
            )
        if self._state != "running":
            return None
        for member_id, member in self._members.items():
            if not member.ended:
                self.end_member(member_id, status)
        final: dict[str, Any] = {"members": len(self._members), "status": status}
        if self._best is not None:
            final[f"best_{self.metric}"] = self._best[0]
            final["best_member"] = str(self._best[1])
        final.update(summary or {})
        ts = _now_ms()
        points = [(_key(k), float(v), ts, 0) for k, v in final.items() if is_number(v)]
        tags = {_key(k): _tag_value(v) for k, v in final.items() if not is_number(v)}
        self._put(("metrics", self.sweep_key, points))
        self._put(("tags", self.sweep_key, tags))
        self._put(("end", self.sweep_key, RUN_STATUS[status], _now_ms()))
        ok = self.flush(self.close_timeout if timeout is None else timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0 if ok else 1.0)
        self._state = "closed"
        atexit.unregister(self._atexit)
        rows = self._writer.snapshot()
        if rows:
            self._spilled = self._write_spill(rows)
            warnings.warn(
                f"mb.MLflowLogger: {self._describe(rows)} could not be logged to {self.tracking_uri} "
                f"({self._error or 'MLflow refused them'}); kept in {self._spilled}. Replay them with: "
                f"{REPLAY_COMMAND} {self._spilled} --tracking-uri {self.tracking_uri}",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._spilled

    def view_url(self, ui: str | None = None) -> str | None:
        """The address of this sweep's saved view (``view_params``) in the MLflow UI at ``ui``
        (default: the tracking server, or ``http://127.0.0.1:5000`` of ``mlflow ui``); ``None``
        before the experiment is known (its first write) or without ``view_params``."""
        experiment_id = self._writer.experiment_id if self._writer else None
        if self.view_params is None or experiment_id is None:
            return None
        if ui is None:
            remote = str(self.tracking_uri).startswith(("http://", "https://"))
            ui = str(self.tracking_uri) if remote else "http://127.0.0.1:5000"
        query = f"viewStateShareKey={self.view_id}&compareRunsMode=CHART&workflowType=machine_learning"
        return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"

    def run_id(self, member_id: Any | None = None) -> str | None:
        """The MLflow run id of ``member_id`` (``None``: the parent run) once created."""
        key = self.sweep_key if member_id is None else self._members[member_id].key
        run = self._writer.runs.get(key) if self._writer else None
        return None if run is None else run.run_id

    # -- background -----------------------------------------------------------------------
    def _check_running(self, api: str) -> None:
        if self._state != "running":
            raise RuntimeError(f"mb.MLflowLogger.{api}: call start() first (and not after close()).")

    def _put(self, item: tuple) -> None:
        self._inbox.append(item)
        if item[0] in ("flush", "end"):
            self._wake.set()

    def _drain(self) -> list[threading.Event]:
        writer, events = self._writer, []
        with writer.lock:
            while self._inbox:
                item = self._inbox.popleft()
                kind = item[0]
                if kind == "metrics":
                    writer.runs[item[1]].metrics.extend(item[2])
                elif kind == "tags":
                    writer.runs[item[1]].tags.update(item[2])
                elif kind == "start":
                    _, key, name, params, tags, ts = item
                    writer.runs[key] = _Run(
                        key=key,
                        name=name,
                        parent=self.sweep_key,
                        start_time=ts,
                        create_attempted=self.resumed,
                        reopen=self.resumed,
                    )
                    writer.runs[key].params.update(params)
                    writer.runs[key].tags.update(tags)
                elif kind == "artifact":
                    writer.runs[item[1]].artifacts.append(item[2:])
                elif kind == "end":
                    writer.runs[item[1]].status, writer.runs[item[1]].end_time = item[2], item[3]
                elif kind == "flush":
                    events.append(item[1])
        return events

    def _check(self) -> None:
        if self._stop and self._error is not None:
            raise _Aborted

    def _work(self) -> None:
        backoff = 0.0
        waiting: list[threading.Event] = []
        while True:
            self._wake.wait(max(self.flush_interval, backoff))
            self._wake.clear()
            try:
                waiting += self._drain()
                self._writer.flush(self._check)
            except _Aborted:
                return
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                if message != self._error:
                    _log.warning(
                        "mb.MLflowLogger: writing to %s failed, will retry: %s", self.tracking_uri, message
                    )
                self._error = message
                backoff = min(max(2 * backoff, 0.5), 5.0)
                if self._stop:
                    return
                continue
            self._error, backoff = None, 0.0
            for event in waiting:
                event.set()
            waiting = []
            if self._stop and not self._inbox:
                return

    def _at_exit(self) -> None:
        if self._state == "running":
            self.close(status="interrupted")

    def _write_spill(self, rows: list[dict[str, Any]]) -> Path:
        header = {
            "format": SPILL_FORMAT,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self._writer.experiment_name,
            "artifact_location": self.artifact_location,
        }
        path = self.spill_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in [header, *rows]:
                f.write(json.dumps(row) + "\n")
        return path

    @staticmethod
    def _describe(rows: list[dict[str, Any]]) -> str:
        points = sum(len(r["metrics"]) for r in rows)
        return f"{points} metric points of {len(rows)} runs"


_KEYS: dict[str, str] = {}


def _key(key: str) -> str:
    """clean_key, memoized: the driver's per-report cost stays a dict lookup."""
    cleaned = _KEYS.get(key)
    if cleaned is None:
        cleaned = clean_key(key)
        if len(_KEYS) < 100_000:
            _KEYS[key] = cleaned
    return cleaned


# ---------------------------------------------------------------------------- replay
def replay(path: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, str]:
    """Write a spill file of :class:`MLflowLogger` into MLflow; returns ``{run name: run id}``.

    Runs that exist already (same run id, or found by their ``modelbatch.run_key`` tag) are continued;
    points logged twice are stored once. ``tracking_uri`` defaults to the one recorded in the file.
    """
    return _replay(path, tracking_uri, "modelbatch.mlflow.replay")


def _replay(path: str | os.PathLike, tracking_uri: str | None, api: str) -> dict[str, str]:
    """:func:`replay`, its errors starting with ``api`` (the function's name, or the command's)."""
    lines = Path(path).read_text().splitlines()
    if not lines or json.loads(lines[0]).get("format") != SPILL_FORMAT:
        raise ValueError(f"{api}: {path} is not a spill file of modelbatch's MLflowLogger.")
    header = json.loads(lines[0])
    writer = _Writer(
        tracking_uri or header["tracking_uri"], header["experiment_name"], header["artifact_location"]
    )
    experiment_id = writer.resolve_experiment()
    for line in lines[1:]:
        row = json.loads(line)
        run = _Run.from_json(row)
        known = writer.runs.get(run.key)
        if known is not None:  # a chunk MLflow refused before: append it to its run
            known.metrics += run.metrics
            known.params.update(run.params)
            known.tags.update(run.tags)
            continue
        if run.run_id is not None:
            try:
                info = writer.client.get_run(run.run_id).info
                run.owned = run.owned or info.experiment_id == experiment_id
            except Exception:
                run.run_id, run.owned = None, True  # another store: create it anew
        writer.runs[run.key] = run
    writer.flush()
    return {run.name or run.key: run.run_id for run in writer.runs.values()}


def main(argv: list[str] | None = None) -> int:
    """``replay SPILL.jsonl [--tracking-uri URI]``: log a spill file into MLflow."""
    parser = argparse.ArgumentParser(
        prog=REPLAY_COMMAND.rsplit(" ", 1)[0], description="Log a spill file of MLflowLogger into MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("replay", help="log a spill file written by MLflowLogger into MLflow")
    rep.add_argument("spill", help="the .jsonl spill file")
    rep.add_argument("--tracking-uri", default=None, help="default: the tracking URI recorded in the file")
    args = parser.parse_args(argv)
    runs = _replay(args.spill, args.tracking_uri, REPLAY_COMMAND)
    print(f"replayed {len(runs)} runs from {args.spill}")
    return 0


# ---------------------------------------------------------------------------- mb.fit
class MLflowFitCallback(Callback):
    """``mb.fit``'s side of :class:`MLflowLogger`: members are the child runs of one parent run."""

    def __init__(self, logger: MLflowLogger) -> None:
        self.logger = logger
        self.configs: Mapping[Any, Mapping[str, Any]] = {}
        self.trainer: Any = None
        self.packs = 0
        self.node = socket.gethostname()
        self.tmp: str | None = None

    def on_fit_start(self, configs: Mapping[Any, Mapping[str, Any]]) -> None:
        self.configs = configs
        self.logger.start(tags={"members_planned": len(configs)})

    def on_pack_start(self, trainer: Any) -> None:
        """Called by ``mb.fit`` when a pack (a PackTrainer) starts: its signature and slots become tags."""
        self.trainer, self.packs = trainer, self.packs + 1

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        logger = self.logger
        if logger.metric is None and reports:
            logger.metric = "val_loss" if "val_loss" in next(iter(reports.values())) else "loss"
        for member_id, report in reports.items():
            if member_id not in logger._members:
                logger.start_member(
                    member_id,
                    self.configs.get(member_id, {}),
                    name=f"member-{member_id}",
                    tags=self._tags(member_id),
                )
            logger.log_member(
                member_id,
                {k: v for k, v in report.items() if k not in ("training_iteration", "step")},
                step=report.get("training_iteration", 0),
            )

    def _tags(self, member_id: Any) -> dict[str, Any]:
        tags: dict[str, Any] = {"node": self.node, "member": member_id}
        if self.trainer is not None:
            tags.update(
                pack=f"pack-{self.packs - 1}",
                signature=pack_label(self.trainer.signature),  # the results' "pack" column
                slot=self.trainer.slot_of(member_id),
            )
        return tags

    def on_member_stop(self, member_id: Any, reason: str, last_report: Mapping[str, float] | None) -> None:
        if member_id not in self.logger._members:
            return
        if self.logger.log_artifacts and self.trainer is not None:
            self._log_state_dict(member_id)
        self.logger.end_member(member_id, member_status(reason), reason)

    def _log_state_dict(self, member_id: Any) -> None:
        import torch

        try:
            slot = self.trainer.slot_of(member_id)
        except KeyError:
            return
        self.tmp = self.tmp or tempfile.mkdtemp(prefix="modelbatch-mlflow-")
        path = Path(self.tmp) / f"member-{member_id}" / "state_dict.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.trainer.batch.member(slot).state_dict(), path)
        self.logger.log_member_artifact(member_id, path.parent, "model", delete=True)

    def on_fit_end(self, history: Any) -> None:
        self.logger.close()

    def on_fit_interrupted(self, exc: BaseException) -> None:
        """Called by ``mb.fit`` when training raised (Ctrl+C included): runs end as ``interrupted``."""
        self.logger.close(status="interrupted")


def fit_callback(spec: Any) -> MLflowFitCallback:
    """The callback of ``mb.fit(mlflow=spec)``: ``True``, a dict of MLflowLogger arguments or a logger."""
    if spec is True:
        logger = MLflowLogger()
    elif isinstance(spec, Mapping):
        logger = MLflowLogger(**spec)
    elif isinstance(spec, MLflowLogger):
        logger = spec
    else:
        raise TypeError(
            f"mb.fit: mlflow must be True, a dict of mb.MLflowLogger arguments or a mb.MLflowLogger, "
            f"got {type(spec).__name__}."
        )
    return MLflowFitCallback(logger)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
