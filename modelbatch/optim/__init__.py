"""Vectorized optimizers: every member of a pack has its own hyperparameters and state.

Each optimizer applies torch.optim's elementwise formulas to the stacked ``[N, ...]``
parameters with ``[N]`` hyperparameters, so a member is updated exactly as its own
``torch.optim`` optimizer would update it (bitwise, on CPU).
"""

from . import lr_scheduler
from ._base import Optimizer, StepValues
from .adam import Adam, AdamW
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "RMSprop", "StepValues", "lr_scheduler"]
