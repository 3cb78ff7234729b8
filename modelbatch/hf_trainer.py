"""Train a pack of Hugging Face models with ``transformers.Trainer``: one Trainer, N members.

:class:`PackedHFTrainer` is a ``transformers.Trainer`` whose model is a :class:`modelbatch.ModelBatch`
of N models of one config. Each member has its own learning rate, weight decay and warmup, its own
AdamW state (:class:`modelbatch.optim.AdamW`), its own copy of the Trainer's lr schedule
(``lr_scheduler_type``, built per member by :class:`modelbatch.optim.lr_scheduler.PerMember`) and
its own gradient clipping (:func:`modelbatch.clip_grad_norm_`). Its losses are summed for the
backward, so member ``i`` trains as the same model under a plain ``Trainer`` with
``learning_rate=lr[i]`` would. Logs and metrics hold the mean over members under the Trainer's
usual keys and each member's value under ``<key>/m<i>`` (``loss/m0``, ``eval_loss/m1``, ...).

Not supported (each raises a clear error): several processes or GPUs (DDP, DataParallel, FSDP,
DeepSpeed), ``fp16`` (one loss scaler would be shared by all members), label smoothing,
``compute_loss_func``, ``load_best_model_at_end``, optimizers other than AdamW and the
``reduce_lr_on_plateau`` schedule. Checkpoints (``save_strategy``) hold one ``save_pretrained``
folder per member and the pack; ``train(resume_from_checkpoint=...)`` continues from them.

This module is not imported by ``import modelbatch``; it needs ``transformers`` (and ``accelerate``).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

try:
    from transformers import PreTrainedModel, Trainer, TrainingArguments
    from transformers.optimization import get_scheduler
    from transformers.trainer_pt_utils import find_batch_size, nested_detach
    from transformers.trainer_utils import EvalLoopOutput, EvalPrediction
    from transformers.utils import can_return_loss, find_labels
except ImportError as exc:  # pragma: no cover - exercised by a test with transformers hidden
    raise ImportError(
        'modelbatch.hf_trainer: needs transformers; pip install "modelbatch[integrations]"'
    ) from exc

from ._batch import ModelBatch
from ._checkpoint import load, save
from ._clip import clip_grad_norm_
from ._hparams import MemberValue, member_values
from .optim import AdamW, StepValues
from .optim.lr_scheduler import PerMember

__all__ = ["PackedHFTrainer"]

_API = "PackedHFTrainer"
_ADAMW = ("adamw_torch", "adamw_torch_fused")
PACK_CHECKPOINT = "pack.pt"  # in each checkpoint-<step> folder, beside member-<i>/


class _GroupedAdamW(AdamW):
    """:class:`modelbatch.optim.AdamW` that skips weight decay on ``no_decay`` parameters.

    ``transformers.Trainer`` decays every parameter but biases and norm weights
    (``Trainer.get_decay_parameter_names``); this keeps that split, member by member.
    """

    def __init__(self, batch: ModelBatch, no_decay: set[str], **hparams: Any) -> None:
        super().__init__(batch, **hparams)
        self.no_decay = frozenset(no_decay)

    def _update_all(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        values: StepValues,
    ) -> None:
        # step() passes the parameters with a gradient in stacked_parameters() order (rows of them
        # when members are frozen), so the names line up position by position.
        names = [name for name, p in self.batch.stacked_parameters().items() if p.grad is not None]
        decay = [i for i, name in enumerate(names) if name not in self.no_decay]
        rest = [i for i, name in enumerate(names) if name in self.no_decay]

        def pick(rows: list[int]) -> tuple[list, list, list]:
            return [params[i] for i in rows], [grads[i] for i in rows], [states[i] for i in rows]

        if decay:
            super()._update_all(*pick(decay), values)
        if rest:
            super()._update_all(*pick(rest), _without_weight_decay(values))


def _without_weight_decay(values: StepValues) -> StepValues:
    """The same step values with weight decay 0 for every member."""
    hparams = {key: value for key, value in values.lists.items() if key != "step"}
    out = StepValues(hparams, values.lists["step"])
    rows = len(values.lists["step"])
    out.set("weight_decay", [0.0] * rows)
    out.set("decay_factor", [1.0] * rows)
    return out


def _member_slice(predictions: Any, index: int) -> Any:
    """Member ``index``'s predictions out of ``[samples, N, ...]`` arrays (or tuples of them)."""
    if isinstance(predictions, (tuple, list)):
        return type(predictions)(_member_slice(p, index) for p in predictions)
    return predictions[:, index]


