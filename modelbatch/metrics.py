"""Metrics for one member's batch: ``fn(outputs, targets) -> scalar`` (vmapped over the pack).

Example:
    >>> import torch, modelbatch as mb
    >>> mb.metrics.accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])).item()
    0.5
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose arg-max class equals the target."""
    return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(outputs, targets)


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return F.l1_loss(outputs, targets)
