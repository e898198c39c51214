"""The `pumpfleet` command. Each part adds its subcommands here; errors a user can cause end in
one line that says what went wrong and how to fix it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pumpfleet import contract, schema
from pumpfleet.settings import Settings, load_settings


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


Handler = Callable[[argparse.Namespace, Settings], int | None]


def _cmd(sub: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


# db ---------------------------------------------------------------------------------------------


def _db_migrate(args: argparse.Namespace, settings: Settings) -> None:
    dsn = settings.database_url.get_secret_value()
    applied = asyncio.run(schema.migrate(dsn, flavour=args.flavour))
    for mig in applied:
        print(f"applied {mig.version:04d}_{mig.name}")
    versions = asyncio.run(schema.applied_versions(dsn))
    flavour = versions[-1][2] if versions else "none"
    print(
        f"schema at version {versions[-1][0] if versions else 0} ({flavour}); "
        f"{len(applied)} applied now"
    )


# stack ------------------------------------------------------------------------------------------


def _stack_up(args: argparse.Namespace, settings: Settings) -> None:
    from pumpfleet import stack

    info = stack.up(args.run_dir or settings.run_dir)
    _print_stack(info)


def _stack_down(args: argparse.Namespace, settings: Settings) -> None:
    from pumpfleet import stack

    stack.down(args.run_dir or settings.run_dir, purge=args.purge)
    print("stack stopped" + (" and its data removed" if args.purge else ""))


def _stack_status(args: argparse.Namespace, settings: Settings) -> int:
    from pumpfleet import stack

    st = stack.status(args.run_dir or settings.run_dir)
    for line in st.lines():
        print(line)
    return 0 if st.running else 1


def _print_stack(info: Any) -> None:
    print(f"mosquitto   {info.mqtt_url}")
    print(f"postgresql  {info.database_url}")
    print(f"run dir     {info.run_dir}")
    print("environment (other shells pick these up from the run dir; export to override):")
    for key, value in info.to_env().items():
        print(f"  export {key}={value}")


# contract ---------------------------------------------------------------------------------------


def _contract_schema(args: argparse.Namespace, settings: Settings) -> None:
    for path in contract.write_json_schemas(args.out):
        print(f"wrote {path}")


def _contract_validate(args: argparse.Namespace, settings: Settings) -> int:
    data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    try:
        msg = contract.decode(args.topic, data)
    except contract.ContractError as exc:
        print(f"rejected: {exc}")
        return 1
    print(f"valid {type(msg).__name__}: pump_id={msg.pump_id} seq={msg.seq}")
    return 0


# soak -------------------------------------------------------------------------------------------


def _soak(args: argparse.Namespace, settings: Settings) -> int:
    from pumpfleet import soak

    if args.minutes <= 0:
        raise UsageError(f"--minutes {args.minutes}: give a positive number of minutes")
    cfg = soak.SoakConfig(
        seconds=args.minutes * 60,
        seed=args.seed,
        rate=args.rate,
        pumps=args.pumps,
        short=args.short,
        run_dir=args.run_dir,
        progress=lambda line: print(line, flush=True),
    )
    report = soak.run(cfg)
    print(report.table())
    return 0 if report.passed else 1


# entry point ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pumpfleet", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = top.add_parser("db", help="database schema").add_subparsers(
        required=True, metavar="ACTION"
    )
    p = _cmd(db, "migrate", _db_migrate, "apply pending schema migrations (idempotent)")
    p.add_argument(
        "--flavour",
        choices=schema.FLAVOURS,
        default=None,
        help="force a flavour (default: timescaledb if the server offers it)",
    )

    st = top.add_parser("stack", help="local mosquitto + PostgreSQL").add_subparsers(
        required=True, metavar="ACTION"
    )
    for name, handler, text in (
        ("up", _stack_up, "start mosquitto and PostgreSQL in the run directory"),
        ("down", _stack_down, "stop them"),
        ("status", _stack_status, "show whether they run, and where"),
    ):
        p = _cmd(st, name, handler, text)
        p.add_argument("--run-dir", type=Path, default=None, help="default .pumpfleet/")
        if name == "down":
            p.add_argument("--purge", action="store_true", help="also delete their data")

    ct = top.add_parser("contract", help="the wire contract").add_subparsers(
        required=True, metavar="ACTION"
    )
    p = _cmd(ct, "schema", _contract_schema, "write the JSON Schema of every message")
    p.add_argument("--out", type=Path, default=Path("docs/contract"))
    p = _cmd(ct, "validate", _contract_validate, "validate one payload as the ingester would")
    p.add_argument("topic", help="e.g. pumps/P-0001/telemetry")
    p.add_argument("file", type=Path, help="payload file, or - for standard input")

    p = _cmd(top, "soak", _soak, "the pipeline under load while seeded random faults hit it")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random, printed)")
    p.add_argument("--rate", type=float, default=300.0, help="telemetry messages per second")
    p.add_argument("--pumps", type=int, default=150, help="simulated pumps")
    p.add_argument("--short", action="store_true", help="faults of at most 6 s (the test profile)")
    p.add_argument("--run-dir", type=Path, default=None, help="keep logs here (default: temporary)")

    for register in _part_commands():
        register(top)
    return parser


def _part_commands() -> list[Callable[[Any], None]]:
    """Subcommands the other parts contribute (ingest, agent, sim, alerts)."""
    found = []
    for module in ("ingest.cli", "device_agent.cli", "sim_fleet.cli", "dashboards.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        found.append(mod.register)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    from pumpfleet import logs

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        logs.setup(args.log_level or settings.log_level)
        return int(args.handler(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for what a user can fix, a traceback for bugs
        message = user_error(exc)
        if message is None:
            raise
        print(f"pumpfleet: {message}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug."""
    from pydantic import ValidationError

    from pumpfleet import stack
    from pumpfleet.broker import BrokerConfigError

    if isinstance(exc, UsageError | stack.StackError | schema.MigrationError | BrokerConfigError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return "bad configuration: " + contract.describe(exc)
    import tomllib

    if isinstance(exc, tomllib.TOMLDecodeError):
        config = os.environ.get("PUMPFLEET_CONFIG", "pumpfleet.toml")
        return f"{config} does not parse: {exc}; fix the file (TOML) or set PUMPFLEET_CONFIG"
    if isinstance(
        exc, FileNotFoundError | IsADirectoryError | PermissionError | NotADirectoryError
    ):
        what = {
            FileNotFoundError: "no such file",
            IsADirectoryError: "a directory, not a file",
            PermissionError: "not readable",
            NotADirectoryError: "a path through a file",
        }[type(exc)]
        return f"{exc.filename}: {what}; give the path of a readable file"
    if isinstance(exc, ConnectionRefusedError | OSError) and "onnect" in str(exc):
        return (
            f"cannot connect ({exc}); is the stack running? start it with "
            "`pumpfleet stack up`, or set PUMPFLEET_DATABASE_URL / PUMPFLEET_MQTT__URL"
        )
    import asyncpg

    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"database refused the credentials: {exc}; check PUMPFLEET_DATABASE_URL"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc}; check the database name in PUMPFLEET_DATABASE_URL"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"the database has no pumpfleet schema ({exc}); run `pumpfleet db migrate` first"
    if isinstance(exc, asyncpg.exceptions._base.ClientConfigurationError):
        return f"bad database URL: {exc}; check PUMPFLEET_DATABASE_URL"
    return None


if __name__ == "__main__":
    sys.exit(main())
