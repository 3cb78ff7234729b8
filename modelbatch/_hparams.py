"""Per-member hyperparameters: validation and conversion to ``[N]`` tensors; the shared argument checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MemberValue = float | int | Sequence[float] | torch.Tensor
"""A hyperparameter given for a pack: one scalar for every member, or one value per member."""


def member_values(
    api: str,
    name: str,
    value: MemberValue,
    n: int,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    high_inclusive: bool = True,
) -> torch.Tensor:
    """Return ``value`` as a float64 CPU tensor of shape ``[n]``, checked member by member.

    Raises a ``ValueError`` that names ``api``, the hyperparameter and the offending member when
    the value has the wrong length, is not finite, or lies outside ``[low, high]``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{api}: {name} must be a number or one number per member, got a bool.")
    if isinstance(value, torch.Tensor):
        values = value.detach().to("cpu", torch.float64).reshape(-1)
        if value.dim() == 0:
            values = values.expand(n)
    elif isinstance(value, (int, float)):
        values = torch.full((n,), float(value), dtype=torch.float64)
    else:
        try:
            values = torch.tensor([float(v) for v in value], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{api}: {name} must be a number, a list of numbers or a tensor, got {value!r}."
            ) from exc
    if values.numel() != n:
        raise ValueError(
            f"{api}: {name} has {values.numel()} values but the pack has {n} members. "
            f"Pass one value for every member, or a single number shared by all."
        )
    values = values.clone()
    for i, v in enumerate(values.tolist()):
        if not math.isfinite(v):
            raise ValueError(f"{api}: {name} of member {i} is {v}; it must be finite.")
        if low is not None and v < low:
            raise ValueError(f"{api}: {name} of member {i} is {v}; it must be >= {low}.")
        if high is not None and (v > high or (v == high and not high_inclusive)):
            bound = "<=" if high_inclusive else "<"
            raise ValueError(f"{api}: {name} of member {i} is {v}; it must be {bound} {high}.")
    return values


def check_member_index(api: str, index: int, n: int) -> int:
    """Return ``index`` as a non-negative member index, or raise an ``IndexError`` naming ``api``."""
    if isinstance(index, torch.Tensor):
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{api}: member index must be an int, got {type(index).__name__}.")
    if not -n <= index < n:
        raise IndexError(f"{api}: member {index} is out of range for a pack of {n} members.")
    return index % n


def check_positive_int(api: str, name: str, value: Any, *, alternative: str | None = None) -> None:
    """Raise a ``ValueError`` naming ``api`` unless ``value`` is an int >= 1 (a bool is refused).

    ``alternative`` names the other value the caller accepts (``"None"``, ``"'auto'"``) in the message;
    the caller handles that value itself.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive int" if alternative is None else f"a positive int or {alternative}"
        raise ValueError(f"{api}: {name} must be {accepted}, got {value!r}.")
