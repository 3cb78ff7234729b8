"""The main job: a Ray Tune sweep of MLPs on scikit-learn's digits, trained as ModelBatch packs.

64 configs (learning rate, weight decay, width, dropout) by default, ASHA stopping the weak ones
early, Ray started locally (or joined with ``--address``), every member logged as its own MLflow
run nested under the sweep's parent run (local sqlite store by default). Each GPU of the cluster
(or each CPU node when there is none) runs one slot server that trains its members as one
vmapped pack per architecture; every member is still its own Tune trial.

At the end it prints the best config and its validation score, where the MLflow runs are, the
command that starts the UI and the link to the sweep's saved view there (a parallel-coordinates plot
of the searched values against ``best_val_loss``), and writes into ``--out`` (default ``sweep_results/``):
``history.parquet`` (one row per member per report), ``learning_curves.png`` (every member's
validation curves, the best highlighted) and ``best.json``.

Run from the repository root after ``pip install -e ".[dev]"`` (about 80 CPU-seconds over all its
processes: about 1 min on 2 idle cores, 2-3 min on a busy machine):
    python examples/sweep.py
    python examples/sweep.py --num-samples 8 --epochs 3          # a quick first look
    python examples/sweep.py --num-samples 256 --epochs 30 --searcher optuna --name big
    python examples/sweep.py --address auto --tracking-uri http://mlflow-host:5000   # a running cluster
Ctrl-C stops cleanly at any moment and prints the command that continues the sweep. The sweep's
arguments are kept in ``--out/--name/sweep_args.json``: ``--resume`` reuses them (flags given again
must match) and continues the same MLflow runs; a new run into a folder holding a sweep is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

EXPERIMENT = "modelbatch-digits"
METRIC, MODE = "val_loss", "min"
SEARCHED = ["lr", "weight_decay", "width", "dropout"]  # the MLflow view's parallel coordinates (not seed)
BATCH_SIZE = 64
VAL_FRACTION = 0.2
ARGS_FILE = "sweep_args.json"  # in the Tune experiment folder: the arguments a --resume reuses
SWEEP_FLAGS = ("num_samples", "epochs", "searcher", "seed", "slots", "tracking_uri", "wandb")  # the sweep
PLACE_FLAGS = ("cpus", "gpus", "address")  # where it runs: may differ on resume
DEFAULTS = {
    "num_samples": 64,
    "epochs": 20,
    "searcher": "random",
    "seed": 0,
    "slots": "auto",
    "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
    "wandb": None,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with ``--resume``, the sweep's own arguments read from its folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, help="configs to try (default 64)")
    parser.add_argument("--epochs", type=int, help="most epochs per member (ASHA max_t, default 20)")
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs for the local Ray (default: all it finds; 0: CPU only)"
    )
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster ('auto' or host:port) instead of a local one",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--searcher", choices=["random", "optuna"], help="config suggester (default random)")
    parser.add_argument("--slots", help="members per server: an int or 'auto' (default)")
    parser.add_argument("--out", type=Path, default=Path("sweep_results"), help="output folder")
    parser.add_argument("--name", default="digits-sweep", help="Tune experiment name (a folder under --out)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep in --out/--name with the arguments it started with",
    )
    parser.add_argument("--seed", type=int, help="seed of the config sampling (default 0)")
    parser.add_argument(
        "--wandb",
        choices=["offline", "online"],
        help="also log every member to W&B (project modelbatch-digits, group --name; offline: into "
        "--out/wandb, upload later with wandb sync)",
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    folder = args.out / args.name
    stored_path = folder / ARGS_FILE
    if args.resume:
        if not stored_path.exists():
            parser.error(f"--resume: no sweep to continue in {folder}; run without --resume first")
        stored = json.loads(stored_path.read_text())
        for flag in SWEEP_FLAGS:
            given = getattr(args, flag)
            if given is not None and str(given) != str(stored[flag]):
                option = "--" + flag.replace("_", "-")
                parser.error(
                    f"--resume: {option} {given} differs from the sweep's {option} {stored[flag]} "
                    f"(stored in {stored_path}); drop {option} to continue that sweep, or start a new "
                    "one with another --name or --out"
                )
            setattr(args, flag, stored[flag])
    elif folder.exists() and any(folder.iterdir()):
        parser.error(
            f"{folder} already holds a sweep; continue it with --resume, or start a new one with "
            "another --name or --out"
        )
    for flag in SWEEP_FLAGS:
        if getattr(args, flag) is None:
            setattr(args, flag, DEFAULTS[flag])
    if args.num_samples < 1 or args.epochs < 1:
        parser.error("--num-samples and --epochs must be at least 1")
    if args.slots != "auto":
        if not str(args.slots).isdigit() or int(args.slots) < 1:
            parser.error(f"--slots must be a positive int or 'auto', got {args.slots!r}")
        args.slots = int(args.slots)
    return args


def save_args(args: argparse.Namespace) -> None:
    """Write the sweep's arguments into its folder (before anything runs, so any Ctrl-C can resume)."""
    folder = args.out / args.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ARGS_FILE
    key = (json.loads(path.read_text()) if path.exists() else {}).get("mlflow_key") or uuid.uuid4().hex
    stored = {**{flag: getattr(args, flag) for flag in SWEEP_FLAGS}, "mlflow_key": key}
    path.write_text(json.dumps(stored, indent=2) + "\n")
    args.mlflow_key = key  # the sweep's MLflow runs are found again by it, whenever Ctrl-C came


