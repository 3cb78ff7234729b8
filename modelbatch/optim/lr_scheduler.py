"""Per-member learning-rate schedules: every member of a pack follows its own torch scheduler.

Each member gets a real ``torch.optim.lr_scheduler`` attached to a tiny stand-in torch optimizer
whose one param group carries that member's lr (and momentum, for schedules that cycle it). On
:meth:`PerMember.step` every active member's scheduler steps and the new values are written into
the pack optimizer's ``hparams``. So member ``i``'s lr sequence is exactly (bitwise) the one torch
produces for that member's model trained alone, with ``scheduler.step()`` after ``optimizer.step()``.

Frozen members (``batch.active[i]`` is False) do not advance: their lr stays where it was and their
schedule resumes from that point when they are unfrozen.
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.optim import lr_scheduler as torch_sched

from .._hparams import MemberValue, check_member_index, member_values
from ._base import Optimizer

SchedulerFactory = Callable[[int, torch.optim.Optimizer], torch_sched.LRScheduler]
"""``factory(i, torch_optimizer)`` returns member ``i``'s torch scheduler over ``torch_optimizer``."""

IntValue = int | Sequence[int]
"""An integer argument: one int shared by every member, or one int per member."""

__all__ = [
    "CosineAnnealingLR",
    "ExponentialLR",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "OneCycleLR",
    "PerMember",
    "SchedulerFactory",
    "StepLR",
    "WarmupCosine",
]


