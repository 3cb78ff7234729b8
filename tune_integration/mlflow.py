"""Tune's MLflow callback; ``python -m tune_integration.mlflow replay SPILL.jsonl [--tracking-uri URI]`` is
an alias of the engine's ``python -m modelbatch.mlflow replay`` (see :mod:`modelbatch.mlflow`), which
logs a spill file of :class:`MLflowCallback` (or ``mb.fit(..., mlflow=...)``) into MLflow.
"""

from modelbatch.mlflow import main, replay

from ._mlflow import MLflowCallback, member_config, split_result, trial_name, trial_number

__all__ = ["MLflowCallback", "main", "member_config", "replay", "split_result", "trial_name", "trial_number"]

if __name__ == "__main__":
    raise SystemExit(main())
