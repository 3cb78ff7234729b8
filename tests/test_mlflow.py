"""MLflow logging without Ray: MLflowLogger on a real sqlite store, limits, spill/replay, mb.fit(mlflow=)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from recipes import small_recipe
from torch import nn

import modelbatch as mb
from modelbatch._mlflow import MLflowLogger, clean_key, flatten, replay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(uri: str, experiment: str) -> tuple:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)  # artifacts of the default root land in tmp_path/mlruns
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_keys_and_params_follow_mlflow_rules() -> None:
    assert clean_key("a b/c-d.e_f") == "a b/c-d.e_f"
    assert clean_key("loss(val)@1") == "loss_val__1"
    assert clean_key("/x/../y/") == "_/x/_/y/_"
    assert flatten({"a": {"b": {"c": 1}, "d": {}}, "e": [1, 2]}) == {"a/b/c": 1, "a/d": {}, "e": [1, 2]}


def test_logger_respects_per_call_limits_and_truncates(sqlite_uri) -> None:
    """150 params, 120 tags, 2500 points in one flush: several log_batch calls, nothing lost."""
    config = {f"p{i:03d}": i for i in range(150)} | {"long": "x" * 7000, "nested": {"k": [1, 2]}}
    logger = MLflowLogger(sqlite_uri, "limits", flush_interval=30.0)  # one flush, at close
    logger.start()
    logger.start_member("m", config, tags={f"t{i}": i for i in range(120)})
    for step in range(1, 501):
        logger.log_member("m", {f"k{j}": step * 10 + j for j in range(5)} | {"skip": "text"}, step=step)
    assert logger.close() is None
    client, parents, children = _runs(sqlite_uri, "limits")
    run = children[0]
    assert len(parents) == 1 and len(children) == 1
    assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert len(run.data.params) == 152
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    assert run.data.params["nested/k"] == "[1, 2]" and run.data.params["p149"] == "149"
    assert all(run.data.tags[f"t{i}"] == str(i) for i in range(120))
    assert "skip" not in run.data.metrics
    for j in range(5):
        assert _history(client, run.info.run_id, f"k{j}") == [(s, s * 10.0 + j) for s in range(1, 501)]


def test_report_keys_are_tags_only_if_the_logger_is_told(sqlite_uri) -> None:
    """A report's ``server`` is a tag only with tag_keys=["server"], else a metric, as ``slot`` stays."""
    for told in (False, True):
        logger = MLflowLogger(sqlite_uri, f"tags-{told}", tag_keys=["server"] if told else ())
        logger.start()
        logger.log_member("m", {"loss": 0.5, "slot": 3, "server": 1}, step=1)
        assert logger.close() is None
        _, _, (run,) = _runs(sqlite_uri, f"tags-{told}")
        assert run.data.metrics["slot"] == 3 and "slot" not in run.data.tags
        assert ("server" in run.data.tags, "server" in run.data.metrics) == (told, not told)
    with pytest.raises(TypeError, match="MLflowLogger: tag_keys must be a list"):
        MLflowLogger(sqlite_uri, "bad", tag_keys="server")


class _CallerThreads:
    """Wraps an MlflowClient; records the thread of every method call."""

    def __init__(self, client: MlflowClient) -> None:
        self._client, self.threads = client, []

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.threads.append((threading.current_thread().name, name))
            return attr(*args, **kwargs)

        return call


def test_reports_are_only_queued_on_the_callers_thread(sqlite_uri) -> None:
    """start_member and log_member never call MLflow themselves: the writer thread does (the driver's
    cost per report is measured by benchmarks/mlflow_logging.py, not asserted here)."""
    logger = MLflowLogger(sqlite_uri, "cost", flush_interval=0.05)
    logger.start()
    recorder = logger._writer.client = _CallerThreads(logger._writer.client)
    for m in range(16):
        logger.start_member(m, {"lr": 0.1 * m})
    report = {"loss": 0.5, "val_loss": 0.6, "val_acc": 0.9, "time_total_s": 3.0, "slot": 3, "step": 7}
    for it in range(1, 126):
        for m in range(16):
            logger.log_member(m, report, step=it)
    caller = threading.current_thread().name
    assert [call for thread, call in recorder.threads if thread == caller] == []
    assert logger.close() is None
    assert any(call == "log_batch" for _, call in recorder.threads)  # the writer did write
    client, _, children = _runs(sqlite_uri, "cost")
    assert len(children) == 16
    assert all(len(client.get_metric_history(r.info.run_id, "val_acc")) == 125 for r in children)


