"""WandBWriter: one W&B run per member, written from one background thread.

``wandb.init`` takes 0.3-1 s a run (it asks W&B's service process for one), so a pack of 64
members or a sweep's driver would wait a minute on it; here the caller only queues. A run that
W&B refuses is warned about once and dropped; training goes on.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def import_wandb(api: str) -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            f"{api}: needs the wandb package; pip install 'modelbatch[integrations]' (or wandb)"
        ) from exc
    return wandb


def wandb_values(
    values: Mapping[str, Any], skip: frozenset[str] | set[str] = frozenset()
) -> dict[str, float]:
    """The numbers of a report, as W&B history values (bools and ``skip`` keys left out)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip
    }


class WandBWriter:
    """Queue W&B calls per member key; a daemon thread makes them in order.

    Example:
        >>> import glob, tempfile
        >>> writer, folder = WandBWriter("mb.callbacks.WandB"), tempfile.mkdtemp()
        >>> quiet = writer.wandb.Settings(silent=True)
        >>> writer.start("m0", project="p", name="member-0", mode="offline", dir=folder, settings=quiet)
        >>> writer.log("m0", {"loss": 0.5}, step=1)
        >>> writer.end("m0", {"status": "finished"})
        >>> writer.close()
        >>> len(glob.glob(f"{folder}/wandb/offline-run-*"))
        1
    """

    def __init__(self, api: str) -> None:
        self.api = api
        self.wandb = import_wandb(api)
        self.runs: dict[Any, Any] = {}  # key -> wandb Run (the thread's)
        self.failed: set[Any] = set()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, key: Any, **init_kwargs: Any) -> None:
        """Start (or, with ``id=`` and ``resume="allow"``, continue) the run of ``key``."""
        self._put("start", key, init_kwargs)

    def log(self, key: Any, values: Mapping[str, Any], step: int, summary: Mapping[str, Any] = {}) -> None:
        """Log ``values`` at ``step`` in the run of ``key``; ``summary``: values that are not history."""
        self._put("log", key, (dict(values), step, dict(summary)))

    def end(self, key: Any, summary: Mapping[str, Any]) -> None:
        """Set ``summary`` on the run of ``key`` and finish it."""
        self._put("end", key, dict(summary))

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        """Finish every open run (with ``summary``) and wait until all is written."""
        if self._thread is None:
            return
        self._queue.put(("close", None, dict(summary or {})))
        self._thread.join()
        self._thread = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks: not the thread or the runs
        return {"api": self.api}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["api"])

    def _put(self, op: str, key: Any, arg: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="modelbatch-wandb", daemon=True)
            self._thread.start()
        self._queue.put((op, key, arg))

    def _work(self) -> None:
        while True:
            op, key, arg = self._queue.get()
            if op == "close":
                for k in list(self.runs):
                    self._do("end", k, arg)
                if len(self.failed) > 1:
                    message = (
                        f"{self.api}: {len(self.failed)} W&B runs were not logged (the first error above)"
                    )
                    warnings.warn(message, stacklevel=1)
                return
            self._do(op, key, arg)

    def _do(self, op: str, key: Any, arg: Any) -> None:
        if key in self.failed:
            return
        try:
            if op == "start":
                if key not in self.runs:
                    if arg.get("dir"):
                        Path(arg["dir"]).mkdir(parents=True, exist_ok=True)  # W&B would warn about it
                    if arg.get("settings") is not None:  # wandb.init writes the run's name etc. into it
                        arg = {**arg, "settings": arg["settings"].model_copy()}
                    self.runs[key] = self.wandb.init(reinit="create_new", **arg)
            elif op == "log" and key in self.runs:
                run = self.runs[key]
                run.log(arg[0], step=arg[1])
                for name, value in arg[2].items():
                    run.summary[name] = value
            elif op == "end" and key in self.runs:
                run = self.runs.pop(key)
                for name, value in arg.items():
                    run.summary[name] = value
                run.finish()
        except Exception as exc:  # W&B refused: drop this run, keep training; warn about the first
            if not self.failed:
                message = f"{self.api}: W&B {op} of run {key!r} failed, not logging it further: {exc!r}"
                warnings.warn(message, stacklevel=1)
            self.failed.add(key)
            self.runs.pop(key, None)
