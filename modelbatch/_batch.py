"""ModelBatch: N models of one architecture stacked and run as one vmapped module."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import stack_module_state, vmap
from torch.utils import _pytree as pytree

from ._activation_checkpoint import running_pack
from ._architecture import first_setting_difference
from ._backends import Backends, check_compile
from ._dropout import (
    MemberRandom,
    install_member_rates,
    plain_rate,
    rate_slots,
    running_members,
    set_member_rates,
)
from ._host import device_tensor, host_list, member_flags
from ._hparams import check_member_index
from ._huggingface import adapt_skeleton
from ._tied import retie, set_tensor, tied_names
from .layers import install_preflight, prepare_for_vmap


class MemberLosses(torch.Tensor):
    """The ``[N]`` per-member losses returned by :meth:`ModelBatch.compute_loss`.

    It behaves as a plain tensor except that ``backward()`` without a gradient raises: the right
    call is ``losses.sum().backward()``, which gives every member exactly its own gradient.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def backward(self, gradient: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> None:
        if gradient is None and self.numel() > 1:
            raise RuntimeError(
                "mb.ModelBatch.compute_loss: the losses hold one value per member "
                f"(shape {list(self.shape)}); call losses.sum().backward() so that each member "
                "gets exactly its own gradient. Do not use .mean(): it divides every gradient by N."
            )
        super().backward(gradient, *args, **kwargs)


# Up to this many members, compute_loss calls loss_fn once per member instead of vmapping it: vmap
# runs e.g. cross_entropy through torch's Python decomposition of nll_loss, a fixed ~0.3 ms per call
# (measured on CPU: 0.35 ms vmapped vs 0.02 ms per member). The same op runs per member either way.
LOSS_LOOP_MAX_N = 8


def _looped_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: torch.Tensor,
    targets: torch.Tensor,
    dim: int | None,
) -> Any:
    """``vmap(loss_fn, in_dims=(0, dim))(outputs, targets)`` as a loop over members."""
    if outputs.shape[0] == 1:  # a squeeze's backward is a view, an unbind's a copy
        loss = loss_fn(outputs.squeeze(0), targets if dim is None else targets.squeeze(0))
        return loss.unsqueeze(0) if isinstance(loss, torch.Tensor) else loss
    losses = [loss_fn(out, targets if dim is None else targets[i]) for i, out in enumerate(outputs.unbind(0))]
    if not all(isinstance(loss, torch.Tensor) for loss in losses):
        return losses
    return torch.stack(losses)


def select_output(outputs: Any, output: str | int | None, api: str) -> Any:
    """The tensor to compute a loss on: ``outputs`` itself, or its field ``output``.

    A ``Mapping`` (a Hugging Face ``ModelOutput``, a dict) gives its ``output`` key (default
    ``"logits"``); a tuple or list its element ``output`` (default 0); a tensor itself.

    Example:
        >>> import torch
        >>> select_output({"logits": torch.ones(2), "hidden": torch.zeros(2)}, None, "api").tolist()
        [1.0, 1.0]
    """
    if isinstance(outputs, Mapping):
        key = "logits" if output is None else output
        if key not in outputs:
            raise KeyError(
                f"{api}: the model's outputs ({type(outputs).__name__}) have no field {key!r}; they "
                f"have {list(outputs.keys())}. Pass output='<field>' to pick the one the loss uses."
            )
        return outputs[key]
    if isinstance(outputs, (tuple, list)):
        index = 0 if output is None else output
        if not isinstance(index, int) or not -len(outputs) <= index < len(outputs):
            raise IndexError(
                f"{api}: output={output!r} does not index the model's {len(outputs)} outputs; pass "
                "output=<position> of the tensor the loss uses."
            )
        return outputs[index]
    if output is not None:
        raise TypeError(f"{api}: output={output!r} given, but the outputs are a {type(outputs).__name__}.")
    return outputs