def test_unreachable_server_spills_and_replay_restores_everything(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{_free_port()}"
    logger = MLflowLogger(
        dead, "spilled", metric="loss", close_timeout=2.0, spill_path=tmp_path / "spill.jsonl"
    )
    logger.start()
    for m in range(3):
        logger.start_member(m, {"lr": 10.0**-m, "net": {"width": 8 * (m + 1)}}, tags={"slot": m})
        for it in range(1, 6):
            logger.log_member(m, {"loss": 1.0 / (it + m), "nan": math.nan}, step=it)
        logger.end_member(m, ["finished", "stopped early", "errored"][m], reason=f"r{m}")
    # 30 reports, best_loss and best_iteration of each member, members and best_loss of the parent
    with pytest.warns(
        RuntimeWarning, match=r"MLflowLogger: 38 metric points of 4 runs .*spill\.jsonl.*replay"
    ):
        spill = logger.close()
    assert spill == tmp_path / "spill.jsonl"
    assert json.loads(spill.read_text().splitlines()[0])["tracking_uri"] == dead

    uri = f"sqlite:///{tmp_path}/replayed.db"
    replay(spill, uri)
    replay(spill, uri)  # replaying twice neither duplicates runs nor points
    client, parents, children = _runs(uri, "spilled")
    assert len(parents) == 1 and len(children) == 3
    by_slot = {r.data.tags["slot"]: r for r in children}
    for m in range(3):
        run = by_slot[str(m)]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params == {"lr": str(10.0**-m), "net/width": str(8 * (m + 1))}
        assert _history(client, run.info.run_id, "loss") == [(it, 1.0 / (it + m)) for it in range(1, 6)]
        assert len(client.get_metric_history(run.info.run_id, "nan")) == 5
        assert run.data.tags["status"] == ["finished", "stopped early", "errored"][m]
        assert run.info.status == ["FINISHED", "FINISHED", "FAILED"][m]
        assert run.data.metrics["best_loss"] == 1.0 / (5 + m)
    assert parents[0].data.tags["best_member"] == "2" and parents[0].info.status == "FINISHED"


def test_replay_command_line(tmp_path, monkeypatch) -> None:
    """``python -m modelbatch.mlflow replay`` (the command the warning names) and its older alias
    ``python -m tune_integration.mlflow replay`` each log the spill file."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = MLflowLogger(
        f"http://127.0.0.1:{_free_port()}", "cli", close_timeout=0.5, spill_path=tmp_path / "s.jsonl"
    )
    logger.start()
    logger.log_member("a", {"x": 1.0}, step=1)
    with pytest.warns(RuntimeWarning, match="python -m modelbatch.mlflow replay"):
        logger.close()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for module, store in (("modelbatch.mlflow", "c"), ("tune_integration.mlflow", "d")):
        uri = f"sqlite:///{tmp_path}/{store}.db"
        done = subprocess.run(
            [sys.executable, "-m", module, "replay", str(tmp_path / "s.jsonl"), "--tracking-uri", uri],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "replayed 2 runs" in done.stdout
        _, parents, children = _runs(uri, "cli")
        assert len(parents) == len(children) == 1
        assert _history(MlflowClient(uri), children[0].info.run_id, "x") == [(1, 1.0)]


# ---------------------------------------------------------------------------- mb.fit(mlflow=...)
torch.manual_seed(0)
X, Y = torch.randn(80, 6), torch.randint(0, 3, (80,))


class Net(nn.Module):
    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        if poison:  # a member whose loss is NaN: errored, the others go on
            with torch.no_grad():
                self.body[0].weight.fill_(math.nan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _recipe() -> mb.Recipe:
    return small_recipe(
        lambda cfg: Net(cfg.get("poison", False)),
        (X, Y),
        val_data=(X, Y),
        steps_per_report=3,
        metrics={"acc": mb.metrics.accuracy},
        dtype=torch.float32,  # Recipe's default: the run a user logs (the tests' default is float64)
    )


def test_fit_logs_members_as_child_runs(sqlite_uri, tmp_path) -> None:
    configs = [{"lr": 1e-3 * (i + 1), "opt": {"beta1": 0.9}} for i in range(4)] + [
        {"lr": 1e-3, "poison": True}
    ]

    class StopMember2(mb.callbacks.EarlyStopping):  # val_loss falls, so "max" stops member 2 at report 2
        def on_report(self, reports, control):
            super().on_report({k: v for k, v in reports.items() if k == 2}, control)

    history = mb.fit(
        _recipe(),
        configs,
        reports=4,
        progress=False,
        callbacks=[StopMember2("val_loss", mode="max", patience=1)],
        mlflow={
            "tracking_uri": sqlite_uri,
            "experiment_name": "fit",
            "log_artifacts": True,
            "artifact_location": str(tmp_path / "artifacts"),
        },
    )
    client, parents, children = _runs(sqlite_uri, "fit")
    assert len(parents) == 1 and len(children) == 5
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["members"] == 5
    runs = {r.info.run_name: r for r in children}
    assert set(runs) == {f"member-{i}" for i in range(5)}
    for member, rows in history.groupby("member"):
        run = runs[f"member-{member}"]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["lr"] == str(configs[member]["lr"]) and run.data.params["seed"] == str(member)
        assert "step" not in run.data.metrics  # the x axis of every chart, not a metric
        for key in ("loss", "val_loss", "val_acc"):
            expected = [(int(i), float(v)) for i, v in zip(rows["training_iteration"], rows[key])]
            got = _history(client, run.info.run_id, key)
            assert [s for s, _ in got] == [s for s, _ in expected]
            assert all(a == b or (math.isnan(a) and math.isnan(b)) for (_, a), (_, b) in zip(got, expected))
        assert run.data.tags["pack"] == "pack-0" and run.data.tags["signature"] == rows["pack"].iloc[0]
        assert run.data.tags["slot"] == str(member) and run.data.tags["node"] == socket.gethostname()
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
        assert artifacts == ["model/state_dict.pt"]
    assert runs["member-0"].data.params["opt/beta1"] == "0.9"
    assert [runs[f"member-{i}"].data.tags["status"] for i in range(5)] == [
        "finished",
        "finished",
        "stopped early",
        "finished",
        "errored",
    ]
    assert (
        runs["member-4"].info.status == "FAILED"
        and "non-finite" in runs["member-4"].data.tags["status_reason"]
    )
    best = history[history.member == 0]["val_loss"].min()
    assert runs["member-0"].data.metrics["best_val_loss"] == best
    path = client.download_artifacts(runs["member-1"].info.run_id, "model/state_dict.pt", str(tmp_path))
    assert set(torch.load(path)) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}


def test_fit_interrupted_flushes_and_marks_runs_killed(sqlite_uri) -> None:
    class CtrlC(mb.callbacks.Callback):
        def on_report(self, reports, control):
            if (
                next(iter(reports.values()))["training_iteration"] == 3
            ):  # mb.fit's MLflow callback comes after
                raise KeyboardInterrupt

    logger = MLflowLogger(sqlite_uri, "interrupted", flush_interval=60.0)
    with pytest.raises(KeyboardInterrupt):
        mb.fit(
            _recipe(),
            [{"lr": 1e-3}, {"lr": 1e-2}],
            reports=5,
            progress=False,
            callbacks=[CtrlC()],
            mlflow=logger,
        )
    client, parents, children = _runs(sqlite_uri, "interrupted")
    assert parents[0].info.status == "KILLED" and len(children) == 2
    for run in children:
        assert run.info.status == "KILLED" and run.data.tags["status"] == "interrupted"
        assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [1, 2]


def test_fit_rejects_bad_mlflow_argument() -> None:
    with pytest.raises(TypeError, match=r"mb\.fit: mlflow must be True, a dict"):
        mb.fit(_recipe(), [{"lr": 1e-3}], reports=1, progress=False, mlflow="sqlite:///x.db")


def test_fit_mlflow_true_follows_mlflow_defaults(tmp_path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    mb.fit(_recipe(), [{"lr": 1e-3}], reports=2, progress=False, mlflow=True)
    client, parents, children = _runs(uri, "from-env")
    assert len(parents) == len(children) == 1
    assert [s for s, _ in _history(client, children[0].info.run_id, "val_loss")] == [1, 2]


class _Trial:
    """What MLflowCallback reads of a Tune trial."""

    def __init__(self, tid: str, stop: dict | None = None) -> None:
        self.trial_id, self.config, self.stopping_criterion = tid, {"tid": tid}, stop or {}
        self.last_result: dict = {}
        self.checkpoint, self.status = None, "RUNNING"

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


def test_tune_callback_statuses_without_a_cluster(sqlite_uri) -> None:
    """finished (returned / stop criterion / most iterations), stopped early, errored (NaN), interrupted."""
    from tune_integration.mlflow import MLflowCallback

    cb = MLflowCallback(sqlite_uri, "statuses", metric="loss")
    cb.setup(num_samples=7)
    trials = {
        t: _Trial(t, {"training_iteration": 4} if t == "crit" else None)
        for t in ("returned", "crit", "asha", "asha-remade", "most", "nan", "running")
    }
    plan = {
        "returned": (3, False),
        "crit": (4, True),
        "asha": (2, True),
        "asha-remade": (2, True),  # stopped, then a restore made its last result again (done=False)
        "most": (9, True),
        "nan": (2, False),
        "running": (1, False),
    }
    for tid, (iterations, done_at_end) in plan.items():
        trial = trials[tid]
        cb.on_trial_start(0, [], trial)
        for it in range(1, iterations + 1):
            loss = math.nan if tid == "nan" and it == iterations else 1.0 / it
            trial.last_result = {
                "loss": loss,
                "training_iteration": it,
                "done": done_at_end and it == iterations,
                "slot": 1,
                "server": 0,
                "server_node": "abc",
            }
            cb.on_trial_result(0, [], trial, dict(trial.last_result))
        if tid == "asha-remade":  # Ctrl-C before Tune ended it; resumed, it ends without a new result
            cb.on_trial_result(0, [], trial, {**trial.last_result, "done": False})
        if tid != "running":
            cb.on_trial_complete(0, [], trial)
    cb.on_experiment_end(list(trials.values()))
    _, parents, children = _runs(sqlite_uri, "statuses")
    got = {r.data.tags["trial_id"]: (r.data.tags["status"], r.info.status) for r in children}
    assert got == {
        "returned": ("finished", "FINISHED"),
        "crit": ("finished", "FINISHED"),
        "asha": ("stopped early", "FINISHED"),
        "asha-remade": ("stopped early", "FINISHED"),
        "most": ("finished", "FINISHED"),
        "nan": ("errored", "FAILED"),
        "running": ("interrupted", "KILLED"),
    }
    assert parents[0].info.status == "KILLED"
    tags = children[0].data.tags
    assert (tags["slot"], tags["server"], tags["node"]) == ("1", "0", "abc")


def test_tune_callback_status_reasons_are_mb_fit_s_words(sqlite_uri) -> None:
    """Diverged members, one a mb.callbacks callback stopped on its server, ones Tune stopped: one wording."""
    from tune_integration.mlflow import MLflowCallback

    cb = MLflowCallback(sqlite_uri, "reasons", metric="loss")
    cb.setup(num_samples=6)
    last = {
        "nan": ({"loss": math.nan}, False),  # any trainable's NaN result
        "mb-nan": ({"loss": math.nan, "error": "non-finite loss (nan) at report 2"}, False),  # a server's
        "early": ({"loss": 0.5, "stopped": "early stopped: val_loss did not improve for 3 reports"}, True),
        "early-last": ({"loss": 0.5, "stopped": "user said so"}, True),  # at the most reports: still stopped
        "asha": ({"loss": 0.5}, True),
        "long": ({"loss": 0.5}, True),
    }
    trials = {tid: _Trial(tid) for tid in last}
    for tid, (result, done) in last.items():
        cb.on_trial_start(0, [], trials[tid])
        iterations = 3 if tid in ("long", "early-last") else 2
        for it in range(1, iterations + 1):
            trials[tid].last_result = {"loss": 1.0, "training_iteration": it, "done": False}
            if it == iterations:
                trials[tid].last_result.update(result, done=done)
            cb.on_trial_result(0, [], trials[tid], dict(trials[tid].last_result))
        cb.on_trial_complete(0, [], trials[tid])
    cb.on_experiment_end(list(trials.values()))
    _, _, children = _runs(sqlite_uri, "reasons")
    got = {r.data.tags["trial_id"]: (r.data.tags["status"], r.data.tags["status_reason"]) for r in children}
    assert got == {
        "nan": ("errored", "non-finite loss (nan) at report 2"),
        "mb-nan": ("errored", "non-finite loss (nan) at report 2"),
        "early": ("stopped early", "early stopped: val_loss did not improve for 3 reports"),
        "early-last": ("stopped early", "user said so"),
        "asha": ("stopped early", "stopped by the scheduler at report 2"),
        "long": ("finished", "reached 3 reports, the most"),
    }


def test_a_resumed_sweep_continues_its_parent_and_member_runs(sqlite_uri) -> None:
    """Interrupted, then continued with the first logger's sweep_key: one parent, one child per member."""
    first = MLflowLogger(sqlite_uri, "resumed", metric="loss", params={"searcher": "random"})
    first.start()
    for m in ("a", "b"):
        first.start_member(m, {"lr": 0.1}, name=f"m-{m}")
        first.log_member(m, {"loss": 0.5}, step=1)
    first.log_member("a", {"loss": 0.2}, step=2)
    first.end_member("b", "stopped early")
    first.close(status="interrupted")
    client, parents, children = _runs(sqlite_uri, "resumed")
    assert [p.info.status for p in parents] == ["KILLED"] and len(children) == 2

    second = MLflowLogger(
        sqlite_uri, "resumed", metric="loss", params={"searcher": "random"}, sweep_key=first.sweep_key
    )
    second.start()
    second.start_member("a", {"lr": 0.1}, name="m-a", best=first.best("a"))
    second.log_member("a", {"loss": 0.3}, step=3)  # worse than its best of the first session
    second.end_member("a", "finished")
    second.close(summary={"members": 2, "best_member": "a"})
    client, parents, children = _runs(sqlite_uri, "resumed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and parents[0].info.end_time
    assert parents[0].data.params == {"searcher": "random"}
    assert parents[0].data.metrics == {"members": 2, "best_loss": 0.2}
    assert parents[0].data.tags["best_member"] == "a"
    runs = {r.info.run_name: r for r in children}
    assert set(runs) == {"m-a", "m-b"} and runs["m-a"].info.status == "FINISHED"
    assert _history(client, runs["m-a"].info.run_id, "loss") == [(1, 0.5), (2, 0.2), (3, 0.3)]
    assert runs["m-a"].data.metrics["best_loss"] == 0.2 and runs["m-a"].data.metrics["best_iteration"] == 2
    assert runs["m-b"].data.tags["status"] == "stopped early"


def _saved_view(client: MlflowClient, experiment_id: str, view_id: str) -> dict:
    """A saved view as the MLflow UI reads it: the tag's JSON, its state inflated."""
    import base64
    import zlib

    view = json.loads(client.get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{view_id}"])
    assert view["state"].startswith("deflate;")
    view["state"] = json.loads(zlib.decompress(base64.b64decode(view["state"][len("deflate;") :])))
    return view


def test_view_params_save_a_ui_view_of_the_sweep_members(sqlite_uri) -> None:
    """The saved view selects exactly this sweep's members (MLflow's own search runs its filter) and
    plots the given params against best_<metric>; a second sweep in the experiment gets its own."""
    loggers = []
    for sweep in ("first", "second"):
        logger = MLflowLogger(
            sqlite_uri, "views", run_name=sweep, metric="loss", mode="min", view_params=["lr", "w"]
        )
        logger.start()
        for i in range(3):
            logger.start_member(f"{sweep}{i}", {"lr": 0.1 * (i + 1), "w": i, "seed": i})
            logger.log_member(f"{sweep}{i}", {"loss": 1.0 / (i + 1)}, step=1)
        assert logger.close() is None
        loggers.append(logger)
    client = MlflowClient(sqlite_uri)
    experiment_id = client.get_experiment_by_name("views").experiment_id
    for logger in loggers:
        view = _saved_view(client, experiment_id, logger.view_id)
        state = view["state"]
        assert view["name"] == logger.run_name
        found = client.search_runs([experiment_id], filter_string=state["searchFilter"])
        mine = {logger.run_id(f"{logger.run_name}{i}") for i in range(3)}
        assert {r.info.run_id for r in found} == mine
        (plot,) = [c for c in state["compareRunCharts"] if c["type"] == "PARALLEL"]
        assert plot["selectedParams"] == ["lr", "w"] and plot["selectedMetrics"] == ["best_loss"]
        assert plot["showAllRuns"] and state["runsHiddenMode"] == "SHOWALL"
        assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_loss`", True)
        assert {"params.`lr`", "params.`w`", "metrics.`best_loss`"} <= set(state["selectedColumns"])
        url = logger.view_url()
        assert url == (
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey="
            f"{logger.view_id}&compareRunsMode=CHART&workflowType=machine_learning"
        )
    assert loggers[0].view_id != loggers[1].view_id
    assert MLflowLogger(sqlite_uri, "views").view_url() is None  # no view_params: no view
    with pytest.raises(ValueError, match=r"view_params .* needs metric="):
        MLflowLogger(sqlite_uri, "views", view_params=["lr"])
