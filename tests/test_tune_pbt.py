"""Population-based training (PBT, PB2) with ``search_alg=ModelBatchSearcher(...)`` on a local Ray (2 CPUs).

The reference is Tune's own account of the sweep: a recording PBT notes, in the order Tune
processed them, each result it saw, each checkpoint it kept (a member in the upper quantile)
and each exploit (recipient, donor, new config). Every member's history is then replayed by the
engine alone, one member per trainer: an exploited member goes on from the donor's state at
that checkpoint with the new lr set as torch sets a changed ``param_group["lr"]``. Its results
and its final weights must equal the replay's (float64), with the iteration numbers plain
Tune gives (a function trainable restored from the donor's checkpoint counts on from there).
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.tune.schedulers import PopulationBasedTraining  # noqa: E402
from ray.tune.schedulers.pb2 import PB2  # noqa: E402
from tune_recipes import Results, open_sweeps, plain_member, recipe  # noqa: E402

import modelbatch as mb  # noqa: E402
from tune_integration import ModelBatchSearcher  # noqa: E402
from tune_integration._packs import Packs, load_member_state  # noqa: E402
from tune_integration._relay import read_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
MEMBERS, ITERATIONS, INTERVAL = 8, 6, 2
LRS = [0.001 * 2**k for k in range(MEMBERS)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Recorded:
    """A PBT scheduler class that notes what Tune did, in order: ``events`` of the instance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple] = []
        self.seen: dict[str, int] = {}  # trial -> results the scheduler saw
        self.initial: dict[str, dict] = {}  # trial -> its config before any exploit

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self.initial[trial.trial_id] = copy.deepcopy(trial.config)

    def on_trial_result(self, tune_controller, trial, result):
        self.seen[trial.trial_id] = self.seen.get(trial.trial_id, 0) + 1
        return super().on_trial_result(tune_controller, trial, result)

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        if trial in upper_quantile:  # PBT keeps the checkpoint of this result (saved before the next)
            self.events.append(("checkpoint", trial.trial_id, self.seen[trial.trial_id] - 1))
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        before = copy.deepcopy(trial.config)
        super()._exploit(tune_controller, trial, trial_to_clone)
        exploit = (trial.trial_id, trial_to_clone.trial_id, self.seen[trial.trial_id] - 1)
        self.events.append(("exploit", *exploit, copy.deepcopy(trial.config), before))


class RecordedPBT(Recorded, PopulationBasedTraining):
    pass


class RecordedPB2(Recorded, PB2):
    pass


def pbt(cls=RecordedPBT, **kw):
    if cls is RecordedPB2:
        kw.setdefault("hyperparam_bounds", {"lr": [1e-3, 0.2]})
    else:
        kw.setdefault("hyperparam_mutations", {"lr": tune.loguniform(1e-3, 0.2)})
    return cls(time_attr="training_iteration", perturbation_interval=INTERVAL, quantile_fraction=0.25, **kw)


