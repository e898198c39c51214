"""`pumpfleet agent`: one agent for one simulated pump, until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from pumpfleet import cli, contract
from pumpfleet.broker import BrokerConfigError, BrokerOptions
from pumpfleet.provision import ProvisionError, read_credentials
from pumpfleet.settings import Settings

from ._agent import Agent
from ._clock import SimClock
from ._driver import ConstantPump, PumpDriver
from ._store import QueueLimits, Store, StoreError

log = logging.getLogger("device_agent")

DriverFactory = Callable[..., PumpDriver]
"""`factory(pump_id, *, start: datetime, reporting_interval_s: float) -> PumpDriver`."""

FAST_START_BACK = timedelta(days=7)

app = typer.Typer()
"""`agent`, one command at the top of `pumpfleet`."""


@dataclass(frozen=True)
class AgentOptions:
    """What `pumpfleet agent` was asked for; the defaults are the command's."""

    pump_id: str | None = None
    interval_s: float = 600.0
    speed: float = 1.0
    start: datetime | None = None
    state_dir: Path | None = None
    driver: str | None = None
    inflight: int = 100
    max_queue_messages: int = QueueLimits.max_messages
    max_queue_mb: float = QueueLimits.max_bytes / 2**20
    credentials: Path | None = None


def _utc_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise typer.BadParameter(f"{text!r} needs a UTC offset, e.g. 2026-01-01T00:00Z")
    return value.astimezone(UTC)


@app.command("agent", help="run the device agent of one simulated pump (store-and-forward to MQTT)")
def _agent(
    ctx: typer.Context,
    pump_id: Annotated[
        str | None, typer.Option(help="e.g. P-000001 (default: the credentials file's)")
    ] = None,
    interval_s: Annotated[float, typer.Option(help="reporting interval")] = AgentOptions.interval_s,
    speed: Annotated[
        float, typer.Option(help="simulated seconds per real second")
    ] = AgentOptions.speed,
    start: Annotated[
        datetime | None,
        typer.Option(
            parser=_utc_time,
            help="device clock at start, UTC ISO 8601 (default now; 7 days ago when --speed > 1)",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="where the on-disk queue lives (default <run dir>/agents, i.e. .pumpfleet/agents)"
        ),
    ] = None,
    driver: Annotated[
        str | None,
        typer.Option(
            metavar="MODULE:FACTORY",
            help="pump model factory (default: device_agent:ConstantPump)",
        ),
    ] = None,
    inflight: Annotated[int, typer.Option(help="unacked publishes")] = AgentOptions.inflight,
    max_queue_messages: Annotated[int, typer.Option(metavar="N")] = AgentOptions.max_queue_messages,
    max_queue_mb: Annotated[float, typer.Option(metavar="MB")] = AgentOptions.max_queue_mb,
    credentials: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="the pump's broker credentials, from `pumpfleet pumps provision`",
        ),
    ] = None,
) -> None:
    options = AgentOptions(
        pump_id=pump_id,
        interval_s=interval_s,
        speed=speed,
        start=start,
        state_dir=state_dir,
        driver=driver,
        inflight=inflight,
        max_queue_messages=max_queue_messages,
        max_queue_mb=max_queue_mb,
        credentials=credentials,
    )
    run_agent(options, cli.settings(ctx))


def run_agent(
    options: AgentOptions, settings: Settings, factory: DriverFactory | None = None
) -> None:
    """`pumpfleet agent` from code; `factory` (or `driver`) plugs in another pump model."""
    o = options
    creds = None
    if o.credentials is not None:
        try:
            creds = read_credentials(o.credentials)
        except ProvisionError as exc:
            raise cli.UsageError(f"--credentials: {exc}") from None
        if o.pump_id is not None and o.pump_id != creds.pump_id:
            raise cli.UsageError(
                f"--pump-id {o.pump_id} but {o.credentials} is pump {creds.pump_id}'s; "
                "drop --pump-id or use that pump's file"
            )
        o = replace(o, pump_id=creds.pump_id)
    if o.pump_id is None:
        raise cli.UsageError("give --pump-id, or --credentials with the pump's file")
    pump_id = o.pump_id
    if not re.fullmatch(contract.PUMP_ID_PATTERN, pump_id):
        raise cli.UsageError(f"--pump-id {pump_id!r}: use letters, digits, - and _ (at most 64)")
    if o.interval_s <= 0 or o.speed <= 0 or o.inflight < 1:
        raise cli.UsageError("--interval-s, --speed and --inflight must be positive")
    try:
        if creds is not None and o.credentials is not None:
            broker = creds.broker_options(settings.mqtt.keepalive_s, o.credentials.parent)
        else:
            broker = BrokerOptions.from_settings(settings.mqtt, pump_id)
        limits = QueueLimits(o.max_queue_messages, int(o.max_queue_mb * 2**20))
        if broker.tls:
            broker.tls_context()  # unusable TLS files: a configuration error, not a retry
    except BrokerConfigError as exc:
        raise cli.UsageError(str(exc)) from None
    except ValueError as exc:
        raise cli.UsageError(f"{exc}; check the queue limits") from None
    start = o.start or (datetime.now(UTC) - (FAST_START_BACK if o.speed > 1 else timedelta(0)))
    factory = factory or (_load_factory(o.driver) if o.driver else ConstantPump)
    driver = factory(pump_id, start=start, reporting_interval_s=o.interval_s)
    state_dir = o.state_dir or settings.run_dir / "agents"
    try:
        store = Store(state_dir / f"{pump_id}.sqlite3", pump_id, limits)
    except StoreError as exc:
        raise cli.UsageError(str(exc)) from None
    with store:
        agent = Agent(driver, store, broker, clock=SimClock(start, o.speed), inflight=o.inflight)

        def stop(signum: int, frame: FrameType | None) -> None:
            agent.request_stop()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "agent starting",
            extra={
                "pump_id": pump_id,
                "broker": broker.url,
                "state": store.path,
                "backlog": len(store),
                "next_seq": store.next_seq,
                "interval_s": o.interval_s,
                "speed": o.speed,
                "start": start.isoformat(),
            },
        )
        try:
            agent.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _load_factory(spec: str) -> DriverFactory:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr or "make_driver")
    except (ImportError, AttributeError) as exc:
        raise cli.UsageError(f"--driver {spec!r}: {exc}") from None
    if not callable(factory):
        raise cli.UsageError(f"--driver {spec!r} is not callable")
    return factory
