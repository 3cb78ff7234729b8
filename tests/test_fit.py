"""mb.fit / PackTrainer / callbacks: every member trains as it would alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recipes import small_recipe
from torch import nn

import modelbatch as mb

torch.manual_seed(0)
X = torch.randn(90, 6, dtype=torch.float64)
Y = torch.randint(0, 3, (90,))
XV, YV = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def recipe(**kw) -> mb.Recipe:
    settings = dict(
        model=lambda cfg: Net(cfg.get("hidden", 8)),
        train_data=(X, Y),
        optimizer="adamw",
        val_data=(XV, YV),
        steps_per_report=7,
        metrics={"acc": mb.metrics.accuracy},
        backend="vmap",  # bitwise comparisons between runs need one backend
    )
    return small_recipe(**{**settings, **kw})


CONFIGS = [{"lr": 1e-3 * (i + 1), "weight_decay": 0.01 * i, "seed": 10 + i} for i in range(5)]


def _by_member(history):
    return {m: g.reset_index(drop=True) for m, g in history.groupby("member")}


def _assert_same_history(a, b, rtol=1e-10):
    for col in ("loss", "val_loss", "val_acc"):
        torch.testing.assert_close(
            torch.tensor(a[col].values), torch.tensor(b[col].values), rtol=rtol, atol=0
        )
    assert a["training_iteration"].tolist() == b["training_iteration"].tolist()


def plain_torch_val_losses(
    cfg: dict, reports: int, change_at: int | None = None, new: dict | None = None
) -> list:
    """Plain torch alone: torch.manual_seed + the model, a seeded shuffling DataLoader, torch.optim.AdamW,
    7 steps per report; from report ``change_at`` on, ``new``'s lr and weight decay (as PBT sets them)."""
    torch.manual_seed(cfg["seed"])
    model = Net().double()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    batches = (b for _ in range(100) for b in loader)
    val_losses = []
    for report in range(reports):
        if report == change_at:
            opt.param_groups[0].update(lr=new["lr"], weight_decay=new["weight_decay"])
        for _ in range(7):
            xb, yb = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        with torch.no_grad():
            val_losses.append(float(F.cross_entropy(model(XV), YV)))
    return val_losses


def test_member_in_pack_equals_plain_torch_training_alone() -> None:
    """Reference: torch.manual_seed + the model, a seeded shuffling DataLoader, torch.optim.AdamW."""
    history = mb.fit(recipe(), CONFIGS, reports=4, progress=False)
    val_losses = plain_torch_val_losses(CONFIGS[3], reports=4)
    got = _by_member(history)[3]["val_loss"].tolist()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(val_losses), rtol=1e-10, atol=0)


def test_pack_equals_each_config_alone_and_waves_equal_one_wave() -> None:
    together = _by_member(mb.fit(recipe(), CONFIGS, reports=3, progress=False))
    waves = _by_member(mb.fit(recipe(), CONFIGS, reports=3, n_slots=2, progress=False))
    for i, cfg in enumerate(CONFIGS):
        alone = _by_member(mb.fit(recipe(), [cfg], reports=3, progress=False))[0]
        _assert_same_history(together[i], alone)
        _assert_same_history(waves[i], alone)


