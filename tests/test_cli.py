"""``modelbatch service start|status|stop``: settings from flags and a TOML file, the status text."""

from __future__ import annotations

import pytest

from tune_integration._cli import _parser, _settings, format_status, main


def settings(*argv: str) -> dict:
    return _settings(_parser().parse_args(["service", "start", *argv]))


def test_flags_and_a_toml_file_give_the_tenants_settings_flags_winning(tmp_path):
    toml = tmp_path / "tenants.toml"
    toml.write_text('[tenants.alice]\nweight = 3\nmax_slots = 8\n[tenants."bob@host"]\npriority = 1\n')
    flags = [
        "--weight",
        "alice=2.5",
        "--slots-per-gpu",
        "16",
        "--idle-stop-s",
        "60",
        "--memory-budget-gib",
        "40",
    ]
    got = settings("--tenants", str(toml), *flags)
    assert got == {
        "slots_per_gpu": 16,
        "idle_stop_s": 60.0,
        "memory_budget_gib": 40.0,
        "tenants": {"alice": {"weight": 2.5, "max_slots": 8}, "bob@host": {"priority": 1}},
    }
    assert settings()["idle_stop_s"] is None  # started by hand: long-lived


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weight", "alice"], r"--weight takes TENANT=float, got 'alice'"),
        (["--max-slots", "alice=x"], r"--max-slots takes TENANT=int"),
        (["--weight", "alice=-1"], r"tenant 'alice' weight must be a positive number"),
        (["--slots-per-gpu", "0"], r"--slots-per-gpu must be a positive int"),
        (["--memory-budget-gib", "0"], r"--memory-budget-gib must be > 0"),
    ],
)
def test_bad_flags_name_the_command_and_the_fix(argv, message):
    with pytest.raises(ValueError, match=r"^modelbatch service start: .*" + message):
        settings(*argv)


def test_a_bad_toml_file_says_what_it_must_hold(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("[tenants.alice]\nshare = 3\n")
    with pytest.raises(ValueError, match=r"tenant 'alice' .* unknown keys \['share'\]; use weight"):
        settings("--tenants", str(toml))
    toml.write_text("tenants = 3\n")
    with pytest.raises(ValueError, match=r"must hold \[tenants.NAME\] tables"):
        settings("--tenants", str(toml))
    assert main(["service", "start", "--tenants", str(tmp_path / "missing.toml")]) == 2


def test_the_status_text_has_a_line_per_server_and_per_tenant():
    status = {
        "servers": [
            {
                "server": 0,
                "server_node": "abcdef0123",
                "device": "cuda",
                "alive": True,
                "n_slots": 32,
                "live": 5,
                "packs": 2,
                "tenants": {"alice": 3, "bob": 2},
                "memory": {"used": 3 * 2**30, "free": 77 * 2**30},
                "parked": 1,
                "evictions": 2,
                "pack_tenants": [
                    {"pack": "Net 8-3 #1a2b3c", "pack_id": "0/4", "members": {"alice": 2, "bob": 2}},
                    {"pack": "Net 16-3 #4d5e6f", "pack_id": "0/5", "members": {"alice": 1}},
                ],
            }
        ],
        "tenants": {
            "alice": {"weight": 3.0, "max_slots": None, "priority": 0, "live": 3, "queued": 4, "share": 0.6},
            "bob": {"weight": 1.0, "max_slots": 8, "priority": 0, "live": 2, "queued": 0, "share": 0.4},
        },
        "sweeps": {"s1": {}, "s2": {}},
    }
    text = format_status(status)
    assert "node abcdef01  cuda  up  slots 32  live 5  packs 2  members per tenant: alice: 3, bob: 2" in text
    assert "memory used 3.0 GiB free 77.0 GiB  parked 1  evictions 2" in text
    assert (
        "\n    pack 0/4  Net 8-3 #1a2b3c  alice: 2, bob: 2\n    pack 0/5  Net 16-3 #4d5e6f  alice: 1\n"
        in text
    )
    assert "alice  weight 3  max_slots -  priority 0  live 3  queued 4  share of slot-seconds" in text
    assert "(last minute) 60%" in text
    assert text.endswith("sweeps open: 2")
