"""Dropout in a pack: every member draws its masks from its own generator, at its own rate.

Under ``torch.vmap(randomness="different")`` dropout draws from the process's global generator,
so a member's masks would depend on its pack-mates, its slot and everything else drawing random
numbers. Instead, while a pack runs its members (:func:`running_members`), torch's dropout
functions — ``F.dropout`` (what ``nn.Dropout`` calls), ``F.dropout1d``/``2d``/``3d``,
``F.alpha_dropout``, ``F.feature_alpha_dropout`` (``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``),
``torch.dropout`` and its kin, and ``F.scaled_dot_product_attention(dropout_p>0)``, looked up by
name when called, as ``nn`` and Hugging Face do — draw each member's mask from that member's
``torch.Generator`` (:class:`MemberRandom`), outside the vmap, with the ops torch's CPU kernel uses
(``empty_like(x).bernoulli_(1 - p)``, then ``div_(1 - p)``). Outside a pack they are torch's own
(one context lookup per call; see :func:`_install`). So:

* a rerun is bitwise identical, and a member's masks do not depend on its pack-mates or slot;
* on the CPU a member seeded with ``torch.Generator`` state ``s`` draws exactly the masks the
  plain model draws after ``torch.set_rng_state(s)`` (dropout layers bitwise; SDPA to round-off);
* every dropout rate is a per-member value (:class:`MemberRate`): the rate ``p`` of a dropout
  *module* (``_DropoutNd``), and a float a module keeps for ``F.dropout`` / SDPA's ``dropout_p``
  (Hugging Face's ``attention_dropout``, T5's ``dropout``; the rule: :func:`is_rate_attribute`).
  Models that differ only in them share a pack. A forward that computes with a rate in Python
  (``1 - self.attention_dropout``, ``if self.dropout > 0``) gets the plain float when the members'
  rates are equal, and an error naming the rate when they differ — never member 0's rate for all.
  Rates torch's kernels compute with (``nn.RNNBase``, ``nn.MultiheadAttention``) stay module
  settings, equal in a pack.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SELU_ALPHA = 1.7580993408473766  # torch's alpha_dropout constant (ATen/native/Dropout.cpp)


_OPERATORS = {
    "__add__": "+", "__radd__": "+", "__sub__": "-", "__rsub__": "-", "__mul__": "*", "__rmul__": "*",
    "__truediv__": "/", "__rtruediv__": "/", "__floordiv__": "//", "__rfloordiv__": "//",
    "__mod__": "%", "__rmod__": "%", "__divmod__": "divmod", "__rdivmod__": "divmod",
    "__pow__": "**", "__rpow__": "**", "__neg__": "unary -", "__pos__": "unary +", "__abs__": "abs",
    "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=", "__eq__": "==", "__ne__": "!=",
    "__bool__": "bool", "__float__": "float", "__int__": "int", "__round__": "round",
    "__trunc__": "math.trunc", "__floor__": "math.floor", "__ceil__": "math.ceil",
}  # fmt: skip


class MemberRate(float):
    """A dropout rate in a pack's skeleton: every member's rate (``rates``), by member.

    A dropout call that receives it (``F.dropout`` and its kin, ``scaled_dot_product_attention``'s
    ``dropout_p``) applies member ``i``'s rate to member ``i``. Computing with it in Python —
    arithmetic, comparisons, ``bool``, ``float`` — gives the ordinary result when all members'
    rates are equal and raises when they differ: no member is silently given another's rate.
    Its value as a C double (what a torch op reads) is the common rate, or NaN when they differ.

    Example:
        >>> rate = MemberRate([0.1, 0.1])
        >>> 1 - rate, rate > 0
        (0.9, True)
        >>> try:
        ...     1 - MemberRate([0.1, 0.3], "attention_dropout")
        ... except RuntimeError as error:
        ...     print(str(error)[:86])
        mb.ModelBatch: the dropout rate attention_dropout differs between members ([0.1, 0.3])
    """

    rates: list[float]
    where: str

    def __new__(cls, rates: Sequence[float], where: str = "") -> MemberRate:
        rates = [float(r) for r in rates]
        rate = super().__new__(cls, rates[0] if len(set(rates)) == 1 else math.nan)
        rate.rates, rate.where = rates, where
        return rate

    def __reduce__(self) -> tuple:
        return (MemberRate, (self.rates, self.where))

    def __deepcopy__(self, memo: dict) -> MemberRate:
        return MemberRate(self.rates, self.where)

    def __repr__(self) -> str:
        return f"MemberRate({self.rates})"

    __hash__ = float.__hash__

    def common(self, operation: str) -> float:
        """The members' rate when they are all equal; else ``operation`` (needing one value) raises."""
        if len(set(self.rates)) == 1:
            return self.rates[0]
        where = f" {self.where}" if self.where else ""
        raise RuntimeError(
            f"mb.ModelBatch: the dropout rate{where} differs between members ({self.rates}), and the "
            f"model computes with it ({operation}); a pack applies each member's own rate only where "
            "the rate is passed to F.dropout (and its kin) or to F.scaled_dot_product_attention's "
            "dropout_p. Give these members equal rates (they may then share a pack), or keep the rate "
            "under a name that is not a dropout rate's (see modelbatch._dropout.is_rate_attribute): "
            "models differing in it then train in separate packs."
        )