def run(trainable, scheduler, tmp_path, search_alg=None, members=MEMBERS):
    """The sweep: ``members`` lrs of ``LRS`` (one trial each), ``ITERATIONS`` reports each.

    Fewer members take every other lr of ``LRS`` (x4 apart): PBT ranks a member at its perturbation
    against the others' latest scores, some a report older, and the slowest learner must be the
    worst of them all the same (lrs x2 apart once left four members without an exploit)."""
    results = Results()
    analysis = tune.run(
        trainable,
        name="pbt",
        config={"lr": tune.grid_search(LRS[:: len(LRS) // members][:members]), "seed": 0},
        search_alg=search_alg,
        scheduler=scheduler,
        metric="val_loss",
        mode="min",
        stop={"training_iteration": ITERATIONS},
        reuse_actors=True,
        storage_path=str(tmp_path),
        verbose=0,
        callbacks=[results],
    )
    return analysis, results.rows


def replay(rec: mb.Recipe, rows: dict[str, list[dict]], scheduler) -> dict[str, list[dict]]:
    """Each trial's results and states as the engine alone gives them, following Tune's PBT decisions.

    Returns ``{trial: [{"result": metrics, "state": member state after that result}, ...]}``.
    """
    rows = {tid: len(results) for tid, results in rows.items()}
    checkpoints: dict[str, int] = {}
    # trial -> [(its first row, (donor, donor's row) or None, config)]
    starts = {tid: [(0, None, scheduler.initial[tid])] for tid in rows}
    for event in scheduler.events:
        if event[0] == "checkpoint":
            checkpoints[event[1]] = event[2]
        else:
            _, tid, donor, row, config, _ = event
            starts[tid].append((row + 1, (donor, checkpoints[donor]), config))
    done: dict[str, list[dict]] = {}

    def states(tid: str, upto: int) -> list[dict]:
        out = done.setdefault(tid, [])
        for (first, donor, config), nxt in zip(starts[tid], [*starts[tid][1:], (rows[tid],)]):
            if first > upto or len(out) > first:
                continue
            trainer = mb.PackTrainer(rec, 1, example_config=config)
            if donor is None:
                trainer.add(tid, config)
            else:  # the donor's state at its checkpoint, then the new lr as torch's param_group["lr"]
                state = states(donor[0], donor[1])[donor[1]]["state"]
                trainer.restore_member({**state, "slot_state": replace(state["slot_state"], member_id=tid)})
                trainer.optimizer.set_hparam("lr", config["lr"], member=0)
                trainer.slots[0].config = dict(config)
            for _ in range(first, nxt[0]):
                result = trainer.train_report()[tid]
                out.append({"result": result, "state": trainer.member_state_dict(tid)})
        return out

    for tid in rows:
        states(tid, rows[tid])
    return done


def assert_replayed(rec, analysis, rows, scheduler, final_state) -> None:
    """Each trial's results, iteration numbers and final weights equal the replay's."""
    replayed = replay(rec, rows, scheduler)
    for trial in analysis.trials:
        got = pd.DataFrame(rows[trial.trial_id])
        ref = replayed[trial.trial_id]
        assert got["training_iteration"].tolist() == [r["result"]["training_iteration"] for r in ref]
        for column in ("loss", "val_loss"):
            torch.testing.assert_close(
                torch.tensor(got[column].to_numpy()),
                torch.tensor([r["result"][column] for r in ref], dtype=torch.float64),
                rtol=1e-10,
                atol=0,
            )
        assert got["training_iteration"].iloc[-1] == ITERATIONS
        want = ref[-1]["state"]["model"]
        for name, value in final_state(trial).items():
            torch.testing.assert_close(value, want[name], rtol=1e-10, atol=1e-12)


def exploits(events):
    return [e for e in events if e[0] == "exploit"]


def assert_pbt_exploited(analysis, scheduler, members=MEMBERS, mutated=True) -> None:
    """Every member finished, and some exploit changed a member's lr (``mutated``: to a new value)."""
    assert len(analysis.trials) == members and all(t.status == "TERMINATED" for t in analysis.trials)
    done = exploits(scheduler.events)
    assert done, "PBT exploited no member: the test checked nothing"
    assert any(e[4]["lr"] != e[5]["lr"] for e in done)
    if mutated:  # PB2 copies the donor's lr while its model has no data of the donor
        assert any(e[4]["lr"] not in LRS for e in done)


@pytest.mark.usefixtures("local_ray")
def test_pbt_with_the_searcher_exploits_with_the_new_config_exactly(tmp_path):
    """The pack waits up to 10 s for a member whose relay is away (an exploit restarts its trial),
    so the 8 members report in step and PBT ranks them on near-current scores. Parked after 1 s,
    members of a loaded run raced ahead while Tune was busy: the best ended before the worst
    reached its perturbation, which then found no donor with a checkpoint (no exploit, 1 of 5
    runs); synchronous PBT instead once ended an exploited member's trial after 3 of 6 iterations
    (not understood yet)."""
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=MEMBERS, park_after_s=10.0)
    scheduler = pbt()
    analysis, rows = run(searcher.trainable(), scheduler, tmp_path, search_alg=searcher)
    assert_pbt_exploited(analysis, scheduler)

    def final_state(trial):
        return load_member_state(read_checkpoint(trial.checkpoint))["model"]

    assert_replayed(rec, analysis, rows, scheduler, final_state)
    (stats,) = searcher.server_stats()
    assert stats["device_restores"] >= 1  # an exploit within the pack: the donor's state copied on the device
    assert open_sweeps() == {}


@pytest.mark.usefixtures("local_ray")
def test_the_replay_is_what_plain_tune_pbt_gives(tmp_path):
    """The reference itself: plain Tune PBT over a plain function trainable follows the same replay."""
    scheduler = pbt()
    analysis, rows = run(plain_member, scheduler, tmp_path, members=4)
    assert_pbt_exploited(analysis, scheduler, members=4)

    def final_state(trial):
        with trial.checkpoint.as_directory() as directory:
            return torch.load(os.path.join(directory, "member.pt"), weights_only=False)["model"]

    assert_replayed(recipe(), analysis, rows, scheduler, final_state)


@pytest.mark.usefixtures("local_ray")
def test_pb2_with_the_searcher_exploits_with_the_new_config_exactly(tmp_path):
    """As the PBT test: the pack waits up to 10 s for a member whose relay is away. Parked after 1 s,
    a loaded run (two xdist workers) once had no exploit: the members raced ahead of Tune."""
    rec = recipe()
    searcher = ModelBatchSearcher(rec, slots_per_gpu=4, park_after_s=10.0)
    scheduler = pbt(RecordedPB2)
    analysis, rows = run(searcher.trainable(), scheduler, tmp_path, search_alg=searcher, members=4)
    assert_pbt_exploited(analysis, scheduler, members=4, mutated=False)

    def final_state(trial):
        return load_member_state(read_checkpoint(trial.checkpoint))["model"]

    assert_replayed(rec, analysis, rows, scheduler, final_state)


def packs(**kw) -> Packs:
    return Packs(recipe(), 4, checkpoint_every=1, **kw)


def test_an_exploit_from_a_snapshot_on_the_device_equals_one_from_the_checkpoint_bytes():
    """Population-based training within one server: the donor's checkpointed state is copied on the device."""
    donor, recipient = {"lr": 0.01, "seed": 1}, {"lr": 0.002, "seed": 2}
    results = {}
    for snapshot_every in (None, 2):
        p = packs(snapshot_every=snapshot_every)
        pid = p.join("d", donor, None)
        p.join("r", recipient, None)
        blob = [p.train(pid, {})["d"]["checkpoint"] for _ in range(2)][-1]
        p.train(pid, {})  # the donor trains on: the exploit takes its checkpoint of report 2
        p.join("r", {**donor, "lr": 0.03}, blob)  # PBT's new config for the recipient
        assert p.device_restores == (snapshot_every is not None)
        results[snapshot_every] = [p.train(pid, {})["r"]["result"] for _ in range(2)]
    assert [r["training_iteration"] for r in results[2]] == [3, 4]
    assert results[2] == results[None]


def test_a_new_config_of_another_architecture_cannot_continue_a_state():
    p = packs()
    pid = p.join("d", {"lr": 0.01}, None)
    blob = p.train(pid, {})["d"]["checkpoint"]
    with pytest.raises(
        ValueError, match=r"^ModelBatchSearcher: member r continues from the state of member d"
    ):
        p.join("r", {"lr": 0.01, "hidden": 5}, blob)
