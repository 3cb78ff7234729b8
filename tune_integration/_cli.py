"""``modelbatch service start|status|stop``: run the cluster's packing service, look at it, stop it.

Also ``python -m tune_integration service ...``. Without ``--address`` it connects to the running
cluster (``RAY_ADDRESS`` or the local one, as ``ray.init(address="auto")`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

PROG = "modelbatch service"


def main(argv: list[str] | None = None) -> int:
    """The console script's entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.group != "service" or args.command is None:
        _parser().print_help()
        return 2
    try:
        settings = _settings(args) if args.command == "start" else {}
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    import ray

    from ._service import NAMESPACE, SERVICE_NAME, connect

    ray.init(address=args.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    try:
        if args.command == "start":
            try:
                ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
                print(f"{PROG}: a packing service already runs on this cluster (its settings stay):")
            except ValueError:
                service = connect(settings)
                ray.get(service.start_servers.remote())
                print(
                    f"{PROG}: started; it runs until `{PROG} stop`"
                    if settings["idle_stop_s"] is None
                    else f"{PROG}: started; it stops {settings['idle_stop_s']:g} s after its last sweep"
                )
            status = ray.get(ray.get_actor(SERVICE_NAME, namespace=NAMESPACE).status.remote())
        else:
            try:
                service = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
            except ValueError:
                print(f"{PROG}: no packing service runs on this cluster.")
                return 1 if args.command == "stop" else 0
            if args.command == "stop":
                with contextlib.suppress(ray.exceptions.RayActorError):  # it exited while answering
                    ray.get(service.stop.remote(), timeout=60)
                _wait_until_gone(service)
                print(f"{PROG}: stopped; every sweep's members left their slots.")
                return 0
            status = ray.get(service.status.remote())
        print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
        return 0
    finally:
        ray.shutdown()


def format_status(status: dict[str, Any]) -> str:
    """The service's status as text: one line per server (then one per pack: members per tenant), then
    one per tenant."""
    lines = ["servers:"]
    for s in status["servers"]:
        memory = s.get("memory", {})
        tenants = ", ".join(f"{t}: {n}" for t, n in s.get("tenants", {}).items() if n) or "-"
        lines.append(
            f"  {s.get('server', '?')}  node {str(s.get('server_node', '?'))[:8]}  {s.get('device', '?')}"
            f"  {'up' if s.get('alive') else 'dead'}  slots {s.get('n_slots', 0)}  live {s.get('live', 0)}"
            f"  packs {s.get('packs', 0)}  members per tenant: {tenants}"
            f"  memory used {_gib(memory.get('used'))} free {_gib(memory.get('free'))}"
            f"  parked {s.get('parked', 0)}  evictions {s.get('evictions', 0)}"
        )
        for pack in s.get("pack_tenants", []):
            members = ", ".join(f"{t}: {n}" for t, n in pack["members"].items())
            lines.append(f"    pack {pack['pack_id']}  {pack['pack']}  {members}")
    lines.append("tenants:" if status["tenants"] else "tenants: none")
    for name, t in status["tenants"].items():
        cap = t["max_slots"] if t["max_slots"] is not None else "-"
        lines.append(
            f"  {name}  weight {t['weight']:g}  max_slots {cap}  priority {t['priority']}  live {t['live']}"
            f"  queued {t['queued']}  share of slot-seconds (last minute) {t['share']:.0%}"
        )
    lines.append(f"sweeps open: {len(status['sweeps'])}")
    return "\n".join(lines)


def _gib(n: Any) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, (int, float)) else "?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelbatch", description="The ModelBatch packing service of a Ray cluster."
    )
    groups = parser.add_subparsers(dest="group")
    service = groups.add_parser("service", help="start, look at or stop the cluster's packing service")
    commands = service.add_subparsers(dest="command")
    for name, text in (
        ("start", "start the packing service (long-lived: it runs until `stop`, unless --idle-stop-s)"),
        (
            "status",
            "print servers (packs, members per tenant, memory) and tenants (weight, live, queued, share)",
        ),
        ("stop", "stop the service: every sweep's members leave, every CPU/GPU it held is freed"),
    ):
        cmd = commands.add_parser(name, help=text, description=text)
        cmd.add_argument("--address", default="auto", help="Ray cluster address (default: the running one)")
        cmd.add_argument("--json", action="store_true", help="print the status as JSON")
        if name == "start":
            cmd.add_argument(
                "--slots-per-gpu",
                type=int,
                help="members per server over all sweeps (default: each sweep's own)",
            )
            cmd.add_argument(
                "--idle-stop-s", type=float, help="stop this long after the last sweep left (default: never)"
            )
            cmd.add_argument(
                "--memory-budget-gib",
                type=float,
                help="at most this much of each server's device memory for packs (default: 80%% of its free)",
            )
            cmd.add_argument(
                "--tenants", type=Path, help="TOML file: [tenants.NAME] weight=, max_slots=, priority="
            )
            for flag, kind in (("weight", float), ("max-slots", int), ("priority", int)):
                cmd.add_argument(
                    f"--{flag}",
                    action="append",
                    default=[],
                    metavar="TENANT=VALUE",
                    help=f"a tenant's {flag} ({kind.__name__}); repeatable; overrides --tenants",
                )
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The service settings of ``start``: slots, idle stop and the operator's per-tenant values."""
    if args.slots_per_gpu is not None and args.slots_per_gpu <= 0:
        raise ValueError(f"{PROG} start: --slots-per-gpu must be a positive int, got {args.slots_per_gpu}.")
    tenants: dict[str, dict[str, Any]] = {}
    if args.tenants is not None:
        tenants = read_tenants(args.tenants)
    for flag, key, kind in (
        ("weight", "weight", float),
        ("max_slots", "max_slots", int),
        ("priority", "priority", int),
    ):
        for item in getattr(args, flag):
            name, sep, value = item.rpartition("=")
            try:
                parsed = kind(value)
            except ValueError:
                parsed = None
            if not sep or not name or parsed is None:
                raise ValueError(
                    f"{PROG} start: --{flag.replace('_', '-')} takes TENANT={kind.__name__}, got {item!r}."
                )
            tenants.setdefault(name, {})[key] = parsed
    _check_tenants(tenants, "flags")
    if args.memory_budget_gib is not None and not args.memory_budget_gib > 0:
        raise ValueError(f"{PROG} start: --memory-budget-gib must be > 0, got {args.memory_budget_gib}.")
    return {
        "slots_per_gpu": args.slots_per_gpu,
        "idle_stop_s": args.idle_stop_s,
        "memory_budget_gib": args.memory_budget_gib,
        "tenants": tenants,
    }


