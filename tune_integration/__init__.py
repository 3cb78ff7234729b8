"""Ray Tune integration: sweeps where each GPU trains a pack and every member is a native Tune trial.

Example::

    from tune_integration import ModelBatchSearcher

    searcher = ModelBatchSearcher(recipe, slots_per_gpu="auto")
    analysis = tune.run(searcher.trainable(), config=space, num_samples=64, search_alg=searcher,
                        metric="val_loss", mode="min", stop={"training_iteration": 20})

The package imports lazily: member trials import only its light relay module (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._mlflow import MLflowCallback
    from ._searcher import ModelBatchSearcher
    from ._wandb import WandBCallback

__all__ = ["MLflowCallback", "ModelBatchSearcher", "WandBCallback"]


def __getattr__(name: str) -> Any:
    if name == "ModelBatchSearcher":
        from ._searcher import ModelBatchSearcher

        return ModelBatchSearcher
    if name == "MLflowCallback":
        from ._mlflow import MLflowCallback

        return MLflowCallback
    if name == "WandBCallback":
        from ._wandb import WandBCallback

        return WandBCallback
    raise AttributeError(f"module 'tune_integration' has no attribute {name!r}")
