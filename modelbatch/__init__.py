"""ModelBatch: train hundreds of independent PyTorch models as one vmapped pack.

Example:
    >>> import torch, modelbatch as mb
    >>> models = [torch.nn.Linear(4, 2) for _ in range(8)]
    >>> batch = mb.ModelBatch(models)
    >>> opt = mb.optim.AdamW(batch, lr=[1e-3 * (i + 1) for i in range(8)])
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> losses = batch.compute_loss(batch(x), y, torch.nn.functional.cross_entropy)
    >>> losses.shape
    torch.Size([8])
    >>> losses.sum().backward(); opt.step()
"""

from . import amp, callbacks, data, layers, metrics, optim, testing
from ._batch import MemberLosses, ModelBatch
from ._checkpoint import load, save
from ._clip import clip_grad_norm_
from ._fit import fit
from ._memory import MemoryEstimate, estimate_memory
from ._mlflow import MLflowLogger
from ._recipe import Recipe
from ._trainer import PackTrainer

__all__ = [
    "MLflowLogger",
    "MemberLosses",
    "MemoryEstimate",
    "ModelBatch",
    "PackTrainer",
    "Recipe",
    "amp",
    "callbacks",
    "clip_grad_norm_",
    "data",
    "estimate_memory",
    "fit",
    "layers",
    "load",
    "metrics",
    "optim",
    "save",
    "testing",
]
__version__ = "0.1.0"