def continue_command(args: argparse.Namespace) -> str:
    """The command that resumes this sweep: every flag of it, so it also reads well in a log."""
    words = ["python", sys.argv[0], "--resume", "--out", str(args.out), "--name", args.name]
    for flag in (*SWEEP_FLAGS, *PLACE_FLAGS):
        value = getattr(args, flag)
        if value is not None:
            words += ["--" + flag.replace("_", "-"), str(value)]
    return shlex.join(words)


def interrupted_message(args: argparse.Namespace, what: str) -> int:
    """Say what a Ctrl-C stopped and how to continue; the exit code of an interrupt (130)."""
    print(f"\nInterrupted {what}.\nContinue with: {continue_command(args)}", flush=True)
    return 130


class CtrlC:
    """SIGINT held while the job imports and starts Ray, raised at the next safe point instead.

    A KeyboardInterrupt raised inside an import can be swallowed (``Exception ignored in ...``) and
    the sweep then runs on, or escape the exit path. Once Tune's own handler is in place
    (:meth:`hand_to`), a held Ctrl-C goes to it, and one after it (Tune restores this handler)
    raises at once, as a second Ctrl-C should.
    """

    def __init__(self) -> None:
        self.held = False
        self.raising = False
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, frame: Any) -> None:
        if self.raising:
            raise KeyboardInterrupt
        self.held = True

    def check(self) -> None:
        """Raise a held Ctrl-C here."""
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    def hand_to(self, stop: Any) -> None:
        """Tune's handler is installed: from now on a Ctrl-C raises; a held one is passed to ``stop``."""
        self.raising = True
        if self.held:
            self.held = False
            stop(signal.SIGINT, None)


CTRL_C: CtrlC | None = None  # the command line's (not installed when main() is called in-process)
if __name__ == "__main__":  # --help and bad flags answer before torch, pandas and Ray are imported
    ARGS = parse_args()
    CTRL_C = CtrlC()  # before the imports below: a Ctrl-C during them ends the job cleanly too

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import modelbatch as mb  # noqa: E402