def _guarded(name: str) -> Callable:
    method = getattr(float, name)

    def operator(self: MemberRate, *args: Any) -> Any:
        return method(self.common(_OPERATORS[name]), *args)

    operator.__name__ = name
    return operator


for _name in _OPERATORS:
    setattr(MemberRate, _name, _guarded(_name))


def is_rate_attribute(module: nn.Module, name: str, value: Any) -> bool:
    """Whether ``module.name = value`` is a dropout rate a pack holds per member (:class:`MemberRate`).

    The rule: a dropout module's ``p`` (``nn.modules.dropout._DropoutNd``); and any ``float``
    attribute in ``[0, 1]`` whose name contains ``"dropout"`` or ends with ``"pdrop"`` (Hugging
    Face's ``attention_dropout``, T5's ``dropout``, ViT's ``dropout_prob``, GPT-2-style
    ``attn_pdrop``), except on ``nn.RNNBase`` and ``nn.MultiheadAttention``, whose rates torch's
    kernels compute with (those stay module settings, equal in a pack). ``bool``/``int`` values
    are not rates.

    Example:
        >>> from torch import nn
        >>> [is_rate_attribute(nn.Module(), name, 0.1) for name in ("attention_dropout", "layerdrop")]
        [True, False]
    """
    if not (isinstance(value, MemberRate) or (type(value) is float and 0.0 <= value <= 1.0)):
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return name == "p"
    lower = name.lower()
    named = "dropout" in lower or lower.endswith("pdrop")
    return named and not isinstance(module, (nn.RNNBase, nn.MultiheadAttention))


def _is_config(value: Any) -> bool:
    """A model configuration a module keeps (Hugging Face's ``PretrainedConfig``: ``to_dict``)."""
    return not isinstance(value, nn.Module) and callable(getattr(value, "to_dict", None))


def rate_slots(model: nn.Module) -> dict[str, tuple[Any, str]]:
    """Every per-member dropout rate of ``model``: ``{key: (owner, attribute)}``.

    The key of a dropout module's ``p`` is the module's path (``"1"``, ``"encoder.drop"``); that
    of a float rate the attribute's path (``"model.layers.0.self_attn.attention_dropout"``). A
    configuration the modules keep (Hugging Face's ``model.config``, shared by its submodules) has
    its float rates here too (``"config.hidden_dropout_prob"``), so that ``member(i).config`` and
    its ``save_pretrained`` hold member ``i``'s rates, not model 0's.
    """
    slots: dict[str, tuple[Any, str]] = {}
    configs: set[int] = set()
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if is_rate_attribute(module, name, value):
                module_p = isinstance(module, nn.modules.dropout._DropoutNd)
                slots[path if module_p else f"{path}.{name}".lstrip(".")] = (module, name)
            elif _is_config(value) and id(value) not in configs:
                configs.add(id(value))
                for field, rate in vars(value).items():
                    if not field.startswith("_") and is_rate_attribute(module, field, rate):
                        slots[f"{path}.{name}.{field}".lstrip(".")] = (value, field)
    return slots


def install_member_rates(skeleton: nn.Module, models: Sequence[nn.Module]) -> None:
    """Give every dropout rate of ``skeleton`` a :class:`MemberRate` holding each model's value."""
    per_model = [rate_slots(m) for m in models]
    for key, (module, name) in rate_slots(skeleton).items():
        rates = [plain_rate(getattr(*slots[key]), "mb.ModelBatch") for slots in per_model]
        setattr(module, name, MemberRate(rates, key))


def plain_rate(rate: float, api: str) -> float:
    """A model's rate as a plain float; a pack's :class:`MemberRate` (a skeleton passed for a
    model) raises, ``api`` first."""
    if isinstance(rate, MemberRate):
        raise TypeError(
            f"{api}: got a pack's skeleton (its rates are per member: {rate.where} = {rate.rates}); "
            "pass a plain model, e.g. batch.member(i)."
        )
    return float(rate)


