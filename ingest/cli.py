"""`pumpfleet ingest` (stateless storage workers) and `pumpfleet alerting` (the rules), each
until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from pumpfleet.settings import Settings

log = logging.getLogger("pumpfleet.ingest")


def register(sub: Any) -> None:
    p = sub.add_parser("ingest", help="run the ingester (MQTT -> database)", description=__doc__)
    p.add_argument("--client-id", default=None, help="MQTT client id (fixed per worker)")
    p.add_argument(
        "--shared-group",
        default=None,
        help="MQTT 5 shared-subscription group, to split load across workers",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="/metrics and /healthz port")
    p.set_defaults(handler=_run)

    p = sub.add_parser(
        "alerting",
        help="run the alerting service (rules, alert book, notifications)",
        description="The rules, the alert book and the notifier, apart from the ingesters. Run "
        "two or more: one is active (it holds a lease in the database), the others stand by and "
        "take over within the lease time when it stops.",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="/metrics and /healthz port")
    p.set_defaults(handler=_run_alerting)

    from ingest.alerts.cli import register as register_alerts

    register_alerts(sub)


def _run(args: argparse.Namespace, settings: Settings) -> None:

    updates: dict[str, Any] = {}
    if args.client_id:
        updates["client_id"] = args.client_id
    if args.shared_group:
        updates["shared_group"] = args.shared_group
    if args.metrics_port is not None:
        updates["metrics_port"] = args.metrics_port
    if updates:
        settings = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update=updates)}
        )
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    """One worker: the telemetry and status lane, and the urgent lane for events beside it."""
    from ingest.service import Ingester
    from pumpfleet.contract import Kind

    if settings.ingest.urgent_lane:
        # The main lane takes every topic (so a message on an unknown kind is still seen and
        # dead-lettered) and the urgent lane takes events again: an event is stored by whichever
        # lane has it first, and the other's copy counts as a duplicate.
        main = Ingester(settings)
        quiet = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update={"metrics_port": None})}
        )
        urgent = Ingester(quiet, kinds=(Kind.EVENT,), lane="urgent", stats=main.stats)
        main.partners.append(urgent)
        lanes = [main, urgent]
    else:
        lanes = [Ingester(settings)]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for lane in lanes:
            lane.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(lane.run(), name=f"ingest-{lane.lane}") for lane in lanes]
    try:
        # A lane that fails takes the worker down (a supervisor restarts it) rather than
        # leaving it half-working; each lane commits and acks what it holds before it returns.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                log.error("ingest lane failed; stopping the worker", exc_info=t.exception())
    finally:
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_alerting(args: argparse.Namespace, settings: Settings) -> None:
    if args.metrics_port is not None:
        settings = settings.model_copy(
            update={
                "alerts": settings.alerts.model_copy(update={"metrics_port": args.metrics_port})
            }
        )
    asyncio.run(_serve_alerting(settings))


async def _serve_alerting(settings: Settings) -> None:
    from ingest.alerts.service import AlertingService

    service = AlertingService(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()
