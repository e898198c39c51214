"""The `pumpfleet` command: the core's commands (db, stack, contract, soak) and each part's,
found through the `pumpfleet.commands` entry points so that the core imports no part. Errors a
user can cause end in one line that says what went wrong and how to fix it, exit status 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from pumpfleet import contract, schema
from pumpfleet.settings import Settings, load_settings

if TYPE_CHECKING:
    from pumpfleet.broker import BrokerOptions

COMMANDS = "pumpfleet.commands"
"""The entry point group: each entry is a part's `typer.Typer`, merged into `pumpfleet`."""


class UsageError(typer.TyperException):
    """A problem the user can fix; printed as one line, exit status 2."""

    exit_code = 2


@dataclass
class _Run:
    log_level: str | None = None
    settings: Settings | None = None


def settings(ctx: typer.Context, *, broker_account: str | None = None) -> Settings:
    """This run's settings, with logging set up from them. Loaded when a command first asks, so
    `--help` and a bad option are answered even with a broken pumpfleet.toml. On a local stack
    the broker URL carries `broker_account`'s credentials (see `load_settings`)."""
    from pumpfleet import logs

    run = ctx.ensure_object(_Run)
    if run.settings is None:
        run.settings = load_settings(broker_account=broker_account)
        logs.setup(run.log_level or run.settings.log_level)
    return run.settings


