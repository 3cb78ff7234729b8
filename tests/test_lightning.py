"""modelbatch.lightning: a pack trained by lightning.Trainer equals mb.fit / plain torch, per member."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch as mb
from modelbatch.lightning import MemberEarlyStopping, PackModule, RecipeDataModule

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-12


def trainer(**kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **kwargs})


def regression(n: int = 64, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    return x, x @ torch.randn(4, 1, generator=g, dtype=dtype) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=dtype
    )


def split(dtype: torch.dtype = torch.float64) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """64 training and 24 validation samples of one regression problem."""
    x, y = regression(88, dtype)
    return (x[:64], y[:64]), (x[64:], y[64:])


def mlp(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert p.shape == q.shape, name
        worst = max(worst, float(((p - q).abs() / q.abs().clamp_min(1e-30)).max()))
    return worst


def assert_close_members(a: nn.Module, b: nn.Module, rtol: float = RTOL) -> float:
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=0.0)
    return max_rel_diff(a, b)


class KeepMembers(mb.callbacks.Callback):
    """Captures every member's model from mb.fit's pack when it stops (its last report)."""

    def __init__(self) -> None:
        self.models: dict[int, nn.Module] = {}

    def on_pack_start(self, pack_trainer: mb.PackTrainer) -> None:
        self.pack = pack_trainer

    def on_member_stop(self, member_id, reason, last_report) -> None:
        self.models[member_id] = self.pack.batch.member(self.pack.slot_of(member_id))


def fit_recipe(**overrides) -> mb.Recipe:
    (x, y), (xv, yv) = split()
    options = {
        "model": lambda cfg: nn.Sequential(nn.Linear(4, cfg.get("hidden", 5)), nn.Tanh(), nn.Linear(5, 1)),
        "optimizer": "adam",
        "loss": F.mse_loss,
        "train_data": (x, y),
        "val_data": (xv, yv),
        "batch_size": 16,
        "steps_per_report": 4,  # one epoch of 64 samples
        "metrics": {"mae": F.l1_loss},
        "order": "shared",
        "dtype": torch.float64,
        "device": "cpu",
        "lr_schedule": lambda cfg, opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    }
    return mb.Recipe(**{**options, **overrides})


CONFIGS = [{"lr": 0.01}, {"lr": 0.05, "grad_clip": 0.5}, {"lr": 0.002, "seed": 11}]


def test_from_recipe_equals_mb_fit_float64_and_logs_each_member(tmp_path: Path) -> None:
    recipe = fit_recipe()
    module = PackModule.from_recipe(recipe, CONFIGS)
    initial = [module.member(i) for i in range(len(CONFIGS))]
    logger = CSVLogger(tmp_path, name="csv")
    trainer(max_epochs=3, logger=logger, log_every_n_steps=1).fit(module, datamodule=RecipeDataModule(recipe))

    keep = KeepMembers()
    history = mb.fit(recipe, CONFIGS, reports=3, callbacks=[keep], progress=False)
    worst = 0.0
    for i in range(len(CONFIGS)):
        reference = keep.models[i]
        assert max_rel_diff(reference, initial[i]) > 1e-3  # it trained
        worst = max(worst, assert_close_members(module.member(i), reference))
    print(f"max relative difference Lightning vs mb.fit (float64): {worst:.3g}")
    # members really differ: a swapped lr or member would not pass the comparison above
    assert max_rel_diff(module.member(0), keep.models[1]) > 1e-3

    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    val = metrics.dropna(subset=["val_loss/m0"]).reset_index(drop=True)
    assert {f"val_loss/m{i}" for i in range(3)} | {f"val_mae/m{i}" for i in range(3)} <= set(metrics.columns)
    assert len(val) == 3
    for i in range(3):
        theirs = history[history["member"] == i].sort_values("training_iteration")
        torch.testing.assert_close(
            torch.tensor(val[f"val_loss/m{i}"].to_numpy()),
            torch.tensor(theirs["val_loss"].to_numpy()),
            rtol=1e-6,
            atol=0.0,
        )
        torch.testing.assert_close(
            torch.tensor(val[f"val_mae/m{i}"].to_numpy()),
            torch.tensor(theirs["val_mae"].to_numpy()),
            rtol=1e-6,
            atol=0.0,
        )
        alone = module.member(i).eval()
        xv, yv = recipe.val_data
        with torch.no_grad():
            expected = float(F.mse_loss(alone(xv), yv))
        assert val[f"val_loss/m{i}"].iloc[-1] == pytest.approx(expected, rel=1e-6)
    mean = val[[f"val_loss/m{i}" for i in range(3)]].mean(axis=1).to_numpy()
    torch.testing.assert_close(
        torch.tensor(val["val_loss"].to_numpy()), torch.tensor(mean), rtol=1e-6, atol=0.0
    )


def test_pack_and_optimizer_equal_plain_torch_loop() -> None:
    x, y = regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    lrs = [0.02, 0.1, 0.05]
    module = PackModule(
        mb.ModelBatch([mlp(s) for s in range(3)]),
        lambda b: mb.optim.SGD(b, lr=lrs, momentum=0.9, weight_decay=1e-3),
        loss=F.mse_loss,
    )
    trainer(max_epochs=3, limit_val_batches=0).fit(module, loader)
    for i, lr in enumerate(lrs):
        model = mlp(i)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
        for _ in range(3):
            for xb, yb in loader:
                opt.zero_grad()
                F.mse_loss(model(xb), yb).backward()
                opt.step()
        assert_close_members(module.member(i), model)
    assert module.optimizer.steps.tolist() == [12.0, 12.0, 12.0]


def _state(module: PackModule) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v.detach().clone() for k, v in module.batch.stacked_parameters().items()}
    for name, st in module.optimizer.state.items():
        out.update({f"opt/{name}/{k}": t.clone() for k, t in st.items()})
    out["steps"] = module.optimizer.steps.clone()
    out["lr"] = module.optimizer.hparams["lr"].clone()
    out["active"] = module.batch.active.clone()
    return out


def test_checkpoint_resume_is_bitwise(tmp_path: Path) -> None:
    recipe = fit_recipe(dtype=torch.float32)
    stopper = MemberEarlyStopping(patience=50)

    straight = PackModule.from_recipe(recipe, CONFIGS)
    straight.stop_member(2, "left by hand")
    trainer(max_epochs=2, callbacks=[stopper]).fit(straight, datamodule=RecipeDataModule(recipe))

    first = PackModule.from_recipe(recipe, CONFIGS)
    first.stop_member(2, "left by hand")
    one = trainer(max_epochs=1, callbacks=[MemberEarlyStopping(patience=50)])
    one.fit(first, datamodule=RecipeDataModule(recipe))
    path = tmp_path / "epoch1.ckpt"
    one.save_checkpoint(path)

    resumed = PackModule.from_recipe(recipe, CONFIGS)
    resumed_stopper = MemberEarlyStopping(patience=50)
    trainer(max_epochs=2, callbacks=[resumed_stopper]).fit(
        resumed, datamodule=RecipeDataModule(recipe), ckpt_path=path
    )
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and len(a) > 6
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.stopped == {2: "left by hand"} and b["active"].tolist() == [True, True, False]
    assert resumed_stopper.best == stopper.best and set(stopper.best) == {0, 1}
    assert not torch.equal(_state(first)["param/0.weight"], b["param/0.weight"])  # epoch 2 did train


def test_member_early_stopping_leaves_the_others_training(tmp_path: Path) -> None:
    (x, y), (xv, yv) = split()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    val = DataLoader(TensorDataset(xv, yv), batch_size=24)

    def pack(seeds: list[int], lrs: list[float]) -> PackModule:
        return PackModule(
            mb.ModelBatch([mlp(s) for s in seeds]), lambda b: mb.optim.SGD(b, lr=lrs), loss=F.mse_loss
        )

    module = pack([0, 1, 2], [0.05, 2.0, 0.1])  # member 1's lr makes it diverge
    logger = CSVLogger(tmp_path, name="es")
    fit = trainer(
        max_epochs=5, logger=logger, log_every_n_steps=1, callbacks=[MemberEarlyStopping(patience=2)]
    )
    fit.fit(module, train, val)
    assert list(module.stopped) == [1] and "epoch 2" in module.stopped[1]
    assert fit.current_epoch == 5  # the Trainer went on with the others

    others = pack([0, 2], [0.05, 0.1])
    trainer(max_epochs=5, limit_val_batches=0).fit(others, train)
    assert_close_members(module.member(0), others.member(0))
    assert_close_members(module.member(2), others.member(1))
    alone = pack([1], [2.0])  # 3 epochs: then it stopped, and its weights stayed as they were
    trainer(max_epochs=3, limit_val_batches=0).fit(alone, train)
    # a diverging member doubles its round-off every step: 1e-9 after 12 steps (measured 1.8e-12)
    assert_close_members(module.member(1), alone.member(0), rtol=1e-9)

    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    logged = metrics.dropna(subset=["train_loss/m1"])
    assert set(logged["epoch"]) == {0, 1, 2} and metrics.dropna(subset=["train_loss/m0"])["epoch"].max() == 4


def test_nan_guard_stops_a_diverging_member_at_its_first_non_finite_loss_and_the_others_are_exact() -> None:
    (x, y), _ = split()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

    def pack(seeds: list[int], lrs: list[float]) -> PackModule:
        return PackModule(
            mb.ModelBatch([mlp(s) for s in seeds]), lambda b: mb.optim.SGD(b, lr=lrs), loss=F.mse_loss
        )

    module = pack([0, 1, 2], [0.05, 1e30, 0.1])  # member 1's loss overflows within a few steps
    trainer(max_epochs=3, limit_val_batches=0).fit(module, train)
    assert list(module.stopped) == [1]
    reason = module.stopped[1]
    assert reason.startswith("errored: non-finite loss (") and reason.endswith(" at step 5"), reason
    assert module.active_members() == [0, 2] and module.optimizer.steps.tolist() == [12, 5, 12]
    others = pack([0, 2], [0.05, 0.1])
    trainer(max_epochs=3, limit_val_batches=0).fit(others, train)
    assert_close_members(module.member(0), others.member(0), rtol=0.0)
    assert_close_members(module.member(2), others.member(1), rtol=0.0)
    alone = pack([1], [1e30])  # alone it stops at the same step, its last finite weights kept
    trainer(max_epochs=3, limit_val_batches=0).fit(alone, train)
    assert alone.stopped == {0: reason}
    assert all(torch.isfinite(p).all() for p in module.member(1).parameters())
    # a diverging member doubles its round-off every step (as in the early-stopping test)
    assert_close_members(module.member(1), alone.member(0), rtol=1e-9)


@pytest.mark.parametrize(("nan_guard", "per_step"), [(True, {"to_host": 1}), (False, {})])
def test_a_steady_training_step_reads_the_device_only_for_the_nan_guard(
    nan_guard: bool, per_step: dict
) -> None:
    """Forward, backward, clipping, optimizer, schedule and the per-member logging: no host sync; the NaN
    guard reads which losses are finite (one read). The first step also reads the members' flags."""
    from modelbatch.testing import HostSyncCounter

    (x, y), _ = split()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    module = PackModule(
        mb.ModelBatch([mlp(s) for s in range(3)]),
        lambda b: mb.optim.SGD(b, lr=[0.05, 0.1, 0.2]),
        loss=F.mse_loss,
        grad_clip=1.0,
        lr_schedule=lambda o: mb.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        nan_guard=nan_guard,
    )
    counts, step = [], module.training_step

    def counted(batch, batch_idx=0):
        with HostSyncCounter() as probe:
            loss = step(batch, batch_idx)
        counts.append(dict(probe.counts))
        return loss

    module.training_step = counted
    trainer(max_epochs=2, limit_val_batches=0).fit(module, train)
    assert len(counts) == 8 and counts[1:] == [per_step] * 7, counts


