"""Per-member gradient clipping: each member is clipped by the norm of its own gradients."""

from __future__ import annotations

import math

import torch

from ._batch import ModelBatch
from ._host import device_tensor, mark_device_data, to_host
from ._hparams import MemberValue, member_values

_API = "mb.clip_grad_norm_"


def _max_norms(value: MemberValue, n: int) -> list[float]:
    """``max_norm`` as ``n`` floats, checked on the host; ``+inf`` is allowed (measure, clip nothing)."""
    if isinstance(value, bool):
        return member_values(_API, "max_norm", value, n, low=0.0).tolist()
    if isinstance(value, torch.Tensor):  # a tensor on the device is read here: a host sync
        values = to_host(value)
        value = values[0] if value.dim() == 0 else values
    try:
        values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    except (TypeError, ValueError):
        return member_values(_API, "max_norm", value, n, low=0.0).tolist()
    unbounded = [v == math.inf for v in values]
    finite = [0.0 if u else v for u, v in zip(unbounded, values)]
    checked = member_values(_API, "max_norm", finite, n, low=0.0).tolist()
    return [math.inf if u else v for u, v in zip(unbounded, checked)]


@torch.no_grad()
def clip_grad_norm_(
    batch: ModelBatch,
    max_norm: MemberValue,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clip each member's gradients by its own total norm, as ``torch.nn.utils.clip_grad_norm_`` per model.

    Member ``i``'s gradients (over all its parameters) are multiplied by
    ``min(1, max_norm[i] / (total_norm[i] + 1e-6))``, with torch's formula and rounding.
    ``max_norm`` is one number for every member or one per member (``inf``: measure only).
    Returns the ``[N]`` total norms measured before clipping. Call it after
    ``scaler.unscale_(optimizer)`` when training with :class:`modelbatch.amp.GradScaler`.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> losses = batch.compute_loss(batch(x), y, torch.nn.functional.mse_loss)
        >>> losses.sum().backward()
        >>> norms = mb.clip_grad_norm_(batch, max_norm=[0.01, 0.1, 1.0, 10.0])
        >>> norms.shape
        torch.Size([4])
        >>> after = mb.clip_grad_norm_(batch, max_norm=float("inf"))
        >>> bool((after <= torch.tensor([0.01, 0.1, 1.0, 10.0]) + 1e-6).all())
        True
    """
    if not isinstance(batch, ModelBatch):
        raise TypeError(
            f"{_API}: expected a ModelBatch as first argument, got {type(batch).__name__}. "
            "For a single model use torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)."
        )
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"{_API}: norm_type must be a number (e.g. 2.0 or float('inf')), got {norm_type!r}.")
    norm_type = float(norm_type)
    n = batch.n
    limits = _max_norms(max_norm, n)
    grads = [p.grad for p in batch.stacked_parameters().values() if p.grad is not None]
    if not grads:
        return torch.zeros(n)
    for g in grads:
        if g.is_sparse:
            raise ValueError(f"{_API}: sparse gradients are not supported; use dense gradients.")
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.reshape(n, -1), norm_type, dim=1).to(device) for g in grads]
    total_norm = torch.linalg.vector_norm(torch.stack(norms), norm_type, dim=0)
    if error_if_nonfinite:  # raising needs the norms on the host: one sync, as in torch
        flags = to_host(mark_device_data(~torch.isfinite(total_norm)))
        bad = [i for i, f in enumerate(flags) if f]
        if bad:
            raise RuntimeError(
                f"{_API}: the total norm of order {norm_type} of the gradients of members {bad} is "
                f"non-finite ({total_norm[bad].tolist()}), so they cannot be clipped. Check those members' "
                "losses, or pass error_if_nonfinite=False to scale their gradients by the non-finite norm."
            )
    # torch computes `max_norm / (total_norm + 1e-6)` as `reciprocal(total_norm + 1e-6) * max_norm`.
    coef = (total_norm + 1e-6).reciprocal() * device_tensor(limits, total_norm.dtype, device)
    coef = torch.clamp(coef, max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device).view(n, *([1] * (g.dim() - 1))))
    return total_norm