def console(*, stderr: bool = False) -> Console:
    """Rich output: styled and fitted to a terminal; plain and never wrapped elsewhere (a pipe,
    CI, a test), so that each table row stays one parseable line. Text is printed as given: a
    pump's note with [brackets] or :colons: is not markup."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 10_000
    return Console(stderr=stderr, width=width, markup=False, emoji=False, highlight=False)


app = typer.Typer(add_completion=False)
"""The core's own commands; `command()` adds the parts'."""

RunDir = Annotated[Path | None, typer.Option(help="default .pumpfleet/")]

# db ---------------------------------------------------------------------------------------------

db = typer.Typer(name="db", help="database schema", no_args_is_help=True)
app.add_typer(db)


@db.command("migrate", help="apply pending schema migrations (idempotent)")
def _db_migrate(
    ctx: typer.Context,
    flavour: Annotated[
        schema.Flavour | None,
        typer.Option(help="force a flavour (default: timescaledb if the server offers it)"),
    ] = None,
) -> None:
    dsn = settings(ctx).database_url.get_secret_value()
    applied = asyncio.run(schema.migrate(dsn, flavour=flavour))
    for mig in applied:
        print(f"applied {mig.version:04d}_{mig.name}")
    versions = asyncio.run(schema.applied_versions(dsn))
    flavour_now = versions[-1][2] if versions else "none"
    print(
        f"schema at version {versions[-1][0] if versions else 0} ({flavour_now}); "
        f"{len(applied)} applied now"
    )


# stack ------------------------------------------------------------------------------------------

stack_app = typer.Typer(name="stack", help="local mosquitto + PostgreSQL", no_args_is_help=True)
app.add_typer(stack_app)


@stack_app.command("up", help="start mosquitto and PostgreSQL in the run directory")
def _stack_up(ctx: typer.Context, run_dir: RunDir = None) -> None:
    from pumpfleet import stack

    info = stack.up(run_dir or settings(ctx).run_dir)
    print(f"mosquitto   {info.mqtt_url} (plain), {info.mqtts_url} (TLS, CA {info.tls_ca}),")
    print(f"            {info.mqtt_mtls_url} (TLS with a client certificate)")
    print(f"postgresql  {info.database_url}")
    print(f"run dir     {info.run_dir}")
    print(
        "broker accounts (no anonymous access): pumpfleet-ingest, pumpfleet-fleet, "
        f"pumpfleet-admin; passwords in {info.run_dir / 'broker-accounts.json'}"
    )
    print("pumpfleet commands run here find the stack in the run dir; a pump needs its own")
    print("account: `pumpfleet pumps provision PUMP_ID --out DIR`, then")
    print("`pumpfleet agent --credentials DIR/PUMP_ID.json`")


@stack_app.command("down", help="stop them")
def _stack_down(
    ctx: typer.Context,
    run_dir: RunDir = None,
    purge: Annotated[bool, typer.Option("--purge", help="also delete their data")] = False,
) -> None:
    from pumpfleet import stack

    stack.down(run_dir or settings(ctx).run_dir, purge=purge)
    print("stack stopped" + (" and its data removed" if purge else ""))


@stack_app.command("status", help="show whether they run, and where")
def _stack_status(ctx: typer.Context, run_dir: RunDir = None) -> None:
    from pumpfleet import stack

    st = stack.status(run_dir or settings(ctx).run_dir)
    for line in st.lines():
        print(line)
    if not st.running:
        raise typer.Exit(1)


# pumps, broker, tls -----------------------------------------------------------------------------

pumps_app = typer.Typer(
    name="pumps",
    help="provision, revoke and list pumps (broker account + registry)",
    no_args_is_help=True,
)
app.add_typer(pumps_app)


def _admin(ctx: typer.Context) -> tuple[Settings, BrokerOptions]:
    from pumpfleet.broker import BrokerConfigError, BrokerOptions

    s = settings(ctx)
    if s.provisioning.admin_url is None:
        raise UsageError(
            "no provisioning account: set PUMPFLEET_PROVISIONING__ADMIN_URL to "
            "mqtt://pumpfleet-admin:PASSWORD@host:port, or start a local stack "
            "(`pumpfleet stack up`)"
        )
    try:
        admin = BrokerOptions.from_url(s.provisioning.admin_url.get_secret_value())
    except (BrokerConfigError, ValueError) as exc:
        raise UsageError(f"PUMPFLEET_PROVISIONING__ADMIN_URL: {exc}") from None
    return s, admin


def _provisioning(coro: Any) -> Any:
    from pumpfleet import brokerauth, provision

    try:
        return asyncio.run(coro)
    except (provision.ProvisionError, brokerauth.BrokerAuthError) as exc:
        raise UsageError(str(exc)) from None


@pumps_app.command("provision", help="register a pump and give it its own broker account")
def _pumps_provision(
    ctx: typer.Context,
    pump_id: Annotated[str, typer.Argument(help="e.g. P-000001")],
    capacity_ml: Annotated[float, typer.Option(help="reservoir: 20 or 40")] = 20.0,
    high_risk: Annotated[
        bool, typer.Option("--high-risk", help="low-reservoir alarm at 4 mL, not 2")
    ] = False,
    reporting_interval_s: Annotated[
        int, typer.Option(help="how often the pump reports, as the rules expect it")
    ] = 600,
    out: Annotated[Path, typer.Option(help="where <PUMP_ID>.json goes")] = Path("."),
    client_cert: Annotated[
        bool,
        typer.Option(
            "--client-cert", help="also issue a client certificate from the stack's development CA"
        ),
    ] = False,
    keep_existing: Annotated[
        bool,
        typer.Option(
            "--keep-existing",
            help="a pump provisioned before with its file in --out is left as it is (exit 0)",
        ),
    ] = False,
) -> None:
    from pumpfleet import contract as contract_mod
    from pumpfleet import provision

    if not re.fullmatch(contract_mod.PUMP_ID_PATTERN, pump_id):
        raise UsageError(f"{pump_id!r}: a pump id is letters, digits, - and _ (at most 64)")
    if reporting_interval_s <= 0:
        raise UsageError("--reporting-interval-s must be positive")
    s, admin = _admin(ctx)
    if keep_existing and (out / f"{pump_id}.json").is_file():
        from pumpfleet import brokerauth

        def provisioned() -> bool:
            with brokerauth.Admin(admin) as broker:
                return broker.has_pump(pump_id)

        try:
            present = provisioned()
        except brokerauth.BrokerAuthError as exc:
            raise UsageError(str(exc)) from None
        if present:
            print(f"{pump_id} is provisioned and {out / f'{pump_id}.json'} exists: left as it is")
            return
    if s.provisioning.pump_url is None:
        raise UsageError(
            "PUMPFLEET_PROVISIONING__PUMP_URL is not set: the broker URL pumps use (mqtts://...)"
        )
    ca_pem = None
    if s.provisioning.pump_ca is not None:
        try:
            ca_pem = s.provisioning.pump_ca.read_text()
        except OSError as exc:
            raise UsageError(
                f"PUMPFLEET_PROVISIONING__PUMP_CA {s.provisioning.pump_ca}: {exc.strerror}"
            ) from None
    cert = None
    if client_cert:
        cert = _dev_ca_client(s, pump_id)
    path = _provisioning(
        provision.provision(
            pump_id=pump_id,
            database_url=s.database_url.get_secret_value(),
            admin=admin,
            pump_broker_url=(client_cert and s.provisioning.pump_mtls_url)
            or s.provisioning.pump_url,
            out_dir=out,
            ca_pem=ca_pem,
            capacity_ml=capacity_ml,
            high_risk=high_risk,
            reporting_interval_s=reporting_interval_s,
            client_cert=cert,
        )
    )
    print(f"provisioned {pump_id}: credentials in {path} (keep it secret; mode 0600)")
    print(f"run its agent with `pumpfleet agent --credentials {path}`")


def _dev_ca_client(s: Settings, pump_id: str) -> tuple[Path, Path]:
    from pumpfleet import devca

    ca = devca.DevCA(s.run_dir.absolute() / "tls")
    if not ca.ca_key.is_file():
        raise UsageError(
            f"--client-cert needs the development CA in {ca.directory} (`pumpfleet stack up` "
            "makes it); with your own CA, issue the certificate there"
        )
    return ca.issue_client(pump_id)


@pumps_app.command("revoke", help="cut a pump off: the broker refuses it, the registry marks it")
def _pumps_revoke(
    ctx: typer.Context, pump_id: Annotated[str, typer.Argument(help="e.g. P-000001")]
) -> None:
    from pumpfleet import provision

    s, admin = _admin(ctx)
    had_account, had_row = _provisioning(
        provision.revoke(
            pump_id=pump_id, database_url=s.database_url.get_secret_value(), admin=admin
        )
    )
    print(
        f"revoked {pump_id}: broker account "
        + ("disabled (a connected session was cut)" if had_account else "none")
        + ", registry row "
        + ("marked revoked" if had_row else "none")
    )


@pumps_app.command("list", help="every pump the registry or the broker knows")
def _pumps_list(ctx: typer.Context) -> None:
    from rich.table import Table

    from pumpfleet import provision

    s, admin = _admin(ctx)
    records = _provisioning(
        provision.list_pumps(database_url=s.database_url.get_secret_value(), admin=admin)
    )
    table = Table("pump", "capacity mL", "high risk", "registered", "revoked", "broker account")
    for r in records:
        table.add_row(
            r.pump_id,
            f"{r.capacity_ml:g}" if r.capacity_ml is not None else "-",
            "yes" if r.high_risk else "no",
            f"{r.registered_at:%Y-%m-%d %H:%M}" if r.registered_at else "not registered",
            f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "-",
            r.broker,
        )
    console().print(table)


broker_app = typer.Typer(name="broker", help="the broker's accounts", no_args_is_help=True)
app.add_typer(broker_app)


@broker_app.command(
    "init", help="write the dynamic-security file with the service accounts (docker compose)"
)
def _broker_init(
    out: Annotated[Path, typer.Option(help="the plugin's file to write")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
) -> None:
    """Passwords from PUMPFLEET_BROKER_<ACCOUNT>_PASSWORD, e.g. PUMPFLEET_BROKER_INGEST_PASSWORD."""
    from pumpfleet import brokerauth

    if out.exists() and not force:
        print(f"{out} exists; left as it is (accounts added since are kept)")
        return
    passwords = {}
    for account in brokerauth.ACCOUNTS:
        var = f"PUMPFLEET_BROKER_{account.upper()}_PASSWORD"
        if not os.environ.get(var):
            raise UsageError(f"{var} is not set: the password of {brokerauth.ACCOUNTS[account]}")
        passwords[account] = os.environ[var]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(brokerauth.config(passwords), indent=2) + "\n")
    out.chmod(0o600)
    print(f"wrote {out}: accounts {', '.join(brokerauth.ACCOUNTS.values())}")


tls_app = typer.Typer(name="tls", help="development certificates", no_args_is_help=True)
app.add_typer(tls_app)


@tls_app.command("dev-ca", help="make a development CA and the broker's server certificate")
def _tls_dev_ca(
    out: Annotated[Path, typer.Option(help="directory for ca.crt, server.crt and their keys")],
    host: Annotated[
        list[str] | None, typer.Option(help="a name the broker is reached by (repeatable)")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option(help="also issue a client certificate (repeatable)")
    ] = None,
) -> None:
    from pumpfleet import devca

    try:
        ca = devca.ensure_ca(out, tuple(host) if host else devca.DEFAULT_HOSTS)
        issued = [ca.issue_client(name) for name in client or []]
    except devca.DevCAError as exc:
        raise UsageError(str(exc)) from None
    print(f"CA {ca.ca_cert}; server certificate {ca.server_cert} (key {ca.server_key})")
    for cert, key in issued:
        print(f"client certificate {cert} (key {key})")
    print("for development only: production brokers use certificates from the clinic's CA")


# contract ---------------------------------------------------------------------------------------

contract_app = typer.Typer(name="contract", help="the wire contract", no_args_is_help=True)
app.add_typer(contract_app)


@contract_app.command("schema", help="write the JSON Schema of every message")
def _contract_schema(out: Annotated[Path, typer.Option()] = Path("docs/contract")) -> None:
    for path in contract.write_json_schemas(out):
        print(f"wrote {path}")


@contract_app.command("validate", help="validate one payload as the ingester would")
def _contract_validate(
    topic: Annotated[str, typer.Argument(help="e.g. pumps/P-0001/telemetry")],
    file: Annotated[Path, typer.Argument(help="payload file, or - for standard input")],
) -> None:
    data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    try:
        msg = contract.decode(topic, data)
    except contract.ContractError as exc:
        print(f"rejected: {exc}")
        raise typer.Exit(1) from None
    print(f"valid {type(msg).__name__}: pump_id={msg.pump_id} seq={msg.seq}")


# soak -------------------------------------------------------------------------------------------


@app.command("soak", help="the pipeline under load while seeded random faults hit it")
def _soak(
    minutes: Annotated[float, typer.Option(help="length of the load")] = 10.0,
    seed: Annotated[
        int | None, typer.Option(help="replay a run (default: random, printed)")
    ] = None,
    rate: Annotated[float, typer.Option(help="telemetry messages per second")] = 300.0,
    pumps: Annotated[int, typer.Option(help="simulated pumps")] = 150,
    short: Annotated[
        bool, typer.Option("--short", help="faults of at most 6 s (the test profile)")
    ] = False,
    run_dir: Annotated[
        Path | None, typer.Option(help="keep logs here (default: temporary)")
    ] = None,
) -> None:
    from pumpfleet import soak

    if minutes <= 0:
        raise UsageError(f"--minutes {minutes}: give a positive number of minutes")
    cfg = soak.SoakConfig(
        seconds=minutes * 60,
        seed=seed,
        rate=rate,
        pumps=pumps,
        short=short,
        run_dir=run_dir,
        progress=lambda line: print(line, flush=True),
    )
    report = soak.run(cfg)
    print(report.table())
    if not report.passed:
        raise typer.Exit(1)


# entry point ------------------------------------------------------------------------------------


def _root(
    ctx: typer.Context,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING (default INFO)")
    ] = None,
) -> None:
    ctx.obj = _Run(log_level)


def command() -> TyperGroup:
    """The whole `pumpfleet` command: the core's commands and every part's."""
    root = typer.Typer(
        name="pumpfleet",
        help="Telemetry of implanted pump fleets: MQTT to TimescaleDB with alerting. Each "
        "command's --help says more.",
        callback=_root,
        no_args_is_help=True,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    root.add_typer(app)
    for entry in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        part = entry.load()
        if not isinstance(part, typer.Typer):
            raise TypeError(f"entry point {entry.value} ({COMMANDS}) is not a typer.Typer")
        root.add_typer(part)
    group = typer.main.get_command(root)
    assert isinstance(group, TyperGroup)  # a Typer with a callback and commands is a group
    return group


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 1 when a check or run failed; 2 for a user error; 130 when interrupted
    (typer turns Ctrl-C into that)."""
    try:
        code = command().main(args=argv, prog_name="pumpfleet", standalone_mode=False)
        return int(code or 0)
    except typer.TyperException as exc:  # a bad option, or a UsageError from a command
        if type(exc).__name__ == "NoArgsIsHelpError":  # printed the help; typer checks so too
            return exc.exit_code
        message = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see `{ctx.command_path} --help`)"
        print(f"pumpfleet: {message}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # one line for what a user can fix, a traceback for bugs
        text = user_error(exc)
        if text is None:
            raise
        print(f"pumpfleet: {text}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug."""
    from pydantic import ValidationError

    from pumpfleet import stack
    from pumpfleet.broker import BrokerConfigError

    if isinstance(exc, stack.StackError | schema.MigrationError | BrokerConfigError):
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
    # `python -m pumpfleet.cli` runs this file as __main__: run the module the parts import
    # instead, so that there is one UsageError and one settings() and not two copies.
    from pumpfleet.cli import main as _main

    sys.exit(_main())
