"""The relay trainable: one tiny Tune trial per member; the slot servers do the training.

This module must stay import-light: no torch (a member trial is a ~110 MB process; torch doubles
it). Checkpoints travel as opaque bytes written by the server.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ray
from ray import tune

from ._registry import find_registry

CHECKPOINT_FILE = "member.pt"
RESOURCES = {"cpu": 0.01}
"""A relay's resources: Tune rejects ``{"cpu": 0}`` (an empty placement group)."""


def modelbatch_member(config: dict[str, Any]) -> None:
    """Train one member in a slot of a server: join lazily, then report each of its results to Tune.

    Joining happens here rather than in ``Searcher.suggest`` because trials restored by
    ``tune.run(resume=...)`` / ``Tuner.restore`` never pass ``suggest``; they bring their
    checkpoint instead, from which the server continues the member exactly.
    """
    registry = find_registry()
    trial_id = tune.get_context().get_trial_id()
    server = ray.get(registry.join.remote(trial_id, config, read_checkpoint(tune.get_checkpoint())))
    while True:
        reply = ray.get(server.next_result.remote(trial_id))
        if reply["checkpoint"] is None:
            tune.report(reply["result"])
        else:
            with tempfile.TemporaryDirectory() as directory:
                with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as f:
                    f.write(reply["checkpoint"])
                tune.report(reply["result"], checkpoint=tune.Checkpoint.from_directory(directory))
        if reply["final"]:  # always after a report: a trial ending without its metric aborts the sweep
            ray.get(registry.release.remote(trial_id))
            return


def read_checkpoint(checkpoint: tune.Checkpoint | None) -> bytes | None:
    """The member state bytes of a relay checkpoint (``None`` for none)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"ModelBatchSearcher: checkpoint {checkpoint.path} has no {CHECKPOINT_FILE}; a member "
                "trial restores only from checkpoints written by a ModelBatchSearcher sweep."
            )
        with open(path, "rb") as f:
            return f.read()


def trainable() -> Any:
    """The relay with its resources, to pass to ``tune.run`` / ``tune.Tuner``."""
    return tune.with_resources(modelbatch_member, RESOURCES)
