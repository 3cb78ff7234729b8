"""The vectorized optimizer base: [N] hyperparameters, per-member state, steps and masks."""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from .._batch import ModelBatch
from .._grad_spares import keep as keep_spare
from .._host import check_mask_size, device_tensor, member_flags, upload
from .._hparams import MemberValue, check_member_index, member_values

# On CPU, a step updates its tensors in pieces of at most this many bytes (whole members along dim 0):
# the update's temporaries then come from memory the allocator keeps, not from fresh pages that the
# kernel must fault in and zero (glibc maps every block over 32 MB afresh: a stacked ResNet-18 at 16
# members spent a third of its optimizer step so). Elementwise updates give the same bits either way.
CPU_PIECE_BYTES = 4 << 20


class StepValues:
    """Per-member scalars of one step (for the updating members), shaped for each tensor.

    ``set(name, values)`` registers one float per updating member (or bools, for ``mask``);
    ``get(name, like)`` returns a float when all of them agree (torch's own scalar kernel then
    runs) or a ``[R, 1, ..., 1]`` tensor with ``like``'s dtype and device.
    """

    def __init__(self, hparams: Mapping[str, list[float]], steps: list[float]) -> None:
        self.lists: dict[str, list] = dict(hparams)
        self.lists["step"] = steps
        self._cache: dict[tuple, torch.Tensor] = {}
        self._uniform: dict[str, bool] = {}
        self._rows = slice(None)

    def rows(self, start: int, stop: int) -> StepValues:
        """These values for the tensors' rows ``start:stop``: the same choices (:meth:`any`, float or
        tensor), each tensor cut to those rows."""
        part = copy.copy(self)  # shares the lists and caches
        part._rows = slice(start, stop)
        return part

    def set(self, name: str, values: list) -> None:
        self.lists[name] = values
        self._uniform.pop(name, None)

    def derive(self, name: str, formula: Callable[..., Any], *names: str) -> None:
        """Register ``name`` as ``formula`` of the named values, member by member (one Python
        expression per member, rounding as torch.optim's host scalars do)."""
        self.set(name, [formula(*xs) for xs in zip(*(self.lists[n] for n in names))])

    def any(self, name: str) -> bool:
        """Whether any updating member has a non-zero (or true) ``name``."""
        return any(v != 0 for v in self.lists[name])

    def uniform(self, name: str) -> bool:
        """Whether every updating member has the same ``name`` (then :meth:`get` gives a float)."""
        same = self._uniform.get(name)
        if same is None:
            values = self.lists[name]
            same = self._uniform[name] = all(v == values[0] for v in values)
        return same

    def get(self, name: str, like: torch.Tensor) -> float | torch.Tensor:
        if self.uniform(name):
            return float(self.lists[name][0])
        return self._tensor(name, like, like.dtype)

    def get_all(self, name: str, likes: list[torch.Tensor]) -> float | list[torch.Tensor]:
        """:meth:`get` for several tensors at once: one float, or one ``[R, 1, ...]`` tensor per tensor."""
        if self.uniform(name):
            return float(self.lists[name][0])
        return [self._tensor(name, like, like.dtype) for like in likes]

    def mask(self, name: str, like: torch.Tensor) -> torch.Tensor | bool:
        """A bool when all updating members agree on ``name``, else a ``[R, 1, ...]`` bool tensor."""
        values = self.lists[name]
        if all(values) or not any(values):
            return bool(values[0])
        return self._tensor(name, like, torch.bool)

    def _tensor(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype, like.device)
        flat = self._cache.get(key)
        if flat is None:
            source = torch.tensor(
                self.lists[name], dtype=torch.float64 if dtype != torch.bool else torch.bool
            )
            flat = self._cache[key] = upload(source.to(dtype), like.device)
        return flat[self._rows].view(-1, *([1] * (like.dim() - 1)))


