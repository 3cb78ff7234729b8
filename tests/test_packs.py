"""A slot server's packs (no Ray): an evicted member continues exactly elsewhere; members end as in mb.fit."""

from __future__ import annotations

import math

import pandas as pd
from tune_recipes import assert_ends_as_in_fit, assert_matches_fit, recipe

import modelbatch as mb
from tune_integration._packs import Packs

A, B, MATE = {"lr": 0.02, "seed": 1}, {"lr": 0.005, "seed": 2}, {"lr": 0.01, "seed": 3}


def train(packs: Packs, pid: int, reports: int, got: dict) -> None:
    for _ in range(reports):
        for member, reply in packs.train(pid, {}).items():
            got.setdefault(member, []).append(reply["result"])


def test_an_evicted_member_continues_exactly_in_another_servers_pack() -> None:
    rec = recipe()
    here, there = Packs(rec, slots=2), Packs(rec, slots=2)
    got: dict = {}
    pid = here.join("a", dict(A), None)
    here.join("b", dict(B), None)
    train(here, pid, 2, got)
    blob = here.evict("a")  # its slot goes to another tenant's member
    assert here.live(pid) == {"b": 1}
    train(here, pid, 1, got)  # b trains on alone
    other = there.join("mate", dict(MATE), None)
    assert there.join("a", dict(A), blob) == other  # a lands in another pack, with another mate
    train(there, other, 3, got)
    assert [r["training_iteration"] for r in got["a"]] == [1, 2, 3, 4, 5]
    assert_matches_fit(rec, A, pd.DataFrame(got["a"]))
    assert_matches_fit(rec, B, pd.DataFrame(got["b"]))


def test_evicting_a_parked_member_hands_over_its_kept_state_and_an_unknown_one_gives_none() -> None:
    rec = recipe()
    packs = Packs(rec, slots=2)
    got: dict = {}
    pid = packs.join("a", dict(A), None)
    packs.join("b", dict(B), None)
    train(packs, pid, 1, got)
    packs.park("a")  # Tune paused it
    blob = packs.evict("a")
    assert blob is not None and "a" not in packs.parked and packs.evict("a") is None
    assert packs.evict("nobody") is None
    pid = packs.join("a", dict(A), blob)
    train(packs, pid, 1, got)
    assert_matches_fit(rec, A, pd.DataFrame(got["a"]))


def test_a_sweeps_callbacks_and_nan_guard_end_its_members_as_mb_fit_does_and_no_other_sweeps() -> None:
    """Members of two sweeps share a pack; only the first sweep's EarlyStopping stops its members."""
    rec = recipe()
    # lr 0: val_loss never improves, so EarlyStopping(patience=2) stops it at report 3; scale nan diverges
    configs = [{"lr": 0.0, "seed": 1}, {"lr": 0.02, "seed": 2}, {"lr": 0.01, "seed": 3, "scale": math.nan}]
    packs = Packs(rec, slots=4)
    early = [mb.callbacks.EarlyStopping("val_loss", patience=2)]
    for i, config in enumerate(configs):
        pid = packs.join(("s1", i), dict(config), None, (6, None, None), early)
    assert packs.join(("s2", 0), dict(configs[0]), None, (6, None, None)) == pid  # no callbacks
    got: dict = {}
    finals = set()
    while packs.live(pid):
        for member, reply in packs.train(pid, {}).items():
            got.setdefault(member, []).append(reply["result"])
            if reply["final"]:
                finals.add(member)
    assert finals == set(got)
    ends = {
        m: (r[-1]["training_iteration"], r[-1].get("stopped"), r[-1].get("error")) for m, r in got.items()
    }
    assert ends[("s1", 0)] == (3, "early stopped: val_loss did not improve for 2 reports", None)
    assert ends[("s1", 2)] == (1, None, "non-finite loss (nan) at report 1")
    assert ends[("s2", 0)] == (6, None, None)  # the same config without the callback: finished
    fresh = [mb.callbacks.EarlyStopping("val_loss", patience=2)]
    assert_ends_as_in_fit(rec, configs, fresh, 6, [got[("s1", i)] for i in range(3)])
    assert_ends_as_in_fit(rec, configs[:1], [], 6, [got[("s2", 0)]])
