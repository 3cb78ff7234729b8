"""Replay an MLflow spill file: ``python -m tune_integration.mlflow replay SPILL.jsonl [--tracking-uri URI]``.

When the tracking server stayed unreachable until a sweep ended, :class:`MLflowCallback` (and
``mb.fit(..., mlflow=...)``) wrote the points it could not log to ``mlflow-spill-<id>.jsonl`` and
warned. This command logs them into MLflow: runs that exist already are continued (found by run id or
by their ``modelbatch.run_key`` tag), the others are created under their parent run; a point logged
twice is stored once. ``--tracking-uri`` defaults to the URI recorded in the file.
"""

from modelbatch._mlflow import main, replay

from ._mlflow import MLflowCallback, split_result, trial_name, trial_number

__all__ = ["MLflowCallback", "main", "replay", "split_result", "trial_name", "trial_number"]

if __name__ == "__main__":
    raise SystemExit(main())