def test_lr_schedule_from_recipe_equals_alone() -> None:
    def sched(cfg, opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step"], gamma=0.5)

    configs = [{"lr": 0.05, "step": 3, "seed": 1}, {"lr": 0.02, "step": 5, "seed": 2}]
    r = recipe(optimizer="sgd", lr_schedule=sched, optimizer_defaults={"momentum": 0.9})
    both = _by_member(mb.fit(r, configs, reports=3, progress=False))
    for i, cfg in enumerate(configs):
        _assert_same_history(both[i], _by_member(mb.fit(r, [cfg], reports=3, progress=False))[0])


def test_mixed_architectures_train_in_separate_packs() -> None:
    configs = [{"hidden": 8, "lr": 1e-2}, {"hidden": 12, "lr": 1e-2}, {"hidden": 8, "lr": 3e-3}]
    history = mb.fit(recipe(), configs, reports=2, progress=False)
    assert sorted(history["member"].unique()) == [0, 1, 2]
    assert (history.groupby("member").size() == 2).all()
    assert set(history["status"]) == {"running", "finished"}


def test_nan_guard_stops_the_diverging_member_and_others_are_untouched() -> None:
    # Regression with SGD at lr=1e8 grows the weights exponentially: inf, then nan.
    targets, val_targets = torch.randn(90, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    r = recipe(
        optimizer="sgd", loss=F.mse_loss, train_data=(X, targets), val_data=(XV, val_targets), metrics={}
    )
    good = [{"lr": 1e-2, "seed": 1}, {"lr": 3e-2, "seed": 2}]
    with_bad = _by_member(mb.fit(r, [*good, {"lr": 1e8, "seed": 99}], reports=6, progress=False))
    without = _by_member(mb.fit(r, good, reports=6, progress=False))
    status = with_bad[2]["status"].iloc[-1]
    assert status.startswith("errored: non-finite"), status
    assert len(with_bad[2]) < 6
    for i in range(2):
        for col in ("loss", "val_loss"):
            assert with_bad[i][col].tolist() == without[i][col].tolist(), f"member {i} {col} changed"


def test_early_stopping_stops_at_the_right_report() -> None:
    # lr = 0: val_loss never improves after the first report -> stopped at report 1 + patience.
    configs = [{"lr": 0.0}, {"lr": 1e-2}]
    history = mb.fit(
        recipe(optimizer="sgd"),
        configs,
        reports=8,
        callbacks=[mb.callbacks.EarlyStopping("val_loss", patience=3)],
        progress=False,
    )
    frozen = _by_member(history)[0]
    assert frozen["training_iteration"].max() == 4
    assert frozen["status"].iloc[-1].startswith("early stopped: val_loss did not improve for 3 reports")
    assert _by_member(history)[1]["training_iteration"].max() == 8


def test_pack_trainer_after_report_ends_members_as_mb_fit_does() -> None:
    """One after-report path: a pack driven by hand ends the members mb.fit ends, at the same reports, alike.

    Rules in order: a NaN/inf first (it wins over a callback's stop at the same report), then the
    callbacks (a stop at the last report wins over "finished"), then the report limit.
    """
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(90, 3, dtype=torch.float64, generator=gen)
    val_targets = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    r = recipe(
        optimizer="sgd", loss=F.mse_loss, train_data=(X, targets), val_data=(XV, val_targets), metrics={}
    )
    # lr 0: val_loss never improves (early stopped at report 4); lr 1e8 diverges;
    # 3e-2 is stopped at the last report
    configs = [
        {"lr": 0.0, "seed": 1},
        {"lr": 1e-2, "seed": 2},
        {"lr": 1e8, "seed": 3},
        {"lr": 3e-2, "seed": 4},
    ]

    class StopAtTheEnd(mb.callbacks.Callback):
        def __init__(self) -> None:
            self.stopped: list = []

        def on_report(self, reports, control):
            control.stop(99, "not a member of this round: ignored")
            if 2 in reports and reports[2]["loss"] != reports[2]["loss"]:
                control.stop(2, "the NaN guard came first")
            if 3 in reports and reports[3]["training_iteration"] == 6:
                control.stop(3, "stopped at the last report")

        def on_member_stop(self, member_id, reason, last_report):
            self.stopped.append((member_id, reason, last_report["training_iteration"]))

    fitted = StopAtTheEnd()
    history = mb.fit(
        r, configs, reports=6, callbacks=[mb.callbacks.EarlyStopping(patience=3), fitted], progress=False
    )
    trainer = mb.PackTrainer(r, n_slots=len(configs), example_config=configs[0])
    for member, config in enumerate(configs):
        trainer.add(member, config)
    by_hand = StopAtTheEnd()
    callbacks = [mb.callbacks.EarlyStopping(patience=3), by_hand]
    got = {}
    while trainer.live():
        reports = trainer.train_report()
        for member, ended in trainer.after_report(reports, callbacks, max_reports=6).items():
            got[member] = (reports[member]["training_iteration"], ended.status, ended.kind)
            assert (
                member not in trainer.live()
                and trainer.slots[trainer.slot_of(member)].stopped == ended.status
            )
    expected = {
        m: (g["training_iteration"].iloc[-1], g["status"].iloc[-1]) for m, g in _by_member(history).items()
    }
    assert {m: g[:2] for m, g in got.items()} == expected
    assert {m: g[2] for m, g in got.items()} == {0: "stopped", 1: "finished", 2: "errored", 3: "stopped"}
    assert got[0][:2] == (4, "early stopped: val_loss did not improve for 3 reports")
    assert got[2][1].startswith("errored: non-finite ") and got[2][1].endswith(f" at report {got[2][0]}")
    assert got[3][:2] == (6, "stopped at the last report")
    assert (
        sorted(by_hand.stopped) == sorted(fitted.stopped) == sorted((m, g[1], g[0]) for m, g in got.items())
    )


def test_tensorboard_writes_one_run_per_member(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = mb.callbacks.TensorBoard(tmp_path)
    mb.fit(recipe(), CONFIGS[:3], reports=3, callbacks=[tb], progress=False)
    for member in range(3):
        acc = EventAccumulator(str(tb.run_dir(member)))
        acc.Reload()
        assert {"loss", "val_loss", "val_acc"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("val_loss")] == [1, 2, 3]


def test_user_callback_sees_reports_and_stops() -> None:
    seen: list = []

    class Recorder(mb.callbacks.Callback):
        def on_report(self, reports, control):
            seen.append(sorted(reports))
            if 1 in reports and reports[1]["training_iteration"] == 2:
                control.stop(1, "user said so")

        def on_member_stop(self, member_id, reason, last_report):
            seen.append((member_id, reason))

    history = mb.fit(recipe(), CONFIGS[:2], reports=3, callbacks=[Recorder()], progress=False)
    assert seen[0] == [0, 1]
    assert (1, "user said so") in seen and (0, "finished") in seen
    assert _by_member(history)[1]["status"].iloc[-1] == "user said so"


def test_progress_bar_runs(capsys) -> None:
    mb.fit(recipe(), CONFIGS[:2], reports=2, progress=True)
    assert "members" in capsys.readouterr().err


def test_pack_trainer_member_state_dict_moves_a_member_between_packs() -> None:
    r = recipe(optimizer="adam")
    a = mb.PackTrainer(r, n_slots=3, example_config=CONFIGS[0])
    a.add("x", CONFIGS[1])
    a.add("y", CONFIGS[2])
    a.train_report()
    state = a.member_state_dict("y")
    b = mb.PackTrainer(r, n_slots=2, example_config=CONFIGS[0])
    b.add("z", CONFIGS[0])
    b.restore_member(state)
    for _ in range(2):
        ra, rb = a.train_report(), b.train_report()
        assert ra["y"]["training_iteration"] == rb["y"]["training_iteration"]
        torch.testing.assert_close(
            torch.tensor(ra["y"]["val_loss"]), torch.tensor(rb["y"]["val_loss"]), rtol=1e-10, atol=0
        )


@pytest.mark.parametrize("broken", ["sampler", "optimizer_state"])
def test_a_state_that_fails_to_restore_leaves_nothing_in_the_pack(broken: str) -> None:
    r = recipe(optimizer="adam")
    a = mb.PackTrainer(r, n_slots=2, example_config=CONFIGS[0])
    a.add("y", CONFIGS[2])
    a.train_report()
    state = a.member_state_dict("y")
    if broken == "sampler":  # fails late, after the weights, the optimizer and the schedule loaded
        state = {**state, "sampler": {**state["sampler"], "position": 10**9}}
    else:
        name, st = next(iter(state["optimizer_state"].items()))
        state = {**state, "optimizer_state": {name: {k: t[:1] for k, t in st.items()}}}
    b = mb.PackTrainer(r, n_slots=2, example_config=CONFIGS[0])
    b.add("z", CONFIGS[0])
    before = {k: v.clone() for k, v in b.batch.stacked_parameters().items()}
    with pytest.raises(ValueError, match=r"position|optimizer body\.0\.weight\.exp_avg has shape \[1, 6\]"):
        b.restore_member(state)
    assert list(b.live()) == ["z"] and len(b.free_slots()) == 1
    for name, p in b.batch.stacked_parameters().items():
        assert torch.equal(p[0], before[name][0]), name  # the other member is untouched
    b.restore_member(a.member_state_dict("y"))  # the freed slot takes the good state
    ra, rb = a.train_report(), b.train_report()
    torch.testing.assert_close(
        torch.tensor(ra["y"]["val_loss"]), torch.tensor(rb["y"]["val_loss"]), rtol=1e-10, atol=0
    )


DEPRECATED = r"is deprecated, use {} \(same meaning\); it will be removed in the next release\."


def test_the_deprecated_names_capacity_and_member_state_warn_and_mean_n_slots_and_member_state_dict() -> None:
    with pytest.warns(FutureWarning, match="^mb.fit: capacity= " + DEPRECATED.format("n_slots=")):
        old = _by_member(mb.fit(recipe(), CONFIGS, reports=2, capacity=2, progress=False))
    new = _by_member(mb.fit(recipe(), CONFIGS, reports=2, n_slots=2, progress=False))
    for i in range(len(CONFIGS)):
        _assert_same_history(old[i], new[i])
    with pytest.warns(FutureWarning, match="^mb.PackTrainer: capacity= " + DEPRECATED.format("n_slots=")):
        a = mb.PackTrainer(recipe(), capacity=2, example_config=CONFIGS[0])
    b = mb.PackTrainer(recipe(), n_slots=2, example_config=CONFIGS[0])
    with pytest.warns(FutureWarning, match="^mb.PackTrainer: capacity " + DEPRECATED.format("n_slots")):
        assert a.capacity == a.n_slots == b.n_slots == 2
    for pack in (a, b):
        pack.add("x", CONFIGS[1])
        pack.train_report()
    with pytest.warns(
        FutureWarning,
        match=r"^mb.PackTrainer: member_state\(\) " + DEPRECATED.format(r"member_state_dict\(\)"),
    ):
        old_state = a.member_state("x")
    new_state = b.member_state_dict("x")
    assert old_state.keys() == new_state.keys() and old_state["slot_state"] == new_state["slot_state"]
    torch.testing.assert_close(old_state["model"], new_state["model"], rtol=0, atol=0)
    torch.testing.assert_close(old_state["optimizer_state"], new_state["optimizer_state"], rtol=0, atol=0)


def test_val_subset_validates_each_member_on_its_own_samples() -> None:
    subsets = {0: torch.arange(0, 30), 1: torch.arange(10, 35)}
    configs = [{"lr": 1e-2, "part": 0, "seed": 5}, {"lr": 3e-3, "part": 1, "seed": 6}]
    packed = _by_member(
        mb.fit(recipe(val_subset=lambda cfg: subsets[cfg["part"]]), configs, reports=3, progress=False)
    )
    for i, cfg in enumerate(configs):
        own = recipe(val_data=(XV[subsets[cfg["part"]]], YV[subsets[cfg["part"]]]))
        _assert_same_history(packed[i], _by_member(mb.fit(own, [cfg], reports=3, progress=False))[0])


def test_a_mostly_empty_pack_trains_its_live_member_as_a_pack_of_one() -> None:
    """Empty and stopped slots are not computed (NaN in evaluate) and do not change the live member."""
    big = mb.PackTrainer(recipe(backend="loop"), n_slots=4, example_config=CONFIGS[0])
    one = mb.PackTrainer(recipe(backend="loop"), n_slots=1, example_config=CONFIGS[0])
    big.add("live", CONFIGS[1])
    big.add("stopped", CONFIGS[2])
    one.add("live", CONFIGS[1])
    big.train_report()
    big.stop("stopped", "finished")
    stopped = {k: v[big.slot_of("stopped")].clone() for k, v in big.batch.stacked_parameters().items()}
    one.train_report()
    for _ in range(2):
        rb, ro = big.train_report(), one.train_report()
        assert set(rb) == {"live"}
        for key in ("loss", "val_loss", "val_acc"):
            torch.testing.assert_close(
                torch.tensor(rb["live"][key]), torch.tensor(ro["live"][key]), rtol=1e-12, atol=0
            )
    values = big.evaluate()["val_loss"]
    assert [v != v for v in values] == [False, True, True, True]  # NaN but for the live slot
    for name, value in big.batch.stacked_parameters().items():
        assert torch.equal(value[big.slot_of("stopped")], stopped[name]), name


def test_restore_member_with_a_new_config_equals_torch_changing_param_groups() -> None:
    """Population-based training's exploit: a donor's state goes on with new hyperparameters.

    Reference: one torch.optim.AdamW run alone whose param_group lr and weight decay change after
    two reports, as a plain Tune PBT trainable does after loading the donor's checkpoint.
    """
    cfg, new = CONFIGS[3], {**CONFIGS[3], "lr": 0.02, "weight_decay": 0.05}
    donor = mb.PackTrainer(recipe(), n_slots=2, example_config=cfg)
    donor.add("d", cfg)
    got = [donor.train_report()["d"]["val_loss"] for _ in range(2)]
    state = donor.member_state_dict("d")
    pack = mb.PackTrainer(recipe(), n_slots=3, example_config=cfg)
    pack.add("other", CONFIGS[0])
    pack.restore_member(state, new)
    got += [pack.train_report()["d"]["val_loss"] for _ in range(2)]
    assert pack.slots[pack.slot_of("d")].config == new and pack.slots[pack.slot_of("d")].iteration == 4
    want = plain_torch_val_losses(cfg, reports=4, change_at=2, new=new)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-10, atol=0)


def test_wandb_writes_one_offline_run_per_member_grouped_with_config_and_history(tmp_path) -> None:
    from wandb_files import read_runs

    wb = mb.callbacks.WandB(project="test", group="sweep-1", mode="offline", dir=tmp_path)
    early = mb.callbacks.EarlyStopping("val_loss", patience=1, min_delta=10.0)  # member 2 stops at report 2
    configs = CONFIGS[:3]

    class OnlyTheThird(mb.callbacks.Callback):
        def on_report(self, reports, control):
            early.on_report({m: r for m, r in reports.items() if m == 2}, control)

    history = mb.fit(recipe(), configs, reports=3, callbacks=[wb, OnlyTheThird()], progress=False)
    runs = {run.name: run for run in read_runs(tmp_path).values()}
    assert sorted(runs) == ["member-0", "member-1", "member-2"]
    for member, rows in _by_member(history).items():
        run = runs[f"member-{member}"]
        assert (run.project, run.group, run.files) == ("test", "sweep-1", 1)
        assert run.config == configs[member]
        assert run.steps("val_loss") == list(zip(rows["training_iteration"], rows["val_loss"], strict=True))
        assert "training_iteration" not in run.history[0]
        assert run.summary["status"] == rows["status"].iloc[-1]
    assert runs["member-0"].summary["status"] == "finished" and len(runs["member-0"].history) == 3
    assert (
        runs["member-2"].summary["status"].startswith("early stopped") and len(runs["member-2"].history) == 2
    )


def test_wandb_refusing_a_run_warns_and_training_goes_on(tmp_path) -> None:
    wb = mb.callbacks.WandB(project="test", mode="no-such-mode", dir=tmp_path)
    with pytest.warns(UserWarning) as warned:
        history = mb.fit(recipe(), CONFIGS[:2], reports=2, callbacks=[wb], progress=False)
    assert [str(w.message)[:52] for w in warned] == [
        "mb.callbacks.WandB: W&B start of run 0 failed, not l",
        "mb.callbacks.WandB: 2 W&B runs were not logged (the ",
    ]
    assert list(history.groupby("member")["status"].last()) == ["finished", "finished"]
