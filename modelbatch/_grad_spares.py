"""Gradient memory that a CPU pack uses again, step after step, instead of fresh pages.

The loop backend runs each member on a view of the stacked parameters (``unbind``); its backward
stacks the members' gradients into one new ``[N, ...]`` tensor per parameter. glibc gives every
block over 32 MB fresh pages, which the kernel faults in and zeroes, and ``zero_grad`` hands them
back: a ResNet-18 pack of 16 members spent ~200 ms of a ~3 s step on that. So ``mb.optim``'s
``zero_grad`` keeps a gradient nothing else holds as the parameter's *spare*, and the next backward
stacks into the spare (``torch.stack(out=)``: the same values) and hands it over as the new
gradient. Only on CPU (CUDA's caching allocator already reuses memory), only a gradient that no
other tensor, view or Python name shares, and never when the backward builds a graph.
"""

from __future__ import annotations

import sys
import weakref

import torch

# id(parameter) -> (a weak reference to it, its spare); the entry goes with the parameter
_spares: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def keep(param: torch.Tensor) -> None:
    """Drop ``param.grad`` (``zero_grad(set_to_none=True)``), keeping its memory if nothing else holds it."""
    grad = param.grad
    param.grad = None
    if grad is None or grad.device.type != "cpu" or grad.requires_grad or grad.is_sparse:
        return
    # here: the name ``grad`` and getrefcount's argument; one TensorImpl; its storage's owner and
    # the temporary storage object asked
    alone = sys.getrefcount(grad) == 2 and grad._use_count() == 1
    if alone and torch._C._storage_Use_Count(grad.untyped_storage()._cdata) == 2:
        key = id(param)
        _spares[key] = (weakref.ref(param, lambda _: _spares.pop(key, None)), grad)


def take(param: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The spare of ``param`` if it fits ``shape`` and ``dtype``, given up (no reference kept here)."""
    ref, spare = _spares.pop(id(param), (None, None))
    if ref is None or ref() is not param:
        return None
    return spare if spare.shape == shape and spare.dtype == dtype and spare.is_contiguous() else None


class _Unbind(torch.autograd.Function):
    """``stacked.unbind(0)`` whose backward stacks into the parameter's spare when it has one."""

    @staticmethod
    def forward(stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return stacked.unbind(0)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: tuple) -> None:
        ctx.stacked = weakref.ref(inputs[0])  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, *grads: torch.Tensor) -> torch.Tensor:
        stacked = ctx.stacked()  # type: ignore[attr-defined]
        if stacked is None or torch.is_grad_enabled():  # (on CPU: unbind_parameter)
            return torch.stack(grads)
        spare = take(stacked, torch.Size((len(grads), *grads[0].shape)), grads[0].dtype)
        if spare is None:
            return torch.stack(grads)
        torch.stack(grads, out=spare)
        return spare


def unbind_parameter(stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The members' views of a stacked CPU parameter (see the module docstring); ``unbind(0)`` elsewhere."""
    if stacked.device.type != "cpu" or not stacked.requires_grad or not torch.is_grad_enabled():
        return stacked.unbind(0)
    return _Unbind.apply(stacked)
