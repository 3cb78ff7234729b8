"""PackedHFTrainer: a member trained in the pack by a transformers.Trainer equals a plain Trainer's model."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from modelbatch.hf_trainer import PackedHFTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, CLASSES = 100, 8, 2
# Relative to each tensor's scale: a member's gradients (after clipping) and parameters at every step.
# Measured: in float64 the pack and a plain Trainer agree to <= 4e-14; in float32 to <= 2e-5 (vmapped
# kernels round differently).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# The key bias of self-attention has an identically zero true gradient (softmax ignores a shift shared by
# all keys); AdamW turns its round-off noise into full steps, packed or not (see ARCHITECTURE.md, section 3).
ZERO_GRADIENT = ("attention.self.key.bias",)


def _config(**kw: object) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def _models(
    n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[transformers.BertForSequenceClassification]:
    torch.manual_seed(seed)
    return [transformers.BertForSequenceClassification(_config()).to(dtype) for _ in range(n)]


def _data(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (count,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    labels = (ids[:, 0] % CLASSES).tolist()  # learnable
    return [
        {"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(count)
    ]


def _args(path: Path, **kw: object) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=3,
        warmup_steps=2, max_grad_norm=0.2, optim="adamw_torch",
    )  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _Record(transformers.TrainerCallback):
    """Member ``member``'s parameters and lr after every optimizer step (``member=None``: a plain model)."""

    def __init__(self, member: int | None = None) -> None:
        self.member, self.params, self.grads, self.lrs = member, [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.member is None:
            self.grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        else:
            stacked = model.stacked_parameters()
            self.grads.append(
                {k: p.grad[self.member].clone() for k, p in stacked.items() if p.grad is not None}
            )

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kw):
        if self.member is None:
            self.params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            self.lrs.append(lr_scheduler.get_last_lr()[0])
        else:
            stacked = model.stacked_parameters()
            self.params.append({k: p[self.member].detach().clone() for k, p in stacked.items()})
            self.lrs.append(lr_scheduler.get_last_lr()[self.member])


def _assert_close_per_step(packed: _Record, alone: _Record, what: str) -> None:
    assert len(packed.params) == len(alone.params) > 0
    rtol = RTOL[next(iter(alone.params[0].values())).dtype]
    _assert_close(packed.grads, alone.grads, rtol, f"{what} (gradients)", gradients=True)
    _assert_close(packed.params, alone.params, rtol, f"{what} (parameters)")


def _assert_close(packed: list, alone: list, rtol: float, what: str, gradients: bool = False) -> None:
    assert len(packed) == len(alone) > 0
    worst = 0.0
    for step, (got, want) in enumerate(zip(packed, alone)):
        assert got.keys() == want.keys()
        for name, value in want.items():
            if name.endswith(ZERO_GRADIENT):
                if gradients:  # skipped only while its gradient is round-off, packed and alone
                    assert float(torch.stack([got[name], value]).abs().max()) < 1e-6, f"{what}: {name}"
                continue
            scale = value.abs().max().clamp_min(1e-12)
            diff = float((got[name] - value).abs().max() / scale)
            worst = max(worst, diff)
            assert diff <= rtol, f"{what}: step {step + 1}, {name} differs by {diff:.2e} (rtol {rtol})"
    print(f"{what}: max relative difference {worst:.1e}")