class PerMember:
    """One torch lr scheduler per member of a pack, built by ``factory(i, torch_optimizer)``.

    ``factory`` may build any ``torch.optim.lr_scheduler`` (including ``SequentialLR``,
    ``ChainedScheduler``, ``CyclicLR`` and ``ReduceLROnPlateau``, whose :meth:`step` takes one
    metric per member). The stand-in optimizer's initial lr is the member's current lr.

    Call :meth:`step` after the optimizer's ``step()``. Only active members (``batch.active``,
    and ``mask`` when given) advance; a frozen member keeps its lr and continues its schedule
    where it stopped once unfrozen. An lr changed with ``opt.set_hparam("lr", ...)`` is seen by
    chainable schedules exactly as a changed ``param_group["lr"]`` is seen in torch.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)])
        >>> opt = mb.optim.SGD(batch, lr=[0.1, 0.2])
        >>> sched = mb.optim.lr_scheduler.PerMember(
        ...     opt, lambda i, o: torch.optim.lr_scheduler.StepLR(o, step_size=1 + i, gamma=0.5)
        ... )
        >>> sched.step()
        >>> sched.get_last_lr()
        [0.05, 0.2]
        >>> opt.hparams["lr"].tolist()
        [0.05, 0.2]
    """

    def __init__(self, optimizer: Optimizer, factory: SchedulerFactory) -> None:
        api = self._api()
        _pack_size(api, optimizer)
        if not callable(factory):
            raise TypeError(f"{api}: factory must be callable as factory(i, torch_optimizer) -> scheduler.")
        self.optimizer = optimizer
        self.n = optimizer.n
        self._factory = factory
        self.initial_lrs: list[float] = optimizer.hparams["lr"].tolist()
        self.schedulers: list[torch_sched.LRScheduler] = [
            self._build(i, lr) for i, lr in enumerate(self.initial_lrs)
        ]
        self._push(list(range(self.n)))

    # ---------------------------------------------------------------- public API
    def step(
        self, metrics: Sequence[float] | torch.Tensor | None = None, *, mask: torch.Tensor | None = None
    ) -> None:
        """Advance the schedule of every active member (``batch.active``, and ``mask`` when given).

        ``metrics`` (one value per member) is passed to schedulers that take one, such as
        ``ReduceLROnPlateau``.
        """
        rows = self._stepping_rows(mask)
        values = self._metrics(metrics)
        self._pull(rows)
        for i in rows:
            if values is None:
                self.schedulers[i].step()
            else:
                self.schedulers[i].step(values[i])
        self._push(rows)

    def get_last_lr(self) -> list[float]:
        """The lr that each member's schedule set last, one float per member."""
        return [float(s.get_last_lr()[0]) for s in self.schedulers]

    def reset_member(self, index: int, lr: float | None = None) -> None:
        """Restart member ``index``'s schedule from its initial lr, or from ``lr`` when given.

        Use it when a slot is refilled with a new model (together with ``opt.reset_member``).
        """
        api = f"{self._api()}.reset_member"
        index = check_member_index(api, index, self.n)
        if lr is not None:
            low, high, inclusive = self.optimizer.hparam_bounds["lr"]
            checked = member_values(api, "lr", lr, 1, low=low, high=high, high_inclusive=inclusive)
            self.initial_lrs[index] = checked.tolist()[0]
        self.schedulers[index] = self._build(index, self.initial_lrs[index])
        self._push([index])

    def member_state_dict(self, index: int) -> dict[str, Any]:
        """Member ``index``'s schedule alone (to move that member to another slot or pack)."""
        index = check_member_index(f"{self._api()}.member_state_dict", index, self.n)
        sched = self.schedulers[index]
        return {
            "initial_lr": self.initial_lrs[index],
            "scheduler": copy.deepcopy(sched.state_dict()),
            "optimizer": copy.deepcopy(sched.optimizer.state_dict()),
        }

    def load_member_state_dict(self, index: int, state: dict[str, Any]) -> None:
        """Continue member ``index``'s schedule from :meth:`member_state_dict` output."""
        index = check_member_index(f"{self._api()}.load_member_state_dict", index, self.n)
        self.initial_lrs[index] = float(state["initial_lr"])
        self.schedulers[index] = sched = self._build(index, self.initial_lrs[index])
        sched.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        sched.load_state_dict(copy.deepcopy(state["scheduler"]))
        self._push([index])

    def state_dict(self) -> dict[str, Any]:
        """Every member's scheduler state, stand-in optimizer state and initial lr."""
        return {"members": [self.member_state_dict(i) for i in range(self.n)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; also restores every member's lr in the optimizer."""
        api = f"{self._api()}.load_state_dict"
        saved = len(state_dict["members"])
        if saved != self.n:
            raise ValueError(
                f"{api}: the state is for {saved} members but the pack has {self.n}; load it into a "
                "scheduler over a pack of the same size."
            )
        for i, member in enumerate(state_dict["members"]):
            self.load_member_state_dict(i, member)

    def __repr__(self) -> str:
        kinds = sorted({type(s).__name__ for s in self.schedulers})
        return f"{self._api()}(n={self.n}, schedulers={kinds})"

    # ---------------------------------------------------------------- internals
    def _api(self) -> str:
        return f"mb.optim.lr_scheduler.{type(self).__name__}"

    def _momentum_key(self) -> str | None:
        hp = self.optimizer.hparams
        return "beta1" if "beta1" in hp else "momentum" if "momentum" in hp else None

    def _stand_in(self, index: int, lr: float) -> torch.optim.Optimizer:
        """A one-parameter torch optimizer carrying member ``index``'s lr and momentum (or betas)."""
        params = [torch.zeros(1, requires_grad=True)]
        hp = self.optimizer.hparams
        if self._momentum_key() == "beta1":
            betas = (hp["beta1"][index].item(), hp["beta2"][index].item())
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
        else:
            momentum = hp["momentum"][index].item() if "momentum" in hp else 0.0
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
        opt._opt_called = True  # type: ignore[attr-defined]  # the pack optimizer steps, not this one
        return opt

    def _build(self, index: int, lr: float) -> torch_sched.LRScheduler:
        stand_in = self._stand_in(index, lr)
        try:
            sched = self._factory(index, stand_in)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self._api()}: building the schedule of member {index} failed: {exc}") from exc
        if not isinstance(sched, torch_sched.LRScheduler) or sched.optimizer is not stand_in:
            raise TypeError(
                f"{self._api()}: the factory must return a torch.optim.lr_scheduler scheduler built on the "
                f"optimizer it receives, got {type(sched).__name__} for member {index}."
            )
        return sched

    def _cycles_momentum(self, index: int) -> bool:
        return bool(getattr(self.schedulers[index], "cycle_momentum", False))

    def _stepping_rows(self, mask: torch.Tensor | None) -> list[int]:
        """The active members (and ``mask``'s), read on the host as the optimizer reads them."""
        return [i for i, u in enumerate(self.optimizer._updating(mask)) if u]

    def _metrics(self, metrics: Sequence[float] | torch.Tensor | None) -> list[float] | None:
        if metrics is None:
            return None
        values = torch.as_tensor(
            metrics.detach() if isinstance(metrics, torch.Tensor) else metrics, dtype=torch.float64
        )
        values = values.reshape(-1).tolist()
        if len(values) != self.n:
            raise ValueError(
                f"{self._api()}.step: metrics has {len(values)} values but the pack has {self.n} members; "
                "pass one metric per member (e.g. the [N] validation losses)."
            )
        return values

    def _pull(self, rows: list[int]) -> None:
        """Copy the optimizer's current lr (and cycled momentum) into the stepping members' groups."""
        lrs = self.optimizer.hparam_list("lr")  # host values: no device read, capturable or not
        key = self._momentum_key()
        moms = self.optimizer.hparam_list(key) if key is not None else None
        for i in rows:
            group = self._group(i)
            group["lr"] = lrs[i]
            if moms is not None and self._cycles_momentum(i):
                _set_group_momentum(group, moms[i])

    def _push(self, rows: list[int]) -> None:
        """Write the ``rows`` members' group lr (and cycled momentum) into the optimizer's hparams."""
        if not rows:
            return
        self.optimizer._write_hparam("lr", rows, [self._group(i)["lr"] for i in rows])
        key = self._momentum_key()
        cycled = [i for i in rows if self._cycles_momentum(i)]
        if key is not None and cycled:
            self.optimizer._write_hparam(key, cycled, [_group_momentum(self._group(i)) for i in cycled])

    def _group(self, index: int) -> dict[str, Any]:
        return self.schedulers[index].optimizer.param_groups[0]


def _group_momentum(group: dict[str, Any]) -> float:
    return float(group["betas"][0]) if "betas" in group else float(group["momentum"])


def _set_group_momentum(group: dict[str, Any], value: float) -> None:
    if "betas" in group:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


# -------------------------------------------------------------------- per-member arguments
def _pack_size(api: str, optimizer: Optimizer) -> int:
    """The number of members of ``optimizer``'s pack, or a ``TypeError`` if it is no pack optimizer."""
    if not isinstance(optimizer, Optimizer) or "lr" not in optimizer.hparams:
        raise TypeError(
            f"{api}: expected a modelbatch optimizer with an 'lr' hyperparameter, got "
            f"{type(optimizer).__name__}. Pass e.g. mb.optim.SGD(batch, lr=...)."
        )
    return optimizer.n


def _length_error(api: str, name: str, got: int, n: int) -> ValueError:
    return ValueError(
        f"{api}: {name} has {got} values but the pack has {n} members; "
        "pass one value for every member, or a single value shared by all."
    )


def _numbers(api: str, name: str, value: MemberValue, n: int, *, low: float | None = None) -> list[float]:
    """``value`` (a number or one per member) as ``n`` Python floats, validated."""
    return member_values(api, name, value, n, low=low).tolist()


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integers(api: str, name: str, value: IntValue, n: int, *, low: int) -> list[int]:
    """``value`` (an int or one int per member) as ``n`` Python ints, each ``>= low``."""
    values = [value] * n if _is_int(value) else list(value) if isinstance(value, Sequence) else None
    if values is None:
        raise TypeError(f"{api}: {name} must be an int or a list of one int per member, got {value!r}.")
    if len(values) != n:
        raise _length_error(api, name, len(values), n)
    for i, v in enumerate(values):
        if not _is_int(v) or v < low:
            raise ValueError(f"{api}: {name} of member {i} is {v!r}; it must be an integer >= {low}.")
    return [int(v) for v in values]


def _callables(api: str, name: str, value: Callable | Sequence[Callable], n: int) -> list[Callable]:
    """One callable shared by every member, or a list of ``n`` callables."""
    values = [value] * n if callable(value) else list(value) if isinstance(value, Sequence) else []
    if not callable(value) and len(values) != n:
        raise _length_error(api, name, len(values), n)
    for i, fn in enumerate(values):
        if not callable(fn):
            raise TypeError(f"{api}: {name} of member {i} is {fn!r}; pass a callable epoch -> factor.")
    return values


def _milestone_lists(
    api: str, name: str, value: Sequence[int] | Sequence[Sequence[int]], n: int
) -> list[list[int]]:
    """One list of milestones shared by every member, or one list per member."""
    if not isinstance(value, Sequence) or any(not (_is_int(v) or isinstance(v, Sequence)) for v in value):
        raise TypeError(
            f"{api}: {name} must be a list of ints or one list of ints per member, got {value!r}."
        )
    if all(_is_int(v) for v in value):
        return [_integers(api, name, list(value), len(value), low=0)] * n
    if len(value) != n:
        raise _length_error(api, name, len(value), n)
    return [_integers(api, f"{name}[{i}]", list(v), len(v), low=0) for i, v in enumerate(value)]


_Init = TypeVar("_Init", bound=Callable[..., None])
_non_negative = functools.partial(_numbers, low=0.0)
_int_from_0 = functools.partial(_integers, low=0)
_int_from_1 = functools.partial(_integers, low=1)


def _per_member(
    schedule: Callable[..., torch_sched.LRScheduler], **kinds: Callable[..., list[Any]]
) -> Callable[[_Init], _Init]:
    """Turn a wrapper's ``__init__`` stub, which only declares the signature, into one building ``schedule``.

    Member ``i`` gets ``schedule(torch_optimizer, **arguments)``, every argument but ``optimizer``
    as given, except one named in ``kinds``: ``kind(api, name, value, n)`` checks it (one value
    shared by all or one per member) and returns ``n`` values, and member ``i`` gets the ``i``-th.
    """

    def decorate(stub: _Init) -> _Init:
        @functools.wraps(stub)
        def __init__(self: PerMember, *args: Any, **kwargs: Any) -> None:
            stub(self, *args, **kwargs)  # a wrong call fails with Python's own message
            bound = inspect.signature(stub).bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            del arguments["self"]
            optimizer = arguments.pop("optimizer")
            api = self._api()
            n = _pack_size(api, optimizer)
            columns = {k: kinds[k](api, k, v, n) if k in kinds else [v] * n for k, v in arguments.items()}
            members = [{k: column[i] for k, column in columns.items()} for i in range(n)]
            PerMember.__init__(self, optimizer, lambda i, o: schedule(o, **members[i]))

        return __init__  # type: ignore[return-value]

    return decorate


# -------------------------------------------------------------------- convenience schedules
class StepLR(PerMember):
    """``torch.optim.lr_scheduler.StepLR`` per member: lr times ``gamma`` every ``step_size`` steps.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.StepLR(opt, step_size=[1, 2], gamma=0.5)
        >>> sched.step(); sched.step()
        >>> sched.get_last_lr()
        [0.25, 0.5]
    """

    @_per_member(torch_sched.StepLR, step_size=_int_from_1, gamma=_numbers)
    def __init__(self, optimizer: Optimizer, step_size: IntValue, gamma: MemberValue = 0.1) -> None: ...


class MultiStepLR(PerMember):
    """``torch.optim.lr_scheduler.MultiStepLR`` per member: lr times ``gamma`` at each milestone.

    ``milestones`` is one list shared by every member or one list per member.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.MultiStepLR(opt, milestones=[[1], [2, 3]], gamma=0.5)
        >>> sched.step()
        >>> sched.get_last_lr()
        [0.5, 1.0]
    """

    @_per_member(torch_sched.MultiStepLR, milestones=_milestone_lists, gamma=_numbers)
    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int] | Sequence[Sequence[int]],
        gamma: MemberValue = 0.1,
    ) -> None: ...