def test_trainer_stops_when_every_member_has_stopped() -> None:
    x, y = regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    module = PackModule(
        mb.ModelBatch([mlp(s) for s in range(2)]), lambda b: mb.optim.SGD(b, lr=0.0), loss=F.mse_loss
    )
    fit = trainer(max_epochs=20, callbacks=[MemberEarlyStopping(patience=1)])
    fit.fit(module, loader, loader)
    assert sorted(module.stopped) == [0, 1] and fit.current_epoch == 2 and fit.should_stop


def test_bf16_mixed_runs_under_autocast() -> None:
    x, y = regression(dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    seen = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return F.mse_loss(out.float(), target)

    module = PackModule(
        mb.ModelBatch([mlp(s, torch.float32) for s in range(3)]),
        lambda b: mb.optim.Adam(b, lr=[1e-3, 1e-2, 1e-1]),
        loss=loss,
    )
    before = module.batch.stack[0].weight.detach().clone()
    trainer(max_epochs=1, precision="bf16-mixed", limit_val_batches=0).fit(module, loader)
    assert seen and set(seen) == {torch.bfloat16} and module.scaler is None
    after = module.batch.stack[0].weight.detach()
    assert torch.isfinite(after).all() and all(not torch.equal(before[i], after[i]) for i in range(3))


def test_16_mixed_scales_each_member_on_its_own() -> None:
    x, y = regression(dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    models = [mlp(s, torch.float32) for s in range(3)]
    with torch.no_grad():
        models[1][2].weight.mul_(3e3)  # its fp16 gradients overflow at scale 2**16
    module = PackModule(mb.ModelBatch(models), lambda b: mb.optim.SGD(b, lr=0.01), loss=F.mse_loss)
    before = module.batch.stack[0].weight.detach().clone()
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer(max_epochs=1, plugins=[plugin], limit_train_batches=1, limit_val_batches=0).fit(module, loader)
    assert isinstance(module.scaler, mb.amp.GradScaler) and plugin.scaler is None
    assert module.scaler.get_scale().tolist() == [2.0**16, 2.0**15, 2.0**16]
    after = module.batch.stack[0].weight.detach()
    assert torch.equal(before[1], after[1])  # its step was skipped
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])
    assert module.optimizer.steps.tolist() == [1.0, 0.0, 1.0]


