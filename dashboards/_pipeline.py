"""Pipeline health: what arrives, how late, what is rejected, and whether alerts get out.

Figures from the database where it holds them (stored rows, dead letters, the notification
outbox), and from the ingesters' Prometheus counters for what storage cannot show (redeliveries
dropped as duplicates, messages held before commit)."""

from __future__ import annotations

from dashboards._common import (
    PROMETHEUS,
    Grid,
    Json,
    alert_thresholds,
    by_name,
    dashboard,
    fixed_color,
    prom,
    sql,
    stat,
    table,
    timeseries,
)

UID = "pumpfleet-pipeline"


def build() -> Json:
    grid = Grid()
    panels = [
        stat(
            grid,
            "Dead letters",
            "Messages the ingester rejected and kept whole in dead_letter (nothing is dropped). "
            "Quarantined: those held for a decision rather than merely malformed, a payload "
            "naming another pump than its topic (spoofing) or a pump not in the registry.",
            [sql("pipeline.quarantine")],
            w=8,
            overrides=[
                by_name("quarantined", thresholds=alert_thresholds("red")),
                by_name("dead letters in range", thresholds=alert_thresholds("orange")),
            ],
        ),
        stat(
            grid,
            "Alert notification outbox",
            "Notifications to Alertmanager and the webhook, written in the same transaction "
            "as the alert transition. Pending at the end of the range, of which retrying (a "
            "delivery failed and will be tried again), failed for good within the range "
            "(rejected by the receiver), and the age of the oldest pending one.",
            [sql("pipeline.outbox")],
            w=10,
            overrides=[
                by_name("pending", thresholds=alert_thresholds("orange")),
                by_name("retrying", thresholds=alert_thresholds("red")),
                by_name("failed", thresholds=alert_thresholds("red")),
                by_name("oldest pending (s)", unit="s", decimals=0),
            ],
        ),
        stat(
            grid,
            "Ingesters",
            "From the ingesters' /metrics (Prometheus): 1 when every ingester reaches its broker "
            "and database, and the messages held but not yet committed (so not acknowledged).",
            [
                prom("ingest.up", "up", "A"),
                prom("ingest.pending", "pending", "B"),
            ],
            w=6,
            datasource=PROMETHEUS,
            overrides=[
                by_name(
                    "up",
                    thresholds={
                        "mode": "absolute",
                        "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
                    },
                ),
            ],
        ),
        timeseries(
            grid,
            "Stored per second",
            "Rows stored per second by arrival time: first-seen telemetry and events, and dead "
            "letters. Redeliveries are dropped before storage (see Ingester counters).",
            [sql("pipeline.stored_rate")],
            w=12,
            unit="cps",
            overrides=[by_name("dead letters", color=fixed_color("red"))],
        ),
        timeseries(
            grid,
            "Lag: device time to stored",
            "Seconds from a reading's device time to its storage, by arrival: the agent's "
            "store-and-forward while offline, the broker and the ingester together (and the "
            "device clock's error). p50, p99 and the largest per interval.",
            [sql("pipeline.lag")],
            w=12,
            unit="s",
        ),
        timeseries(
            grid,
            "Dead letters by reason",
            "Rejected messages per interval, by the class of their reason.",
            [sql("pipeline.dead_letters")],
            w=12,
            bars=True,
            stacked=True,
        ),
        timeseries(
            grid,
            "Ingester counters",
            "Per second, from the ingesters' Prometheus counters: messages received (committed "
            "and acknowledged), written for the first time, duplicates dropped (QoS 1 "
            "redeliveries already stored), statuses superseded and dead-lettered. received = "
            "written + duplicates + superseded + dead-lettered.",
            [
                prom("ingest.received_rate", "received", "A"),
                prom("ingest.written_rate", "written", "B"),
                prom("ingest.duplicates_rate", "duplicates", "C"),
                prom("ingest.superseded_rate", "statuses superseded", "D"),
                prom("ingest.dead_lettered_rate", "dead-lettered", "E"),
            ],
            w=12,
            unit="cps",
            datasource=PROMETHEUS,
        ),
        timeseries(
            grid,
            "Receive to commit",
            "Inside the ingesters (Prometheus): the 99th percentile of the time from receiving "
            "a batch's oldest message to its commit, and the last batch's; database errors in "
            "the range.",
            [
                prom("ingest.commit_p99", "p99 receive to commit", "A"),
                prom("ingest.lag", "last batch", "B"),
                prom("ingest.database_errors", "database errors (range)", "C"),
            ],
            w=12,
            unit="s",
            datasource=PROMETHEUS,
            overrides=[by_name("database errors (range)", unit="none", color=fixed_color("red"))],
        ),
        timeseries(
            grid,
            "Notifications queued, delivered, failed",
            "Alert notifications per interval: queued by a transition, delivered, rejected for "
            "good.",
            [sql("pipeline.outbox_flow")],
            w=12,
            bars=True,
            overrides=[
                by_name("failed", color=fixed_color("red")),
                by_name("delivered", color=fixed_color("green")),
            ],
        ),
        table(
            grid,
            "Notification problems",
            "Notifications not delivered at the end of the range whose last attempt failed "
            "(retrying), and those rejected for good within the range, with the receiver's "
            "error.",
            "pipeline.outbox_problems",
            w=12,
            links_pump=False,
        ),
        table(
            grid,
            "Latest dead letters",
            "The newest rejected messages in the range with the ingester's reason. The raw "
            "payload stays in the database (not readable by the dashboards' role).",
            "pipeline.dead_letters_recent",
            w=12,
        ),
    ]
    return dashboard(
        UID,
        "Pipeline health",
        "Ingest rate and lag, dead letters by reason and quarantine, duplicates, and the alert "
        "notification outbox.",
        panels,
        time_from="now-6h",
    )
