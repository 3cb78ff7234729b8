"""Vectorized SGD (momentum, dampening, nesterov, weight decay), one hyperparameter per member."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._batch import ModelBatch
from .._hparams import MemberValue
from . import _kernels as k
from ._base import Optimizer, StepValues


class SGD(Optimizer):
    """``torch.optim.SGD`` for every member of a pack, each with its own hyperparameters.

    ``lr``, ``momentum``, ``dampening`` and ``weight_decay`` take one number for all members or
    one per member; ``nesterov``, ``maximize`` and ``capturable`` (a step on device tensors only,
    see :class:`~modelbatch.optim.Optimizer`) are shared by the pack.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(4)])
        >>> opt = mb.optim.SGD(batch, lr=[0.1, 0.05, 0.01, 0.001], momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> losses = batch.compute_loss(batch(x), y, torch.nn.functional.mse_loss)
        >>> losses.sum().backward()
        >>> opt.step()
    """

    hparam_bounds: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        "lr": (0.0, None, True),
        "momentum": (0.0, None, True),
        "dampening": (None, None, True),
        "weight_decay": (0.0, None, True),
    }

    def __init__(
        self,
        batch: ModelBatch,
        lr: MemberValue = 1e-3,
        momentum: MemberValue = 0.0,
        dampening: MemberValue = 0.0,
        weight_decay: MemberValue = 0.0,
        *,
        nesterov: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(
            batch,
            {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay},
            {"nesterov": nesterov, "maximize": maximize, "capturable": capturable},
        )
        if nesterov and bool(((self.hparams["momentum"] <= 0) | (self.hparams["dampening"] != 0)).any()):
            raise ValueError(
                "mb.optim.SGD: nesterov momentum requires momentum > 0 and dampening = 0 for every member."
            )

    def _state_keys(self) -> tuple[str, ...]:
        if self.capturable or bool((self.hparams["momentum"] != 0).any()):
            return ("momentum_buffer",)
        return ()

    def _prepare(self, values: StepValues) -> None:
        values.derive("neg_lr", lambda lr: -lr, "lr")
        values.derive("one_minus_dampening", lambda d: 1 - d, "dampening")
        values.derive("first_step", lambda s: s == 1, "step")
        values.derive("uses_momentum", lambda m: m != 0, "momentum")

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], values: StepValues
    ) -> None:
        if self.flags["maximize"]:
            grad = -grad
        if values.any("weight_decay"):
            grad = k.add(grad, param, values.get("weight_decay", param))
        if values.any("momentum"):
            buf = state["momentum_buffer"]
            first = values.mask("first_step", param)
            if first is not True:
                running = k.add_(
                    buf.mul_(values.get("momentum", param)), grad, values.get("one_minus_dampening", param)
                )
                buf.copy_(k.select(first, grad, running))
            else:
                buf.copy_(grad)
            step = k.add(grad, buf, values.get("momentum", param)) if self.flags["nesterov"] else buf
            grad = k.select(values.mask("uses_momentum", param), step, grad)
        k.add_(param, grad, values.get("neg_lr", param))
