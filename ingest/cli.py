"""`pumpfleet ingest`: run one ingester until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from pumpfleet.settings import Settings


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
    from ingest.service import Ingester

    ingester = Ingester(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ingester.stop)
    await ingester.run()