def _plain(model, args, data, member: int | None = None, **kw):
    record = _Record()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[record], **kw)
    trainer.train()
    return trainer, record


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="clip-warmup"),
        pytest.param({"gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine"}, id="accum-cosine"),
    ],
)
def test_member_equals_model_trained_by_plain_trainer(tmp_path: Path, extra: dict) -> None:
    """In float64: every step's gradients and parameters, the lr and the logged loss of each member."""
    lrs, decays, warmups = [1e-3, 5e-3, 2e-2], [0.0, 0.01, 0.1], [2, 0, 3]
    models, data = _models(3, dtype=torch.float64), _data(32)
    alone = [copy.deepcopy(m) for m in models]
    records = [_Record(i) for i in range(3)]
    trainer = PackedHFTrainer(
        models, _args(tmp_path / "pack", **extra), learning_rate=lrs, weight_decay=decays,
        warmup_steps=warmups, train_dataset=data, callbacks=records,
    )  # fmt: skip
    trainer.train()
    for i in range(3):
        args = _args(
            tmp_path / f"alone{i}",
            learning_rate=lrs[i],
            weight_decay=decays[i],
            **{**extra, "warmup_steps": warmups[i]},
        )
        plain, record = _plain(alone[i], args, data)
        assert records[i].lrs == pytest.approx(record.lrs, rel=1e-12, abs=0)
        _assert_close_per_step(records[i], record, f"member {i}")
        # the per-member logged losses are each plain Trainer's logged loss
        got = [log[f"loss/m{i}"] for log in trainer.state.log_history if f"loss/m{i}" in log]
        want = [log["loss"] for log in plain.state.log_history if "loss" in log]
        assert got == pytest.approx(want, rel=1e-5)
    assert records[2].lrs[0] == pytest.approx(lrs[2] / 3)  # its own warmup: 1 of 3 steps


def test_logs_hold_the_mean_and_every_member(tmp_path: Path) -> None:
    trainer = PackedHFTrainer(
        _models(2), _args(tmp_path, max_steps=2), learning_rate=[1e-3, 1e-2], train_dataset=_data(8)
    )
    trainer.train()
    first, last = trainer.state.log_history[0], trainer.state.log_history[-1]
    for key in ("loss", "grad_norm", "learning_rate"):
        assert first[key] == pytest.approx((first[f"{key}/m0"] + first[f"{key}/m1"]) / 2, rel=1e-6)
    assert last["train_loss"] == pytest.approx((last["train_loss/m0"] + last["train_loss/m1"]) / 2, rel=1e-6)
    assert first["grad_norm/m0"] != first["grad_norm/m1"]


def _accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    assert pred.predictions.shape[1:] == (CLASSES,), "compute_metrics sees one member's predictions"
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def test_evaluate_reports_each_members_loss_and_metrics(tmp_path: Path) -> None:
    models, train, held_out = _models(3), _data(16), _data(10, seed=5)  # 10 = 4 + 4 + 2
    trainer = PackedHFTrainer(
        models, _args(tmp_path, max_steps=3), learning_rate=[1e-3, 1e-2, 3e-2],
        train_dataset=train, eval_dataset=held_out, compute_metrics=_accuracy,
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    accs = []
    for i in range(3):
        plain = transformers.Trainer(
            model=trainer.pack.member(i), args=_args(tmp_path / f"m{i}"), eval_dataset=held_out,
            compute_metrics=_accuracy,
        )  # fmt: skip
        want = plain.evaluate()
        assert metrics[f"eval_loss/m{i}"] == pytest.approx(want["eval_loss"], rel=1e-5)
        assert metrics[f"eval_accuracy/m{i}"] == want["eval_accuracy"]
        accs.append(want["eval_accuracy"])
    assert metrics["eval_accuracy"] == pytest.approx(sum(accs) / 3)
    losses = [metrics[f"eval_loss/m{i}"] for i in range(3)]
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_save_members_loads_with_from_pretrained(tmp_path: Path) -> None:
    trainer = PackedHFTrainer(
        _models(2), _args(tmp_path, max_steps=2), learning_rate=[1e-2, 3e-2], train_dataset=_data(8)
    )
    trainer.train()
    folders = trainer.save_members(tmp_path / "out")
    assert [Path(f).name for f in folders] == ["member-0", "member-1"]
    batch = _data(4, seed=9)
    ids = torch.stack([b["input_ids"] for b in batch])
    mask = torch.stack([b["attention_mask"] for b in batch])
    for i, folder in enumerate(folders):
        assert (Path(folder) / "config.json").exists() and (Path(folder) / "model.safetensors").exists()
        loaded = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
        member = trainer.pack.member(i).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(ids, attention_mask=mask).logits,
                member(ids, attention_mask=mask).logits,
                rtol=0,
                atol=0,
            )
    trainer.save_model(str(tmp_path / "via_save_model"))
    assert (tmp_path / "via_save_model" / "member-1" / "model.safetensors").exists()


