"""The tests' recipe builder: one set of defaults for the small CPU recipes they train.

``small_recipe(model, train_data, **settings)`` is ``mb.Recipe`` with cross-entropy, batches of 16,
a report every 4 steps and float64 on the CPU; a test passes only what it needs otherwise, so its
call shows what is special about its recipe. tests/tune_recipes.py builds the Tune tests' recipe
with it (and pickles this module by value for Ray's workers, as it does itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch as mb


def small_recipe(model: Callable[[dict], nn.Module], train_data: Any, **settings: Any) -> mb.Recipe:
    """``mb.Recipe(model=model, train_data=train_data, ...)`` with the tests' defaults; ``settings``
    replace them or add others (``val_data``, ``metrics``, ``backend``, ...)."""
    args: dict[str, Any] = dict(
        model=model,
        optimizer="adam",
        loss=F.cross_entropy,
        train_data=train_data,
        batch_size=16,
        steps_per_report=4,
        dtype=torch.float64,
        device="cpu",
    )
    args.update(settings)
    return mb.Recipe(**args)
