"""Vectorized Adam and AdamW, one hyperparameter per member."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .._batch import ModelBatch
from .._hparams import MemberValue
from . import _kernels as k
from ._base import Optimizer, StepValues


class Adam(Optimizer):
    """``torch.optim.Adam`` for every member of a pack, each with its own hyperparameters.

    ``lr``, each of ``betas``, ``eps`` and ``weight_decay`` take one number for all members or
    one per member; ``amsgrad``, ``maximize`` and ``capturable`` (a step on device tensors only,
    see :class:`~modelbatch.optim.Optimizer`) are shared by the pack.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(3)])
        >>> opt = mb.optim.Adam(batch, lr=[1e-2, 1e-3, 1e-4], betas=([0.9, 0.8, 0.5], 0.999))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> losses = batch.compute_loss(batch(x), y, torch.nn.functional.mse_loss)
        >>> losses.sum().backward()
        >>> opt.step()
    """

    hparam_bounds: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        "lr": (0.0, None, True),
        "beta1": (0.0, 1.0, False),
        "beta2": (0.0, 1.0, False),
        "eps": (0.0, None, True),
        "weight_decay": (0.0, None, True),
    }
    decoupled_weight_decay = False

    def __init__(
        self,
        batch: ModelBatch,
        lr: MemberValue = 1e-3,
        betas: Sequence[MemberValue] = (0.9, 0.999),
        eps: MemberValue = 1e-8,
        weight_decay: MemberValue = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        if isinstance(betas, torch.Tensor) or len(betas) != 2:
            raise ValueError(
                f"mb.optim.{type(self).__name__}: betas must be a pair (beta1, beta2), each a number or "
                "one number per member."
            )
        super().__init__(
            batch,
            {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay},
            {"amsgrad": amsgrad, "maximize": maximize, "capturable": capturable},
        )

    def _state_keys(self) -> tuple[str, ...]:
        return (
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
            if self.flags["amsgrad"]
            else ("exp_avg", "exp_avg_sq")
        )

    def _prepare(self, values: StepValues) -> None:
        values.derive("neg_step_size", lambda lr, b1, s: -(lr / (1 - b1**s)), "lr", "beta1", "step")
        values.derive("bias2_sqrt", lambda b2, s: (1 - b2**s) ** 0.5, "beta2", "step")
        values.derive("one_minus_beta1", lambda b: 1 - b, "beta1")
        values.derive("one_minus_beta2", lambda b: 1 - b, "beta2")
        values.derive("decay_factor", lambda lr, wd: 1 - lr * wd, "lr", "weight_decay")

    def _update_all(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        values: StepValues,
    ) -> None:
        """:meth:`_update` for all parameters at once, op by op with ``torch._foreach_*``."""
        if not params:
            return
        if self.flags["maximize"]:
            grads = torch._foreach_neg(grads)
        if values.any("weight_decay"):
            if self.decoupled_weight_decay:
                k.foreach_mul_(params, values.get_all("decay_factor", params))
            else:
                grads = k.foreach_add(grads, params, values.get_all("weight_decay", params))
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        k.foreach_lerp_(exp_avgs, grads, values.get_all("one_minus_beta1", params))
        k.foreach_mul_(exp_avg_sqs, values.get_all("beta2", params))
        k.foreach_addcmul_(exp_avg_sqs, grads, grads, values.get_all("one_minus_beta2", params))
        second = exp_avg_sqs
        if self.flags["amsgrad"]:
            second = [state["max_exp_avg_sq"] for state in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, values.get_all("bias2_sqrt", params))
        torch._foreach_add_(denom, values.get_all("eps", params))
        k.foreach_addcdiv_(params, exp_avgs, denom, values.get_all("neg_step_size", params))

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], values: StepValues
    ) -> None:
        """The base class's per-parameter hook; :meth:`step` calls :meth:`_update_all` instead."""
        self._update_all([param], [grad], [state], values)


class AdamW(Adam):
    """``torch.optim.AdamW`` (Adam with decoupled weight decay) for every member of a pack.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)])
        >>> opt = mb.optim.AdamW(batch, lr=[1e-3, 3e-3], weight_decay=[0.0, 0.1])
        >>> opt.hparams["weight_decay"].tolist()
        [0.0, 0.1]
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        batch: ModelBatch,
        lr: MemberValue = 1e-3,
        betas: Sequence[MemberValue] = (0.9, 0.999),
        eps: MemberValue = 1e-8,
        weight_decay: MemberValue = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(
            batch, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize, capturable=capturable
        )