class MLP(nn.Module):
    """A 64-width-width-10 MLP with dropout: the architecture each config builds."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(config: dict[str, Any]) -> nn.Module:
    return MLP(int(config["width"]), float(config["dropout"]))


def digits(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 1797 8x8 digits scaled to [0, 1], split 80/20 by a seeded permutation."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def make_recipe(device: str | None = None) -> mb.Recipe:
    """One member = one config trained with AdamW on its own shuffle of digits; a report per epoch."""
    if __name__ != "__main__":  # imported (benchmarks/sweep.py): Ray workers cannot import this file
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    train, val = digits()
    return mb.Recipe(
        model=make_model,
        optimizer="adamw",
        loss=F.cross_entropy,
        train_data=train,
        val_data=val,
        batch_size=BATCH_SIZE,
        steps_per_report=math.ceil(len(train[1]) / BATCH_SIZE),  # one epoch
        metrics={"acc": mb.metrics.accuracy},
        device=device,
    )


def search_space() -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(1e-4, 3e-2),
        "weight_decay": tune.loguniform(1e-6, 1e-1),
        "width": tune.choice([64, 128]),
        "dropout": tune.choice([0.0, 0.2]),  # a per-member rate: each width is one pack
        "seed": tune.randint(0, 2**31 - 1),
    }


def make_progress(total: int, max_t: int, ctrl_c: CtrlC | None = None) -> Any:
    """A Tune callback showing members running / stopped early / finished / errored and the best so far.

    ``ctrl_c``: the job's held Ctrl-C, handed to Tune's handler when the sweep starts."""
    from ray import tune
    from tqdm.auto import tqdm

    class LiveProgress(tune.Callback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.shown = 0.0
            self.best: tuple[float, float] | None = None  # (val_loss, val_acc of that same report)
            self.interrupted = False

        def setup(self, **info: Any) -> None:
            """Note a Ctrl-C: Tune's own handler (installed before this runs) then ends the run cleanly."""
            if threading.current_thread() is not threading.main_thread():
                return
            tune_handler = signal.getsignal(signal.SIGINT)

            def on_sigint(signum: int, frame: Any) -> None:
                self.interrupted = True
                if callable(tune_handler):
                    tune_handler(signum, frame)

            signal.signal(signal.SIGINT, on_sigint)
            if ctrl_c is not None:
                ctrl_c.hand_to(on_sigint)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_: Any) -> None:
            value = result.get(METRIC)
            if value is not None and math.isfinite(value) and (self.best is None or value < self.best[0]):
                self.best = (value, result.get("val_acc", float("nan")))

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.shown < 0.5:
                return
            self.shown = time.monotonic()
            self.refresh(trials)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.refresh(trials)
            if self.bar is not None:
                self.bar.close()

        def refresh(self, trials: list) -> None:
            counts = {"pending": 0, "running": 0, "stopped": 0, "finished": 0, "errored": 0}
            for trial in trials:
                status = member_status(trial, max_t)
                counts[{"stopped early": "stopped", "paused": "running"}.get(status, status)] += 1
            if self.bar is None:
                self.bar = tqdm(
                    total=total, unit="member", desc="members done", dynamic_ncols=True, mininterval=1
                )
            ended = counts["stopped"] + counts["finished"] + counts["errored"]
            self.bar.update(ended - self.bar.n)
            postfix = " ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("running", "finished"))
            if self.best is not None:
                postfix += f" | best {METRIC} {self.best[0]:.4f} (val_acc {self.best[1]:.3f})"
            self.bar.set_postfix_str(postfix, refresh=True)

    return LiveProgress()


def quiet_ray() -> None:
    """Ray's start-up notices and INFO lines off (they break the progress bar); warnings and errors stay."""
    import logging

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # CSV, JSON added back; no TensorBoard
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints no experiment banner
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # "Token authentication is enabled for this Ray cluster": a notice of a default, not a problem
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def start_ray(args: argparse.Namespace) -> None:
    import logging

    import ray

    quiet_ray()
    if args.address:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(  # "local": a fresh Ray even where an older one's address file is left in /tmp/ray
            address="local",
            num_cpus=args.cpus,
            num_gpus=args.gpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )


