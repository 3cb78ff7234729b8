"""Conformance check: prove that packing is exact for *your* model.

``assert_pack_matches_sequential`` trains the same N models twice in float64 — once packed in a
:class:`~modelbatch.ModelBatch` with a :mod:`modelbatch.optim` optimizer, once one model at a time
with the matching ``torch.optim`` optimizer — on the same per-member batches, and compares every
parameter and buffer.

Example:
    >>> import torch, modelbatch as mb
    >>> def make(i):
    ...     torch.manual_seed(i)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> report = mb.testing.assert_pack_matches_sequential(make, (X, y), optimizer="adam",
    ...     hparams={"lr": [1e-3, 3e-3, 1e-2]}, n_members=3, steps=20)
    >>> report.max_rel_diff < 1e-10
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import optim as mb_optim
from ._batch import ModelBatch, select_output
from ._recipe import OPTIMIZERS as RECIPE_OPTIMIZERS
from ._sync_probe import HostSyncCounter as HostSyncCounter

#: Each optimizer name of :class:`~modelbatch.Recipe`: its packed class and the ``torch.optim``
#: class of the same name it must match.
OPTIMIZERS: dict[str, tuple[type[mb_optim.Optimizer], type[torch.optim.Optimizer]]] = {
    name: (cls, getattr(torch.optim, cls.__name__)) for name, cls in RECIPE_OPTIMIZERS.items()
}


#: A parameter whose gradient stays below this fraction of the model's largest gradient at every
#: step has a true gradient of zero (attention key biases, a bias feeding BatchNorm): its values
#: are round-off that Adam turns into full steps, so it is listed, not compared. Not 1e-15: models
#: run parts in float32 even in a float64 run (Hugging Face's softmax), whose round-off reaches
#: ~3e-9 of the largest gradient (measured on ViT's key biases).
ZERO_GRAD_RTOL = 1e-6


@dataclass
class PackReport:
    """Per-tensor relative differences after training: max |packed - alone| over the largest
    |alone| of the tensor's kind (all ``bias`` parameters, all ``running_var`` buffers, ...).

    ``zero_gradient`` names the parameters whose true gradient is zero (left out of the
    comparison: see :data:`ZERO_GRAD_RTOL`); :attr:`verdict` says it all in one line.
    """

    rel_diff: dict[str, float] = field(default_factory=dict)
    zero_gradient: list[str] = field(default_factory=list)
    rtol: float | None = None

    @property
    def max_rel_diff(self) -> float:
        return max(self.rel_diff.values(), default=0.0)

    @property
    def verdict(self) -> str:
        """One line: equal or not, the largest difference, which tensors were not compared."""
        worst = max(self.rel_diff, key=self.rel_diff.get, default=None)
        ok = self.rtol is None or self.max_rel_diff <= self.rtol
        line = (
            f"{'packed == alone' if ok else 'packed != alone'}: max relative difference "
            f"{self.max_rel_diff:.1e} ({worst}) over {len(self.rel_diff)} tensors"
        )
        if self.rtol is not None:
            line += f", rtol {self.rtol:g}"
        if self.zero_gradient:
            shown = ", ".join(self.zero_gradient[:4]) + (", ..." if len(self.zero_gradient) > 4 else "")
            line += f"; zero true gradient, not compared: {len(self.zero_gradient)} ({shown})"
        return line


def member_hparams(hparams: Mapping[str, Any], index: int, n: int) -> dict[str, Any]:
    """The torch.optim keyword arguments of member ``index`` from per-member ``hparams``."""

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[index]) if value.numel() == n else float(value)
        if isinstance(value, (list, tuple)) and len(value) == n and not isinstance(value[0], (bool, str)):
            return float(value[index])
        return value

    out = {}
    for key, value in hparams.items():
        if key == "betas":
            out[key] = (pick(value[0]), pick(value[1]))
        else:
            out[key] = pick(value)
    return out


def member_batches(
    n_samples: int, n_members: int, steps: int, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """Index tensor ``[steps, N, B]``: member ``i`` draws its own batches from generator ``seed + i``."""
    out = torch.empty(steps, n_members, batch_size, dtype=torch.long)
    for i in range(n_members):
        gen = torch.Generator().manual_seed(seed + i)
        out[:, i] = torch.randint(0, n_samples, (steps, batch_size), generator=gen)
    return out


def assert_pack_matches_sequential(
    model_factory: Callable[[int], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    optimizer: str = "adam",
    hparams: Mapping[str, Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    n_members: int = 4,
    steps: int = 200,
    batch_size: int = 32,
    rtol: float = 1e-10,
    ignore: Sequence[str] = (),
    seed: int = 0,
    backend: str = "vmap",
    output: str | int | None = None,
) -> PackReport:
    """Train ``n_members`` models packed and alone (float64) and assert they end up equal.

    Args:
        model_factory: ``i -> nn.Module``; called twice per member, it must return equal weights
            for equal ``i`` (seed inside it). Dropout may be on: member ``i`` draws its masks
            from its own stream seeded ``seed + i`` (:meth:`ModelBatch.manual_seed`), the model
            alone after ``torch.manual_seed(seed + i)`` (equal masks on the CPU).
        data: ``(X, y)``; member ``i`` trains on its own random batches of it (drawn from seed ``seed + i``).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
        hparams: optimizer keyword arguments; a list of ``n_members`` values gives one per member.
        rtol: the largest allowed ``max |packed - alone|`` of any tensor, relative to the
            largest ``|alone|`` of its kind (:func:`tensor_kind`: a bias that starts at zero is
            judged at the scale of the model's biases, not at its own round-off).
        ignore: parameter/buffer names left out. Parameters whose true gradient is zero (a bias
            feeding BatchNorm, attention key biases) are found and left out by themselves
            (listed in ``report.zero_gradient``): Adam turns their round-off into full steps.
        backend: the pack's backend (``"vmap"``, ``"chunked"``, ``"loop"``; see ModelBatch).
        output: the field of the model's outputs the loss uses, for models returning a
            ``ModelOutput``/dict (default ``"logits"``) or a tuple (default 0).

    Returns:
        A :class:`PackReport`. Raises ``AssertionError`` naming the tensors and members that differ.
    """
    api = "mb.testing.assert_pack_matches_sequential"
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{api}: unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")
    hparams = dict(hparams or {})
    packed_cls, torch_cls = OPTIMIZERS[optimizer]
    X, y = data
    X = X.to(torch.float64) if X.is_floating_point() else X
    y = y.to(torch.float64) if y.is_floating_point() else y
    models = [model_factory(i).to(torch.float64) for i in range(n_members)]
    alone = [copy.deepcopy(m) for m in models]
    batches = member_batches(X.shape[0], n_members, steps, batch_size, seed)

    batch = ModelBatch(models, backend=backend)
    batch.manual_seed([seed + i for i in range(n_members)])
    opt = packed_cls(batch, **hparams)
    for idx in batches:
        opt.zero_grad()
        out = batch(X[idx], in_dims=0)
        batch.compute_loss(out, y[idx], loss_fn, target_in_dims=0, output=output).sum().backward()
        opt.step()

    zero: dict[str, bool] = {}
    for i, model in enumerate(alone):
        _train_alone(
            model,
            torch_cls(model.parameters(), **member_hparams(hparams, i, n_members)),
            X,
            y,
            batches[:, i],
            _picking(loss_fn, output),
            seed + i,
            zero,
        )
    skip = set(ignore) | {name for name, always in zero.items() if always}
    try:
        report = _compare(api, batch, alone, rtol, skip)
    except AssertionError as exc:
        drift = _chaos_drift(
            model_factory, torch_cls, hparams, n_members, X, y, batches, _picking(loss_fn, output), skip, seed
        )
        raise AssertionError(
            f"{exc}\n  For scale: the reference trained alone drifts by {drift:.3e} from itself when its "
            "initial weights are nudged by 1e-15 (relative). If that is as large as the difference above, "
            "training is chaotic at these settings (use fewer steps or a smaller lr); else packing is wrong."
        ) from None
    report.zero_gradient = sorted(name for name, always in zero.items() if always)
    report.rtol = rtol
    return report


def _picking(loss_fn: Callable, output: str | int | None) -> Callable:
    """``loss_fn`` on the field ``output`` of one model's outputs (a ModelOutput, dict or tuple)."""

    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(select_output(out, output, "mb.testing.assert_pack_matches_sequential"), y)

    return loss


def _train_alone(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    loss_fn: Callable,
    seed: int,
    zero: dict[str, bool] | None = None,
) -> None:
    """Train one model with torch.optim, its dropout drawing from the global generator seeded
    ``seed`` (restored afterwards); ``zero[name]`` stays True while ``name``'s gradient is ~0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx in batches:
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            if zero is not None:
                _track_zero_gradients(model, zero)
            opt.step()


def _track_zero_gradients(model: nn.Module, zero: dict[str, bool]) -> None:
    grads = {n: p.grad.abs().max() for n, p in model.named_parameters() if p.grad is not None}
    largest = float(max(grads.values(), default=torch.zeros(())))
    for name, _ in model.named_parameters():
        small = name not in grads or float(grads[name]) <= ZERO_GRAD_RTOL * largest
        zero[name] = zero.get(name, True) and small


def _chaos_drift(model_factory, torch_cls, hparams, n, X, y, batches, loss_fn, ignore, seed) -> float:
    """The largest relative difference of the reference from itself under a 1e-15 weight nudge."""
    worst = 0.0
    for i in range(n):
        pair = [model_factory(i).to(torch.float64) for _ in range(2)]
        with torch.no_grad():
            for p in pair[1].parameters():
                p.mul_(1 + 1e-15)
        for model in pair:
            _train_alone(
                model,
                torch_cls(model.parameters(), **member_hparams(hparams, i, n)),
                X,
                y,
                batches[:, i],
                loss_fn,
                seed + i,
            )
        nudged = dict(_floating_tensors(pair[1]))
        for name, a in _floating_tensors(pair[0]):  # buffers too (BatchNorm statistics)
            if name not in ignore:
                b = nudged[name]
                worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)))
    return worst


def _floating_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t.detach()) for name, t in named if t.is_floating_point() and t.numel()]


def tensor_kind(name: str, is_parameter: bool) -> str:
    """The kind a tensor's differences are scaled by: parameter or buffer, and its own name.

    Example:
        >>> tensor_kind("encoder.layer.0.attention.key.bias", True)
        'parameter bias'
    """
    return f"{'parameter' if is_parameter else 'buffer'} {name.rpartition('.')[2]}"


def _compare(
    api: str, batch: ModelBatch, alone: list[nn.Module], rtol: float, ignore: set[str]
) -> PackReport:
    """Each tensor's largest difference per member, relative to the largest value of its kind.

    A kind is e.g. every ``bias`` parameter (:func:`tensor_kind`): a tensor of small values (a
    bias initialized to zero) is compared at the scale of its kind, not at its own round-off.
    """
    report = PackReport()
    failures = []
    params = batch.stacked_parameters()
    pairs = {}
    for name, stacked in {**params, **batch.stacked_buffers()}.items():
        if name in ignore:
            continue
        ref = torch.stack(
            [dict(m.named_parameters()).get(name, dict(m.named_buffers()).get(name)) for m in alone]
        )
        pairs[name] = (ref.detach(), stacked.detach())
    scales: dict[str, torch.Tensor] = {}
    for name, (ref, _) in pairs.items():
        if ref.is_floating_point():
            kind = tensor_kind(name, name in params)
            largest = ref.abs().reshape(len(ref), -1).amax(1).to(torch.float64)
            scales[kind] = torch.maximum(scales.get(kind, largest), largest)
    for name, (ref, got) in pairs.items():
        if not got.is_floating_point():  # integer buffers (num_batches_tracked) compare exactly
            diff = torch.where((got != ref).reshape(len(ref), -1).any(1), float("inf"), 0.0)
        else:
            scale = scales[tensor_kind(name, name in params)].clamp_min(1e-300)
            diff = (got - ref).abs().reshape(len(ref), -1).amax(1).to(torch.float64) / scale
        report.rel_diff[name] = float(diff.max())
        bad = (~(diff <= rtol)).nonzero().flatten().tolist()  # nan differs too
        if bad:
            failures.append(f"{name}: members {bad} differ (worst relative diff {float(diff.max()):.3e})")
    if failures:
        shown = failures[:8] + ([f"... and {len(failures) - 8} more tensors"] if len(failures) > 8 else [])
        raise AssertionError(
            f"{api}: packed training differs from training alone (rtol={rtol:g}) in {len(failures)} of "
            f"{len(report.rel_diff)} tensors:\n  " + "\n  ".join(shown)
        )
    return report