class TensorValues(StepValues):
    """The step's per-member scalars of a capturable step: ``[N]`` float64 tensors on the device.

    Every member's row is computed (the caller keeps the rows of members that do not update),
    every value is a tensor and no branch depends on a value (:meth:`any` is true), so one
    traced graph serves every step: no value is read on the host, none is a guard.
    """

    def __init__(self, hparams: Mapping[str, torch.Tensor], steps: torch.Tensor) -> None:
        self.lists = dict(hparams)
        self.lists["step"] = steps
        self._cache = {}

    def set(self, name: str, values: torch.Tensor) -> None:
        self.lists[name] = values

    def derive(self, name: str, formula: Callable[..., Any], *names: str) -> None:
        self.set(name, formula(*(self.lists[n] for n in names)))

    def any(self, name: str) -> bool:
        return True

    def uniform(self, name: str) -> bool:
        return False

    def mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self._tensor(name, like, torch.bool)

    def _tensor(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        flat = self._cache.get(key)
        if flat is None:
            flat = self._cache[key] = self.lists[name].to(dtype)
        return flat.view(-1, *([1] * (like.dim() - 1)))


class Optimizer(abc.ABC):
    """Base class of the vectorized optimizers: every numeric hyperparameter is a ``[N]`` tensor.

    Subclasses declare ``hparam_bounds`` (name -> (low, high, high_inclusive)), the state they
    keep per parameter (``state_keys``) and implement :meth:`_update` with the same elementwise
    formulas as torch.optim, written with :mod:`modelbatch.optim._kernels` so that every member
    is updated exactly as its own torch.optim optimizer would update it.

    ``capturable=True`` (each optimizer's keyword) keeps the hyperparameters and step counts on
    the parameters' device and computes the step from them as tensors, every member's row at
    once (the rows of members that do not update are kept with ``torch.where``): the step reads
    nothing on the host and branches on no value, so ``torch.compile(opt.step, fullgraph=True)``
    traces it once for every later step, whatever the schedule and whichever members are frozen,
    and a CUDA graph can replay it. It costs a copy of the parameters and states per step. The
    values equal the default step's (bitwise where its formulas are single roundings: SGD,
    RMSprop; Adam's bias corrections ``beta**step`` come from the device's ``pow``, which may
    differ in the last bit of the float64 correction); a member with ``weight_decay=0`` still
    computes ``grad + 0 * param`` (a non-finite parameter then gives NaN).
    """

    hparam_bounds: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {}

    def __init__(
        self, batch: ModelBatch, hparams: Mapping[str, MemberValue], flags: Mapping[str, bool]
    ) -> None:
        api = type(self).__name__
        if not isinstance(batch, ModelBatch):
            raise TypeError(
                f"mb.optim.{api}: expected a ModelBatch as first argument, got {type(batch).__name__}. "
                f"Build the pack first: mb.optim.{api}(mb.ModelBatch(models), lr=...)."
            )
        self.batch = batch
        self.n = batch.n
        self.flags = dict(flags)
        self.hparams: dict[str, torch.Tensor] = {}
        for name, value in hparams.items():
            low, high, inclusive = self.hparam_bounds[name]
            self.hparams[name] = member_values(
                f"mb.optim.{api}", name, value, self.n, low=low, high=high, high_inclusive=inclusive
            )
        self.steps = torch.zeros(self.n, dtype=torch.float64)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._hparam_lists: dict[str, tuple[torch.Tensor, int, list[float]]] = {}
        self._place()
        if self.capturable:  # every state exists before a step is traced: one graph from the first
            for name, p in batch.stacked_parameters().items():
                if p.requires_grad:
                    self._param_state(name, p)

    @property
    def capturable(self) -> bool:
        """Whether the step runs on device tensors only (see the class docstring)."""
        return bool(self.flags.get("capturable", False))

    def _place(self) -> None:
        """Hyperparameters and step counts on the parameters' device (capturable) or the host."""
        params = list(self.batch.stacked_parameters().values())
        device = params[0].device if self.capturable and params else torch.device("cpu")
        self._host_hparams = {k: v.tolist() for k, v in self.hparams.items()} if self.capturable else {}
        self.hparams = {k: v.to(device) for k, v in self.hparams.items()}
        self.steps = self.steps.to(device)

    def hparam_list(self, name: str) -> list[float]:
        """Hyperparameter ``name`` of every member as host floats, without reading the device.

        A capturable optimizer answers from its host copy, which :meth:`set_hparam`, the
        schedules and :meth:`load_state_dict` keep; change its hyperparameters through them,
        not by writing ``opt.hparams`` in place.
        """
        if self.capturable:
            return self._host_hparams[name]
        return self._hparam_list(name, self.hparams[name])

    def _write_hparam(self, name: str, rows: list[int], values: list[float]) -> None:
        """Set rows ``rows`` of hyperparameter ``name`` in place (a captured step reads this very
        tensor): on the host, or as one upload of the host copy that makes the host wait for nothing."""
        t = self.hparams[name]
        if not self.capturable:
            t[rows] = torch.tensor(values, dtype=torch.float64)
            return
        host = self._host_hparams[name]
        for row, value in zip(rows, values):
            host[row] = float(value)
        t.copy_(upload(torch.tensor(host, dtype=torch.float64), t.device))

    # ---------------------------------------------------------------- public API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the stacked gradients of every member."""
        for p in self.batch.stacked_parameters().values():
            if p.grad is None:
                continue
            if set_to_none:
                keep_spare(p)  # p.grad = None, its memory kept for the next backward (CPU)
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, mask: torch.Tensor | None = None) -> Any:
        """Update every active member (``batch.active``, and ``mask`` when given) by its own rule.

        The step makes the host wait for no device, except to read a ``mask`` that lives on the
        device (a GradScaler's overflow mask: one read); pass a host (CPU) mask to avoid it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.capturable:
            self._capturable_step(mask)
            return loss
        updating = self._updating(mask)
        if all(updating):  # the common case: no indexing (advanced indexing costs ~20 µs a call on CPU)
            self.steps += 1
            values = StepValues(
                {k: self._hparam_list(k, v) for k, v in self.hparams.items()}, self.steps.tolist()
            )
            rows = None
        else:
            rows = [i for i, u in enumerate(updating) if u]
            if not rows:
                return loss
            self.steps[rows] += 1
            steps = self.steps.tolist()
            values = StepValues(
                {k: [self._hparam_list(k, v)[i] for i in rows] for k, v in self.hparams.items()},
                [steps[i] for i in rows],
            )
        self._prepare(values)
        named = [(name, p) for name, p in self.batch.stacked_parameters().items() if p.grad is not None]
        states = [self._param_state(name, p) for name, p in named]
        params = [p for _, p in named]
        if rows is None:
            self._update_pieces(params, [p.grad for p in params], states, values)
            return loss
        idx = [device_tensor(rows, torch.long, p.device) for p in params]
        sub_params = [p.index_select(0, i) for p, i in zip(params, idx)]
        sub_states = [{k: t.index_select(0, i) for k, t in st.items()} for st, i in zip(states, idx)]
        sub_grads = [p.grad.index_select(0, i) for p, i in zip(params, idx)]
        self._update_all(sub_params, sub_grads, sub_states, values)
        for p, i, sub_p, st, sub_st in zip(params, idx, sub_params, states, sub_states):
            p.index_copy_(0, i, sub_p)
            for k, t in st.items():
                t.index_copy_(0, i, sub_st[k])
        return loss

    def _capturable_step(self, mask: torch.Tensor | None) -> None:
        """The step from device tensors only: every row computed, the non-updating rows kept."""
        named = [(name, p) for name, p in self.batch.stacked_parameters().items() if p.grad is not None]
        if not named:
            return
        params = [p for _, p in named]
        device = params[0].device
        updating = upload(self.batch.active, device)
        if mask is not None:
            check_mask_size(f"mb.optim.{type(self).__name__}.step", mask.numel(), self.n)
            updating = updating & upload(mask, device).to(torch.bool).reshape(-1)
        self.steps.add_(updating.to(torch.float64))
        values = TensorValues(self.hparams, self.steps)
        self._prepare(values)
        states = [self._param_state(name, p) for name, p in named]
        kept = [(p.clone(), {k: t.clone() for k, t in st.items()}) for p, st in zip(params, states)]
        self._update_all(params, [p.grad for p in params], states, values)
        for p, st, (old_p, old_st) in zip(params, states, kept):
            rows = updating.view(-1, *([1] * (p.dim() - 1)))
            p.copy_(torch.where(rows, p, old_p))
            for k, t in st.items():
                t.copy_(torch.where(rows, t, old_st[k]))

    def _update_pieces(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        values: StepValues,
    ) -> None:
        """:meth:`_update_all`, on CPU in pieces of whole members of at most ``CPU_PIECE_BYTES``."""
        if not params or params[0].device.type != "cpu" or sum(p.nbytes for p in params) <= CPU_PIECE_BYTES:
            self._update_all(params, grads, states, values)
            return
        pieces: dict[tuple[int, int], list[tuple]] = {}  # rows -> (param, grad, state) pieces
        for p, g, st in zip(params, grads, states):
            n = p.shape[0]
            step = n if p.nbytes <= CPU_PIECE_BYTES else max(1, CPU_PIECE_BYTES // max(1, p.nbytes // n))
            for start in range(0, n, step):
                cut = slice(start, min(start + step, n))
                piece = (p[cut], g[cut], {k: t[cut] for k, t in st.items()})
                pieces.setdefault((cut.start, cut.stop), []).append(piece)
        for (start, stop), group in pieces.items():
            part = values.rows(start, stop)
            for batch in _runs_of_at_most(group, CPU_PIECE_BYTES):
                self._update_all(*(list(x) for x in zip(*batch)), part)

    def _updating(self, mask: torch.Tensor | None) -> list[bool]:
        """Which members update: ``batch.active`` (read again only when it changes) and ``mask``.

        Reading ``mask`` is a host sync when it lives on the device (a GradScaler's overflow mask);
        a mask on the host (the trainer's, a user's CPU tensor) costs none.
        """
        active = self.batch.active_flags()
        if mask is None:
            return active
        return member_flags(f"mb.optim.{type(self).__name__}.step", mask, active)

    def _hparam_list(self, name: str, values: torch.Tensor) -> list[float]:
        """``values.tolist()``, cached until the tensor is replaced or changed in place (``_version``)."""
        cached = self._hparam_lists.get(name)
        if cached is None or cached[0] is not values or cached[1] != values._version:
            cached = self._hparam_lists[name] = (values, values._version, values.tolist())
        return cached[2]

    def reset_member(self, index: int) -> None:
        """Clear member ``index``'s optimizer state (moments, momentum, step count), as for a new model."""
        index = check_member_index(f"mb.optim.{type(self).__name__}.reset_member", index, self.n)
        self.steps[index] = 0
        with torch.no_grad():
            for state in self.state.values():
                for t in state.values():
                    t[index].zero_()

    def set_hparam(self, name: str, value: MemberValue, member: int | None = None) -> None:
        """Set hyperparameter ``name`` for all members (scalar or ``[N]`` value) or for one ``member``."""
        api = f"mb.optim.{type(self).__name__}.set_hparam"
        if name not in self.hparams:
            raise KeyError(f"{api}: unknown hyperparameter {name!r}; known: {sorted(self.hparams)}.")
        low, high, inclusive = self.hparam_bounds[name]
        if member is None:
            values = member_values(api, name, value, self.n, low=low, high=high, high_inclusive=inclusive)
            self._write_hparam(name, list(range(self.n)), values.tolist())
            return
        index = check_member_index(api, member, self.n)
        values = member_values(api, name, value, 1, low=low, high=high, high_inclusive=inclusive)
        self._write_hparam(name, [index], values.tolist())

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, flags, per-member step counts and state, all as tensors."""
        return {
            "hparams": {k: v.clone() for k, v in self.hparams.items()},
            "flags": dict(self.flags),
            "steps": self.steps.clone(),
            "state": {name: {k: t.clone() for k, t in st.items()} for name, st in self.state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer over a pack of the same shape."""
        api = f"mb.optim.{type(self).__name__}.load_state_dict"
        if set(state_dict.get("hparams", {})) != set(self.hparams):
            raise ValueError(
                f"{api}: the state has hyperparameters {sorted(state_dict.get('hparams', {}))} but this "
                f"optimizer has {sorted(self.hparams)}; load it into the optimizer class it was saved from."
            )
        steps = state_dict["steps"]
        if steps.shape != self.steps.shape:
            raise ValueError(f"{api}: the state is for {steps.shape[0]} members but the pack has {self.n}.")
        params = self.batch.stacked_parameters()
        for name, st in state_dict["state"].items():
            if name not in params:
                raise KeyError(f"{api}: state for unknown parameter {name!r}: another architecture?")
            for key, t in st.items():
                if t.shape != params[name].shape:
                    raise ValueError(
                        f"{api}: {name}.{key} has shape {list(t.shape)}, the pack's parameter has "
                        f"{list(params[name].shape)}."
                    )
        self.hparams = {
            k: v.detach().to("cpu", torch.float64).clone() for k, v in state_dict["hparams"].items()
        }
        self.flags.update(state_dict.get("flags", {}))
        self.steps = steps.detach().to("cpu", torch.float64).clone()
        self._place()
        self.state = {
            name: {k: t.detach().to(params[name].device, params[name].dtype).clone() for k, t in st.items()}
            for name, st in state_dict["state"].items()
        }

    @classmethod
    def from_state_dict(cls, batch: ModelBatch, state_dict: Mapping[str, Any]) -> Optimizer:
        """Rebuild an optimizer of this class over ``batch`` from :meth:`state_dict` output."""
        optimizer = cls.__new__(cls)
        Optimizer.__init__(optimizer, batch, state_dict["hparams"], state_dict["flags"])
        optimizer.load_state_dict(state_dict)
        return optimizer

    def __repr__(self) -> str:
        def show(t: torch.Tensor) -> str:
            lo, hi = float(t.min()), float(t.max())
            return f"{lo:g}" if lo == hi else f"[{lo:g}..{hi:g}]"

        hp = ", ".join(f"{k}={show(v)}" for k, v in self.hparams.items())
        return f"mb.optim.{type(self).__name__}(n={self.n}, {hp})"

    # ---------------------------------------------------------------- for subclasses
    state_keys: ClassVar[tuple[str, ...]] = ()

    def _param_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(name)
        if state is None:
            keys = self._state_keys()
            state = {k: torch.zeros_like(param, memory_format=torch.preserve_format) for k in keys}
            self.state[name] = state
        return state

    def _state_keys(self) -> tuple[str, ...]:
        return self.state_keys

    def _prepare(self, values: StepValues) -> None:  # noqa: B027 (an optional hook)
        """Register derived per-member scalars (e.g. bias corrections) once per step."""

    def _update_all(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        values: StepValues,
    ) -> None:
        """Update several parameters; by default one :meth:`_update` each.

        Subclasses may override it with ``torch._foreach_*`` ops, which on CPU run the same
        per-tensor kernels (bitwise equal) with one Python call for all tensors.
        """
        for param, grad, state in zip(params, grads, states):
            self._update(param, grad, state, values)

    @abc.abstractmethod
    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], values: StepValues
    ) -> None:
        """Update ``param`` (its rows are the updating members) in place from ``grad``."""


def _runs_of_at_most(pieces: list[tuple], limit: int) -> list[list[tuple]]:
    """``pieces`` (``(param, grad, state)``) in consecutive runs of at most ``limit`` parameter bytes
    (a larger piece is a run alone)."""
    runs: list[list[tuple]] = []
    size = 0
    for piece in pieces:
        if not runs or size + piece[0].nbytes > limit:
            runs.append([])
            size = 0
        runs[-1].append(piece)
        size += piece[0].nbytes
    return runs
