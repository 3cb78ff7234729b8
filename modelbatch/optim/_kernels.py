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


# ``torch._foreach_*`` forms of the kernels above, for lists of tensors. On CPU every foreach op
# runs the per-tensor op in a C++ loop (bitwise equal to the forms above), saving one Python call per
# tensor. A per-member value is a float or one ``[R, 1, ..., 1]`` tensor per tensor of the list.
Scalars = float | list[torch.Tensor]


def foreach_mul_(xs: list[torch.Tensor], value: Scalars) -> None:
    """``x.mul_(value)`` for each ``x``."""
    torch._foreach_mul_(xs, value)


def foreach_lerp_(xs: list[torch.Tensor], ends: list[torch.Tensor], weight: Scalars) -> None:
    """:func:`lerp_` for each pair."""
    if isinstance(weight, float):
        torch._foreach_lerp_(xs, ends, weight)
        return
    for x, end, w in zip(xs, ends, weight):
        lerp_(x, end, w)


def foreach_add(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: Scalars) -> list[torch.Tensor]:
    """:func:`add` for each pair."""
    if isinstance(alpha, float):
        return torch._foreach_add(xs, ys, alpha=alpha)
    return torch._foreach_addcmul(xs, ys, alpha)


def foreach_addcmul_(
    xs: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], value: Scalars
) -> None:
    """:func:`addcmul_` for each triple."""
    if isinstance(value, float):
        torch._foreach_addcmul_(xs, a, b, value=value)
    else:
        torch._foreach_addcmul_(xs, torch._foreach_mul(value, a), b)


def foreach_addcdiv_(
    xs: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], value: Scalars
) -> None:
    """:func:`addcdiv_` for each triple."""
    if isinstance(value, float):
        torch._foreach_addcdiv_(xs, a, b, value=value)
    else:
        torch._foreach_addcdiv_(xs, torch._foreach_mul(value, a), b)