class ExponentialLR(PerMember):
    """``torch.optim.lr_scheduler.ExponentialLR`` per member: lr times ``gamma`` every step.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.ExponentialLR(opt, gamma=[0.5, 0.25])
        >>> sched.step()
        >>> sched.get_last_lr()
        [0.5, 0.25]
    """

    @_per_member(torch_sched.ExponentialLR, gamma=_numbers)
    def __init__(self, optimizer: Optimizer, gamma: MemberValue) -> None: ...


class CosineAnnealingLR(PerMember):
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` per member: cosine from lr to ``eta_min``.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=[2, 4])
        >>> for _ in range(2):
        ...     sched.step()
        >>> [round(lr, 6) for lr in sched.get_last_lr()]
        [0.0, 0.5]
    """

    @_per_member(torch_sched.CosineAnnealingLR, T_max=_int_from_1, eta_min=_non_negative)
    def __init__(self, optimizer: Optimizer, T_max: IntValue, eta_min: MemberValue = 0.0) -> None: ...


class LinearLR(PerMember):
    """``torch.optim.lr_scheduler.LinearLR`` per member: a linear warmup (or decay) of the lr factor.

    The factor goes from ``start_factor`` to ``end_factor`` over ``total_iters`` steps; the
    optimizer's lr is set to ``lr * start_factor`` on construction, as in torch.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.LinearLR(opt, start_factor=[0.5, 0.25], total_iters=2)
        >>> opt.hparams["lr"].tolist()
        [0.5, 0.25]
        >>> sched.step(); sched.step()
        >>> sched.get_last_lr()
        [1.0, 1.0]
    """

    @_per_member(torch_sched.LinearLR, start_factor=_numbers, end_factor=_numbers, total_iters=_int_from_0)
    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: MemberValue = 1.0 / 3,
        end_factor: MemberValue = 1.0,
        total_iters: IntValue = 5,
    ) -> None: ...


class LambdaLR(PerMember):
    """``torch.optim.lr_scheduler.LambdaLR`` per member: lr = initial lr * ``lr_lambda(step)``.

    ``lr_lambda`` is one callable shared by every member or a list of one callable per member.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1 / (t + 1), lambda t: 0.5**t])
        >>> sched.step(); sched.step()
        >>> sched.get_last_lr()
        [0.3333333333333333, 0.25]
    """

    @_per_member(torch_sched.LambdaLR, lr_lambda=_callables)
    def __init__(
        self, optimizer: Optimizer, lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]]
    ) -> None: ...


class OneCycleLR(PerMember):
    """``torch.optim.lr_scheduler.OneCycleLR`` per member, momentum (or Adam's beta1) cycled too.

    As in torch, the optimizer's initial lr is ignored (the cycle starts at ``max_lr / div_factor``)
    and, with ``cycle_momentum``, the optimizer's ``momentum`` (``beta1`` for Adam/AdamW) follows
    the cycle. As in torch, :meth:`step` raises after ``total_steps`` steps.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), momentum=0.9)
        >>> sched = mb.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1.0, 0.5], total_steps=10)
        >>> [round(lr, 6) for lr in opt.hparams["lr"].tolist()], opt.hparams["momentum"].tolist()
        ([0.04, 0.02], [0.95, 0.95])
    """

    @_per_member(
        torch_sched.OneCycleLR,
        max_lr=_non_negative,
        total_steps=_int_from_1,
        pct_start=_non_negative,
        base_momentum=_numbers,
        max_momentum=_numbers,
        div_factor=_numbers,
        final_div_factor=_numbers,
    )
    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: MemberValue,
        total_steps: IntValue,
        pct_start: MemberValue = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: MemberValue = 0.85,
        max_momentum: MemberValue = 0.95,
        div_factor: MemberValue = 25.0,
        final_div_factor: MemberValue = 1e4,
        three_phase: bool = False,
    ) -> None: ...


def _warmup_cosine(
    o: torch.optim.Optimizer, warmup_steps: int, T_max: int, eta_min: float, start_factor: float
) -> torch_sched.LRScheduler:
    if warmup_steps == 0:
        return torch_sched.CosineAnnealingLR(o, T_max, eta_min=eta_min)
    linear = torch_sched.LinearLR(o, start_factor, 1.0, total_iters=warmup_steps)
    cosine = torch_sched.CosineAnnealingLR(o, T_max, eta_min=eta_min)
    return torch_sched.SequentialLR(o, [linear, cosine], milestones=[warmup_steps])


class WarmupCosine(PerMember):
    """Linear warmup then cosine annealing: torch's ``SequentialLR(LinearLR, CosineAnnealingLR)``.

    Member ``i`` warms up linearly from ``lr * start_factor`` to ``lr`` over ``warmup_steps``
    steps, then anneals to ``eta_min`` over ``T_max`` more steps. ``warmup_steps = 0`` gives plain
    ``CosineAnnealingLR``.

    Example:
        >>> import torch, modelbatch as mb
        >>> opt = mb.optim.SGD(mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(2)]), lr=1.0)
        >>> sched = mb.optim.lr_scheduler.WarmupCosine(opt, warmup_steps=[2, 0], T_max=2, start_factor=0.5)
        >>> opt.hparams["lr"].tolist()
        [0.5, 1.0]
        >>> sched.step(); sched.step()
        >>> [round(lr, 6) for lr in sched.get_last_lr()]
        [1.0, 0.0]
    """

    @_per_member(
        _warmup_cosine,
        warmup_steps=_int_from_0,
        T_max=_int_from_1,
        eta_min=_non_negative,
        start_factor=_numbers,
    )
    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: IntValue,
        T_max: IntValue,
        eta_min: MemberValue = 0.0,
        *,
        start_factor: MemberValue = 1.0 / 3,
    ) -> None: ...
