"""MLflow logging of a sweep (:class:`MLflowLogger`) and its replay command::

    python -m modelbatch.mlflow replay SPILL.jsonl [--tracking-uri URI]

When the tracking server stayed unreachable until a sweep ended, :class:`MLflowLogger` (behind
``mb.fit(..., mlflow=...)`` and integrations' callbacks) wrote the points it could not log to
``mlflow-spill-<id>.jsonl`` and warned. This command logs them into MLflow: runs that exist already are
continued (found by run id or by their ``modelbatch.run_key`` tag), the others are created under their
parent run; a point logged twice is stored once. ``--tracking-uri`` defaults to the URI recorded in the
file. An integration logs through this module's names, never through ``modelbatch._mlflow``.
"""

from ._mlflow import (
    MEMBER_TAG_KEYS,
    Limits,
    MLflowLogger,
    clean_key,
    flatten,
    is_number,
    limits,
    main,
    replay,
)

__all__ = [
    "MEMBER_TAG_KEYS",
    "Limits",
    "MLflowLogger",
    "clean_key",
    "flatten",
    "is_number",
    "limits",
    "main",
    "replay",
]

if __name__ == "__main__":
    raise SystemExit(main())
