"""Per-member lr schedules equal N torch schedulers, each driving one model trained alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as T

import modelbatch as mb
from modelbatch.optim import lr_scheduler as S

N = 4
LRS = [0.1, 0.05, 0.3, 1.0]
STEPS = 30
LAMBDAS = [lambda t: 1 / (t + 1), lambda t: 0.9**t, lambda t: 1.0 + 0.1 * t, lambda t: 0.5 ** (t // 3)]


def _warmup_cosine(o, warmup, t_max, eta_min=0.0, start=1 / 3):
    if warmup == 0:
        return T.CosineAnnealingLR(o, t_max, eta_min=eta_min)
    linear = T.LinearLR(o, start, 1.0, total_iters=warmup)
    cosine = T.CosineAnnealingLR(o, t_max, eta_min=eta_min)
    return T.SequentialLR(o, [linear, cosine], milestones=[warmup])


# (id, mb schedule builder, torch reference factory for member i)
CASES = [
    (
        "StepLR",
        lambda opt: S.StepLR(opt, step_size=[1, 3, 5, 7], gamma=[0.5, 0.9, 0.1, 0.3]),
        lambda i, o: T.StepLR(o, [1, 3, 5, 7][i], gamma=[0.5, 0.9, 0.1, 0.3][i]),
    ),
    (
        "MultiStepLR",
        lambda opt: S.MultiStepLR(opt, milestones=[[2, 5], [10], [1, 2, 3], []], gamma=[0.5, 0.9, 0.1, 0.3]),
        lambda i, o: T.MultiStepLR(o, [[2, 5], [10], [1, 2, 3], []][i], gamma=[0.5, 0.9, 0.1, 0.3][i]),
    ),
    (
        "MultiStepLR-shared",
        lambda opt: S.MultiStepLR(opt, milestones=[3, 8, 8, 20]),
        lambda i, o: T.MultiStepLR(o, [3, 8, 8, 20]),
    ),
    (
        "ExponentialLR",
        lambda opt: S.ExponentialLR(opt, gamma=[0.9, 0.95, 0.99, 0.5]),
        lambda i, o: T.ExponentialLR(o, [0.9, 0.95, 0.99, 0.5][i]),
    ),
    (
        "CosineAnnealingLR",
        lambda opt: S.CosineAnnealingLR(opt, T_max=[5, 10, 30, 7], eta_min=[0.0, 1e-3, 0.01, 0.0]),
        lambda i, o: T.CosineAnnealingLR(o, [5, 10, 30, 7][i], eta_min=[0.0, 1e-3, 0.01, 0.0][i]),
    ),
    (
        "LinearLR",
        lambda opt: S.LinearLR(
            opt,
            start_factor=[0.1, 1 / 3, 0.5, 1.0],
            end_factor=[1.0, 0.5, 1.0, 0.1],
            total_iters=[3, 5, 10, 0],
        ),
        lambda i, o: T.LinearLR(
            o, [0.1, 1 / 3, 0.5, 1.0][i], [1.0, 0.5, 1.0, 0.1][i], total_iters=[3, 5, 10, 0][i]
        ),
    ),
    (
        "LambdaLR",
        lambda opt: S.LambdaLR(opt, LAMBDAS),
        lambda i, o: T.LambdaLR(o, LAMBDAS[i]),
    ),
    (
        "OneCycleLR",
        lambda opt: S.OneCycleLR(
            opt, max_lr=[0.5, 1.0, 2.0, 0.1], total_steps=[30, 40, 50, 31], pct_start=0.25
        ),
        lambda i, o: T.OneCycleLR(
            o, [0.5, 1.0, 2.0, 0.1][i], total_steps=[30, 40, 50, 31][i], pct_start=0.25
        ),
    ),
    (
        "WarmupCosine",
        lambda opt: S.WarmupCosine(
            opt, warmup_steps=[0, 3, 5, 10], T_max=[10, 20, 25, 5], eta_min=[0, 1e-3, 0, 0]
        ),
        lambda i, o: _warmup_cosine(o, [0, 3, 5, 10][i], [10, 20, 25, 5][i], [0, 1e-3, 0, 0][i]),
    ),
    (
        "PerMember-CyclicLR",
        lambda opt: S.PerMember(opt, lambda i, o: T.CyclicLR(o, 0.01, 0.1 * (i + 1), step_size_up=3 + i)),
        lambda i, o: T.CyclicLR(o, 0.01, 0.1 * (i + 1), step_size_up=3 + i),
    ),
]
BY_ID = {case[0]: case for case in CASES}


def _pack(n: int = N) -> mb.ModelBatch:
    torch.manual_seed(0)
    return mb.ModelBatch([torch.nn.Linear(3, 2).double() for _ in range(n)])


def _mb_optimizer(kind: str, batch: mb.ModelBatch, lrs=LRS) -> mb.optim.Optimizer:
    if kind == "adam":
        return mb.optim.Adam(batch, lr=lrs, betas=([0.9, 0.8, 0.95, 0.5], 0.999))
    return mb.optim.SGD(batch, lr=lrs, momentum=[0.9, 0.0, 0.5, 0.99])


def _torch_optimizer(kind: str, params, i: int, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=([0.9, 0.8, 0.95, 0.5][i], 0.999))
    return torch.optim.SGD(params, lr=lr, momentum=[0.9, 0.0, 0.5, 0.99][i])


def _momentum(group: dict) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def _torch_sequence(kind: str, factory, i: int, lr: float, steps: int = STEPS) -> list[tuple[float, float]]:
    """(lr, momentum) after construction and after each step, for one member trained alone."""
    opt = _torch_optimizer(kind, [torch.zeros(1, requires_grad=True)], i, lr)
    sched = factory(i, opt)
    group = opt.param_groups[0]
    seq = [(group["lr"], _momentum(group))]
    for _ in range(steps):
        opt.step()
        sched.step()
        seq.append((group["lr"], _momentum(group)))
    return seq


def _mb_sequences(kind: str, opt: mb.optim.Optimizer, sched: S.PerMember, steps: int = STEPS):
    key = "beta1" if kind == "adam" else "momentum"
    seqs = [[(opt.hparams["lr"][i].item(), opt.hparams[key][i].item())] for i in range(N)]
    for _ in range(steps):
        sched.step()
        for i in range(N):
            seqs[i].append((opt.hparams["lr"][i].item(), opt.hparams[key][i].item()))
    return seqs


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lr_sequence_equals_torch_per_member(case, kind):
    _, build, factory = case
    opt = _mb_optimizer(kind, _pack())
    sched = build(opt)
    seqs = _mb_sequences(kind, opt, sched)
    for i in range(N):
        expected = _torch_sequence(kind, factory, i, LRS[i])
        assert seqs[i] == expected, f"member {i}"
        assert sched.get_last_lr()[i] == expected[-1][0]


def test_hparams_stay_float64_cpu_and_other_hparams_untouched():
    opt = _mb_optimizer("sgd", _pack())
    momentum = opt.hparams["momentum"].clone()
    sched = BY_ID["StepLR"][1](opt)
    sched.step()
    assert opt.hparams["lr"].dtype == torch.float64 and opt.hparams["lr"].shape == (N,)
    assert torch.equal(opt.hparams["momentum"], momentum)


def test_set_hparam_lr_is_seen_like_a_changed_param_group():
    opt = _mb_optimizer("sgd", _pack())
    sched = S.ExponentialLR(opt, gamma=0.5)
    sched.step()
    opt.set_hparam("lr", 0.8, member=2)
    sched.step()
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LRS[2])
    ref = T.ExponentialLR(ref_opt, 0.5)
    ref_opt.step()
    ref.step()
    ref_opt.param_groups[0]["lr"] = 0.8
    ref_opt.step()
    ref.step()
    assert opt.hparams["lr"][2].item() == ref_opt.param_groups[0]["lr"] == 0.4


@pytest.mark.parametrize("case_id", ["StepLR", "LambdaLR", "OneCycleLR", "WarmupCosine"])
def test_state_dict_round_trip_resumes_identically(case_id):
    _, build, _ = BY_ID[case_id]
    opt = _mb_optimizer("sgd", _pack())
    sched = build(opt)
    for _ in range(10):
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    expected = _mb_sequences("sgd", opt, sched, steps=15)

    fresh_opt = _mb_optimizer("sgd", _pack())
    fresh = build(fresh_opt)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert _mb_sequences("sgd", fresh_opt, fresh, steps=15) == expected


def test_state_dict_is_a_snapshot():
    opt = _mb_optimizer("sgd", _pack())
    sched = BY_ID["WarmupCosine"][1](opt)
    saved = sched.state_dict()
    snapshot = copy.deepcopy(saved)
    for _ in range(5):
        sched.step()
    assert saved["members"] == snapshot["members"]


def test_load_state_dict_rejects_other_pack_size():
    sd = S.StepLR(_mb_optimizer("sgd", _pack()), step_size=2).state_dict()
    small = mb.optim.SGD(_pack(3), lr=0.1)
    with pytest.raises(
        ValueError, match=r"^mb\.optim\.lr_scheduler\.StepLR\.load_state_dict: the state is for 4"
    ):
        S.StepLR(small, step_size=2).load_state_dict(sd)


def test_reset_member_restarts_from_initial_or_given_lr():
    _, build, factory = BY_ID["WarmupCosine"]
    opt = _mb_optimizer("sgd", _pack())
    sched = build(opt)
    for _ in range(7):
        sched.step()
    before = opt.hparams["lr"].clone()
    sched.reset_member(1)
    sched.reset_member(2, lr=0.7)
    assert torch.equal(opt.hparams["lr"][[0, 3]], before[[0, 3]])
    seqs = _mb_sequences("sgd", opt, sched, steps=10)
    assert seqs[1] == _torch_sequence("sgd", factory, 1, LRS[1], steps=10)
    assert seqs[2] == _torch_sequence("sgd", factory, 2, 0.7, steps=10)
    assert seqs[0] == _torch_sequence("sgd", factory, 0, LRS[0], steps=17)[7:]
    sched.reset_member(2)
    assert opt.hparams["lr"][2].item() == _torch_sequence("sgd", factory, 2, 0.7, steps=0)[0][0]


def test_reset_member_validates():
    sched = S.StepLR(_mb_optimizer("sgd", _pack()), step_size=2)
    with pytest.raises(IndexError, match=r"^mb\.optim\.lr_scheduler\.StepLR\.reset_member: member 4"):
        sched.reset_member(4)
    with pytest.raises(ValueError, match=r"^mb\.optim\.lr_scheduler\.StepLR\.reset_member: lr of member 0"):
        sched.reset_member(0, lr=-1.0)


def test_frozen_member_does_not_advance_and_resumes_where_it_was():
    _, build, factory = BY_ID["CosineAnnealingLR"]
    batch = _pack()
    opt = _mb_optimizer("sgd", batch)
    sched = build(opt)
    lrs = {i: [opt.hparams["lr"][i].item()] for i in range(N)}
    for step in range(20):
        if step == 5:
            batch.freeze(1)
        if step == 12:
            batch.unfreeze(1)
        sched.step()
        for i in range(N):
            lrs[i].append(opt.hparams["lr"][i].item())
    ref = [lr for lr, _ in _torch_sequence("sgd", factory, 1, LRS[1], steps=13)]
    assert lrs[1] == ref[:6] + [ref[5]] * 7 + ref[6:]
    assert lrs[0] == [lr for lr, _ in _torch_sequence("sgd", factory, 0, LRS[0], steps=20)]


def test_step_mask_skips_members():
    opt = _mb_optimizer("sgd", _pack())
    sched = S.ExponentialLR(opt, gamma=0.5)
    sched.step(mask=torch.tensor([True, False, True, False]))
    assert sched.get_last_lr() == [LRS[0] / 2, LRS[1], LRS[2] / 2, LRS[3]]


def test_reduce_on_plateau_takes_one_metric_per_member():
    opt = _mb_optimizer("sgd", _pack())
    sched = S.PerMember(opt, lambda i, o: T.ReduceLROnPlateau(o, factor=0.5, patience=i))
    refs = []
    for i in range(N):
        o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LRS[i])
        refs.append((o, T.ReduceLROnPlateau(o, factor=0.5, patience=i)))
    for step in range(12):
        metrics = [1.0 + 0.1 * ((step + i) % 3) for i in range(N)]
        sched.step(torch.tensor(metrics))
        for i, (o, r) in enumerate(refs):
            o.step()
            r.step(metrics[i])
        assert opt.hparams["lr"].tolist() == [o.param_groups[0]["lr"] for o, _ in refs]
    with pytest.raises(ValueError, match=r"^mb\.optim\.lr_scheduler\.PerMember\.step: metrics has 3 values"):
        sched.step([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda o: S.StepLR(o, step_size=[1, 2, 3]),
            r"StepLR: step_size has 3 values but the pack has 4 members",
        ),
        (
            lambda o: S.StepLR(o, 2, gamma=[0.1, 0.2, 0.3]),
            r"StepLR: gamma has 3 values but the pack has 4 members",
        ),
        (
            lambda o: S.MultiStepLR(o, [[1], [2], [3]]),
            r"MultiStepLR: milestones has 3 values but the pack has 4",
        ),
        (
            lambda o: S.LambdaLR(o, LAMBDAS[:3]),
            r"LambdaLR: lr_lambda has 3 values but the pack has 4 members",
        ),
        (
            lambda o: S.CosineAnnealingLR(o, T_max=[5] * 5),
            r"CosineAnnealingLR: T_max has 5 values but the pack",
        ),
        (
            lambda o: S.LinearLR(o, total_iters=[1, 2]),
            r"LinearLR: total_iters has 2 values but the pack has 4",
        ),
        (
            lambda o: S.ExponentialLR(o, gamma=[0.9] * 2),
            r"ExponentialLR: gamma has 2 values but the pack has 4",
        ),
        (
            lambda o: S.OneCycleLR(o, 1.0, total_steps=[9] * 3),
            r"OneCycleLR: total_steps has 3 values but the",
        ),
        (lambda o: S.WarmupCosine(o, [1, 2], 10), r"WarmupCosine: warmup_steps has 2 values but the pack"),
        (
            lambda o: S.StepLR(o, step_size=0),
            r"StepLR: step_size of member 0 is 0; it must be an integer >= 1",
        ),
        (lambda o: S.StepLR(o, step_size=2.5), r"StepLR: step_size must be an int"),
        (lambda o: S.LinearLR(o, start_factor=2.0), r"LinearLR: building the schedule of member 0 failed"),
    ],
)
def test_argument_errors_name_the_api(build, message):
    opt = _mb_optimizer("sgd", _pack())
    with pytest.raises((ValueError, TypeError), match="^mb\\.optim\\.lr_scheduler\\." + message):
        build(opt)


def test_rejects_a_torch_optimizer_and_bad_factories():
    torch_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"^mb\.optim\.lr_scheduler\.StepLR: expected a modelbatch optimizer"):
        S.StepLR(torch_opt, step_size=2)
    opt = _mb_optimizer("sgd", _pack())
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"^mb\.optim\.lr_scheduler\.PerMember: the factory must return"):
        S.PerMember(opt, lambda i, o: T.StepLR(other, 2))


# The loop runs each member's own Linear: bitwise the models alone. vmap's batched matmuls round
# differently; Adam at lr up to 2.0 grows that to ~1e-12 in 20 steps (ARCHITECTURE.md section 3: MLPs
# <= 1e-10). "auto" picks vmap here on CPU (a pure function of the pack, see modelbatch._backends).
TOLERANCE = {"loop": 0.0, "vmap": 1e-10}


@pytest.mark.parametrize("backend", sorted(TOLERANCE))
@pytest.mark.parametrize(
    ("kind", "case_id"),
    [("sgd", "WarmupCosine"), ("sgd", "OneCycleLR"), ("adam", "OneCycleLR"), ("sgd", "StepLR")],
)
def test_training_with_schedule_equals_models_trained_alone(kind, case_id, backend):
    _, build, factory = BY_ID[case_id]
    torch.manual_seed(1)
    models = [torch.nn.Linear(3, 2).double() for _ in range(N)]
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    batch = mb.ModelBatch(models, backend=backend)
    opt = _mb_optimizer(kind, batch)
    sched = build(opt)
    for _ in range(20):
        opt.zero_grad()
        losses = batch.compute_loss(batch(x), y, F.mse_loss)
        losses.sum().backward()
        opt.step()
        sched.step()
    for i, model in enumerate(models):
        ref = copy.deepcopy(model)
        ref_opt = _torch_optimizer(kind, ref.parameters(), i, LRS[i])
        ref_sched = factory(i, ref_opt)
        for _ in range(20):
            ref_opt.zero_grad()
            F.mse_loss(ref(x), y).backward()
            ref_opt.step()
            ref_sched.step()
        member = batch.member(i)
        for (name, got), want in zip(member.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(
                got, want, rtol=TOLERANCE[backend], atol=0, msg=lambda m, i=i, n=name: f"member {i} {n}: {m}"
            )


def test_auto_trains_a_schedule_like_vmap_bitwise():
    """The default backend is vmap for this pack, whatever the machine's load: bitwise equal results."""
    _, build, _ = BY_ID["OneCycleLR"]
    results = []
    for backend in ("auto", "vmap"):
        torch.manual_seed(1)
        batch = mb.ModelBatch([torch.nn.Linear(3, 2).double() for _ in range(N)], backend=backend)
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        opt = _mb_optimizer("adam", batch)
        sched = build(opt)
        for _ in range(20):
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.mse_loss).sum().backward()
            opt.step()
            sched.step()
        results.append(batch.stacked_parameters())
    assert results[0].keys() == results[1].keys()
    for name, p in results[0].items():
        assert torch.equal(p, results[1][name]), name


def test_member_state_moves_a_schedule_to_another_slot():
    opt = _mb_optimizer("sgd", _pack())
    sched = S.StepLR(opt, step_size=[1, 2, 3, 4], gamma=0.5)
    for _ in range(3):
        sched.step()
    state = sched.member_state_dict(2)
    other = S.StepLR(_mb_optimizer("sgd", _pack()), step_size=1, gamma=0.9)
    other.load_member_state_dict(0, state)
    for _ in range(4):
        sched.step()
        other.step()
        assert other.get_last_lr()[0] == sched.get_last_lr()[2]