def test_multi_process_strategy_raises_a_clear_error() -> None:
    x, y = regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = PackModule(mb.ModelBatch([mlp(0), mlp(1)]), lambda b: mb.optim.SGD(b, lr=0.1), loss=F.mse_loss)
    environ = dict(os.environ)  # DDP sets MASTER_PORT, WORLD_SIZE, ...: later subprocesses must not see them
    try:
        with pytest.raises(RuntimeError, match=r"PackModule: strategy DDPStrategy .*devices=1"):
            trainer(max_epochs=1, strategy="ddp").fit(module, loader)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def test_bad_arguments_raise_with_the_api_name() -> None:
    batch = mb.ModelBatch([mlp(0), mlp(1)])
    with pytest.raises(TypeError, match=r"PackModule: expected a mb\.ModelBatch"):
        PackModule(mlp(0), lambda b: mb.optim.SGD(b, lr=0.1), loss=F.mse_loss)
    with pytest.raises(TypeError, match=r"PackModule: optimizer must be a modelbatch\.optim optimizer"):
        PackModule(batch, lambda b: torch.optim.SGD(b.parameters(), lr=0.1), loss=F.mse_loss)
    recipe = fit_recipe(subset=lambda cfg: torch.arange(32))
    with pytest.raises(ValueError, match=r"PackModule\.from_recipe: .*subset"):
        PackModule.from_recipe(recipe, CONFIGS)
    with pytest.raises(ValueError, match="MemberEarlyStopping: mode"):
        MemberEarlyStopping(mode="lowest")


def test_member_and_save_members(tmp_path: Path) -> None:
    module = PackModule.from_recipe(fit_recipe(), CONFIGS)
    paths = module.save_members(tmp_path)
    assert [Path(p).name for p in paths] == ["member_0.pt", "member_1.pt", "member_2.pt"]
    state = torch.load(paths[2])
    assert torch.equal(state["0.weight"], module.batch.stack[0].weight[2])
    torch.manual_seed(11)  # config 2's seed: the model mb.fit builds for it
    expected = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    assert torch.equal(module.member(2)[0].weight, expected[0].weight)


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "modelbatch.lightning")
    with pytest.raises(
        ImportError, match=r'modelbatch.lightning: needs lightning; pip install "modelbatch\[integrations\]"'
    ):
        importlib.import_module("modelbatch.lightning")


def test_import_modelbatch_does_not_import_lightning() -> None:
    code = "import sys, modelbatch; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "lightning_pack.py"),
            "--output-dir",
            str(tmp_path),
            "--epochs",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("member ") and "val_loss=" in line for line in lines) == 5
    assert any(line.startswith("best member ") for line in lines)
    assert len(list((tmp_path / "members").glob("member_*.pt"))) == 5