def _scatter_members(out: Any, ids: Callable[[torch.Tensor], torch.Tensor], k: int, n: int) -> Any:
    """Outputs of ``k`` members (``[k, ...]`` leaves) placed in ``[n, ...]`` zeros at rows ``ids(t)``."""

    def place(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != k:
            return t
        return t.new_zeros((n, *t.shape[1:])).index_copy(0, ids(t), t)

    return pytree.tree_map(place, out)


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    first = models[0]
    ref = {n: (t.shape, t.dtype) for n, t in _named_tensors(first)}
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(first):
            raise TypeError(
                f"mb.ModelBatch: all models must be of the same class; model 0 is "
                f"{type(first).__name__} but model {i} is {type(model).__name__}. "
                "Build one ModelBatch per architecture."
            )
        _check_same_ties(model, i, first)
        got = {n: (t.shape, t.dtype) for n, t in _named_tensors(model)}
        if got.keys() != ref.keys():
            diff = sorted(got.keys() ^ ref.keys())
            raise ValueError(
                f"mb.ModelBatch: model {i} has different parameters/buffers than model 0 "
                f"(differing names: {diff[:5]}). Build one ModelBatch per architecture."
            )
        for name, (shape, dtype) in got.items():
            if (shape, dtype) != ref[name]:
                raise ValueError(
                    f"mb.ModelBatch: model {i} has {name} of shape {list(shape)} ({dtype}) but model 0 "
                    f"has {list(ref[name][0])} ({ref[name][1]}). Models of one pack must have "
                    "identical parameter shapes: group configs by architecture, one ModelBatch each."
                )
        _check_same_training(model, i, first)
        difference = first_setting_difference(first, model)
        if difference is not None:
            raise ValueError(
                f"mb.ModelBatch: model {i} has {difference}. A pack runs every member through model 0's "
                "modules, so module settings must be equal: build one ModelBatch per setting (mb.fit "
                "and ModelBatchSearcher group configs this way), or hold per-member values in buffers."
            )
        _check_same_rates(model, i, first)  # a config's rates (not module settings) too


def _check_same_rates(model: nn.Module, i: int, first: nn.Module) -> None:
    """Model ``i`` must have a float dropout rate wherever model 0 has one (and only there)."""
    ref, got = rate_slots(first), rate_slots(model)
    for key in sorted(ref.keys() ^ got.keys()):
        has, lacks = (f"model {i}", "model 0") if key in got else ("model 0", f"model {i}")
        raise ValueError(
            f"mb.ModelBatch: {has} has the dropout rate {key} = {getattr(*(got | ref)[key])!r} but "
            f"{lacks} has no float there (None or absent). A pack holds a rate per member only where "
            "every model has a float: give it a float in every model (e.g. 0.0), or in none."
        )


def _check_same_ties(model: nn.Module, i: int, first: nn.Module) -> None:
    """Model ``i`` must share (tie) the same tensors as model 0: a pack keeps one leaf per tie."""
    ties, ref_ties = tied_names(model), tied_names(first)
    if ties != ref_ties:
        raise ValueError(
            f"mb.ModelBatch: model {i} shares (ties) parameters/buffers {ties} but model 0 shares "
            f"{ref_ties}. A pack keeps one tensor per tie for every member: build every model with "
            "the same ties (e.g. the same tie_word_embeddings), one ModelBatch per variant."
        )


def _check_same_training(model: nn.Module, i: int, first: nn.Module) -> None:
    """Model ``i`` must freeze the same parameters as model 0 (a stacked leaf trains as a whole)."""
    ref = dict(first.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad != ref[name].requires_grad:
            raise ValueError(
                f"mb.ModelBatch: parameter {name!r} has requires_grad={param.requires_grad} in model {i} "
                f"but {ref[name].requires_grad} in model 0. A pack stacks each parameter of all members "
                "into one tensor, which trains or not as a whole: freeze the same parameters in every "
                "model (p.requires_grad_(False) on each), or freeze whole members with batch.freeze(i)."
            )


def _non_tensor_message(what: str) -> str:
    return (
        f"mb.ModelBatch.forward: the model returned {what}; a pack stacks tensor outputs only (one "
        "per member). For a Hugging Face model pass use_cache=False (the pack turns config.use_cache "
        "off; an explicit use_cache=True cannot be packed), or return tensors, tuples or dicts of "
        "tensors from forward."
    )


def _check_tensor_outputs(out: Any) -> None:
    """Raise if the members' outputs hold something a pack cannot stack (a cache object)."""
    for leaf in pytree.tree_leaves(out):
        if not isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))):
            raise TypeError(_non_tensor_message(type(leaf).__name__))


def _model_rates(api: str, model: nn.Module) -> dict[str, float]:
    """A plain model's dropout rates by :func:`rate_slots` key."""
    return {key: plain_rate(getattr(*slot), api) for key, slot in rate_slots(model).items()}


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


