"""How each trial of a Tune sweep went, in ``mb.fit``'s words: what Tune's logging callbacks share.

:class:`TrialOutcomes` follows a sweep's results and ends (``finished``, ``stopped early``,
``errored``, ``interrupted`` with a reason), drops results made again after a restore from an
earlier checkpoint, and keeps all of it across ``tune.run(resume=True)`` through its state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelbatch.callbacks import NaNGuard
from modelbatch.mlflow import is_number


class TrialOutcomes:
    """Each trial's reports and how it ended.

    A trial stopped by the scheduler counts as ``finished`` if it met its ``stop`` criteria or
    reached ``max_iterations`` (default: the most iterations any trial of the sweep reached, e.g.
    ASHA's ``max_t``; see :meth:`final_statuses`).

    Example:
        >>> from types import SimpleNamespace
        >>> outcomes = TrialOutcomes()
        >>> trial = SimpleNamespace(trial_id="a", last_result={"loss": 0.5}, stopping_criterion={})
        >>> outcomes.report(trial, {"training_iteration": 1, "loss": 0.5})
        1
        >>> outcomes.report(trial, {"training_iteration": 1, "loss": 0.5})  # made again after a restore
        >>> outcomes.complete(trial)
        ('finished', 'the trainable returned')
    """

    def __init__(self, max_iterations: int | None = None) -> None:
        self.max_iterations = max_iterations
        self.iterations: dict[str, int] = {}  # reports logged per trial
        self.status: dict[str, str] = {}  # of trials ended
        self.stopped_by_tune: dict[str, bool] = {}
        self.stopped_by_callback: set[str] = set()  # by a mb.callbacks callback on a slot server

    def get_state(self) -> dict[str, Any]:
        return {
            "iterations": dict(self.iterations),
            "status": dict(self.status),
            "stopped_by_tune": dict(self.stopped_by_tune),
            "stopped_by_callback": sorted(self.stopped_by_callback),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.iterations = dict(state.get("iterations", {}))
        self.status = dict(state.get("status", {}))
        self.stopped_by_tune = dict(state.get("stopped_by_tune", {}))
        self.stopped_by_callback = set(state.get("stopped_by_callback", ()))

    def start(self, trial: Any) -> None:
        self.iterations.setdefault(trial.trial_id, 0)

    def report(self, trial: Any, result: Mapping[str, Any]) -> int | None:
        """The result's step (``training_iteration``) if it is new, ``None`` if it is logged already."""
        tid = trial.trial_id
        self.start(trial)
        step = result.get("training_iteration") or 0
        done = bool(result.get("done"))  # Tune sets done when it decides to stop the trial
        if step and step <= self.iterations[tid]:
            # made again after a restore from an earlier checkpoint: that step is logged already,
            # and a stop decided on it before (e.g. ASHA's, just before a Ctrl-C) still stands
            self.stopped_by_tune[tid] = self.stopped_by_tune.get(tid, False) or done
            return None
        self.stopped_by_tune[tid] = done
        self.iterations[tid] = step
        return step

    def complete(self, trial: Any) -> tuple[str, str]:
        """(status, reason) of a trial Tune completed; the status is kept."""
        status, reason = self._completion(trial)
        self.status[trial.trial_id] = status
        return status, reason

    def error(self, trial: Any) -> tuple[str, str]:
        """(``"errored"``, the error) of a trial that raised; the status is kept."""
        self.status[trial.trial_id] = "errored"
        return "errored", error_reason(trial)

    def interrupted(self, trials: list) -> list:
        """The trials that reported but did not end (the sweep stopped, e.g. by Ctrl-C)."""
        return [t for t in trials if t.trial_id in self.iterations and t.trial_id not in self.status]

    def final_statuses(self) -> dict[str, str]:
        """Ended trials' statuses; without ``max_iterations``, a scheduler's stop at the sweep's most
        iterations (e.g. ASHA's ``max_t``) counts as finished (a callback's stop stays one)."""
        if self.max_iterations is not None or not self.iterations:
            return dict(self.status)
        most = max(self.iterations.values())
        return {
            tid: "finished"
            if status == "stopped early"
            and self.iterations[tid] >= most
            and tid not in self.stopped_by_callback
            else status
            for tid, status in self.status.items()
        }

    def _completion(self, trial: Any) -> tuple[str, str]:
        tid = trial.trial_id
        it = self.iterations.get(tid, 0)
        last = trial.last_result or {}
        # a diverged member, in mb.fit's words (a ModelBatch member's last result says it in "error")
        diverged = last.get("error") if isinstance(last.get("error"), str) else NaNGuard.reason(last)
        if diverged is not None:
            return "errored", diverged
        if isinstance(last.get("stopped"), str):  # a ModelBatch member stopped by a mb.callbacks.Callback
            self.stopped_by_callback.add(tid)
            return "stopped early", last["stopped"]
        if not self.stopped_by_tune.get(tid, False):
            return "finished", "the trainable returned"
        for criterion, value in (getattr(trial, "stopping_criterion", None) or {}).items():
            reached = last.get(criterion)
            if is_number(reached) and reached >= value:
                return "finished", f"stop criterion {criterion} >= {value}"
        if self.max_iterations is not None and it >= self.max_iterations:
            return "finished", f"reached max_iterations={self.max_iterations}"
        return "stopped early", f"stopped by the scheduler at report {it}"


def error_reason(trial: Any) -> str:
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
