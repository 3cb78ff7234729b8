"""Callbacks: per-member services of a training loop, run by :func:`modelbatch.fit` and the slot servers.

A callback sees every report of every member and may stop members through ``control``.
Write your own by subclassing :class:`Callback` and overriding what you need. ``mb.fit`` calls
every hook; a sweep's slot servers (``ModelBatchSearcher(recipe, callbacks=[...])``) call
``on_report`` and ``on_member_stop`` with the members they train (member ids there are
``(sweep id, trial id)``; each server has its own copy of the callbacks; a member Tune stops, e.g.
by ASHA, leaves without ``on_member_stop``). Both apply them in one
place, :meth:`modelbatch.PackTrainer.after_report`, so a callback stops the same members at the
same reports in either.

Example:
    >>> import modelbatch as mb
    >>> class PrintBest(mb.callbacks.Callback):
    ...     def on_report(self, reports, control):
    ...         best = min(reports.values(), key=lambda r: r["loss"])
    ...     def on_member_stop(self, member_id, reason, last_report):
    ...         pass
    >>> callbacks = [PrintBest(), mb.callbacks.EarlyStopping("val_loss", patience=3)]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ._hparams import check_positive_int


class Control(Protocol):
    """What a callback may do to the run."""

    def stop(self, member_id: Any, reason: str, *, error: bool = False) -> None:
        """Stop training ``member_id``; ``error=True`` records it as errored rather than stopped.

        The first stop of a member in a round counts; a member that did not report in this
        round (it ended already) is left alone.
        """


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, configs: Mapping[Any, Mapping[str, Any]]) -> None:
        """Before training, with every member's config by member id."""

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        """After each round of reports: ``{member_id: {"loss": ..., "val_loss": ..., ...}}``."""

    def on_member_stop(self, member_id: Any, reason: str, last_report: Mapping[str, float] | None) -> None:
        """When a member stops for any reason (finished, early stopping, non-finite loss, ...)."""

    def on_fit_end(self, history: Any) -> None:
        """After training, with the history DataFrame."""


HOOKS = ("on_fit_start", "on_report", "on_member_stop", "on_fit_end")