def read_tenants(path: Path) -> dict[str, dict[str, Any]]:
    """``[tenants.NAME]`` tables of a TOML file: ``weight``, ``max_slots``, ``priority`` each."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(
            f"{PROG} start: --tenants needs Python 3.11+ (tomllib); pass --weight/--max-slots"
        ) from None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{PROG} start: cannot read --tenants {path}: {exc}") from exc
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict) or any(not isinstance(v, dict) for v in tenants.values()):
        raise ValueError(
            f"{PROG} start: {path} must hold [tenants.NAME] tables, e.g. [tenants.alice] weight = 3"
        )
    _check_tenants(tenants, str(path))
    return tenants


def _check_tenants(tenants: dict[str, dict[str, Any]], where: str) -> None:
    for name, values in tenants.items():
        unknown = set(values) - {"weight", "max_slots", "priority"}
        if unknown:
            raise ValueError(
                f"{PROG} start: tenant {name!r} in {where} has unknown keys {sorted(unknown)}; "
                "use weight, max_slots, priority."
            )
        weight, max_slots, priority = (
            values.get("weight", 1.0),
            values.get("max_slots"),
            values.get("priority", 0),
        )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(
                f"{PROG} start: tenant {name!r} weight must be a positive number, got {weight!r}."
            )
        if max_slots is not None and (
            isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots <= 0
        ):
            raise ValueError(
                f"{PROG} start: tenant {name!r} max_slots must be a positive int, got {max_slots!r}."
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"{PROG} start: tenant {name!r} priority must be an int, got {priority!r}.")


if __name__ == "__main__":
    sys.exit(main())


def _wait_until_gone(service: Any, timeout_s: float = 60.0) -> None:
    """Until the stopped service's actor has exited (it ends itself just after answering ``stop``)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(service.status.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.2)