def describe_space(space: dict[str, Any]) -> dict[str, str]:
    """The search space as MLflow params of the sweep's run: ``{"space/lr": "loguniform(0.0001, 0.03)"}``."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    out = {}
    for key, domain in space.items():
        if isinstance(domain, Categorical):
            text = f"choice({domain.categories})"
        elif isinstance(domain, (Float, Integer)):
            kind = "loguniform" if isinstance(domain.get_sampler(), LogUniform) else "uniform"
            kind = kind if isinstance(domain, Float) else "randint"
            text = f"{kind}({domain.lower!r}, {domain.upper!r})"
        else:
            text = str(domain)
        out[f"space/{key}"] = text
    return out


def member_name(trial: Any) -> str:
    """A member's MLflow run name, its number and searched values: ``m007 lr=3.1e-03 wd=2e-05 w=64 p=0.2``."""
    from tune_integration.mlflow import trial_number

    number, c = trial_number(trial), trial.config
    head = trial.trial_id if number is None else f"m{number:03d}"
    return f"{head} lr={c['lr']:.1e} wd={c['weight_decay']:.0e} w={c['width']} p={c['dropout']}"


def keep_scheduler_state(scheduler: Any) -> Any:
    """A Tune callback that saves the scheduler's state with the experiment and restores it on resume.

    Tune saves the searcher and the callbacks but not the scheduler: a resumed sweep would start ASHA
    with empty rungs, so a member in flight at the interrupt passed every later rung unchallenged.
    """
    from ray import tune

    class SchedulerState(tune.Callback):
        def get_state(self) -> dict[str, Any]:
            return {"scheduler": dict(scheduler.__dict__)}  # pickled whole: shared objects stay shared

        def set_state(self, state: dict[str, Any]) -> None:
            scheduler.__dict__.update(state["scheduler"])

    return SchedulerState()