def check_callbacks(api: str, callbacks: Iterable[Any], hint: str = "") -> list[Callback]:
    """``callbacks`` as a list; one without the :class:`Callback` hooks raises a ``TypeError`` naming
    ``api`` (``hint``: more advice at the end of the message)."""
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"{api}: callbacks must be a list of mb.callbacks.Callback, got {callbacks!r}.")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not all(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise TypeError(
                f"{api}: callback {i} ({type(cb).__name__}) is not a mb.callbacks.Callback; subclass "
                "mb.callbacks.Callback and override on_report(reports, control) and/or on_member_stop(...)."
                + hint
            )
    return callbacks


class NaNGuard(Callback):
    """Stop a member whose reported loss (or any metric) is NaN or infinite; the others continue.

    Packed members are independent, so a diverging member cannot harm the others: it is only
    stopped (frozen) and recorded as errored with the reason.

    Example:
        >>> import modelbatch as mb
        >>> stopped = []
        >>> class Ctl:
        ...     def stop(self, member_id, reason, error=False): stopped.append((member_id, reason))
        >>> mb.callbacks.NaNGuard().on_report({"a": {"loss": float("nan"), "training_iteration": 2}}, Ctl())
        >>> stopped
        [('a', 'non-finite loss (nan) at report 2')]
    """

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        for member_id, report in reports.items():
            reason = self.reason(report)
            if reason is not None:
                control.stop(member_id, reason, error=True)

    @staticmethod
    def reason(report: Mapping[str, Any]) -> str | None:
        """Why a report ends its member: its first NaN or infinite value (``None``: every value is finite).

        The one wording of a diverged member, in ``mb.fit``'s history, a sweep's results and MLflow.

        Example:
            >>> import modelbatch as mb
            >>> mb.callbacks.NaNGuard.reason({"loss": 0.5, "val_loss": float("inf"), "training_iteration": 3})
            'non-finite val_loss (inf) at report 3'
        """
        for key, value in report.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"non-finite {key} ({value}) at report {report.get('training_iteration')}"
        return None


class EarlyStopping(Callback):
    """Per member: stop when ``metric`` has not improved by ``min_delta`` for ``patience`` reports.

    Example:
        >>> import modelbatch as mb
        >>> es, stopped = mb.callbacks.EarlyStopping("val_loss", patience=2), []
        >>> class Ctl:
        ...     def stop(self, member_id, reason, error=False): stopped.append(member_id)
        >>> for v in [1.0, 0.9, 0.95, 0.91]:
        ...     es.on_report({"m": {"val_loss": v}}, Ctl())
        >>> stopped
        ['m']
    """

    def __init__(
        self, metric: str = "val_loss", mode: str = "min", patience: int = 5, min_delta: float = 0.0
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"mb.callbacks.EarlyStopping: mode must be 'min' or 'max', got {mode!r}.")
        check_positive_int("mb.callbacks.EarlyStopping", "patience", patience)
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: dict[Any, float] = {}
        self.bad: dict[Any, int] = {}

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        for member_id, report in reports.items():
            if self.metric not in report:
                raise KeyError(
                    f"mb.callbacks.EarlyStopping: members report {sorted(report)}, not {self.metric!r}; "
                    "pass one of those as metric (val_* needs the recipe's val_data)."
                )
            value = float(report[self.metric])
            best = self.best.get(member_id)
            sign = 1.0 if self.mode == "min" else -1.0
            if best is None or sign * (best - value) > self.min_delta:
                self.best[member_id], self.bad[member_id] = value, 0
                continue
            self.bad[member_id] += 1
            if self.bad[member_id] >= self.patience:
                control.stop(
                    member_id, f"early stopped: {self.metric} did not improve for {self.patience} reports"
                )


class Progress(Callback):
    """A progress bar (tqdm) over all member reports: running / stopped members, steps/s, best so far."""

    def __init__(self, metric: str = "val_loss", mode: str = "min", total: int | None = None) -> None:
        self.metric, self.mode, self.total = metric, mode, total
        self.bar: tqdm | None = None
        self.best: float | None = None
        self.stopped = 0
        self.running: set[Any] = set()
        self.last_step: dict[Any, int] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def on_fit_start(self, configs: Mapping[Any, Mapping[str, Any]]) -> None:
        self.bar = tqdm(total=self.total, desc="members", unit="report", dynamic_ncols=True)
        self.start = time.perf_counter()

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        for member_id, report in reports.items():
            self.running.add(member_id)
            step = int(report.get("step", 0))
            self.steps += step - self.last_step.get(member_id, 0)
            self.last_step[member_id] = step
            value = report.get(self.metric)
            if isinstance(value, float) and math.isfinite(value):
                better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
                self.best = value if better else self.best
        if self.bar is not None:
            self.bar.update(len(reports))
            rate = self.steps / max(time.perf_counter() - self.start, 1e-9)
            best = "-" if self.best is None else f"{self.best:.4g}"
            running = f"running={len(self.running)} stopped={self.stopped}"
            self.bar.set_postfix_str(f"{running} steps/s={rate:.0f} best {self.metric}={best}")

    def on_member_stop(self, member_id: Any, reason: str, last_report: Mapping[str, float] | None) -> None:
        self.running.discard(member_id)
        self.stopped += 1

    def on_fit_end(self, history: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoard(Callback):
    """One TensorBoard run directory per member under ``log_dir``, so TensorBoard's UI compares them.

    Each member's numeric report values are written as scalars at ``step=training_iteration``
    and its config as text. Needs the ``tensorboard`` package (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "mb.callbacks.TensorBoard: needs the tensorboard package; pip install tensorboard"
            ) from exc
        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writers: dict[Any, Any] = {}
        self.configs: Mapping[Any, Mapping[str, Any]] = {}

    def run_dir(self, member_id: Any) -> Path:
        """The run directory of one member."""
        return self.log_dir / f"member-{member_id}"

    def on_fit_start(self, configs: Mapping[Any, Mapping[str, Any]]) -> None:
        self.configs = configs

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        for member_id, report in reports.items():
            writer = self.writers.get(member_id)
            if writer is None:
                writer = self.writers[member_id] = self._writer_cls(str(self.run_dir(member_id)))
                config = self.configs.get(member_id, {})
                writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()) or "-")
            step = int(report.get("training_iteration", 0))
            for key, value in report.items():
                if isinstance(value, (int, float)) and key != "training_iteration":
                    writer.add_scalar(key, float(value), global_step=step)

    def on_member_stop(self, member_id: Any, reason: str, last_report: Mapping[str, float] | None) -> None:
        writer = self.writers.pop(member_id, None)
        if writer is not None:
            writer.add_text("status", reason)
            writer.close()

    def on_fit_end(self, history: Any) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class WandB(Callback):
    """One Weights & Biases run per member, grouped by the sweep, with its config and history.

    Each member's run is named ``member-<id>``, holds the member's config, logs its numeric
    report values at ``step=training_iteration`` and ends with ``summary["status"]`` (why the member
    stopped: ``finished``, ``early stopped: ...``). ``group`` (default ``modelbatch-<start time>``) puts
    the runs of one ``mb.fit`` together in W&B's UI. ``mode="offline"`` writes the runs under
    ``dir`` without a network (``wandb sync DIR/wandb/offline-run-*`` uploads them later); other
    ``wandb.init`` arguments pass through ``init_kwargs`` (W&B's own console output is off unless
    ``settings=`` says otherwise). Runs start and log on a background thread, so training does
    not wait for W&B. Needs ``pip install 'modelbatch[integrations]'`` (or ``wandb``).

    Example:
        >>> import glob, tempfile, torch, modelbatch as mb
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> recipe = mb.Recipe(model=lambda cfg: torch.nn.Linear(4, 3), optimizer="sgd",
        ...     loss=torch.nn.functional.cross_entropy, train_data=(X, y), batch_size=8, steps_per_report=2)
        >>> folder = tempfile.mkdtemp()
        >>> wb = mb.callbacks.WandB(project="lr-sweep", mode="offline", dir=folder)
        >>> _ = mb.fit(recipe, [{"lr": 0.1}, {"lr": 0.01}], reports=2, callbacks=[wb], progress=False)
        >>> len(glob.glob(f"{folder}/wandb/offline-run-*"))  # one run per member
        2
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        group: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,
        **init_kwargs: Any,
    ) -> None:
        from ._wandb import WandBWriter

        self.writer = WandBWriter("mb.callbacks.WandB")
        init_kwargs.setdefault("settings", self.writer.wandb.Settings(silent=True))
        self.init_kwargs = dict(
            project=project,
            group=group or time.strftime("modelbatch-%Y%m%d-%H%M%S"),
            mode=mode,
            dir=None if dir is None else str(dir),
            **init_kwargs,
        )
        self.configs: Mapping[Any, Mapping[str, Any]] = {}
        self.started: set[Any] = set()

    def on_fit_start(self, configs: Mapping[Any, Mapping[str, Any]]) -> None:
        self.configs = configs

    def on_report(self, reports: Mapping[Any, Mapping[str, float]], control: Control) -> None:
        from ._wandb import wandb_values

        for member_id, report in reports.items():
            if member_id not in self.started:
                self.started.add(member_id)
                config = dict(self.configs.get(member_id, {}))
                self.writer.start(member_id, name=f"member-{member_id}", config=config, **self.init_kwargs)
            step = int(report.get("training_iteration", 0))
            self.writer.log(member_id, wandb_values(report, {"training_iteration"}), step=step)

    def on_member_stop(self, member_id: Any, reason: str, last_report: Mapping[str, float] | None) -> None:
        self.writer.end(member_id, {"status": reason})

    def on_fit_end(self, history: Any) -> None:
        self.writer.close()
        self.started.clear()
