"""Vectorized RMSprop, one hyperparameter per member."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._batch import ModelBatch
from .._hparams import MemberValue
from . import _kernels as k
from ._base import Optimizer, StepValues


class RMSprop(Optimizer):
    """``torch.optim.RMSprop`` for every member of a pack, each with its own hyperparameters.

    ``lr``, ``alpha``, ``eps``, ``weight_decay`` and ``momentum`` take one number for all members
    or one per member; ``centered``, ``maximize`` and ``capturable`` (a step on device tensors
    only, see :class:`~modelbatch.optim.Optimizer`) are shared by the pack.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)])
        >>> opt = mb.optim.RMSprop(batch, lr=[1e-2, 1e-3], momentum=[0.0, 0.9])
        >>> opt.n
        2
    """

    hparam_bounds: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        "lr": (0.0, None, True),
        "alpha": (0.0, None, True),
        "eps": (0.0, None, True),
        "weight_decay": (0.0, None, True),
        "momentum": (0.0, None, True),
    }

    def __init__(
        self,
        batch: ModelBatch,
        lr: MemberValue = 1e-2,
        alpha: MemberValue = 0.99,
        eps: MemberValue = 1e-8,
        weight_decay: MemberValue = 0.0,
        momentum: MemberValue = 0.0,
        *,
        centered: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(
            batch,
            {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay, "momentum": momentum},
            {"centered": centered, "maximize": maximize, "capturable": capturable},
        )

    def _state_keys(self) -> tuple[str, ...]:
        keys = ["square_avg"]
        if self.capturable or bool((self.hparams["momentum"] > 0).any()):
            keys.append("momentum_buffer")
        if self.flags["centered"]:
            keys.append("grad_avg")
        return tuple(keys)

    def _prepare(self, values: StepValues) -> None:
        values.derive("neg_lr", lambda lr: -lr, "lr")
        values.derive("one_minus_alpha", lambda a: 1 - a, "alpha")
        values.derive("uses_momentum", lambda m: m > 0, "momentum")

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], values: StepValues
    ) -> None:
        if self.flags["maximize"]:
            grad = -grad
        if values.any("weight_decay"):
            grad = k.add(grad, param, values.get("weight_decay", param))
        square_avg = state["square_avg"]
        k.addcmul_(
            square_avg.mul_(values.get("alpha", param)), grad, grad, values.get("one_minus_alpha", param)
        )
        if self.flags["centered"]:
            grad_avg = k.lerp_(state["grad_avg"], grad, values.get("one_minus_alpha", param))
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(values.get("eps", param))
        uses_momentum = values.mask("uses_momentum", param)
        if uses_momentum is False:
            k.addcdiv_(param, grad, avg, values.get("neg_lr", param))
            return
        buf = state["momentum_buffer"].mul_(values.get("momentum", param)).addcdiv_(grad, avg)
        with_momentum = k.add(param, buf, values.get("neg_lr", param))
        if uses_momentum is True:
            param.copy_(with_momentum)
        else:
            param.copy_(
                torch.where(
                    uses_momentum, with_momentum, k.addcdiv(param, grad, avg, values.get("neg_lr", param))
                )
            )
