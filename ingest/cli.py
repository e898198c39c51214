"""`pumpfleet ingest`: run one ingester until SIGTERM or SIGINT."""

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
    """The ingester, with alerting beside it unless alerts are disabled."""
    from ingest.alerts.service import Alerting, build_engine
    from ingest.service import Ingester

    alerting: Alerting | None = None
    if settings.alerts.enabled:
        alerting = Alerting(settings, build_engine(settings))
        await alerting.start()  # open alerts, profiles and rule state before the first message
    ingester = Ingester(settings, alerting.on_commit if alerting else None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ingester.stop)
    if alerting is None:
        await ingester.run()
        return
    alerts_task = asyncio.create_task(alerting.run(), name="alerting")

    def _alerting_died(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("alerting failed; stopping the ingester", exc_info=task.exception())
            ingester.stop()  # loud: a supervisor restarts us, rather than ingesting unwatched

    alerts_task.add_done_callback(_alerting_died)
    try:
        await ingester.run()  # returns after its last batch (and so its last on_commit)
    finally:
        alerting.stop()
        await alerts_task