def test_clipping_is_per_member(tmp_path: Path) -> None:
    """A large-lr member's big gradients do not shrink a pack-mate's clip (float32, as users train)."""
    models, data = _models(2), _data(8)
    alone = copy.deepcopy(models[0])
    records = [_Record(0)]
    trainer = PackedHFTrainer(
        models, _args(tmp_path / "p", max_steps=2, max_grad_norm=0.05), learning_rate=[1e-2, 1.0],
        train_dataset=data, callbacks=records,
    )  # fmt: skip
    trainer.train()
    _, record = _plain(
        alone, _args(tmp_path / "a", max_steps=2, max_grad_norm=0.05, learning_rate=1e-2), data
    )
    _assert_close_per_step(records[0], record, "member 0")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"fp16": True}, "fp16"),
        ({"optim": "sgd"}, "optim="),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"load_best_model_at_end": True}, "load_best_model_at_end"),
    ],
)
def test_unsupported_arguments_are_refused(tmp_path: Path, kw: dict, match: str) -> None:
    args = _args(tmp_path)
    for key, value in kw.items():  # set after construction: this CPU build refuses fp16 itself
        setattr(args, key, value)
    with pytest.raises(ValueError, match=rf"PackedHFTrainer: .*{match}"):
        PackedHFTrainer(_models(2), args, train_dataset=_data(4))


def test_resume_from_a_checkpoint_continues_bitwise(tmp_path: Path) -> None:
    """Stopped after a checkpoint and resumed by a new trainer: every member as if never stopped."""
    lrs, data = [1e-3, 2e-2], _data(32)
    models = _models(2)
    fresh = [copy.deepcopy(m) for m in models]
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine", warmup_steps=2)
    straight = PackedHFTrainer(models, _args(tmp_path / "a", **kw), learning_rate=lrs, train_dataset=data)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "pack.pt").is_file() and (checkpoint / "member-1" / "model.safetensors").is_file()
    resumed = PackedHFTrainer(fresh, _args(tmp_path / "b", **kw), learning_rate=lrs, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for name, value in straight.pack.stacked_parameters().items():
        assert torch.equal(resumed.pack.stacked_parameters()[name], value), name
    for name, state in straight.optimizer.state.items():
        for key, t in state.items():
            assert torch.equal(resumed.optimizer.state[name][key], t), (name, key)
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    with pytest.raises(ValueError, match=r"PackedHFTrainer\.train: .* holds no pack\.pt"):
        PackedHFTrainer(_models(2), _args(tmp_path / "c"), train_dataset=data).train(str(tmp_path / "c"))


def test_bad_member_values_are_refused(tmp_path: Path) -> None:
    args = _args(tmp_path)
    with pytest.raises(ValueError, match=r"PackedHFTrainer.*learning_rate"):
        PackedHFTrainer(_models(2), args, learning_rate=[1e-3, 1e-3, 1e-3], train_dataset=_data(4))
    with pytest.raises(ValueError, match="PackedHFTrainer: warmup_steps"):
        PackedHFTrainer(_models(2), args, warmup_steps=[1], train_dataset=_data(4))
    with pytest.raises(TypeError, match="PackedHFTrainer: optimizers="):
        PackedHFTrainer(_models(2), args, optimizers=(None, None), train_dataset=_data(4))


def test_import_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "modelbatch.hf_trainer")
    with pytest.raises(
        ImportError,
        match=r'modelbatch.hf_trainer: needs transformers; pip install "modelbatch\[integrations\]"',
    ):
        importlib.import_module("modelbatch.hf_trainer")


def test_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_trainer_pack.py"), "--output-dir", str(tmp_path),
         "--epochs", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best member" in result.stdout
    assert (tmp_path / "member-0" / "model.safetensors").exists()