def set_member_rates(skeleton: nn.Module, key: str, rates: Sequence[float], api: str) -> None:
    """Put every member's rate ``rates`` at ``key`` of :func:`rate_slots` (a new :class:`MemberRate`)."""
    slot = rate_slots(skeleton).get(key)
    if slot is None:
        raise KeyError(
            f"{api}: {key!r} is not a dropout rate of the pack's models (they have "
            f"{sorted(rate_slots(skeleton))}); pass a model or state of the pack's architecture."
        )
    setattr(slot[0], slot[1], MemberRate(rates, key))


class MemberRandom:
    """One random stream per member of a pack: a ``torch.Generator`` per member and device type.

    A member is seeded with :meth:`seed` (or given a CPU generator state with :meth:`set_state`);
    a member never seeded takes a seed from the global generator at its first draw.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.seeds: list[int | None] = [None] * n
        self._generators: list[dict[str, torch.Generator]] = [{} for _ in range(n)]

    def seed(self, member: int, seed: int) -> None:
        """Start member ``member``'s streams from ``seed`` (``torch.manual_seed(seed)``'s state)."""
        self.seeds[member] = int(seed)
        self._generators[member] = {}

    def set_state(self, member: int, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Put back states from :meth:`get_state` (or one CPU state, as ``torch.get_rng_state()``)."""
        states = {"cpu": state} if isinstance(state, torch.Tensor) else dict(state)
        seed = states.pop("seed", None)
        if seed is not None:
            self.seeds[member] = int(seed)
        self._generators[member] = {}
        for device, value in states.items():
            gen = torch.Generator(device=torch.device(device))
            gen.set_state(value.cpu())
            self._generators[member][device] = gen

    def get_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s generator states by device type, and its seed (``"seed"``)."""
        out = {device: g.get_state() for device, g in self._generators[member].items()}
        if self.seeds[member] is not None:
            out["seed"] = torch.tensor(self.seeds[member])
        return out

    def generator(self, member: int, device: torch.device) -> torch.Generator:
        """Member ``member``'s generator for tensors on ``device`` (created from its seed)."""
        key = device.type if device.index is None or device.type == "cpu" else str(device)
        gens = self._generators[member]
        gen = gens.get(key)
        if gen is None:
            if self.seeds[member] is None:  # never seeded: one draw of the global generator
                self.seeds[member] = int(torch.randint(0, 2**62, (1,)).item())
            gen = gens[key] = torch.Generator(device=device).manual_seed(self.seeds[member])
        return gen

    def __getstate__(self) -> dict:
        return {"n": self.n, "seeds": self.seeds, "states": [self.get_state(i) for i in range(self.n)]}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n"])
        for i, member_state in enumerate(state["states"]):
            if member_state:
                self.set_state(i, member_state)
        self.seeds = list(state["seeds"])


@dataclass
class _Call:
    """The pack call in progress: its streams, and the member (slot) at each position of the call."""

    random: MemberRandom
    slots: list[int]


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("modelbatch_dropout", default=None)
# The position in the call of the member(s) running: an int (loop), or a tensor batched by the
# pack's vmap holding each member's position.
_POSITION: contextvars.ContextVar[Any] = contextvars.ContextVar("modelbatch_position", default=None)


@contextlib.contextmanager
def running_members(random: MemberRandom, slots: Sequence[int]) -> Iterator[None]:
    """While a pack runs the members ``slots`` (in this order), dropout draws from their streams."""
    if not _ORIGINALS:
        _install()
    token = _CALL.set(_Call(random, list(slots)))
    try:
        yield
    finally:
        _CALL.reset(token)


@contextlib.contextmanager
def member_own_rates(slots: Sequence[tuple[Any, str]], position: int) -> Iterator[None]:
    """While one member runs alone (the compiled loop), each rate that differs between members is
    that member's plain float: ``torch.compile`` reads a module's float as a constant, which a
    :class:`MemberRate` cannot be where rates differ (one graph per distinct rate instead).
    ``slots``: the skeleton's ``rate_slots(...).values()``."""
    call = _CALL.get()
    slot = position if call is None else call.slots[position]
    swapped = []
    for owner, name in slots:
        rate = getattr(owner, name)
        if isinstance(rate, MemberRate) and len(set(rate.rates)) > 1:
            swapped.append((owner, name, rate))
            setattr(owner, name, rate.rates[slot])
    try:
        yield
    finally:
        for owner, name, rate in swapped:
            setattr(owner, name, rate)


