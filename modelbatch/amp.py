"""Mixed precision for packs: a gradient scaler with one loss scale per member.

With one shared scale, an overflow in a single member would skip every member's step and shrink
everyone's scale. :class:`GradScaler` keeps a scale and a growth tracker per member, so an
inf/NaN gradient in member ``i`` skips only member ``i``'s optimizer step and backs off only its scale;
every member then follows exactly the scale sequence of its own ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ._batch import MemberLosses, ModelBatch
from ._host import mark_device_data, upload
from ._hparams import MemberValue, check_member_index, check_positive_int, member_values
from .optim import Optimizer

__all__ = ["GradScaler"]

_API = "mb.amp.GradScaler"
_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


class GradScaler:
    """``torch.amp.GradScaler`` with one loss scale per member of a pack.

    ``scale(losses)`` multiplies each member's loss by its own scale; ``step(optimizer)`` unscales
    the gradients, finds the members whose gradients hold inf/NaN and calls
    ``optimizer.step(mask=~found_inf)``; ``update()`` backs off the scale of those members and
    grows the others' after ``growth_interval`` consecutive good steps, as ``torch._amp_update_scale_``.
    Members frozen in the pack (``batch.active`` false) keep their scale and tracker.
    ``init_scale`` may be one value per member; the other settings are shared.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 1) for _ in range(4)])
        >>> opt = mb.optim.Adam(batch, lr=1e-3)
        >>> scaler = mb.amp.GradScaler(batch, init_scale=1024.0)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> losses = batch.compute_loss(batch(x), y, torch.nn.functional.mse_loss)
        >>> scaler.scale(losses).sum().backward()
        >>> with torch.no_grad():
        ...     batch.stack.weight.grad[2, 0, 0] = float("inf")  # member 2 overflows
        >>> scaler.step(opt); scaler.update()
        >>> scaler.get_scale().tolist()
        [1024.0, 1024.0, 512.0, 1024.0]
        >>> opt.steps.tolist()
        [1.0, 1.0, 0.0, 1.0]
    """

    def __init__(
        self,
        batch_or_n: ModelBatch | int,
        init_scale: MemberValue = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        if isinstance(batch_or_n, ModelBatch):
            self.n = batch_or_n.n
            params = list(batch_or_n.stacked_parameters().values())
            device = params[0].device if params else torch.device("cpu")
        elif isinstance(batch_or_n, int) and not isinstance(batch_or_n, bool) and batch_or_n > 0:
            self.n = batch_or_n
            device = torch.device("cpu")
        else:
            raise TypeError(
                f"{_API}: expected a ModelBatch or a positive number of members, got {batch_or_n!r}. "
                "Pass the pack: mb.amp.GradScaler(batch)."
            )
        self._enabled = bool(enabled)
        self._init_scale = member_values(_API, "init_scale", init_scale, self.n, low=0.0).float()
        if bool((self._init_scale <= 0).any()):
            raise ValueError(f"{_API}: init_scale must be > 0, got {self._init_scale.tolist()}.")
        if not (
            isinstance(growth_factor, (int, float)) and math.isfinite(growth_factor) and growth_factor > 1.0
        ):
            raise ValueError(f"{_API}: growth_factor must be a finite number > 1.0, got {growth_factor!r}.")
        if not (isinstance(backoff_factor, (int, float)) and 0.0 < backoff_factor < 1.0):
            raise ValueError(f"{_API}: backoff_factor must be in (0, 1), got {backoff_factor!r}.")
        check_positive_int(_API, "growth_interval", growth_interval)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._scale = self._init_scale.to(device)
        self._growth_tracker = torch.zeros(self.n, dtype=torch.int32, device=device)
        self._per_optimizer: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------------- training loop
    def scale(self, losses: torch.Tensor) -> torch.Tensor:
        """Return ``losses * scale``: each member's ``[N]`` loss times its own scale (same dtype)."""
        if not self._enabled:
            return losses
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.n,):
            shape = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"{_API}.scale: expected the [N={self.n}] per-member losses from batch.compute_loss, "
                f"got {shape}. Scale the losses before summing them: scaler.scale(losses).sum().backward()."
            )
        self._move_to(losses.device)
        scaled = losses * self._scale.to(losses.dtype)
        return scaled.as_subclass(MemberLosses) if isinstance(losses, MemberLosses) else scaled

    @torch.no_grad()
    def unscale_(self, optimizer: Optimizer) -> None:
        """Divide each member's gradients by its scale and record which members hold inf/NaN."""
        if not self._enabled:
            return
        state = self._state(optimizer, "unscale_")
        if state["stage"] is _UNSCALED:
            raise RuntimeError(
                f"{_API}.unscale_: unscale_() has already been called on this optimizer since the last "
                "update(); call it at most once per step."
            )
        if state["stage"] is _STEPPED:
            raise RuntimeError(
                f"{_API}.unscale_: unscale_() is being called after step(); call update() first."
            )
        # As torch: the reciprocal in float64, then float32.
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.zeros(self.n, dtype=torch.bool, device=self._scale.device)
        for name, param in optimizer.batch.stacked_parameters().items():
            grad = param.grad
            if grad is None:
                continue
            if grad.dtype == torch.float16:
                raise ValueError(
                    f"{_API}.unscale_: attempting to unscale FP16 gradients ({name}). Keep the parameters "
                    "in float32 and run the forward under torch.autocast instead of calling .half()."
                )
            if grad.is_sparse:
                raise ValueError(f"{_API}.unscale_: sparse gradients ({name}) are not supported.")
            # Checked before unscaling, as torch._amp_foreach_non_finite_check_and_unscale_.
            bad = ~torch.isfinite(grad.reshape(self.n, -1)).all(dim=1)
            found_inf |= bad.to(found_inf.device)
            grad.mul_(inv_scale.to(grad.device).view(self.n, *([1] * (grad.dim() - 1))))
        state["found_inf"] = found_inf
        state["active"] = optimizer.batch.active.detach().to(found_inf.device).clone()
        state["stage"] = _UNSCALED

    def step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless done), then ``optimizer.step(mask=~found_inf)``: overflowing members skip it.

        A ``mask`` passed in ``kwargs`` is combined with the members found finite.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or args:
            raise RuntimeError(
                f"{_API}.step: closures are not supported while the scaler is enabled; run the forward and "
                "backward before calling scaler.step(optimizer)."
            )
        state = self._state(optimizer, "step")
        if state["stage"] is _STEPPED:
            raise RuntimeError(f"{_API}.step: step() has already been called since the last update().")
        if state["stage"] is _READY:
            self.unscale_(optimizer)
        mask = ~state["found_inf"]
        user_mask = kwargs.pop("mask", None)
        if user_mask is not None:
            mask = mask & upload(user_mask.detach().to(torch.bool), mask.device).reshape(-1)
        # Which members skip is known on the device only: the optimizer reads it (one host sync, as
        # torch.amp.GradScaler's found_inf.item()) to keep every member's step count exact.
        result = optimizer.step(mask=mark_device_data(mask), **kwargs)
        state["stage"] = _STEPPED
        return result

    @torch.no_grad()
    def update(self) -> None:
        """Back off the scale of members that overflowed, grow the others' every ``growth_interval`` steps."""
        if not self._enabled:
            return
        states = [s for s in self._per_optimizer.values() if "found_inf" in s]
        if not states:
            raise RuntimeError(
                f"{_API}.update: no inf checks were recorded since the last update(); call "
                "scaler.step(optimizer) (or scaler.unscale_(optimizer)) first."
            )
        device = self._scale.device
        found_inf = torch.zeros(self.n, dtype=torch.bool, device=device)
        active = torch.zeros(self.n, dtype=torch.bool, device=device)
        for s in states:
            found_inf |= s["found_inf"].to(device)
            active |= s["active"].to(device)
        # torch._amp_update_scale_ per member: the products in float64, stored in float32.
        tracker = torch.where(found_inf, 0, self._growth_tracker + 1)
        grow = tracker == self._growth_interval
        grown = (self._scale.double() * self._growth_factor).float()
        backed_off = (self._scale.double() * self._backoff_factor).float()
        scale = torch.where(grow & torch.isfinite(grown), grown, self._scale)
        scale = torch.where(found_inf, backed_off, scale)
        tracker = torch.where(grow, 0, tracker).to(torch.int32)
        self._scale = torch.where(active, scale, self._scale)
        self._growth_tracker = torch.where(active, tracker, self._growth_tracker)
        self._per_optimizer = {}

    # ---------------------------------------------------------------- inspection and slots
    def get_scale(self) -> torch.Tensor:
        """The ``[N]`` current scales (float32); all ones when the scaler is disabled."""
        if not self._enabled:
            return torch.ones(self.n)
        return self._scale.clone()

    def get_growth_tracker(self) -> torch.Tensor:
        """The ``[N]`` counts of consecutive steps without overflow (int32); zeros when disabled."""
        if not self._enabled:
            return torch.zeros(self.n, dtype=torch.int32)
        return self._growth_tracker.clone()

    def get_growth_factor(self) -> float:
        """The factor by which a scale grows after ``growth_interval`` good steps."""
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        """The factor by which the scale of an overflowing member is multiplied."""
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        """The number of consecutive good steps after which a scale grows."""
        return self._growth_interval

    def is_enabled(self) -> bool:
        """Whether the scaler scales at all (``enabled=False`` makes every method a pass-through)."""
        return self._enabled

    def reset_member(self, index: int) -> None:
        """Give slot ``index`` a fresh scale (``init_scale``) and tracker, e.g. for a new member."""
        index = check_member_index(f"{_API}.reset_member", index, self.n)
        if not self._enabled:
            return
        self._scale[index] = self._init_scale[index].to(self._scale.device)
        self._growth_tracker[index] = 0

    def state_dict(self) -> dict[str, Any]:
        """The ``[N]`` scales and growth trackers and the shared settings; ``{}`` when disabled."""
        if not self._enabled:
            return {}
        return {
            "scale": self._scale.detach().cpu().clone(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker.detach().cpu().clone(),
            "init_scale": self._init_scale.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of a scaler over a pack of the same size."""
        if not self._enabled:
            return
        api = f"{_API}.load_state_dict"
        if len(state_dict) == 0:
            raise RuntimeError(
                f"{api}: the state dict is empty, possibly because it was saved from a disabled "
                "GradScaler; build this one with enabled=False too, or load a state from an enabled one."
            )
        scale = torch.as_tensor(state_dict["scale"], dtype=torch.float32).reshape(-1)
        tracker = torch.as_tensor(state_dict["_growth_tracker"], dtype=torch.int32).reshape(-1)
        if scale.numel() == 1 and tracker.numel() == 1:  # a torch.amp.GradScaler state: every member gets it
            scale, tracker = scale.expand(self.n), tracker.expand(self.n)
        if scale.numel() != self.n or tracker.numel() != self.n:
            raise ValueError(
                f"{api}: the state holds {scale.numel()} scales but the pack has {self.n} members; "
                "load it into a scaler over a pack of the same size."
            )
        device = self._scale.device
        self._scale = scale.to(device).clone()
        self._growth_tracker = tracker.to(device).clone()
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        if "init_scale" in state_dict:
            self._init_scale = (
                torch.as_tensor(state_dict["init_scale"], dtype=torch.float32).reshape(-1).clone()
            )

    def __repr__(self) -> str:
        if not self._enabled:
            return f"mb.amp.GradScaler(n={self.n}, enabled=False)"
        lo, hi = float(self._scale.min()), float(self._scale.max())
        shown = f"{lo:g}" if lo == hi else f"[{lo:g}..{hi:g}]"
        return f"mb.amp.GradScaler(n={self.n}, scale={shown}, growth_interval={self._growth_interval})"

    # ---------------------------------------------------------------- internals
    def _state(self, optimizer: Optimizer, method: str) -> dict[str, Any]:
        batch = getattr(optimizer, "batch", None)
        if not isinstance(batch, ModelBatch):
            raise TypeError(
                f"{_API}.{method}: expected a modelbatch optimizer (mb.optim.*) over the pack, got "
                f"{type(optimizer).__name__}."
            )
        if batch.n != self.n:
            raise ValueError(
                f"{_API}.{method}: the optimizer's pack has {batch.n} members but the scaler has {self.n}; "
                "build the scaler with mb.amp.GradScaler(batch) for the same pack."
            )
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY})

    def _move_to(self, device: torch.device) -> None:
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._growth_tracker = self._growth_tracker.to(device)
