"""The relay trainable: one tiny Tune trial per member; the slot servers do the training.

This module must stay import-light: no torch (a member trial is a ~110 MB process; torch doubles
it). Checkpoints travel as opaque bytes written by the server.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ray
from ray import tune

from ._server import SERVER_LOST
from ._service import SlotLost, find_service

CHECKPOINT_FILE = "member.pt"
ORIGIN_FILE = "origin.json"
"""Beside the member state in a relay checkpoint: the trial and ``training_iteration`` that wrote it."""
RESOURCES = {"cpu": 0.01}
"""A relay's resources: Tune rejects ``{"cpu": 0}`` (an empty placement group)."""
MAX_REJOINS = 5
"""Times in a row a relay joins again after losing its server without getting a result."""
PACK_KEY = "modelbatch_pack"
"""The config entry in which the searcher hands a member's architecture key (its ``pack`` label) to
its relay, which sends it with ``join`` (the service places members of one key together)."""


def modelbatch_member(config: dict[str, Any], **parameters: Any) -> None:
    """Train one member in a slot of a server: join lazily, then report each of its results to Tune.

    ``parameters`` (what ``tune.with_parameters`` passes) are refused: the servers train from the
    Recipe, which carries the data (the searcher refuses them before the sweep where it can).

    Joining happens here rather than in ``Searcher.suggest`` because trials restored by
    ``tune.run(resume=...)`` / ``Tuner.restore`` never pass ``suggest``; they bring their
    checkpoint instead, from which the server continues the member exactly.

    A member parked by the service (its slot went to another tenant) gets its state instead of a
    result and joins again with it: it continues exactly, on whichever server has room.

    When the server dies (it is restarted by Ray) the relay joins again with the last checkpoint
    it received (kept in memory; none: from the start) and skips the results it re-trains up to
    the last ``training_iteration`` it reported, so Tune sees every iteration once. A trial
    that Tune restarts in the same run (``max_failures``) skips the results Tune processed after
    its checkpoint the same way (the searcher tells the service each member's last iteration).
    After a driver restart (resume) a result logged after a member's last checkpoint may repeat.

    A checkpoint of another trial (population-based training's exploit) continues the donor's
    state with this trial's config, and Tune counts the trial's iterations on from the donor's
    checkpoint, as for any trainable: every result after it is reported.
    """
    if parameters:
        raise TypeError(
            f"ModelBatchSearcher: the member trial got {sorted(parameters)} from tune.with_parameters, but "
            "it trains nothing itself: put the data into the mb.Recipe (train_data=..., val_data=...) and "
            "pass searcher.trainable() without tune.with_parameters."
        )
    config = dict(config)
    key = config.pop(PACK_KEY, None)  # not the model's: the searcher's note of its architecture
    service = find_service()
    context = ray.get_runtime_context()
    trial_id = tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()
    state = read_checkpoint(checkpoint)
    job = context.get_job_id()
    try:
        relay = context.current_actor  # the service pings the relay while it lives
    except RuntimeError:  # not in an actor (called by hand): no liveness pings
        relay = None

    def join(state: bytes | None, restored_at: int = 0) -> tuple[Any, str, int]:
        return ray.get(service.join.remote(job, trial_id, config, state, relay, key, restored_at))

    origin = checkpoint_origin(checkpoint)
    own = origin is not None and origin["trial_id"] == trial_id
    server, sweep, reported = join(state, origin["training_iteration"] if own else 0)
    if server is None:  # restored at its last report (Tune has that result): done
        return
    if origin is not None and not own:
        # population-based training's exploit: another member's checkpoint, from whose iteration
        # Tune counts this trial's results on (as it does for any trainable)
        reported = origin["training_iteration"]
    elif own:  # Tune restored it from a checkpoint it got with that result
        reported = max(reported, origin["training_iteration"])
    lost = 0
    while True:
        try:
            reply = ray.get(server.next_result.remote(sweep, trial_id))
        except (*SERVER_LOST, SlotLost) as exc:
            lost += 1
            if lost > MAX_REJOINS:
                raise RuntimeError(
                    f"ModelBatchSearcher: member {trial_id} lost its slot server {lost} times without a "
                    "result; see the slot servers' logs (ray logs / the dashboard) for why they die."
                ) from exc
            server, sweep, _ = join(state)
            continue
        lost = 0
        if "parked" in reply:  # its slot went to another tenant: queue again, continue exactly
            state = reply["parked"]
            server, sweep, _ = join(state)
            continue
        if reply["checkpoint"] is not None:
            state = reply["checkpoint"]
        iteration = reply["result"].get("training_iteration", 0)
        if iteration > reported:  # else re-trained from an older checkpoint: Tune has this result
            _report(reply, trial_id)
            reported = iteration
        # Tune has a result with the metric by now (a trial ending without one aborts the sweep);
        # a trial whose last result was skipped ends with the last result Tune has of it.
        if reply["final"]:
            ray.get(service.release.remote(sweep, trial_id))
            return


def _report(reply: dict[str, Any], trial_id: str) -> None:
    if reply["checkpoint"] is None:
        tune.report(reply["result"])
        return
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as f:
            f.write(reply["checkpoint"])
        origin = {"trial_id": trial_id, "training_iteration": reply["result"]["training_iteration"]}
        with open(os.path.join(directory, ORIGIN_FILE), "w") as f:
            json.dump(origin, f)
        tune.report(reply["result"], checkpoint=tune.Checkpoint.from_directory(directory))


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


def checkpoint_origin(checkpoint: tune.Checkpoint | None) -> dict[str, Any] | None:
    """``{"trial_id", "training_iteration"}`` of the report that wrote a relay checkpoint (``None``: none)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, ORIGIN_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)


def trainable() -> Any:
    """The relay with its resources, to pass to ``tune.run`` / ``tune.Tuner``."""
    return tune.with_resources(modelbatch_member, RESOURCES)