class ModelBatch(nn.Module):
    """Train N independent models of one architecture as one vmapped module.

    The models' parameters and buffers are copied into stacked tensors of shape ``[N, ...]``
    (``self.stack`` holds them under the original names). ``batch(x)`` runs every member on
    a shared input ``[B, ...]``; ``batch(xs, in_dims=0)`` runs member ``i`` on ``xs[i]``.
    Each member keeps its own parameters, buffers (BatchNorm statistics), dropout rates and
    random stream (:meth:`manual_seed`: its masks do not depend on its pack-mates) and, with
    :mod:`modelbatch.optim`, its own optimizer hyperparameters and state.

    Stock layers that torch runs wrongly under vmap are fixed in the skeleton by
    :func:`modelbatch.layers.prepare_for_vmap`; ``preflight=True`` checks on the first call, in
    float64, that members 0 and 1 packed compute what they compute alone
    (:func:`modelbatch.layers.preflight_check`) and raises before any training otherwise.

    ``compile=True`` wraps the backend's step in ``torch.compile(dynamic=False)``; a mode name
    (``"reduce-overhead"``, ``"max-autotune"``, ...) is passed on as its ``mode``: with
    ``"reduce-overhead"`` on CUDA the compiled forward and backward run as CUDA graphs, and
    ``torch.compile(opt.step, mode="reduce-overhead")`` of a ``capturable=True`` optimizer
    (:class:`modelbatch.optim.Optimizer`) adds the update.

    Example:
        >>> import torch, modelbatch as mb
        >>> batch = mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
        >>> batch(torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
        >>> batch.stack.weight.shape
        torch.Size([4, 2, 3])
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        preflight: bool = False,
        *,
        backend: str = "auto",
        chunk_size: int | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        compile = check_compile("mb.ModelBatch", compile)
        if isinstance(models, nn.Module) or not isinstance(models, Sequence):
            raise TypeError(
                "mb.ModelBatch: expected a list of nn.Module (one per member), got "
                f"{type(models).__name__}. Pass e.g. [MyNet() for _ in range(8)]."
            )
        if len(models) == 0:
            raise ValueError("mb.ModelBatch: got an empty list of models; pass at least one model.")
        for i, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(f"mb.ModelBatch: model {i} is a {type(model).__name__}, not an nn.Module.")
        _check_same_architecture(models)
        self._aliases = tied_names(models[0])
        params, buffers = stack_module_state(list(models))
        template = retie(copy.deepcopy(models[0]).to("meta"), self._aliases)
        stack = copy.deepcopy(template)
        for name, value in params.items():
            set_tensor(stack, name, nn.Parameter(value, requires_grad=value.requires_grad), True)
        for name, value in buffers.items():
            set_tensor(stack, name, value, False)
        retie(stack, self._aliases)  # tied names: one stacked leaf in every alias's slot
        install_member_rates(stack, models)  # every dropout rate, per member
        prepare_for_vmap(stack, api="mb.ModelBatch")
        self._inputs_require_grad = adapt_skeleton(stack)
        self.stack = stack
        self.stack.train(models[0].training)
        self.training = models[0].training
        object.__setattr__(self, "_template", template)
        # on the members' device: a step reads it there (capturable optimizer, GradScaler) with no copy
        device = next((t.device for t in (*stack.parameters(), *stack.buffers())), torch.device("cpu"))
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("active", torch.ones(len(models), dtype=torch.bool, device=device))
        self._random = MemberRandom(len(models))
        self._backends = Backends(self.stack, len(models), compile=compile, template=template)
        self._backends.set("mb.ModelBatch", backend, chunk_size)
        if preflight:
            install_preflight(self)

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        """Number of members in the pack."""
        return int(self.active.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def template(self) -> nn.Module:
        """A skeleton of the members' architecture, on the ``meta`` device (holds no weights)."""
        return self._template

    def extra_repr(self) -> str:
        return f"n={self.n}, active={int(self.active.sum())}, architecture={type(self._template).__name__}"

    def stacked_parameters(self) -> dict[str, nn.Parameter]:
        """The stacked ``[N, ...]`` parameters by their name in the original model."""
        tensors = [(name, table[key]) for name, table, key in self._slots()[1]]  # no walrus: dynamo traces it
        return {name: t for name, t in tensors if t is not None}

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        """The stacked ``[N, ...]`` buffers by their name in the original model."""
        tensors = [(name, table[key]) for name, table, key in self._slots()[2]]  # no walrus: dynamo traces it
        return {name: t for name, t in tensors if t is not None}

    def _slots(self) -> tuple[nn.Module, list[tuple[str, dict, str]], list[tuple[str, dict, str]]]:
        """Where each stacked tensor lives: (name, owner's ``_parameters``/``_buffers``, key).

        Found once per skeleton: walking the module tree (``named_parameters``) cost ~25 µs per call,
        and the forward, the optimizer step and ``zero_grad`` each ask every step. A tensor replaced
        in its slot (``load_state_dict(assign=True)``, ``.to()``) is still found.
        """
        slots = self.__dict__.get("_tensor_slots")
        if slots is None or slots[0] is not self.stack:
            owners = dict(self.stack.named_modules(remove_duplicate=False))

            def where(name: str, table: str) -> tuple[str, dict, str]:
                owner, _, key = name.rpartition(".")
                return name, getattr(owners[owner], table), key

            params = [where(name, "_parameters") for name, _ in self.stack.named_parameters()]
            buffers = [where(name, "_buffers") for name, _ in self.stack.named_buffers()]
            slots = self.__dict__["_tensor_slots"] = (self.stack, params, buffers)
        return slots

    # ------------------------------------------------------------------ backends
    @property
    def backend(self) -> str:
        """The backend setting: ``"auto"`` (the default), ``"vmap"``, ``"chunked"`` or ``"loop"``.

        What ``"auto"`` runs is in :attr:`backend_choice`. See :meth:`set_backend`.
        """
        choice = self._backends.fixed
        return "auto" if choice is None else choice.name

    @property
    def chunk_size(self) -> int | None:
        """Members per chunk of the ``"chunked"`` backend (``None`` for the other backends and ``"auto"``)."""
        choice = self._backends.fixed
        return None if choice is None else choice.chunk_size

    @property
    def backend_choice(self) -> dict[str, str]:
        """What the forward runs on the pack's device: ``{"training": ..., "inference": ...}``.

        Training calls are those in ``train()`` mode with gradients enabled, inference calls the
        others (``eval()``, ``torch.no_grad()``). Labels: ``"vmap"``, ``"chunked:16"``, ``"loop"``.
        A fixed backend runs for both; ``"auto"`` decides from the member count, the architecture's
        layer kinds and size, and the device type, never from timings: the same pack on the same
        device type always gets the same choice (rules in :mod:`modelbatch._backends`).

        Example:
            >>> import torch, modelbatch as mb
            >>> mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)]).backend_choice
            {'training': 'vmap', 'inference': 'vmap'}
        """
        return self._backends.labels(self.stacked_parameters(), self.stacked_buffers())

    def set_backend(self, backend: str, chunk_size: int | None = None) -> None:
        """Choose how the forward runs the members; every backend gives the same results.

        ``"vmap"``: one vmap over all members. ``"chunked"``: vmap over chunks of ``chunk_size``
        members (default 16), bounding the vmapped kernels' transient memory. ``"loop"``: one
        ``functional_call`` per member (runs layers without vmap support too). ``"auto"``: one of
        those per call, chosen from the member count, the layer kinds and size of the architecture,
        the device type and whether the call trains or infers (never from timings: a rerun makes
        the same choice; see :attr:`backend_choice`). ``ModelBatch(models, backend=...,
        chunk_size=...)`` does the same.

        Example:
            >>> import torch, modelbatch as mb
            >>> batch = mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(10)])
            >>> batch.set_backend("chunked", chunk_size=4)
            >>> batch.backend, batch.chunk_size
            ('chunked', 4)
            >>> batch(torch.randn(5, 3)).shape
            torch.Size([10, 5, 2])
        """
        self._backends.set("mb.ModelBatch.set_backend", backend, chunk_size)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        *args: Any,
        in_dims: int | Sequence[int | None] | None = None,
        participating: torch.Tensor | None = None,
        kwarg_in_dims: Mapping[str, int | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run every member: ``in_dims=None`` for shared inputs ``[B, ...]``, ``0`` for ``[N, B, ...]``.

        ``in_dims`` may also be a sequence with one entry per positional input. Keyword
        arguments are passed unchanged (shared) to every member, except those that
        ``kwarg_in_dims`` maps to ``0``: member ``i`` gets row ``i`` of those (e.g. a Hugging Face
        model's ``attention_mask`` of per-member batches: ``batch(ids, attention_mask=mask,
        in_dims=0, kwarg_in_dims={"attention_mask": 0})``). ``participating`` ([N] bool)
        marks members whose batch this step is real: the others, like frozen members, keep
        their buffers (BatchNorm statistics) unchanged. When ``participating`` is given and
        selects at least one member, only the members that participate and are not frozen are
        computed at all; the outputs of the others are zeros (no gradient reaches their
        parameters). A pack with few live members then costs what those members cost.
        """
        dims = self._input_dims(args, in_dims)
        names = self._keyword_inputs(kwargs, kwarg_in_dims)
        if names:  # per-member keyword inputs travel as the last positional inputs, batched on dim 0
            args = (*args, *(kwargs[name] for name in names))
            dims = (*dims, *(0 for _ in names))
            kwargs = {key: value for key, value in kwargs.items() if key not in names}
        params = self.stacked_parameters()
        buffers = self.stacked_buffers()
        # Which members run is decided on the host (no sync): `active` is read only when it changes.
        updating = self.active_flags()
        if participating is not None:  # a host mask costs nothing; one on the device is read (a sync)
            updating = member_flags("mb.ModelBatch.forward: participating", participating, updating)
            rows = [i for i, u in enumerate(updating) if u]
            if params and 0 < len(rows) < self.n:
                return self._forward_members(rows, params, buffers, args, dims, kwargs, names)
        # With frozen members, train-mode layers (BatchNorm) update copies of the buffers and only the
        # updating members' rows are written back: restoring in place would break autograd's saved tensors.
        frozen = self.training and bool(buffers) and not all(updating)
        run_buffers = {name: b.clone() for name, b in buffers.items()} if frozen else buffers
        trial = self.training and torch.is_grad_enabled()  # "auto" chooses for training or inference
        out = self._run(range(self.n), params, run_buffers, args, dims, kwargs, trial, names)
        if frozen:
            self._write_back(buffers, run_buffers, updating)
        return out

    def _run(
        self,
        slots: Sequence[int],
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        trial: bool,
        names: tuple[str, ...],
    ) -> Any:
        """The members ``slots`` (in this order) on their tensors: dropout draws from their streams.

        The last ``len(names)`` entries of ``args`` are the per-member keyword inputs ``names``.
        """
        try:  # torch.utils.checkpoint inside the model recomputes per member (running_pack)
            with running_pack(self.stack, self._inputs_require_grad), running_members(self._random, slots):
                out = self._backends.run(params, buffers, args, dims, kwargs, trial, names)
        except RuntimeError as exc:
            if "data-dependent control flow" not in str(exc):
                raise
            raise RuntimeError(
                "mb.ModelBatch.forward: the model branches on a tensor's values, which torch.vmap cannot "
                "batch (vmap and chunked backends). Hugging Face models do so with a 2-D attention_mask "
                "(padding_mask.all()): pass the 4-D additive mask [N, B, 1, S, S] instead, or use "
                f"backend='loop' (backend='auto' falls back to it by itself).\n{exc}"
            ) from exc
        except ValueError as exc:  # vmap's own words for a non-tensor output
            if "must only return Tensors" in str(exc):
                found = re.search(r"<class '(?:[\w.]*\.)?(\w+)'>", str(exc))
                raise TypeError(_non_tensor_message(found.group(1) if found else "a non-tensor")) from exc
            raise
        if type(out) is not torch.Tensor:
            _check_tensor_outputs(out)
        return out

    def _forward_members(
        self,
        rows: list[int],
        params: dict,
        buffers: dict,
        args: tuple,
        dims: tuple,
        kwargs: dict,
        names: tuple,
    ) -> Any:
        """The forward of the members ``ids`` only; the other members' outputs are zeros.

        Their slices of the stacked tensors are gathered (``index_select``: the backward adds the
        gradients into the stacked parameters' rows), their buffers are written back after the call.
        """

        def ids(t: torch.Tensor) -> torch.Tensor:  # the rows as an index on t's device, uploaded once
            return device_tensor(rows, torch.long, t.device)

        pick = {k: v.index_select(0, ids(v)) for k, v in params.items()}
        run_buffers = {k: b.index_select(0, ids(b)) for k, b in buffers.items()}
        sub_args = tuple(a.index_select(0, ids(a)) if d == 0 else a for a, d in zip(args, dims))
        trial = self.training and torch.is_grad_enabled()
        out = self._run(rows, pick, run_buffers, sub_args, dims, kwargs, trial, names)
        if self.training and buffers:
            with torch.no_grad():
                for name, buf in buffers.items():
                    buf.index_copy_(0, ids(buf), run_buffers[name])
        return _scatter_members(out, ids, len(rows), self.n)

    def _input_dims(self, args: tuple, in_dims: int | Sequence[int | None] | None) -> tuple:
        if in_dims is None or isinstance(in_dims, int):
            dims = (in_dims,) * len(args)
        else:
            dims = tuple(in_dims)
            if len(dims) != len(args):
                raise ValueError(
                    f"mb.ModelBatch.forward: in_dims has {len(dims)} entries for {len(args)} inputs; "
                    "give one entry (None or 0) per positional input."
                )
        for k, (arg, dim) in enumerate(zip(args, dims)):
            if dim is None:
                continue
            if dim != 0:
                raise ValueError(f"mb.ModelBatch.forward: in_dims must be None or 0, got {dim}.")
            if not isinstance(arg, torch.Tensor) or arg.dim() == 0 or arg.shape[0] != self.n:
                shape = list(arg.shape) if isinstance(arg, torch.Tensor) else type(arg).__name__
                raise ValueError(
                    f"mb.ModelBatch.forward: per-member input {k} (in_dims=0) must have the pack size "
                    f"N={self.n} on dim 0, got {shape}. Stack one batch per member, or pass a shared "
                    "batch [B, ...] with in_dims=None."
                )
        return dims

    def _keyword_inputs(
        self, kwargs: dict, kwarg_in_dims: Mapping[str, int | None] | None
    ) -> tuple[str, ...]:
        """The names of the per-member keyword inputs (``kwarg_in_dims`` 0), checked."""
        api = "mb.ModelBatch.forward"
        if kwarg_in_dims is None:
            return ()
        if not isinstance(kwarg_in_dims, Mapping):
            raise TypeError(
                f"{api}: kwarg_in_dims must map keyword input names to None or 0, got "
                f"{type(kwarg_in_dims).__name__}; e.g. kwarg_in_dims={{'attention_mask': 0}}."
            )
        names = []
        for name, dim in kwarg_in_dims.items():
            if name not in kwargs:
                raise ValueError(
                    f"{api}: kwarg_in_dims names {name!r}, which is not a keyword input of this call "
                    f"(given: {sorted(kwargs)}); pass it as {name}=... or drop it from kwarg_in_dims."
                )
            if dim is None:
                continue
            value = kwargs[name]
            if dim != 0 or isinstance(dim, bool):
                raise ValueError(f"{api}: kwarg_in_dims[{name!r}] must be None or 0, got {dim!r}.")
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != self.n:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{api}: per-member keyword input {name!r} (kwarg_in_dims 0) must have the pack "
                    f"size N={self.n} on dim 0, got {shape}. Stack one per member, or share it "
                    "(kwarg_in_dims None)."
                )
            names.append(name)
        return tuple(names)

    @staticmethod
    def _write_back(
        buffers: dict[str, torch.Tensor], updated: dict[str, torch.Tensor], rows: list[bool]
    ) -> None:
        with torch.no_grad():
            for name, buf in buffers.items():
                keep = device_tensor(rows, torch.bool, buf.device).view(-1, *([1] * (buf.dim() - 1)))
                buf.copy_(torch.where(keep, updated[name], buf))

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        outputs: Any,
        targets: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        target_in_dims: int | str | None = "auto",
        mask: torch.Tensor | None = None,
        output: str | int | None = None,
    ) -> MemberLosses:
        """Each member's own loss, shape ``[N]``; train with ``losses.sum().backward()``.

        ``outputs`` is ``[N, B, ...]``; ``targets`` is shared ``[B, ...]`` or per member
        ``[N, B, ...]`` (``target_in_dims="auto"`` tells them apart by shape; pass ``None``
        or ``0`` when ``N == B`` makes that ambiguous). ``loss_fn(out, y)`` must return a scalar
        for one member's batch (e.g. ``F.cross_entropy`` with its default mean reduction).

        ``mask`` (``[N, B]`` bool) marks the real samples of padded per-member batches (members
        whose subsets differ in size): each member's loss is then the mean over its real samples,
        and ``loss_fn`` must accept ``reduction="none"``. A member with no real sample gets 0.

        ``outputs`` may also be what a Hugging Face model returns: a ``ModelOutput`` or dict
        (its ``"logits"`` by default, or the field named by ``output``) or a tuple (element
        ``output``, default 0). See :func:`select_output`.
        """
        outputs = select_output(outputs, output, "mb.ModelBatch.compute_loss")
        if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1 or outputs.shape[0] != self.n:
            shape = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f"mb.ModelBatch.compute_loss: outputs must be [N={self.n}, B, ...] as returned by the "
                f"pack, got {shape}."
            )
        dim = self._target_dim(outputs, targets, target_in_dims)
        if mask is not None:
            return self._masked_loss(outputs, targets, loss_fn, dim, mask)
        if self.n <= LOSS_LOOP_MAX_N:
            losses = _looped_loss(loss_fn, outputs, targets, dim)
        else:
            losses = vmap(loss_fn, in_dims=(0, dim))(outputs, targets)
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.n,):
            raise ValueError(
                "mb.ModelBatch.compute_loss: loss_fn must return one scalar per member (a mean or sum "
                f"over the batch); it returned shape {list(getattr(losses, 'shape', []))} for the "
                "pack. Use reduction='mean' (the default) or 'sum'."
            )
        return losses.as_subclass(MemberLosses)

    def _masked_loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: Callable,
        dim: int | None,
        mask: torch.Tensor,
    ) -> MemberLosses:
        api = "mb.ModelBatch.compute_loss"
        if mask.shape != outputs.shape[:2]:
            raise ValueError(
                f"{api}: mask must be [N, B] = {list(outputs.shape[:2])}, got {list(mask.shape)}."
            )
        try:
            per_sample = vmap(lambda o, t: loss_fn(o, t, reduction="none"), in_dims=(0, dim))(
                outputs, targets
            )
        except TypeError as exc:
            raise TypeError(f"{api}: with a mask, loss_fn must accept reduction='none' ({exc}).") from exc
        per_sample = per_sample.reshape(self.n, outputs.shape[1], -1).mean(dim=2)
        weights = mask.to(per_sample.dtype)
        losses = (per_sample * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
        return losses.as_subclass(MemberLosses)

    def _target_dim(
        self, outputs: torch.Tensor, targets: torch.Tensor, target_in_dims: int | str | None
    ) -> int | None:
        if target_in_dims in (None, 0):
            return target_in_dims
        if target_in_dims != "auto":
            raise ValueError(
                "mb.ModelBatch.compute_loss: target_in_dims must be 'auto', None or 0, "
                f"got {target_in_dims!r}."
            )
        batch = outputs.shape[1] if outputs.dim() > 1 else None
        shape = targets.shape
        # Targets shaped like the outputs (regression, soft labels) or like them less the class dim.
        per_member = shape in (outputs.shape, outputs.shape[:-1])
        shared = shape in (outputs.shape[1:], outputs.shape[1:-1])
        if per_member == shared:  # neither or both: fall back to the leading dims alone
            per_member = targets.dim() >= 2 and shape[0] == self.n and shape[1] == batch
            shared = targets.dim() >= 1 and shape[0] == batch
        if per_member and shared:
            raise ValueError(
                f"mb.ModelBatch.compute_loss: targets of shape {list(targets.shape)} could be shared or "
                f"per member (N == B == {self.n}); pass target_in_dims=None (shared) or 0 (per member)."
            )
        if not per_member and not shared:
            raise ValueError(
                f"mb.ModelBatch.compute_loss: targets of shape {list(targets.shape)} match neither a "
                f"shared batch [B={batch}, ...] nor a per-member batch [N={self.n}, B={batch}, ...]."
            )
        return 0 if per_member else None

    # ------------------------------------------------------------------ members
    def member(self, index: int) -> nn.Module:
        """A standalone module of the original class holding member ``index``'s current weights.

        Tied parameters stay tied (GPT-2's ``lm_head.weight`` is its ``transformer.wte.weight``).

        Example:
            >>> import torch, modelbatch as mb
            >>> batch = mb.ModelBatch([torch.nn.Linear(3, 2) for _ in range(4)])
            >>> m = batch.member(2)
            >>> torch.equal(m.weight, batch.stack.weight[2])
            True
        """
        index = check_member_index("mb.ModelBatch.member", index, self.n)
        model = copy.deepcopy(self._template)
        with torch.no_grad():
            for name, param in self.stacked_parameters().items():
                value = nn.Parameter(param[index].clone(), requires_grad=param.requires_grad)
                set_tensor(model, name, value, True)
            for name, buf in self.stacked_buffers().items():
                set_tensor(model, name, buf[index].clone(), False)
        retie(model, self._aliases)
        rates = self.dropout_rates
        for key, (module, name) in rate_slots(model).items():
            setattr(module, name, rates[key][index])
        model.train(self.training)
        return model

    def load_member(self, index: int, source: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Put a module or state_dict into slot ``index`` (its gradient slot is cleared).

        Pair with ``optimizer.reset_member(index)`` so that the new member starts with a fresh
        optimizer state, as it would if trained alone.
        """
        api = "mb.ModelBatch.load_member"
        index = check_member_index(api, index, self.n)
        if isinstance(source, nn.Module):
            if type(source) is not type(self._template):
                raise TypeError(
                    f"{api}: expected a {type(self._template).__name__}, got {type(source).__name__}."
                )
            values = dict(_named_tensors(source))
            expected = dict(_named_tensors(self.stack))
            rates = _model_rates(api, source)
        elif isinstance(source, Mapping):
            values = dict(source)
            expected = self.stack.state_dict(keep_vars=True)
            rates = None  # a state holds no rates: the member's stay
        else:
            raise TypeError(f"{api}: expected an nn.Module or a state_dict, got {type(source).__name__}.")
        missing = sorted(expected.keys() - values.keys())
        unexpected = sorted(values.keys() - expected.keys())
        if missing or unexpected:
            raise KeyError(
                f"{api}: the state does not match the pack's architecture; missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}. Pass a state_dict of the same model class."
            )
        for name, value in values.items():
            if tuple(value.shape) != tuple(expected[name].shape[1:]):
                raise ValueError(
                    f"{api}: {name} has shape {list(value.shape)} but the pack expects "
                    f"{list(expected[name].shape[1:])}."
                )
        with torch.no_grad():
            for name, value in values.items():
                target = expected[name]
                target[index].copy_(value.to(target.device, target.dtype))
                if isinstance(target, nn.Parameter) and target.grad is not None:
                    target.grad[index].zero_()
        if rates is not None:
            self._set_member_rates(api, index, rates)

    def load_member_rates(self, index: int, source: nn.Module) -> None:
        """Set member ``index``'s dropout rates to those of ``source`` (a model of the pack's architecture,
        on any device, the meta device too), leaving its weights as they are."""
        api = "mb.ModelBatch.load_member_rates"
        index = check_member_index(api, index, self.n)
        self._set_member_rates(api, index, _model_rates(api, source))

    def _set_member_rates(self, api: str, index: int, rates: Mapping[str, float]) -> None:
        current = self.dropout_rates
        if rates.keys() != current.keys():
            raise ValueError(
                f"{api}: the model's dropout rates {sorted(rates)} are not the pack's "
                f"{sorted(current)}; a float rate must be a float in [0, 1] in every model of a pack."
            )
        for key, rate in rates.items():
            set_member_rates(self.stack, key, [*current[key][:index], rate, *current[key][index + 1 :]], api)

    # ------------------------------------------------------------------ dropout
    @property
    def dropout_rates(self) -> dict[str, list[float]]:
        """Every dropout rate per member: a dropout module's ``p`` by the module's path, a float rate
        a module keeps for ``F.dropout`` / attention by the attribute's path.

        Models that differ only in these rates share a pack: member ``i`` drops with its own
        rates (``member(i)`` returns them, ``load_member`` sets them). Which float attributes are
        rates: :func:`modelbatch._dropout.is_rate_attribute` (a float in ``[0, 1]`` named
        ``*dropout*`` or ``*pdrop``, e.g. Hugging Face's ``attention_dropout``).

        Example:
            >>> import torch, modelbatch as mb
            >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(p)) for p in (0.1, 0.5)]
            >>> mb.ModelBatch(nets).dropout_rates
            {'1': [0.1, 0.5]}
        """
        return {key: list(getattr(*slot).rates) for key, slot in rate_slots(self.stack).items()}

    def manual_seed(self, seed: int | Sequence[int], *, member: int | None = None) -> None:
        """Seed the members' dropout streams: one seed per member, or ``member``'s alone.

        Each member draws its dropout masks from its own generator, so its masks depend neither
        on its pack-mates nor on its slot, and a rerun is bitwise identical. Seeded with ``s``, a
        member draws on the CPU exactly the masks a plain model draws after ``torch.manual_seed(s)``.
        A member never seeded takes a seed from the global generator at its first dropout call.

        Example:
            >>> import torch, modelbatch as mb
            >>> batch = mb.ModelBatch([torch.nn.Dropout(0.5) for _ in range(2)])
            >>> batch.manual_seed([7, 8])
            >>> out = batch(torch.ones(6))
            >>> _ = torch.manual_seed(8)
            >>> torch.equal(out[1], torch.nn.Dropout(0.5)(torch.ones(6)))
            True
        """
        api = "mb.ModelBatch.manual_seed"
        if member is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"{api}: with member=, seed must be one int, got {seed!r}.")
            self._random.seed(check_member_index(api, member, self.n), seed)
            return
        if isinstance(seed, int) or not isinstance(seed, Sequence) or len(seed) != self.n:
            raise TypeError(
                f"{api}: pass one seed per member (a list of {self.n} ints), or one int with member=i; "
                f"got {seed!r}."
            )
        for i, value in enumerate(seed):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{api}: seed {i} must be an int, got {value!r}.")
            self._random.seed(i, value)

    def rng_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s dropout stream: generator states by device type and its seed.

        Pass it to :meth:`set_rng_state` to continue the stream (``mb.save`` keeps every member's).
        """
        return self._random.get_state(check_member_index("mb.ModelBatch.rng_state", member, self.n))

    def set_rng_state(self, member: int, state: Mapping[str, torch.Tensor] | torch.Tensor) -> None:
        """Put back a state from :meth:`rng_state`, or a CPU generator state (``torch.get_rng_state()``).

        With the CPU state a plain script has before its training loop, member ``member`` draws
        the masks that script draws (on the CPU).
        """
        index = check_member_index("mb.ModelBatch.set_rng_state", member, self.n)
        self._random.set_state(index, state if isinstance(state, torch.Tensor) else dict(state))

    def active_flags(self) -> list[bool]:
        """Which members train (``active``) as host bools, read from the device only after it changed."""
        return host_list(self.active)

    def freeze(self, index: int) -> None:
        """Freeze member ``index``: its parameters, buffers and optimizer state stop changing."""
        self.active[check_member_index("mb.ModelBatch.freeze", index, self.n)] = False

    def unfreeze(self, index: int) -> None:
        """Let member ``index`` train again after :meth:`freeze`."""
        self.active[check_member_index("mb.ModelBatch.unfreeze", index, self.n)] = True

    # ------------------------------------------------------------------ state
    def _apply(self, fn: Callable, recurse: bool = True) -> ModelBatch:
        """``.to()``, ``.double()``, ...: converts each slot, then ties the aliases again."""
        super()._apply(fn, recurse)
        retie(self.stack, self._aliases)
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state_dict saved from a pack of the same architecture and size."""
        active = state_dict.get("active")
        if isinstance(active, torch.Tensor) and active.shape != self.active.shape:
            raise ValueError(
                f"mb.ModelBatch.load_state_dict: the checkpoint has {active.shape[0]} members but this "
                f"pack has {self.n}. Build the pack with the same number of members."
            )
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            retie(self.stack, self._aliases)  # assign=True puts one new tensor per name
            return result
        except RuntimeError as exc:
            raise RuntimeError(
                "mb.ModelBatch.load_state_dict: the checkpoint does not fit this pack (another "
                f"architecture?). Build the pack from the model class it was saved from.\n{exc}"
            ) from exc
