"""`pumpfleet ingest` (stateless storage workers) and `pumpfleet alerting` (the rules), each
until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated, Any

import typer

from pumpfleet import cli
from pumpfleet.settings import Settings

log = logging.getLogger("pumpfleet.ingest")

URGENT_FLUSH_MS = 10
"""The urgent lane's flush interval (never longer than the main lane's)."""

app = typer.Typer()
"""`ingest` and `alerting`, two commands at the top of `pumpfleet`."""

MetricsPort = Annotated[int | None, typer.Option(help="/metrics and /healthz port")]


@app.command("ingest", help=__doc__, short_help="run the ingester (MQTT -> database)")
def _run(
    ctx: typer.Context,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (fixed per worker)")] = None,
    shared_group: Annotated[
        str | None,
        typer.Option(help="MQTT 5 shared-subscription group, to split load across workers"),
    ] = None,
    metrics_port: MetricsPort = None,
) -> None:
    settings = cli.settings(ctx, broker_account="ingest")
    updates: dict[str, Any] = {}
    if client_id:
        updates["client_id"] = client_id
    if shared_group:
        updates["shared_group"] = shared_group
    if metrics_port is not None:
        updates["metrics_port"] = metrics_port
    if updates:
        settings = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update=updates)}
        )
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    """One worker: the telemetry and status lane, and the urgent lane for events beside it."""
    from ingest._service import Ingester
    from pumpfleet.contract import Kind

    if settings.ingest.urgent_lane:
        # The main lane takes every topic (so a message on an unknown kind is still seen and
        # dead-lettered) and the urgent lane takes events again: an event is stored by whichever
        # lane has it first, and the other's copy counts as a duplicate.
        main = Ingester(settings)
        # Events are few: the urgent lane commits within URGENT_FLUSH_MS of receiving one
        # instead of gathering a batch (alert_latency_bench: p99 to Alertmanager 2.1 -> 1.2 s).
        flush_ms = min(URGENT_FLUSH_MS, settings.ingest.flush_ms)
        quiet = settings.model_copy(
            update={
                "ingest": settings.ingest.model_copy(
                    update={"metrics_port": None, "flush_ms": flush_ms}
                )
            }
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


@app.command(
    "alerting",
    help="The rules, the alert book and the notifier, apart from the ingesters. Run two or more: "
    "one is active (it holds a lease in the database), the others stand by and take over within "
    "the lease time when it stops.",
    short_help="run the alerting service (rules, alert book, notifications)",
)
def _run_alerting(ctx: typer.Context, metrics_port: MetricsPort = None) -> None:
    settings = cli.settings(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(
            update={"alerts": settings.alerts.model_copy(update={"metrics_port": metrics_port})}
        )
    asyncio.run(_serve_alerting(settings))


async def _serve_alerting(settings: Settings) -> None:
    from ingest.alerts import AlertingService

    service = AlertingService(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()