class PackedHFTrainer(Trainer):
    """A ``transformers.Trainer`` that trains N models of one architecture as one pack.

    ``models`` is a list of models built from one config (e.g. ``BertForSequenceClassification``)
    or a ready :class:`modelbatch.ModelBatch`. ``learning_rate``, ``weight_decay`` and
    ``warmup_steps`` take one value per member (or one for all; default: ``args``'s). Everything
    else comes from ``args`` as for a plain Trainer (schedule type, betas, epsilon, batch size,
    gradient accumulation, ``max_grad_norm``: clipped per member, logging, evaluation). Every
    member sees the same batches; ``batch.member(i)`` after training is what a plain Trainer with
    ``learning_rate=learning_rate[i]`` (and the member's weight decay and warmup) gives.

    Logged: ``loss``, ``grad_norm``, ``learning_rate`` (means over members) and ``loss/m<i>``,
    ``grad_norm/m<i>``, ``learning_rate/m<i>``. :meth:`evaluate` returns ``eval_loss/m<i>`` and, with
    ``compute_metrics`` (called once per member with that member's predictions), ``eval_<metric>/m<i>``
    and their mean ``eval_<metric>``. :meth:`save_members` writes one ``save_pretrained`` folder per
    member; ``save_model`` (and checkpoints) do the same.

    Example:
        >>> import torch, transformers
        >>> from modelbatch.hf_trainer import PackedHFTrainer
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, max_position_embeddings=8)
        >>> models = [transformers.BertForSequenceClassification(config) for _ in range(3)]
        >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": i % 2} for i in range(16)]
        >>> args = transformers.TrainingArguments("/tmp/packed_hf_doc", max_steps=2, report_to=[],
        ...     per_device_train_batch_size=8, use_cpu=True, save_strategy="no", disable_tqdm=True)
        >>> trainer = PackedHFTrainer(models, args, learning_rate=[1e-4, 1e-3, 1e-2], train_dataset=data)
        >>> trainer.remove_callback(transformers.PrinterCallback)  # keep the logs off this page
        >>> _ = trainer.train()
        >>> sorted(k for k in trainer.state.log_history[-1] if k.startswith("train_loss"))
        ['train_loss', 'train_loss/m0', 'train_loss/m1', 'train_loss/m2']
        >>> trainer.pack.member(2).classifier.weight.shape
        torch.Size([2, 16])

    Warning:
        One process, one device: DDP, DataParallel, FSDP, DeepSpeed and ``fp16`` raise. A
        ``datasets.Dataset`` keeps only the columns the members' ``forward`` accepts, as usual.
    """

    def __init__(
        self,
        models: Sequence[nn.Module] | ModelBatch,
        args: TrainingArguments,
        *,
        learning_rate: MemberValue | None = None,
        weight_decay: MemberValue | None = None,
        warmup_steps: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        pack = models if isinstance(models, ModelBatch) else ModelBatch(models)
        if not isinstance(args, TrainingArguments):
            raise TypeError(
                f"{_API}: args must be transformers.TrainingArguments, got {type(args).__name__}."
            )
        _check_args(args)
        for name in ("model", "model_init", "compute_loss_func", "optimizers", "optimizer_cls_and_kwargs"):
            if name in kwargs:
                raise TypeError(
                    f"{_API}: {name}= is not supported; the trainer builds the pack's per-member AdamW "
                    "and schedules itself. Pass the models as the first argument and per-member "
                    "learning_rate / weight_decay / warmup_steps."
                )
        n = pack.n
        self.pack = pack
        self.member_learning_rates = member_values(
            _API, "learning_rate", args.learning_rate if learning_rate is None else learning_rate, n
        ).tolist()
        self.member_weight_decays = member_values(
            _API, "weight_decay", args.weight_decay if weight_decay is None else weight_decay, n
        ).tolist()
        self.member_warmup_steps = _warmups(warmup_steps, n)
        self._member_preprocess: Callable | None = kwargs.pop("preprocess_logits_for_metrics", None)
        super().__init__(model=pack, args=args, **kwargs)
        template = pack.template
        # What a plain Trainer reads off the model, read off the members' class.
        if hasattr(template, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = bool(template.accepts_loss_kwargs)
        else:
            params = inspect.signature(template.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if self.args.label_names is None:
            self.label_names = find_labels(type(template))
        self.can_return_loss = can_return_loss(type(template))
        self._reset_member_logs()

    # ---------------------------------------------------------------- optimizer and schedules
    def create_optimizer(self, model: nn.Module | None = None) -> AdamW:
        """One AdamW for the pack: each member's lr and weight decay (none on biases and norms)."""
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(self.pack.template))
            no_decay = {name for name in self.pack.stacked_parameters() if name not in decay}
            self.optimizer = _GroupedAdamW(
                self.pack,
                no_decay,
                lr=self.member_learning_rates,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.member_weight_decays,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> PerMember:
        """``args.lr_scheduler_type`` per member (``transformers.get_scheduler``), each its own warmup."""
        if self.lr_scheduler is None:
            kind, extra = self.args.lr_scheduler_type, self.args.lr_scheduler_kwargs
            default = self.args.get_warmup_steps(num_training_steps)
            warmups = [default if w is None else w for w in self.member_warmup_steps]

            def factory(i: int, stand_in: torch.optim.Optimizer) -> Any:
                return get_scheduler(
                    kind,
                    optimizer=stand_in,
                    num_warmup_steps=warmups[i],
                    num_training_steps=num_training_steps,
                    scheduler_specific_kwargs=extra,
                )

            self.lr_scheduler = PerMember(self.optimizer if optimizer is None else optimizer, factory)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        lrs = self.lr_scheduler.get_last_lr()
        self._member_lrs = list(lrs)
        return sum(lrs) / len(lrs)

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Clip each member by its own gradient norm (a plain Trainer's clip, per member)."""
        norms = clip_grad_norm_(self.pack, self.args.max_grad_norm)
        self._member_grad_norms = norms.tolist()
        return norms.mean()

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None:
            norms = clip_grad_norm_(self.pack, math.inf)
            self._member_grad_norms = norms.tolist()
            grad_norm = norms.mean()
        return grad_norm

    # ---------------------------------------------------------------- losses
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = list(inspect.signature(self.pack.template.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def member_losses(
        self, model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """Every member's own loss ``[N]`` (its ``forward``'s, from ``labels``) and the outputs."""
        kwargs = dict(inputs)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**kwargs)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
        if not isinstance(loss, torch.Tensor) or loss.shape != (self.pack.n,):
            raise ValueError(
                f"{_API}.compute_loss: the members returned no loss (one per member) for inputs "
                f"{sorted(inputs)}; give the dataset a labels column (or set args.label_names) so that "
                "each model computes its own loss."
            )
        return loss, outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The sum of the members' losses: its backward gives each member exactly its own gradient."""
        losses, outputs = self.member_losses(model, inputs, num_items_in_batch)
        self._step_member_losses = losses.detach()
        loss = losses.sum()
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        member = self._step_member_losses.double().cpu()
        if not scaled:
            member = member / self.current_gradient_accumulation_steps
        self._member_tr_loss += member
        return loss / self.pack.n

    # ---------------------------------------------------------------- logging
    def _reset_member_logs(self) -> None:
        n = self.pack.n
        self._member_tr_loss = torch.zeros(n, dtype=torch.float64)
        self._member_total_loss = torch.zeros(n, dtype=torch.float64)
        self._member_logged_step = 0
        self._member_lrs: list[float] | None = None
        self._member_grad_norms: list[float] | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Train every member (``Trainer.train``); ``resume_from_checkpoint`` continues a checkpoint
        this trainer wrote (the pack, its optimizer, every member's schedule and the data order)."""
        self._reset_member_logs()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = os.path.join(resume_from_checkpoint, PACK_CHECKPOINT)
        if not os.path.isfile(path):
            raise ValueError(
                f"{_API}.train: {resume_from_checkpoint!r} holds no {PACK_CHECKPOINT}, so it was not "
                f"written by {_API}; resume from a checkpoint-<step> folder of a {_API} run."
            )
        load(path, self.pack)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        if "loss" in logs:
            steps = self.state.global_step - self._member_logged_step
            if steps > 0:
                logs.update({f"loss/m{i}": v / steps for i, v in enumerate(self._member_tr_loss.tolist())})
            self._member_total_loss += self._member_tr_loss
            self._member_tr_loss.zero_()
            self._member_logged_step = self.state.global_step
            if "grad_norm" in logs and self._member_grad_norms is not None:
                logs.update({f"grad_norm/m{i}": v for i, v in enumerate(self._member_grad_norms)})
            if "learning_rate" in logs and self._member_lrs is not None:
                logs.update({f"learning_rate/m{i}": v for i, v in enumerate(self._member_lrs)})
        if "train_loss" in logs:
            steps = max(self.state.global_step - getattr(self, "_initial_global_step", 0), 0.001)
            total = self._member_total_loss + self._member_tr_loss
            logs.update({f"train_loss/m{i}": v / steps for i, v in enumerate(total.tolist())})
        super().log(logs, start_time)

    # ---------------------------------------------------------------- evaluation
    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """``Trainer.evaluation_loop`` plus each member's loss and ``compute_metrics`` (``<key>/m<i>``)."""
        n = self.pack.n
        self._eval_sums = torch.zeros(n, dtype=torch.float64)
        self._eval_count = 0
        metrics_fn = self.compute_metrics
        self.compute_metrics = None  # the base loop would call it on every member's predictions at once
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            self.compute_metrics = metrics_fn
        metrics = dict(output.metrics)
        if self._eval_count:
            losses = (self._eval_sums / self._eval_count).tolist()
            metrics.update({f"{metric_key_prefix}_loss/m{i}": v for i, v in enumerate(losses)})
        if metrics_fn is not None and output.predictions is not None and output.label_ids is not None:
            per_member: dict[str, list[float]] = {}
            for i in range(n):
                got = metrics_fn(EvalPrediction(_member_slice(output.predictions, i), output.label_ids))
                for key, value in got.items():
                    key = key.removeprefix(f"{metric_key_prefix}_")
                    metrics[f"{metric_key_prefix}_{key}/m{i}"] = value
                    per_member.setdefault(key, []).append(value)
            for key, values in per_member.items():
                if all(isinstance(v, (int, float)) for v in values):
                    metrics[f"{metric_key_prefix}_{key}"] = sum(values) / n
        return EvalLoopOutput(
            predictions=output.predictions,
            label_ids=output.label_ids,
            metrics=metrics,
            num_samples=output.num_samples,
        )

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """The mean of the members' losses, their outputs as ``[B, N, ...]`` and the labels."""
        inputs = self._prepare_inputs(inputs)
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        if ignore_keys is None:
            config = getattr(self.pack.template, "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", []) or [])
        with torch.no_grad():
            if has_labels:
                losses, outputs = self.member_losses(model, inputs)
                size = find_batch_size(inputs)
                self._eval_sums += losses.detach().double().cpu() * size
                self._eval_count += size
                loss: torch.Tensor | None = losses.detach().mean()
            else:
                outputs, loss = model(**inputs), None
        if prediction_loss_only:
            return loss, None, None
        if isinstance(outputs, Mapping):
            fields = [v for k, v in outputs.items() if k not in ignore_keys and k != "loss"]
        else:
            fields = list(outputs[1:] if has_labels else outputs)
        logits = tuple(self._member_logits(f, inputs) for f in fields if isinstance(f, torch.Tensor))
        labels = nested_detach(tuple(inputs.get(name) for name in self.label_names)) if has_labels else None
        if labels is not None and len(labels) == 1:
            labels = labels[0]
        return loss, (logits[0] if len(logits) == 1 else logits), labels

    def _member_logits(self, field: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
        field = field.detach()
        if self._member_preprocess is not None:
            labels = inputs.get(self.label_names[0]) if self.label_names else None
            field = torch.stack([self._member_preprocess(f, labels) for f in field.unbind(0)])
        return field.transpose(0, 1)  # [B, N, ...]: the loop concatenates on the batch dim

    # ---------------------------------------------------------------- saving
    def save_members(self, output_dir: str | os.PathLike | None = None) -> list[str]:
        """Save member ``i`` with ``save_pretrained`` into ``output_dir/member-<i>/``; returns the folders.

        Each folder loads with ``<ModelClass>.from_pretrained(folder)`` (and holds the
        ``processing_class``, e.g. the tokenizer, when the trainer has one).
        """
        root = os.fspath(self.args.output_dir if output_dir is None else output_dir)
        if not isinstance(self.pack.template, PreTrainedModel):
            raise TypeError(
                f"{_API}.save_members: the members are {type(self.pack.template).__name__}, not "
                "transformers PreTrainedModels, so they have no save_pretrained; use mb.save(pack, path)."
            )
        folders = []
        for i in range(self.pack.n):
            folder = os.path.join(root, f"member-{i}")
            self.pack.member(i).save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            folders.append(folder)
        return folders

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, one ``save_pretrained`` folder per member (:meth:`save_members`).

        In a checkpoint (``save_strategy``) the whole pack is also written to ``pack.pt``
        (:func:`modelbatch.save`: every buffer, dropout streams), from which ``train`` resumes.
        """
        if self.args.should_save:
            root = os.fspath(self.args.output_dir if output_dir is None else output_dir)
            self.save_members(root)
            if _internal_call:
                save(os.path.join(root, PACK_CHECKPOINT), self.pack)


def _warmups(value: int | Sequence[int] | None, n: int) -> list[int | None]:
    if value is None:
        return [None] * n
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(
            f"{_API}: warmup_steps has {len(values)} values for {n} members; give one per member."
        )
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{_API}: warmup_steps of member {i} is {v!r}; it must be an int >= 0.")
    return values


def _check_args(args: TrainingArguments) -> None:
    """Raise for the Trainer settings a pack cannot honour member by member."""
    problems = []
    if args.world_size > 1 or args.n_gpu > 1:
        problems.append("several processes or GPUs (run one process on one device)")
    if args.deepspeed or args.fsdp:
        problems.append("DeepSpeed / FSDP")
    if args.fp16:
        problems.append("fp16 (one loss scaler would skip every member's step; use bf16 or float32)")
    if args.label_smoothing_factor:
        problems.append("label_smoothing_factor (the members compute their own loss)")
    if args.load_best_model_at_end:
        problems.append("load_best_model_at_end (each member has its own best; save_members instead)")
    if str(getattr(args.optim, "value", args.optim)) not in _ADAMW:
        problems.append(f"optim={args.optim!r} (only AdamW: adamw_torch or adamw_torch_fused)")
    if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "reduce_lr_on_plateau":
        problems.append("lr_scheduler_type='reduce_lr_on_plateau'")
    if problems:
        raise ValueError(
            f"{_API}: these TrainingArguments are not supported for a pack: {'; '.join(problems)}. "
            "Change them, or train the members one by one with a plain transformers.Trainer."
        )
