"""A slot server's packs (no Ray): evicting a member hands its state to another server exactly."""

from __future__ import annotations

import pandas as pd
from tune_recipes import assert_matches_fit, recipe

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