@contextlib.contextmanager
def at_position(position: Any) -> Iterator[None]:
    """The member(s) running now: position ``int`` in the call, or a vmap-batched tensor of them."""
    token = _POSITION.set(position)
    try:
        yield
    finally:
        _POSITION.reset(token)


def current() -> tuple[_Call, Any] | None:
    """The call and position in progress (``None`` outside a pack), e.g. to replay a region."""
    call = _CALL.get()
    return None if call is None else (call, _POSITION.get())


def snapshot() -> Callable[[], None]:
    """A function that puts the streams of the call in progress back to their states now."""
    call = _CALL.get()
    if call is None:
        return lambda: None
    states = {slot: call.random.get_state(slot) for slot in call.slots}

    def restore() -> None:
        for slot, state in states.items():
            call.random.set_state(slot, state)

    return restore


@contextlib.contextmanager
def replaying(
    saved: tuple[_Call, Any] | None, states: Callable[[], None] | None, position: Any
) -> Iterator[None]:
    """Run a checkpointed region again with the masks of its forward: the streams as they were then.

    ``states`` is a :func:`snapshot` taken when the region first ran; the streams are put back to
    where they are now afterwards (as torch's checkpoint forks the global generator).
    """
    if saved is None:
        yield
        return
    call = saved[0]
    token = _CALL.set(call)
    after = snapshot()
    try:
        if states is not None:
            states()
        with at_position(position):
            yield
    finally:
        after()
        _CALL.reset(token)


# ---------------------------------------------------------------------------- the masks
@dataclass(frozen=True)
class _Spec:
    """What a mask is for: its shape, dtype, device, the members' rates, alpha or not."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    rates: tuple[float, ...]  # by position in the call
    alpha: bool
    call: _Call


@torch.compiler.disable  # compile=True: inductor cannot lower a draw from a given generator
def _draw(spec: _Spec, position: int) -> torch.Tensor:
    """Member ``position``'s multiplier as torch's CPU dropout kernel computes it.

    Alpha dropout: its multiplier and offset, stacked (``[2, *shape]``).
    """
    p = spec.rates[position]
    if p == 0.0 or p == 1.0:  # torch draws nothing for these rates
        noise = torch.full(spec.shape, 1.0 - p, dtype=spec.dtype, device=spec.device)
        return torch.stack([noise, torch.zeros_like(noise)]) if spec.alpha else noise
    gen = spec.call.random.generator(spec.call.slots[position], spec.device)
    noise = torch.empty(spec.shape, dtype=spec.dtype, device=spec.device).bernoulli_(1 - p, generator=gen)
    if spec.alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        offset = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
        return torch.stack([noise.mul_(a), offset])
    return noise.div_(1 - p)


class _MemberNoise(torch.autograd.Function):
    """Each member's dropout multiplier (see :func:`_draw`); under vmap drawn member by member, unbatched."""

    generate_vmap_rule = False

    @staticmethod
    def forward(position: torch.Tensor, spec: _Spec) -> torch.Tensor:
        return _draw(spec, int(position))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, position: torch.Tensor, spec: _Spec) -> tuple:
        if in_dims[0] is None:  # a vmap inside the model: the pack's vmap is further out
            return _MemberNoise.apply(position, spec), None
        positions = position.movedim(in_dims[0], 0).tolist()
        return torch.stack([_draw(spec, i) for i in positions]), 0


def _noise(shape: Sequence[int], like: torch.Tensor, p: float, alpha: bool) -> torch.Tensor:
    """The multiplier (alpha: multiplier and offset) of the member(s) running, at their rates."""
    call, position = _CALL.get(), _POSITION.get()
    rates = p.rates if isinstance(p, MemberRate) else None
    per_position = tuple(float(p) if rates is None else rates[slot] for slot in call.slots)
    spec = _Spec(tuple(shape), like.dtype, like.device, per_position, alpha, call)
    if isinstance(position, int):
        return _draw(spec, position)
    return _MemberNoise.apply(position, spec)


def _all_rates(p: float) -> list[float]:
    return p.rates if isinstance(p, MemberRate) else [float(p)]


def _dropout(
    x: torch.Tensor, p: float, training: bool, inplace: bool, feature: bool, alpha: bool
) -> torch.Tensor:
    """torch's ``_dropout_impl`` with each member's own mask and rate."""
    if any(not 0.0 <= r <= 1.0 for r in _all_rates(p)):
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or x.numel() == 0 or all(r == 0.0 for r in _all_rates(p)):
        return x
    if feature:
        if x.dim() < 2:
            raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
        shape = [x.shape[0], x.shape[1], *([1] * (x.dim() - 2))]
    else:
        shape = list(x.shape)
    noise = _noise(shape, x, p, alpha)
    if not alpha:
        return x.mul_(noise) if inplace else x * noise
    noise, offset = noise.unbind(0)
    return (x.mul_(noise) if inplace else x * noise).add_(offset)


