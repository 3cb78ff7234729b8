"""Pre-flight check: one float64 batch, packed vs one model at a time, before any training."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

if TYPE_CHECKING:
    from .._batch import ModelBatch
    from ..testing import PackReport

#: Differences below this (relative to each tensor's scale) are round-off; a vmap bug is ~1.
PREFLIGHT_RTOL = 1e-9
#: Tensors much smaller than the largest of their kind (a bias feeding BatchNorm, whose true
#: gradient is zero) are compared against this fraction of the largest, not against themselves.
_SCALE_FLOOR = 1e-3


class PreflightError(RuntimeError):
    """The packed models do not compute what the same models compute one by one."""


def preflight_check(
    models: Sequence[nn.Module],
    example_inputs: Tensor | tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    backend: str = "vmap",
    rtol: float = PREFLIGHT_RTOL,
) -> PackReport:
    """Check on one batch, in float64, that a pack of ``models`` computes what they compute alone.

    Copies of the first two models (or two copies of one) are converted to float64 and run on
    ``example_inputs`` packed in a :class:`~modelbatch.ModelBatch` (twice: inputs shared, then
    the same inputs stacked per member with ``in_dims=0``) and one by one; outputs, every
    parameter's gradient and the buffers after the forward (BatchNorm statistics) are compared.
    ``loss_fn(output) -> scalar`` turns one model's output into a loss (default: a fixed random
    projection of every floating output). Dropout is switched off in the copies (its masks
    differ by design); other randomness in ``forward`` makes the check fail. It takes two
    forwards and backwards: run it before spending training time.
    ``backend`` is the pack's backend under test (``"vmap"``: the one where layers go wrong).

    Returns:
        A :class:`~modelbatch.testing.PackReport` of the relative differences. Raises
        :class:`PreflightError` naming the outputs, gradients and buffers that differ.

    Example:
        >>> import torch
        >>> from modelbatch.layers import preflight_check
        >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4, padding_idx=0), torch.nn.LSTM(4, 3))
        >>> report = preflight_check([net], torch.randint(0, 10, (5, 2)), lambda out: out[0].sum())
        >>> report.max_rel_diff < 1e-9
        True
    """
    from .._batch import ModelBatch
    from ..testing import PackReport

    api = "mb.layers.preflight_check"
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or len(models) == 0:
        raise TypeError(f"{api}: expected a non-empty list of nn.Module, got {type(models).__name__}.")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    inputs = tree_map(_to_float64, inputs)
    kwargs = tree_map(_to_float64, dict(example_kwargs or {}))
    sources = (models[0], models[1] if len(models) > 1 else models[0])
    loss_fn = loss_fn or _ProjectionLoss()
    report, failures = PackReport(), []
    for layout in ("shared", "per-member"):  # layers can go wrong in either (padding_idx: per-member)
        pair = [_deterministic(copy.deepcopy(m).to(torch.float64)) for m in sources]
        batch, packed, alone, outputs = _run(
            ModelBatch(pair, backend=backend), pair, inputs, kwargs, loss_fn, layout
        )
        for kind, got, ref in _pairs(batch, packed, alone, outputs):
            _compare(f"[{layout} inputs] {kind}", got, ref, rtol, report, failures)
    if failures:
        raise PreflightError(
            f"{api}: the packed models differ from the same models run one by one (float64, one "
            f"batch, rtol={rtol:g}):\n  " + "\n  ".join(failures) + "\nA layer computing these runs "
            "wrongly under torch.vmap. Replace it with a stock torch.nn layer (mb.layers fixes those), "
            "or train this architecture without a pack."
        )
    return report


def _run(
    batch: ModelBatch, pair: list[nn.Module], inputs: tuple, kwargs: dict, loss_fn: Callable, layout: str
) -> tuple[ModelBatch, Any, list[nn.Module], list[Any]]:
    """One forward + backward packed (inputs shared, or stacked once per member) and one by one."""
    alone = [copy.deepcopy(m) for m in pair]
    dims = tuple(0 if layout == "per-member" and isinstance(x, Tensor) else None for x in inputs)
    packed_inputs = tuple(torch.stack([x, x]) if d == 0 else x for x, d in zip(inputs, dims))
    with torch.enable_grad():
        packed = batch(*packed_inputs, in_dims=dims, **kwargs)
        sum(loss_fn(tree_map(lambda t, i=i: t[i], packed)) for i in range(2)).backward()
        outputs = []
        for model in alone:
            outputs.append(model(*inputs, **kwargs))
            loss_fn(outputs[-1]).backward()
    return batch, packed, alone, outputs


def install_preflight(batch: ModelBatch) -> None:
    """Run :func:`preflight_check` on ``batch``'s first forward (members 0 and 1, that call's inputs).

    Used by ``ModelBatch(models, preflight=True)``: a pack has no example inputs before its
    first call. Per-member inputs (``in_dims=0``) are checked with member 0's batch, shared by
    both; the pack's backend is checked (``"vmap"`` while it is ``"auto"``). The check runs
    again on every call until it passes.
    """
    hook = _PreflightHook(type(batch))
    hook.handle = batch.register_forward_pre_hook(hook, with_kwargs=True)


class _PreflightHook:
    """A forward pre-hook (a class, so that a pack waiting for its check still pickles)."""

    def __init__(self, batch_cls: type) -> None:
        signature = inspect.signature(batch_cls.forward).parameters.items()
        self.own = {name for name, p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY}
        self.handle: Any = None

    def __call__(self, module: ModelBatch, args: tuple, kwargs: dict) -> None:
        in_dims = kwargs.get("in_dims")
        dims = (in_dims,) * len(args) if in_dims is None or isinstance(in_dims, int) else tuple(in_dims)
        shared = tuple(a[0] if d == 0 else a for a, d in zip(args, dims))
        members = [module.member(i) for i in range(min(2, module.n))]
        user_kwargs = {k: v for k, v in kwargs.items() if k not in self.own}
        backend = "vmap" if module.backend == "auto" else module.backend
        try:
            preflight_check(members, shared, example_kwargs=user_kwargs, backend=backend)
        except PreflightError as exc:
            message = str(exc).replace("mb.layers.preflight_check", "mb.ModelBatch(preflight=True)")
            raise PreflightError(message) from None
        self.handle.remove()


def _to_float64(value: Any) -> Any:
    return value.to(torch.float64) if isinstance(value, Tensor) and value.is_floating_point() else value


def _deterministic(model: nn.Module) -> nn.Module:
    """Switch off dropout in a private copy: dropout modules, and every float rate a module keeps
    for ``F.dropout`` (RNN inter-layer and MHA ``dropout``, Hugging Face's ``attention_dropout``,
    ViT's ``dropout_prob``, ``layerdrop``): any float attribute whose name says "drop"."""
    for layer in model.modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.p = 0.0
        for name, value in list(vars(layer).items()):
            if "drop" in name.lower() and type(value) is float:
                setattr(layer, name, 0.0)
    return model


class _ProjectionLoss:
    """A fixed random projection of every floating output: sensitive to every output element."""

    def __init__(self) -> None:
        self.weights: dict[tuple, Tensor] = {}

    def __call__(self, output: Any) -> Tensor:
        terms = []
        for leaf in tree_flatten(output)[0]:
            if isinstance(leaf, Tensor) and leaf.is_floating_point():
                key = (tuple(leaf.shape), leaf.device)
                if key not in self.weights:
                    gen = torch.Generator().manual_seed(len(self.weights))
                    weights = torch.randn(leaf.shape, generator=gen, dtype=torch.float64)
                    self.weights[key] = weights.to(leaf.device)
                terms.append((leaf * self.weights[key]).sum())
        if not terms:
            raise TypeError(
                "mb.layers.preflight_check: the model returned no floating-point tensor; pass "
                "loss_fn(output) -> scalar tensor."
            )
        return torch.stack(terms).sum()


def _pairs(batch: ModelBatch, packed: Any, alone: list[nn.Module], outputs: list[Any]):
    """Yield ``(kind, {name: [N, ...] packed}, {name: [N, ...] alone})`` for outputs, grads, buffers."""
    leaves = tree_flatten(packed)[0]
    refs = [tree_flatten(out)[0] for out in outputs]
    yield (
        "output",
        {f"output[{k}]": t for k, t in enumerate(leaves) if isinstance(t, Tensor)},
        {
            f"output[{k}]": torch.stack([r[k] for r in refs])
            for k, t in enumerate(leaves)
            if isinstance(t, Tensor)
        },
    )
    grads, ref_grads = {}, {}
    for name, param in batch.stacked_parameters().items():
        ref = [dict(m.named_parameters())[name].grad for m in alone]
        if param.grad is None and all(g is None for g in ref):
            continue
        grads[name] = param.grad if param.grad is not None else torch.zeros_like(param)
        ref_grads[name] = torch.stack([torch.zeros_like(param[0]) if g is None else g for g in ref])
    yield "gradient of", grads, ref_grads
    yield (
        "buffer",
        batch.stacked_buffers(),
        {
            name: torch.stack([dict(m.named_buffers())[name] for m in alone])
            for name in batch.stacked_buffers()
        },
    )


def _compare(
    kind: str, got: dict[str, Tensor], ref: dict[str, Tensor], rtol: float, report: Any, failures: list
) -> None:
    """Per-member ``max |got - ref|`` relative to the tensor's scale (floored by the largest of its kind)."""
    scales = {name: float(r.detach().abs().max()) if r.numel() else 0.0 for name, r in ref.items()}
    floor = _SCALE_FLOOR * max(scales.values(), default=0.0)
    for name, r in ref.items():
        g, r = got[name].detach(), r.detach()
        if r.numel() == 0:
            continue
        if r.is_floating_point():
            err = (g - r).abs().reshape(g.shape[0], -1).amax(1) / max(scales[name], floor, 1e-300)
        else:
            # Integers (num_batches_tracked, position_ids) compare exactly: 0 or inf, never nan.
            unequal = (g != r).reshape(g.shape[0], -1).any(1)
            err = torch.where(unequal, float("inf"), 0.0)
        report.rel_diff[f"{kind} {name}"] = float(err.max())
        members = [i for i, e in enumerate(err.tolist()) if not e <= rtol]
        if members:
            failures.append(f"{kind} {name!r}: members {members} differ (relative difference {max(err):.2e})")
