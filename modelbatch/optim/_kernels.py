"""In-place updates with one scalar per member, rounding exactly as torch.optim's scalar kernels.

A per-member value is either a Python float (the same for every updating member: the plain
torch kernel runs) or a tensor of shape ``[R, 1, ..., 1]`` that broadcasts over dim 0. Each
tensor form below was chosen because it is bitwise equal to the scalar kernel on CPU (fused
multiply-adds included): e.g. ``x.add_(y, alpha=a)`` equals ``x.addcmul_(y, a)``, not ``x + a * y``.
"""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor


def add_(x: torch.Tensor, y: torch.Tensor, alpha: Scalar) -> torch.Tensor:
    """``x.add_(y, alpha=alpha)``."""
    if isinstance(alpha, float):
        return x.add_(y, alpha=alpha)
    return x.addcmul_(y, alpha)


def add(x: torch.Tensor, y: torch.Tensor, alpha: Scalar) -> torch.Tensor:
    """``x.add(y, alpha=alpha)``."""
    if isinstance(alpha, float):
        return x.add(y, alpha=alpha)
    return torch.addcmul(x, y, alpha)


def addcmul_(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Scalar) -> torch.Tensor:
    """``x.addcmul_(a, b, value=value)``."""
    if isinstance(value, float):
        return x.addcmul_(a, b, value=value)
    return x.addcmul_(value * a, b)


def addcdiv_(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Scalar) -> torch.Tensor:
    """``x.addcdiv_(a, b, value=value)``."""
    if isinstance(value, float):
        return x.addcdiv_(a, b, value=value)
    return x.addcdiv_(value * a, b)


def addcdiv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Scalar) -> torch.Tensor:
    """``x.addcdiv(a, b, value=value)``."""
    if isinstance(value, float):
        return x.addcdiv(a, b, value=value)
    return torch.addcdiv(x, value * a, b)


def lerp_(x: torch.Tensor, end: torch.Tensor, weight: Scalar) -> torch.Tensor:
    """``x.lerp_(end, weight)``, with lerp's own two-branch formula for tensor weights."""
    if isinstance(weight, float):
        return x.lerp_(end, weight)
    diff = end - x
    low = torch.addcmul(x, weight, diff)
    high = torch.addcmul(end, diff, 1 - weight, value=-1)
    return x.copy_(torch.where(weight < 0.5, low, high))


def select(mask: torch.Tensor | bool, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where the per-member ``mask`` holds, else ``b`` (a bool mask skips the where)."""
    if isinstance(mask, bool):
        return a if mask else b
    return torch.where(mask, a, b)