def _functional(feature: bool, alpha: bool, unbatched_dim: int | None = None) -> Callable:
    """A ``F.dropout*`` of one kind: feature (channel) or not, alpha or not."""

    def dropout(
        input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
    ) -> torch.Tensor:
        squeeze = unbatched_dim is not None and input.dim() == unbatched_dim
        if squeeze:
            input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
        out = _dropout(input, p, training, inplace, feature, alpha)
        if squeeze:
            out = out.squeeze_(0) if inplace else out.squeeze(0)
        return out

    return dropout


def _aten(feature: bool, alpha: bool, inplace: bool) -> Callable:
    """``torch.dropout``-style ops: ``(input, p, train)``."""

    def dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        return _dropout(input, p, train, inplace, feature, alpha)

    return dropout


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with each member's own dropout mask (and rate) on the weights.

    torch's math formulation (``softmax(q kᵀ · scale + mask) · noise @ v``); the same masks as the
    plain call, its results to round-off. Without dropout it is torch's own SDPA, except under the
    pack's vmap on the CPU, where it is torch's math kernel: the CPU's fused attention kernel has
    no batching rule (vmap would run it once per member, with a performance warning).
    """
    if all(r == 0.0 for r in _all_rates(dropout_p)):
        if query.device.type == "cpu" and torch._C._functorch.is_batchedtensor(query):
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA converts it
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, -math.inf)
            gqa = {"enable_gqa": True} if enable_gqa else {}
            return torch.ops.aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, 0.0, is_causal, None, scale=scale, **gqa
            )[0]
        return _ORIGINALS["torch.nn.functional.scaled_dot_product_attention"](
            query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    length, source = query.shape[-2], key.shape[-2]
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    factor = math.sqrt(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
    weights = (query * factor) @ (key * factor).transpose(-2, -1)
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        weights = weights.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attn_mask, float("-inf"))
        else:
            weights = weights + attn_mask
    weights = torch.softmax(weights, dim=-1)
    noise = _noise(weights.shape, weights, dropout_p, alpha=False)
    return (weights * noise) @ value


# What a pack routes to the members' streams: torch's dropout functions, looked up by name at each
# call (``nn.Dropout`` calls ``F.dropout``, Hugging Face ``nn.functional.dropout`` and SDPA).
_ROUTED: dict[tuple[Any, str], Callable] = {
    (F, "dropout"): _functional(False, False),
    (F, "alpha_dropout"): _functional(False, True),
    (F, "feature_alpha_dropout"): _functional(True, True),
    (F, "dropout1d"): _functional(True, False, unbatched_dim=2),
    (F, "dropout2d"): _functional(True, False),
    (F, "dropout3d"): _functional(True, False, unbatched_dim=4),
    (F, "scaled_dot_product_attention"): _attention,
    (torch, "dropout"): _aten(False, False, False),
    (torch, "dropout_"): _aten(False, False, True),
    (torch, "alpha_dropout"): _aten(False, True, False),
    (torch, "alpha_dropout_"): _aten(False, True, True),
    (torch, "feature_dropout"): _aten(True, False, False),
    (torch, "feature_dropout_"): _aten(True, False, True),
    (torch, "feature_alpha_dropout"): _aten(True, True, False),
    (torch, "feature_alpha_dropout_"): _aten(True, True, True),
}
_ORIGINALS: dict[str, Callable] = {}
_INSTALL_LOCK = threading.Lock()


def _router(original: Callable, own: Callable) -> Callable:
    """``own`` while a pack's member runs, else torch's ``original`` (one context lookup per call)."""

    @functools.wraps(original)
    def route(*args: Any, **kwargs: Any) -> Any:
        if _POSITION.get() is None or _CALL.get() is None:
            return original(*args, **kwargs)
        return own(*args, **kwargs)

    route.__modelbatch_original__ = original
    return route


def _install() -> None:
    """Route torch's dropout functions through :func:`_router` (once per process).

    A function reached otherwise than by its name in ``torch`` / ``torch.nn.functional`` at call
    time (``from torch.nn.functional import dropout`` before modelbatch was imported) keeps
    drawing from the global generator.
    """
    with _INSTALL_LOCK:
        if _ORIGINALS:
            return
        for (owner, name), own in _ROUTED.items():
            original = getattr(owner, name)
            original = getattr(original, "__modelbatch_original__", original)
            _ORIGINALS[f"{owner.__name__}.{name}"] = original
            setattr(owner, name, _router(original, own))