def run_sweep(args: argparse.Namespace, stage: dict[str, str]) -> tuple[Any, bool]:
    """Start or join Ray and run the Tune sweep with ModelBatchSearcher: (ExperimentAnalysis, interrupted)."""
    start_ray(args)
    if CTRL_C is not None:
        CTRL_C.check()
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from tune_integration import MLflowCallback, ModelBatchSearcher

    stage["now"] = "while the sweep was starting"
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    servers = f"{gpus} slot servers, one per GPU" if gpus else "one CPU slot server per node"
    print(f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, {gpus} GPUs -> {servers}")
    inner = None
    if args.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        inner = OptunaSearch(seed=args.seed)
    recipe = make_recipe(device="cpu" if gpus == 0 else None)
    searcher = ModelBatchSearcher(recipe, searcher=inner, slots_per_gpu=args.slots, random_state=args.seed)
    scheduler = ASHAScheduler(max_t=args.epochs, grace_period=2, reduction_factor=3)
    params = {
        **describe_space(search_space()),
        "searcher": args.searcher,
        "scheduler": "ASHA(grace_period=2, reduction_factor=3)",
        "num_samples": args.num_samples,
        "epochs": args.epochs,
        "seed": args.seed,
        "slots": args.slots,
    }
    callbacks = [
        make_progress(args.num_samples, args.epochs, CTRL_C),
        MLflowCallback(
            tracking_uri=args.tracking_uri,
            experiment_name=EXPERIMENT,
            metric=METRIC,
            mode=MODE,
            run_name=f"{args.name} ({args.searcher}, {args.num_samples} configs)",
            params=params,
            member_name=member_name,
            max_iterations=args.epochs,
            sweep_key=args.mlflow_key,
            view_params=SEARCHED,
        ),
        CSVLoggerCallback(),
        JsonLoggerCallback(),
        keep_scheduler_state(scheduler),
    ]
    if args.wandb:
        from tune_integration import WandBCallback

        callbacks.append(
            WandBCallback(
                EXPERIMENT,
                group=args.name,
                mode=args.wandb,
                dir=args.out,
                max_iterations=args.epochs,
                member_name=member_name,
            )
        )
    experiment = args.out / args.name
    resume = any(experiment.glob("experiment_state-*.json"))  # none yet: interrupted before Tune saved one
    print(
        f"sweep: {args.num_samples} configs of {sorted(search_space())}, ASHA up to {args.epochs} epochs, "
        f"searcher {args.searcher}{' (resumed)' if resume else ''}; Ctrl-C stops cleanly, --resume continues"
    )
    if CTRL_C is not None:
        CTRL_C.check()
    stage["now"] = "during the sweep (--resume continues from Tune's last save)"
    try:
        analysis = tune.run(
            searcher.trainable(),
            name=args.name,
            storage_path=str(args.out),
            config=search_space(),
            num_samples=args.num_samples,
            search_alg=searcher,
            scheduler=scheduler,
            metric=METRIC,
            mode=MODE,
            stop={"training_iteration": args.epochs},
            reuse_actors=True,
            callbacks=callbacks,
            resume=resume,
            verbose=0,
            raise_on_failed_trial=False,
        )
        args.view_url = callbacks[1].view_url()
        # also a Ctrl-C that reached Tune's handler before the progress bar wrapped it
        ended = len(analysis.trials) == args.num_samples and all(
            t.status in ("TERMINATED", "ERROR") for t in analysis.trials
        )
        return analysis, callbacks[0].interrupted or not ended
    finally:
        if CTRL_C is not None:
            CTRL_C.raising = True  # a Ctrl-C from here on interrupts what follows at once
        hosted = [(s["server"], s["device"], s["members_hosted"]) for s in searcher.server_stats()]
        print(f"slot servers (index, device, members hosted): {hosted}")
        searcher.shutdown()


def member_status(trial: Any, epochs: int, reached: int = 0) -> str:
    """``finished`` (all epochs), ``stopped early`` (by ASHA), ``errored``, or Tune's status in lower case.

    ``reached``: the member's last epoch in its history (a resumed trial's ``last_result`` may be
    an older one restored with it)."""
    result = trial.last_result or {}
    if trial.status == "ERROR" or result.get("error"):
        return "errored"
    if trial.status == "TERMINATED":
        last = max(result.get("training_iteration", 0), reached)
        return "finished" if last >= epochs else "stopped early"
    return trial.status.lower()


def history_frame(analysis: Any, epochs: int) -> pd.DataFrame:
    """One row per member per report: trial id, config, metrics (a resumed report counted once)."""
    from tune_integration.mlflow import member_config

    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        if frame is None or frame.empty:
            continue
        # a report made again after a restore (Ctrl-C, then --resume) counts once: the first, as in
        # MLflow (with dropout the remade one can differ: its masks are drawn anew)
        frame = frame.drop_duplicates("training_iteration", keep="first").copy()
        frame["trial_id"] = trial.trial_id
        frame["status"] = member_status(trial, epochs, int(frame["training_iteration"].max()))
        rows.append(frame)
    if not rows:
        return pd.DataFrame()
    history = pd.concat(rows, ignore_index=True)
    keep = ["trial_id", "training_iteration", "loss", "val_loss", "val_acc", "time_total_s", "status"]
    searched = {f"config/{k}" for trial in analysis.trials for k in member_config(trial)}
    keep += ["server", "pack", "slot", *sorted(c for c in history.columns if c in searched)]
    return history[[c for c in keep if c in history.columns]].sort_values(["trial_id", "training_iteration"])


def plot_curves(history: pd.DataFrame, best_id: str, path: Path) -> None:
    """Every member's validation loss and accuracy per epoch; the best member highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for trial_id, member in history.groupby("trial_id"):
        best = trial_id == best_id
        for ax, column in zip(axes, ("val_loss", "val_acc")):
            ax.plot(
                member["training_iteration"],
                member[column],
                color="tab:red" if best else "tab:gray",
                alpha=1.0 if best else 0.35,
                linewidth=2.5 if best else 0.8,
                zorder=3 if best else 1,
                label=f"best ({best_id})" if best else None,
            )
    for ax, column in zip(axes, ("validation loss", "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend()
    fig.suptitle(f"{history['trial_id'].nunique()} members (ASHA stops the weak ones early)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(analysis: Any, args: argparse.Namespace, seconds: float) -> int:
    """Print the outcome and write history.parquet, learning_curves.png and best.json; the exit code."""
    trials = analysis.trials
    history = history_frame(analysis, args.epochs)
    if history.empty:
        print(f"\nNo member reported a result; see the errors under {args.out / args.name}.")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    history.to_parquet(args.out / "history.parquet", index=False)
    statuses = [member_status(t, args.epochs) for t in trials]
    best = analysis.get_best_trial(METRIC, MODE, scope="all")
    if best is None:
        print(f"\nNo member reported a finite {METRIC}; see the errors under {args.out / args.name}.")
        return 1
    rows = history[history["trial_id"] == best.trial_id]
    at = rows.loc[rows[METRIC].idxmin()]
    plot_curves(history, best.trial_id, args.out / "learning_curves.png")
    from tune_integration.mlflow import member_config

    config = dict(sorted(member_config(best).items()))
    summary = {
        "trial_id": best.trial_id,
        "config": config,
        "epoch": int(at["training_iteration"]),
        METRIC: float(at[METRIC]),
        "val_acc": float(at["val_acc"]),
    }
    (args.out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\n{len(trials)} members in {seconds:.0f} s ({len(trials) / seconds * 3600:.0f} configs/hour): "
        f"{statuses.count('finished')} finished, {statuses.count('stopped early')} stopped early by ASHA, "
        f"{statuses.count('errored')} errored"
    )
    print(f"best config: {json.dumps(config)}")
    print(f"  {METRIC} {summary[METRIC]:.4f}, val_acc {summary['val_acc']:.4f} at epoch {summary['epoch']}")
    print(
        f"MLflow: experiment {EXPERIMENT!r} in {args.tracking_uri} (a parent run, one child run per member)"
    )
    if not args.tracking_uri.startswith(("http://", "https://")):
        print(f"  start the UI: mlflow ui --backend-store-uri {args.tracking_uri}")
    if args.view_url:  # None if MLflow was unreachable all along
        print(f"  open (members best first, parallel coordinates of {', '.join(SEARCHED)}): {args.view_url}")
    if args.wandb:
        print(f"W&B ({args.wandb}): project {EXPERIMENT!r}, group {args.name!r}, one run per member")
        if args.wandb == "offline":
            print(f"  upload them: wandb sync {args.out / 'wandb'}/offline-run-*")
    print(f"history: {args.out / 'history.parquet'} ({len(history)} rows, one per member per report)")
    print(f"learning curves: {args.out / 'learning_curves.png'}; best: {args.out / 'best.json'}")
    print(f"Tune experiment: {args.out / args.name}")
    return 0


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Run the sweep and write its results; 130 after a Ctrl-C, with the command that continues it."""
    args = args or parse_args(argv)
    save_args(args)
    stage = {"now": "while Ray was starting (nothing ran yet)"}
    start = time.monotonic()
    try:
        analysis, interrupted = run_sweep(args, stage)
        if interrupted:
            return interrupted_message(args, f"after {time.monotonic() - start:.0f} s; Tune saved the sweep")
        stage["now"] = "while writing the results (the sweep itself had ended)"
        return summarize(analysis, args, time.monotonic() - start)
    except KeyboardInterrupt:
        return interrupted_message(args, stage["now"])
    finally:
        ray = sys.modules.get("ray")  # not imported again here: a Ctrl-C may have cut its import short
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
