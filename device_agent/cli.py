"""`pumpfleet agent`: one agent for one simulated pump, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from pumpfleet import contract
from pumpfleet.broker import BrokerConfigError, BrokerOptions
from pumpfleet.cli import UsageError
from pumpfleet.settings import Settings

from .agent import Agent
from .clock import SimClock
from .driver import ConstantPump, PumpDriver
from .store import QueueLimits, Store, StoreError

log = logging.getLogger("device_agent")

DriverFactory = Callable[..., PumpDriver]
"""`factory(pump_id, *, start: datetime, reporting_interval_s: float) -> PumpDriver`."""

FAST_START_BACK = timedelta(days=7)


def register(subparsers: Any) -> None:
    text = "run the device agent of one simulated pump (store-and-forward to MQTT)"
    parser: argparse.ArgumentParser = subparsers.add_parser("agent", help=text, description=text)
    parser.add_argument("--pump-id", required=True, help="e.g. P-000001")
    parser.add_argument(
        "--interval-s", type=float, default=600.0, help="reporting interval (default 600)"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per real second (default 1)"
    )
    parser.add_argument(
        "--start",
        type=_utc_time,
        default=None,
        help="device clock at start, UTC ISO 8601 (default now; 7 days ago when --speed > 1)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the on-disk queue lives (default <run dir>/agents, i.e. .pumpfleet/agents)",
    )
    parser.add_argument(
        "--driver",
        default=None,
        metavar="MODULE:FACTORY",
        help="pump model factory (default: device_agent.driver:ConstantPump)",
    )
    parser.add_argument("--inflight", type=int, default=100, help="unacked publishes (100)")
    parser.add_argument(
        "--max-queue-messages", type=int, default=QueueLimits.max_messages, metavar="N"
    )
    parser.add_argument(
        "--max-queue-mb", type=float, default=QueueLimits.max_bytes / 2**20, metavar="MB"
    )
    parser.set_defaults(handler=run_agent)


def run_agent(
    args: argparse.Namespace, settings: Settings, factory: DriverFactory | None = None
) -> int:
    """The `agent` handler; `factory` (or `--driver`) plugs in another pump model."""
    pump_id = args.pump_id
    if not re.fullmatch(contract.PUMP_ID_PATTERN, pump_id):
        raise UsageError(f"--pump-id {pump_id!r}: use letters, digits, - and _ (at most 64)")
    if args.interval_s <= 0 or args.speed <= 0 or args.inflight < 1:
        raise UsageError("--interval-s, --speed and --inflight must be positive")
    try:
        broker = BrokerOptions.from_settings(settings.mqtt, pump_id)
        limits = QueueLimits(args.max_queue_messages, int(args.max_queue_mb * 2**20))
        if broker.tls:
            broker.tls_context()  # unusable TLS files: a configuration error, not a retry
    except BrokerConfigError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(f"{exc}; check the queue limits") from None
    start = args.start or (
        datetime.now(UTC) - (FAST_START_BACK if args.speed > 1 else timedelta(0))
    )
    factory = factory or (_load_factory(args.driver) if args.driver else ConstantPump)
    driver = factory(pump_id, start=start, reporting_interval_s=args.interval_s)
    state_dir = args.state_dir or settings.run_dir / "agents"
    try:
        store = Store(state_dir / f"{pump_id}.sqlite3", pump_id, limits)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    with store:
        agent = Agent(
            driver, store, broker, clock=SimClock(start, args.speed), inflight=args.inflight
        )

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
                "interval_s": args.interval_s,
                "speed": args.speed,
                "start": start.isoformat(),
            },
        )
        try:
            agent.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def _utc_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2026-01-01T00:00Z")
    return value.astimezone(UTC)


def _load_factory(spec: str) -> DriverFactory:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr or "make_driver")
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--driver {spec!r}: {exc}") from None
    if not callable(factory):
        raise UsageError(f"--driver {spec!r} is not callable")
    return factory
