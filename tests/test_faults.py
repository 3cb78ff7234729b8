"""Faults a sweep survives: out of memory in a pack, a slot server or a member process killed.

Out of memory is simulated (no GPU here): the pack's executor raises ``torch.OutOfMemoryError``
when it is asked to run more members at once than ``fits``, in the forward or in the backward.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import sys

import pandas as pd
import pytest
import torch
from ray import cloudpickle
from torch import nn
from tune_recipes import Results, assert_matches_fit, open_sweeps, recipe

import modelbatch as mb
from tune_integration import ModelBatchSearcher
from tune_integration._service import NAMESPACE, server_name

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests folder

CONFIGS = [{"lr": lr, "seed": seed} for seed, lr in enumerate([0.01, 0.02, 0.005, 0.03], start=1)]


# ---------------------------------------------------------------------------------------------- OOM
def _oom(message: str, error: type[Exception]) -> Exception:
    return error(message)


def inject_oom(
    batch: mb.ModelBatch,
    fits: int,
    where: str = "forward",
    error: type[Exception] = torch.OutOfMemoryError,
    message: str = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)",
) -> list[int]:
    """Make ``batch`` run out of memory running over ``fits`` members at once; returns the sizes that failed.

    ``where``: ``"forward"`` (training forward raises before running), ``"backward"`` (the
    training forward runs, updating buffers and drawing dropout masks, then its backward
    raises) or ``"eval"`` (forwards without gradients raise).
    """
    executor = batch._backends.executor
    real = executor.run
    failed: list[int] = []

    def fail(_grad: torch.Tensor) -> None:
        raise _oom(message, error)

    def run(choice, params, buffers, args, dims, kwargs, names=()):
        at_once = {"vmap": batch.n, "chunked": choice.chunk_size, "loop": 1}[choice.name]
        training = torch.is_grad_enabled()
        if at_once <= fits or training != (where != "eval"):
            return real(choice, params, buffers, args, dims, kwargs, names)
        failed.append(at_once)
        if where != "backward":
            raise _oom(message, error)
        out = real(choice, params, buffers, args, dims, kwargs, names)
        out.register_hook(fail)
        return out

    executor.run = run  # this pack only
    return failed


def bn_dropout_recipe(**kw) -> mb.Recipe:
    """The Tune tests' recipe with BatchNorm (buffers the forward updates) and dropout (random draws)
    in its model: what a retry must undo."""

    def model(cfg: dict) -> nn.Module:
        return nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)
        )

    return recipe(**{"model": model, "metrics": {}, "steps_per_report": 3, "backend": "vmap", **kw})


def pack(rec: mb.Recipe, configs=CONFIGS) -> mb.PackTrainer:
    trainer = mb.PackTrainer(rec, len(configs), example_config=configs[0])
    for i, config in enumerate(configs):
        trainer.add(i, config)
    return trainer


def train(trainer: mb.PackTrainer, reports: int) -> pd.DataFrame:
    rows = [{"member": m, **r} for _ in range(reports) for m, r in trainer.train_report().items()]
    return pd.DataFrame(rows).sort_values(["member", "training_iteration"], ignore_index=True)


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ("forward", torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("backward", torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("backward", RuntimeError, "MPS backend out of memory (MPS allocated: 1 GB)"),
    ],
)
def test_out_of_memory_in_a_step_halves_the_chunks_and_retries_it_exactly(where, error, message):
    """No member is lost and no update, BatchNorm statistic or dropout draw of the failed call remains."""
    rec = bn_dropout_recipe()
    trainer = pack(rec)
    failed = inject_oom(trainer.batch, fits=1, where=where, error=error, message=message)
    torch.manual_seed(0)  # dropout draws from the global generator
    warning = r"^mb\.PackTrainer: out of memory running [42] members at once"
    with pytest.warns(RuntimeWarning, match=warning) as warned:
        got = train(trainer, reports=3)
    ours = [w for w in warned if re.match(warning, str(w.message))]  # not other threads' warnings
    assert failed == [4, 2] and len(ours) == 2  # vmap over 4, then chunks of 2, then one at a time
    assert (trainer.batch.backend, trainer.batch.chunk_size) == ("chunked", 1)
    assert sorted(trainer.live()) == [0, 1, 2, 3]
    # the same pack run one member at a time from the start, with no fault: the same numbers
    reference = pack(rec)
    reference.batch.set_backend("chunked", chunk_size=1)
    torch.manual_seed(0)
    expected = train(reference, reports=3)
    assert got["training_iteration"].tolist() == [1, 2, 3] * 4
    for column in ("loss", "val_loss"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()),
            torch.tensor(expected[column].to_numpy()),
            rtol=1e-12,
            atol=0,
        )
    for name, t in reference.batch.stacked_buffers().items():  # BatchNorm statistics updated once per step
        torch.testing.assert_close(trainer.batch.stacked_buffers()[name], t, rtol=1e-12, atol=0)


def test_out_of_memory_in_evaluation_is_retried_with_smaller_chunks():
    rec = recipe(backend="vmap")
    trainer = pack(rec)
    failed = inject_oom(trainer.batch, fits=2, where="eval")
    with pytest.warns(RuntimeWarning, match=r"out of memory running 4 members at once"):
        got = train(trainer, reports=2)
    assert failed == [4] and trainer.batch.chunk_size == 2
    for member, config in enumerate(CONFIGS):
        assert_matches_fit(rec, config, got[got["member"] == member])


@pytest.mark.parametrize(
    ("error", "message"),
    [(torch.OutOfMemoryError, "CUDA out of memory."), (RuntimeError, "HIP error: out of memory")],
)
def test_out_of_memory_one_member_at_a_time_raises_with_the_pack_unchanged(error, message):
    trainer = pack(bn_dropout_recipe())
    before = copy.deepcopy(trainer.batch.state_dict())
    inject_oom(trainer.batch, fits=0, where="backward", error=error, message=message)
    expected = r"^mb\.PackTrainer: out of memory training a pack of 4 members even one member at a time"
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match=expected) as info:
        trainer.train_report()
    assert isinstance(info.value.__cause__, error) and message in str(info.value.__cause__)
    assert "slots_per_gpu" in str(info.value)  # says how to fix it
    for name, t in trainer.batch.state_dict().items():  # no update, no BatchNorm statistic changed
        assert torch.equal(t, before[name]), name
    assert sorted(trainer.live()) == [0, 1, 2, 3]
    assert all(s.iteration == 0 for s in trainer.slots)


def test_an_error_that_is_not_out_of_memory_is_not_retried():
    trainer = pack(recipe(backend="vmap"))
    inject_oom(trainer.batch, fits=0, error=RuntimeError, message="mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied$"):
        trainer.train_report()
    assert trainer.batch.backend == "vmap"


def test_a_server_running_out_of_memory_keeps_every_member_exactly():
    """On a slot server (a pack factory injects the fault): its members finish as if trained alone."""
    ray = pytest.importorskip("ray")
    from tune_integration._server import SlotServer

    rec = recipe(backend="vmap")

    def factory(n_slots, config):
        trainer = mb.PackTrainer(rec, n_slots, config)
        inject_oom(trainer.batch, fits=1)
        return trainer

    with local_ray():
        server = ray.remote(SlotServer).remote(0)
        options = {"checkpoint_every": None, "reports": 2}
        ray.get(server.add_sweep.remote("s", "tenant", cloudpickle.dumps(factory), 3, options))
        ray.get([server.join.remote("s", str(m), c, None) for m, c in enumerate(CONFIGS[:3])])
        results = {m: [] for m in range(3)}
        for _ in range(2):  # one report: every member asks for its result
            replies = ray.get([server.next_result.remote("s", str(m)) for m in range(3)], timeout=120)
            for m, reply in enumerate(replies):
                results[m].append(reply["result"])
        assert ray.get(server.stats.remote("s"))["live"] == 3
        ray.kill(server)
    for m, config in enumerate(CONFIGS[:3]):
        assert_matches_fit(rec, config, pd.DataFrame(results[m]))


# ---------------------------------------------------------------------------------------------- Tune
class local_ray:
    """A local Ray with 2 CPUs for one test, shut down after it."""

    def __enter__(self):
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        return ray

    def __exit__(self, *exc):
        import ray

        ray.shutdown()


def sweep(searcher, tmp_path, config, num_samples, callbacks, **kw):
    from ray import tune

    return tune.run(
        searcher.trainable(),
        config=config,
        num_samples=num_samples,
        search_alg=searcher,
        metric="val_loss",
        mode="min",
        storage_path=str(tmp_path),
        verbose=0,
        reuse_actors=True,
        callbacks=callbacks,
        **kw,
    )


def assert_every_iteration_once(analysis, results, rec, reports):
    """Each member reported iterations 1..reports exactly once, equal to its config trained alone.

    From the results Tune processed (``results``: a :class:`Results` callback): a retried trial's
    ``progress.csv`` may be replaced by an older copy (it once held iterations 4 and 5 only)."""
    for trial in analysis.trials:
        frame = pd.DataFrame(results.rows[trial.trial_id])
        assert trial.status == "TERMINATED"
        assert frame["training_iteration"].tolist() == list(range(1, reports + 1)), trial
        assert_matches_fit(rec, trial.config, frame)


def grid(n):
    from ray import tune

    return {"lr": tune.grid_search([0.01 * (i + 1) for i in range(n)]), "seed": 7}


@pytest.mark.slow
def test_a_killed_slot_server_restarts_and_its_members_continue_from_their_checkpoints(tmp_path):
    """The server dies mid-sweep; Ray restarts it; each relay joins again with its last checkpoint."""
    from ray import tune

    class KillServer(tune.Callback):
        def __init__(self, after):
            self.after, self.seen = after, 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            import ray

            self.seen += 1
            if self.seen == self.after:
                ray.kill(ray.get_actor(server_name(0), namespace=NAMESPACE), no_restart=False)

    rec = recipe()
    # checkpoints every 2 reports: members re-train up to one report, which their relays skip
    searcher = ModelBatchSearcher(rec, slots_per_gpu=3, reports=5, checkpoint_every=2)
    with local_ray():
        kill, results = KillServer(after=5), Results()
        analysis = sweep(searcher, tmp_path, grid(4), 1, [kill, results])
        assert open_sweeps() == {}  # the sweep left the service at the end
    assert kill.seen >= 4 * 5 and len(analysis.trials) == 4
    (stats,) = searcher.server_stats()
    assert stats["restarted"]  # the sweep went on on a restarted server
    assert_every_iteration_once(analysis, results, rec, reports=5)


@pytest.mark.slow
def test_a_killed_member_process_is_retried_from_its_checkpoint_once_per_iteration(tmp_path):
    """SIGKILL of a relay: its pack goes on; Tune retries it (max_failures=1) with no gap or repeat."""
    from ray import tune

    class KillRelay(tune.Callback):
        killed: str | None = None

        def on_trial_result(self, iteration, trials, trial, result, **info):
            import ray

            if self.killed is None and result["training_iteration"] == 3:
                _, pid = ray.get(trial.temporary_state.ray_actor.get_current_ip_pid.remote())
                os.kill(pid, signal.SIGKILL)
                self.killed = trial.trial_id

    rec = recipe()
    # its last checkpoint is from report 2: the retry re-trains report 3, which Tune already has
    searcher = ModelBatchSearcher(rec, slots_per_gpu=3, reports=5, checkpoint_every=2, park_after_s=3)
    with local_ray():
        kill, results = KillRelay(), Results()
        analysis = sweep(searcher, tmp_path, grid(3), 1, [kill, results], max_failures=1)
        assert open_sweeps() == {}
    (killed,) = [t for t in analysis.trials if t.trial_id == kill.killed]
    assert killed.num_failures == 1
    assert all(t.num_failures == 0 for t in analysis.trials if t is not killed)
    assert_every_iteration_once(analysis, results, rec, reports=5)
