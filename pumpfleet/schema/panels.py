"""The SQL behind every dashboard figure, in Grafana's PostgreSQL dialect, and `expand()`, which
turns it into plain SQL the way Grafana does.

One home for these figures: dashboards/ puts each query in a panel, the tests run them against a
database a simulated fleet filled (and on TimescaleDB), and anything else that draws the same
figures imports them from here rather than writing its own.

The text keeps Grafana's macros (`$__timeFilter(col)`, `$__timeGroupAlias(col, $__interval)`,
`$__timeFrom()`, `$__timeTo()`, `$__interval_ms`) and template variables (`$clinic`, a multi-value
list for `IN (...)`; `${pump:sqlstring}`, one quoted pump id). The macros expand to plain SQL
(the datasource is provisioned with `timescaledb: false`, so `$__timeGroup` is
`floor(extract(epoch ...))`, not `time_bucket`) and every table and view has the same name on
TimescaleDB and plain PostgreSQL, so each query runs unchanged on both.

Conventions:
- "Now" is the end of the selected range (`$__timeTo()`), never `now()`: the fleet overview shows
  the fleet as it was at the end of the range (with the default range, now), and a result depends
  on the range alone. Device times are used as stored.
- Telemetry series read raw readings for ranges up to `RAW_MAX` and the hourly aggregate
  (`telemetry_hourly`: a continuous aggregate on TimescaleDB, a view on PostgreSQL) beyond:
  both branches are in the query, and a condition on the range length, constant for the query,
  leaves one of them unexecuted.
- Every query orders its rows completely, so two databases give the same rows in the same order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

__all__ = [
    "EOS_AFTER_ERI_DAYS",
    "LABELLED_FLOW_ACCURACY",
    "PROMQL",
    "RAW_MAX",
    "SQL",
    "ExpandError",
    "Query",
    "expand",
    "interval_for",
]

RAW_MAX = timedelta(days=2)
"""Longest range read from raw telemetry; longer ones read the hourly aggregate."""
LABELLED_FLOW_ACCURACY = 0.145
"""The pumps' labelled flow accuracy (domain.md): the band drawn around the programmed rate."""
EOS_AFTER_ERI_DAYS = 90
"""A pump stops (EOS) 90 days after its elective replacement indicator (domain.md)."""
SILENT_AFTER_INTERVALS = 3
"""A pump is silent after this many reporting intervals without a reading (the silence rule's
first step)."""
LOOKBACK = "30 days"
"""How far back the fleet panels look for a pump's latest reading; older ones count as none."""
LATE_ARRIVALS = "14 days"
"""Pipeline panels bound the device time of the rows they count by arrival to this much before
the range (so that a hypertable's old chunks are not scanned); later arrivals are not counted."""

Format = Literal["table", "time_series"]


@dataclass(frozen=True)
class Query:
    sql: str
    format: Format = "table"
    """Grafana's result format: `time_series` needs a `time` column and sorted rows."""


# Shared fragments -------------------------------------------------------------------------------

_TO = "$__timeTo()::timestamptz"
_FROM = "$__timeFrom()::timestamptz"
_RANGE = f"{_TO} - {_FROM}"
_SHORT = f"{_RANGE} <= INTERVAL '{int(RAW_MAX.total_seconds())} seconds'"
_LONG = f"{_RANGE} > INTERVAL '{int(RAW_MAX.total_seconds())} seconds'"
_PUMP = "${pump:sqlstring}"
_PRIORITY_RANK = "array_position(ARRAY['high', 'medium', 'low', 'info'], {col})"


def _latest(where: str = "p.clinic IN ($clinic)") -> str:
    """Every registered pump `where` says, with its latest reading at or before the end of the
    range and its agent's retained status."""
    return f"""
    SELECT p.pump_id, p.clinic, p.high_risk,
           coalesce(t.reporting_interval_s, p.reporting_interval_s) AS interval_s,
           t.time, t.pump_state, t.alarms, t.reservoir_ml,
           greatest(t.low_reservoir_alarm_ml, p.low_reservoir_alarm_ml) AS alarm_ml,
           t.programmed_dose_mcg_per_day / t.concentration_mcg_per_ml AS ml_per_day,
           t.battery_pct, t.battery_eri, t.eri_since,
           coalesce(t.reservoir_source, 'calculated') AS reservoir_source,
           s.online
    FROM pumps p
    LEFT JOIN LATERAL (
        SELECT x.* FROM telemetry x
        WHERE x.pump_id = p.pump_id AND x.time <= $__timeTo()
          AND x.time > {_TO} - INTERVAL '{LOOKBACK}'
        ORDER BY x.time DESC, x.seq DESC
        LIMIT 1) t ON true
    LEFT JOIN pump_status s ON s.pump_id = p.pump_id
    WHERE {where}"""


_SILENT = (
    f"(l.time IS NULL OR l.time <= {_TO} - "
    f"{SILENT_AFTER_INTERVALS} * l.interval_s * INTERVAL '1 second')"
)

# Days until the programmed schedule brings the reservoir down to its alarm volume (0: already
# there); NULL when nothing is programmed.
_DAYS_TO_ALARM = """CASE WHEN l.reservoir_ml <= l.alarm_ml THEN 0
                         WHEN l.ml_per_day > 0 THEN (l.reservoir_ml - l.alarm_ml) / l.ml_per_day
                    END"""

# Open at the end of the range, with the priority it had then (from the history).
_OPEN_ALERTS = f"""
    SELECT a.alert_id, a.pump_id, a.rule, a.summary, a.started_at, a.escalated_at,
           coalesce(a.clinic, p.clinic, 'unassigned') AS clinic,
           coalesce((SELECT h.priority FROM alert_history h
                     WHERE h.alert_id = a.alert_id AND h.at <= $__timeTo()
                       AND h.phase IN ('start', 'escalate', 'de-escalate')
                     ORDER BY h.at DESC, h.id DESC LIMIT 1), a.priority) AS priority,
           CASE WHEN a.acked_at <= {_TO} THEN a.acked_by END AS acked_by,
           CASE WHEN a.acked_at <= {_TO} THEN a.acked_at END AS acked_at
    FROM alerts a
    LEFT JOIN pumps p ON p.pump_id = a.pump_id
    WHERE a.started_at <= $__timeTo() AND (a.ended_at IS NULL OR a.ended_at > $__timeTo())"""

# Dead-letter reasons, as the contract (pumpfleet/contract.py) and the ingester word them, in a
# few classes a chart can stack.
_REASON_CLASS = """CASE
        WHEN reason LIKE '%(spoofing)' THEN 'spoofing'
        WHEN reason LIKE 'pump_id: not in the pump registry%' THEN 'unknown pump'
        WHEN reason LIKE 'quarantine: %' THEN 'quarantine'
        WHEN reason LIKE 'rate limited: %' THEN 'rate limited'
        WHEN reason LIKE 'database refused%' THEN 'database refused'
        WHEN reason LIKE 'topic %' THEN 'bad topic'
        WHEN reason LIKE 'payload: % bytes exceeds%' THEN 'too large'
        WHEN reason LIKE 'payload: Invalid JSON%' THEN 'not JSON'
        ELSE 'contract breach' END"""
QUARANTINED = ("spoofing", "unknown pump", "quarantine")
"""Dead-letter classes held for a decision, not merely malformed: the message may be genuine
(a pump not yet provisioned, or revoked) or an attack (a payload naming another pump)."""
_QUARANTINED = ", ".join(f"'{c}'" for c in QUARANTINED)

_OUTBOX_PENDING = (
    f"created_at <= {_TO} AND (delivered_at IS NULL OR delivered_at > {_TO}) "
    f"AND (failed_at IS NULL OR failed_at > {_TO})"
)


# The queries ------------------------------------------------------------------------------------

SQL: dict[str, Query] = {
    # Template variables.
    "var.clinic": Query("SELECT DISTINCT clinic FROM pumps ORDER BY 1"),
    "var.pump": Query("SELECT pump_id FROM pumps WHERE clinic IN ($clinic) ORDER BY 1"),
    # Fleet overview ----------------------------------------------------------------------------
    "fleet.reporting": Query(
        f"""WITH l AS ({_latest()})
SELECT count(*) FILTER (WHERE NOT {_SILENT}) AS "reporting",
       count(*) FILTER (WHERE {_SILENT}) AS "silent",
       count(*) FILTER (WHERE l.online IS FALSE) AS "offline (last will)"
FROM l"""
    ),
    "fleet.open_alerts": Query(
        f"""WITH a AS ({_OPEN_ALERTS})
SELECT count(*) FILTER (WHERE priority = 'high') AS "high",
       count(*) FILTER (WHERE priority = 'medium') AS "medium",
       count(*) FILTER (WHERE priority = 'low') AS "low",
       count(*) FILTER (WHERE priority = 'info') AS "standing notices"
FROM a WHERE clinic IN ($clinic)"""
    ),
    "fleet.silent": Query(
        f"""WITH l AS ({_latest()})
SELECT l.pump_id AS "pump", l.clinic, l.time AS "last reading",
       extract(epoch FROM {_TO} - l.time)::float8 / 3600 AS "silent for (h)",
       l.interval_s / 60.0 AS "interval (min)",
       CASE WHEN l.online THEN 'online' WHEN l.online IS FALSE THEN 'offline' ELSE 'unknown' END
           AS "agent"
FROM l WHERE {_SILENT}
ORDER BY l.time NULLS FIRST, l.pump_id"""
    ),
    "fleet.not_infusing": Query(
        f"""WITH l AS ({_latest()})
SELECT l.pump_id AS "pump", l.clinic, l.pump_state AS "state",
       array_to_string(l.alarms, ', ') AS "alarms", l.time AS "last reading"
FROM l WHERE l.pump_state <> 'infusing'
ORDER BY array_position(ARRAY['stalled', 'stopped', 'suspended'], l.pump_state), l.pump_id"""
    ),
    "fleet.closest_to_empty": Query(
        f"""WITH l AS ({_latest()}), d AS (
    SELECT l.*, {_DAYS_TO_ALARM} AS days FROM l WHERE l.time IS NOT NULL)
SELECT pump_id AS "pump", clinic, reservoir_ml AS "reservoir (mL)", alarm_ml AS "alarm at (mL)",
       ml_per_day AS "programmed (mL/day)", days AS "days to alarm volume",
       {_TO} + days * INTERVAL '1 day' AS "alarm volume reached", high_risk AS "high risk"
FROM d
ORDER BY days NULLS LAST, reservoir_ml, pump_id
LIMIT 20"""
    ),
    "fleet.refills_due": Query(
        f"""WITH l AS ({_latest()}), d AS (
    SELECT l.*, {_DAYS_TO_ALARM} AS days FROM l WHERE l.time IS NOT NULL)
SELECT d.pump_id AS "pump", d.clinic, d.days AS "days to alarm volume",
       {_TO} + d.days * INTERVAL '1 day' AS "refill by",
       d.reservoir_ml AS "reservoir (mL)", d.high_risk AS "high risk",
       (SELECT a.priority FROM alerts a
        WHERE a.pump_id = d.pump_id AND a.rule = 'refill_due' AND a.started_at <= $__timeTo()
          AND (a.ended_at IS NULL OR a.ended_at > $__timeTo())
        ORDER BY a.started_at DESC LIMIT 1) AS "refill_due alert"
FROM d WHERE d.days <= 7
ORDER BY d.days, d.pump_id"""
    ),
    "fleet.battery": Query(
        f"""WITH l AS ({_latest()})
SELECT l.pump_id AS "pump", l.clinic, l.battery_pct AS "battery (%)", l.eri_since AS "ERI since",
       greatest(0, {EOS_AFTER_ERI_DAYS} - extract(epoch FROM {_TO} - l.eri_since)::float8 / 86400)
           AS "days to EOS",
       l.eri_since + INTERVAL '{EOS_AFTER_ERI_DAYS} days' AS "EOS expected"
FROM l WHERE l.battery_eri
ORDER BY 5 NULLS FIRST, l.pump_id"""
    ),
    "fleet.flow_not_observable": Query(
        f"""WITH l AS ({_latest()})
SELECT l.pump_id AS "pump", l.clinic, l.reservoir_source AS "reservoir volume",
       EXISTS (SELECT 1 FROM alerts a
               WHERE a.pump_id = l.pump_id AND a.rule = 'flow_not_observable'
                 AND a.started_at <= $__timeTo()
                 AND (a.ended_at IS NULL OR a.ended_at > $__timeTo())) AS "notice open",
       l.time AS "last reading"
FROM l WHERE l.time IS NOT NULL AND l.reservoir_source <> 'measured'
ORDER BY l.pump_id"""
    ),
    # Pump detail -------------------------------------------------------------------------------
    "pump.now": Query(
        f"""WITH l AS ({_latest(f"p.pump_id = {_PUMP}")})
SELECT l.reservoir_ml AS "reservoir (mL)", {_DAYS_TO_ALARM} AS "days to alarm volume",
       l.battery_pct AS "battery (%)", l.pump_state AS "state",
       l.reservoir_source AS "reservoir volume", l.time AS "last reading"
FROM l"""
    ),
    "pump.reservoir": Query(
        f"""WITH r AS (
    SELECT t.time, t.reservoir_ml,
           coalesce(t.scheduled_ul_per_h, t.programmed_rate_ul_per_h) AS programmed_ul_per_h,
           (SELECT count(*) FROM events e
            WHERE e.pump_id = t.pump_id AND e.event = 'refill'
              AND e.time > {_FROM} AND e.time <= t.time) AS segment
    FROM telemetry t
    WHERE t.pump_id = {_PUMP} AND $__timeFilter(t.time) AND {_SHORT}
    UNION ALL
    SELECT h.bucket, h.reservoir_ml_last, h.programmed_rate_ul_per_h_avg,
           (SELECT count(*) FROM events e
            WHERE e.pump_id = h.pump_id AND e.event = 'refill'
              AND e.time > {_FROM} AND e.time < h.bucket + INTERVAL '1 hour')
    FROM telemetry_hourly h
    WHERE h.pump_id = {_PUMP} AND $__timeFilter(h.bucket) AND {_LONG}
), s AS (
    SELECT time, reservoir_ml, segment,
           programmed_ul_per_h * extract(epoch FROM time - lag(time) OVER w)::float8 / 3.6e6
               AS programmed_ml
    FROM r WINDOW w AS (PARTITION BY segment ORDER BY time)
)
SELECT time AS "time", reservoir_ml AS "reservoir",
       first_value(reservoir_ml) OVER w - coalesce(sum(programmed_ml) OVER w, 0)
           AS "programmed projection"
FROM s WINDOW w AS (PARTITION BY segment ORDER BY time)
ORDER BY 1""",
        "time_series",
    ),
    "pump.delivery": Query(
        f"""SELECT $__timeGroupAlias(time, $__interval),
       avg(delivered_ul_per_h) AS "delivered",
       avg(coalesce(scheduled_ul_per_h, programmed_rate_ul_per_h)) AS "programmed",
       avg(coalesce(scheduled_ul_per_h, programmed_rate_ul_per_h)) * {1 + LABELLED_FLOW_ACCURACY}
           AS "programmed +{LABELLED_FLOW_ACCURACY:.1%}",
       avg(coalesce(scheduled_ul_per_h, programmed_rate_ul_per_h)) * {1 - LABELLED_FLOW_ACCURACY}
           AS "programmed -{LABELLED_FLOW_ACCURACY:.1%}"
FROM telemetry
WHERE pump_id = {_PUMP} AND $__timeFilter(time) AND {_SHORT}
GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(bucket, $__interval),
       sum(delivered_ul_per_h_avg * samples) / sum(samples),
       sum(programmed_rate_ul_per_h_avg * samples) / sum(samples),
       sum(programmed_rate_ul_per_h_avg * samples) / sum(samples) * {1 + LABELLED_FLOW_ACCURACY},
       sum(programmed_rate_ul_per_h_avg * samples) / sum(samples) * {1 - LABELLED_FLOW_ACCURACY}
FROM telemetry_hourly
WHERE pump_id = {_PUMP} AND $__timeFilter(bucket) AND {_LONG}
GROUP BY 1
ORDER BY 1""",
        "time_series",
    ),
    "pump.battery": Query(
        f"""SELECT $__timeGroupAlias(time, $__interval), avg(battery_pct) AS "battery"
FROM telemetry
WHERE pump_id = {_PUMP} AND $__timeFilter(time) AND {_SHORT}
GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(bucket, $__interval), min(battery_pct_min)
FROM telemetry_hourly
WHERE pump_id = {_PUMP} AND $__timeFilter(bucket) AND {_LONG}
GROUP BY 1
ORDER BY 1""",
        "time_series",
    ),
    "pump.refills": Query(
        f"""SELECT e.time AS "time", (e.body->>'expected_ml')::float8 AS "expected (mL)",
       (e.body->>'withdrawn_ml')::float8 AS "withdrawn (mL)",
       (e.body->>'expected_ml')::float8 - (e.body->>'withdrawn_ml')::float8 AS "discrepancy (mL)",
       (e.body->>'injected_ml')::float8 AS "injected (mL)",
       (e.body->>'reservoir_after_ml')::float8 AS "after (mL)",
       coalesce(e.body->>'expected_source', 'calculated') AS "expected from",
       (SELECT string_agg(a.rule || ' (' || a.priority || ')', ', ' ORDER BY a.started_at)
        FROM alerts a
        WHERE a.pump_id = e.pump_id AND a.rule IN ('refill_discrepancy', 'pocket_fill')
          AND a.started_at >= e.time AND a.started_at < e.time + INTERVAL '1 hour') AS "alerts"
FROM events e
WHERE e.pump_id = {_PUMP} AND e.event = 'refill' AND $__timeFilter(e.time)
ORDER BY e.time DESC, e.seq DESC"""
    ),
    "pump.alerts": Query(
        f"""SELECT a.started_at AS "started", a.rule, a.priority, a.phase,
       a.ended_at AS "ended", a.acked_by AS "acknowledged by", a.summary
FROM alerts a
WHERE a.pump_id = {_PUMP} AND a.started_at <= $__timeTo()
  AND (a.ended_at IS NULL OR a.ended_at >= $__timeFrom())
ORDER BY a.ended_at IS NULL DESC, {_PRIORITY_RANK.format(col="a.priority")}, a.started_at DESC,
         a.alert_id"""
    ),
    "pump.annotations.events": Query(
        f"""SELECT e.time AS "time",
       e.event || coalesce(': ' || (e.body->>'alarm'), '')
           || CASE WHEN e.event = 'refill' THEN ': expected ' || (e.body->>'expected_ml')
                   || ' mL, withdrawn ' || (e.body->>'withdrawn_ml') || ' mL, injected '
                   || (e.body->>'injected_ml') || ' mL' ELSE '' END AS "text",
       'event,' || e.event AS "tags"
FROM events e
WHERE e.pump_id = {_PUMP} AND $__timeFilter(e.time)
ORDER BY e.time, e.seq"""
    ),
    "pump.annotations.alerts": Query(
        f"""SELECT h.at AS "time",
       a.rule || ' ' || h.phase || ' (' || h.priority || ')'
           || coalesce(' by ' || nullif(h.actor, 'rules'), '')
           || CASE WHEN h.phase = 'start' THEN ': ' || a.summary ELSE '' END
           || coalesce(' - ' || h.note, '') AS "text",
       'alert,' || h.priority || ',' || a.rule AS "tags"
FROM alert_history h JOIN alerts a ON a.alert_id = h.alert_id
WHERE a.pump_id = {_PUMP} AND $__timeFilter(h.at) AND h.phase <> 'continue'
ORDER BY h.at, h.id"""
    ),
    # Alerts ------------------------------------------------------------------------------------
    "alerts.state": Query(
        f"""WITH o AS ({_OPEN_ALERTS})
SELECT (SELECT count(*) FROM o WHERE o.acked_by IS NULL AND o.clinic IN ($clinic)
          AND o.priority IN ($priority)) AS "open, not acknowledged",
       (SELECT count(*) FROM o WHERE o.acked_by IS NOT NULL AND o.clinic IN ($clinic)
          AND o.priority IN ($priority)) AS "acknowledged",
       (SELECT count(*) FROM alerts a LEFT JOIN pumps p ON p.pump_id = a.pump_id
        WHERE $__timeFilter(a.ended_at) AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic)
          AND a.priority IN ($priority)) AS "ended",
       (SELECT count(*) FROM alerts a LEFT JOIN pumps p ON p.pump_id = a.pump_id
        WHERE $__timeFilter(a.escalated_at)
          AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic)
          AND a.priority IN ($priority)) AS "escalated unacknowledged"
"""
    ),
    "alerts.open": Query(
        f"""WITH o AS ({_OPEN_ALERTS})
SELECT o.alert_id AS "alert", o.priority, o.pump_id AS "pump", o.clinic, o.rule,
       o.started_at AS "started", extract(epoch FROM {_TO} - o.started_at)::float8 / 60
           AS "open for (min)",
       o.acked_by AS "acknowledged by", o.acked_at AS "acknowledged",
       o.escalated_at AS "escalated", o.summary
FROM o WHERE o.clinic IN ($clinic) AND o.priority IN ($priority)
ORDER BY {_PRIORITY_RANK.format(col="o.priority")}, o.acked_by IS NOT NULL, o.started_at,
         o.alert_id"""
    ),
    "alerts.started": Query(
        """SELECT $__timeGroupAlias(a.started_at, $__interval), a.priority AS "metric",
       count(*) AS "started"
FROM alerts a LEFT JOIN pumps p ON p.pump_id = a.pump_id
WHERE $__timeFilter(a.started_at) AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic)
  AND a.priority IN ($priority)
GROUP BY 1, 2
ORDER BY 1, 2""",
        "time_series",
    ),
    "alerts.history": Query(
        """SELECT h.at AS "time", h.alert_id AS "alert", a.pump_id AS "pump", a.rule, h.phase,
       h.priority, h.actor, h.note
FROM alert_history h JOIN alerts a ON a.alert_id = h.alert_id
LEFT JOIN pumps p ON p.pump_id = a.pump_id
WHERE $__timeFilter(h.at) AND h.phase <> 'continue'
  AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic) AND h.priority IN ($priority)
ORDER BY h.at DESC, h.id DESC
LIMIT 2000"""
    ),
    "alerts.response_times": Query(
        f"""SELECT a.priority, count(*) AS "started", count(a.acked_at) AS "acknowledged",
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM a.acked_at - a.started_at)::float8 / 60)
           AS "to acknowledge, median (min)",
       percentile_cont(0.9) WITHIN GROUP (
           ORDER BY extract(epoch FROM a.acked_at - a.started_at)::float8 / 60)
           AS "to acknowledge, p90 (min)",
       count(a.ended_at) AS "ended",
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM a.ended_at - a.started_at)::float8 / 60)
           AS "to end, median (min)",
       percentile_cont(0.9) WITHIN GROUP (
           ORDER BY extract(epoch FROM a.ended_at - a.started_at)::float8 / 60)
           AS "to end, p90 (min)"
FROM alerts a LEFT JOIN pumps p ON p.pump_id = a.pump_id
WHERE $__timeFilter(a.started_at) AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic)
  AND a.priority IN ($priority)
GROUP BY a.priority
ORDER BY {_PRIORITY_RANK.format(col="a.priority")}"""
    ),
    "alerts.escalations": Query(
        """SELECT h.at AS "time", h.alert_id AS "alert", a.pump_id AS "pump", a.rule,
       h.priority AS "to priority",
       CASE WHEN h.actor = 'escalation' THEN 'not acknowledged in time'
            ELSE 'condition worsened' END AS "why",
       extract(epoch FROM h.at - a.started_at)::float8 / 60 AS "after (min)",
       a.acked_by AS "acknowledged by"
FROM alert_history h JOIN alerts a ON a.alert_id = h.alert_id
LEFT JOIN pumps p ON p.pump_id = a.pump_id
WHERE h.phase = 'escalate' AND $__timeFilter(h.at)
  AND coalesce(a.clinic, p.clinic, 'unassigned') IN ($clinic) AND h.priority IN ($priority)
ORDER BY h.at DESC, h.id DESC
LIMIT 2000"""
    ),
    # Pipeline health ---------------------------------------------------------------------------
    "pipeline.stored_rate": Query(
        f"""SELECT $__timeGroupAlias(received_at, $__interval), 'telemetry' AS "metric",
       count(*) * 1000.0 / $__interval_ms AS "per second"
FROM telemetry
WHERE $__timeFilter(received_at) AND time > {_FROM} - INTERVAL '{LATE_ARRIVALS}'
GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(received_at, $__interval), 'events', count(*) * 1000.0 / $__interval_ms
FROM events
WHERE $__timeFilter(received_at) AND time > {_FROM} - INTERVAL '{LATE_ARRIVALS}'
GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(received_at, $__interval), 'dead letters',
       count(*) * 1000.0 / $__interval_ms
FROM dead_letter
WHERE $__timeFilter(received_at)
GROUP BY 1
ORDER BY 1, 2""",
        "time_series",
    ),
    "pipeline.lag": Query(
        f"""SELECT $__timeGroupAlias(received_at, $__interval),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - time)::float8)
           AS "p50",
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - time)::float8)
           AS "p99",
       max(extract(epoch FROM received_at - time)::float8) AS "max"
FROM telemetry
WHERE $__timeFilter(received_at) AND time > {_FROM} - INTERVAL '{LATE_ARRIVALS}'
GROUP BY 1
ORDER BY 1""",
        "time_series",
    ),
    "pipeline.dead_letters": Query(
        f"""SELECT $__timeGroupAlias(received_at, $__interval), {_REASON_CLASS} AS "metric",
       count(*) AS "dead letters"
FROM dead_letter
WHERE $__timeFilter(received_at)
GROUP BY 1, 2
ORDER BY 1, 2""",
        "time_series",
    ),
    "pipeline.quarantine": Query(
        f"""SELECT count(*) FILTER (WHERE {_REASON_CLASS} IN ({_QUARANTINED})) AS "quarantined",
       count(*) FILTER (WHERE received_at >= {_FROM}) AS "dead letters in range",
       count(*) AS "dead letters held"
FROM dead_letter
WHERE received_at <= $__timeTo()"""
    ),
    "pipeline.dead_letters_recent": Query(
        f"""SELECT received_at AS "received", {_REASON_CLASS} AS "class", pump_id AS "pump", topic,
       reason
FROM dead_letter
WHERE $__timeFilter(received_at)
ORDER BY received_at DESC, id DESC
LIMIT 200"""
    ),
    "pipeline.outbox": Query(
        f"""SELECT count(*) FILTER (WHERE {_OUTBOX_PENDING}) AS "pending",
       count(*) FILTER (WHERE {_OUTBOX_PENDING} AND last_error IS NOT NULL) AS "retrying",
       count(*) FILTER (WHERE $__timeFilter(failed_at)) AS "failed",
       coalesce(extract(epoch FROM {_TO} - min(created_at) FILTER (WHERE {_OUTBOX_PENDING})),
                0)::float8 AS "oldest pending (s)"
FROM alert_outbox
WHERE created_at <= $__timeTo()"""
    ),
    "pipeline.outbox_flow": Query(
        """SELECT $__timeGroupAlias(created_at, $__interval), 'queued' AS "metric",
       count(*) AS "notifications"
FROM alert_outbox WHERE $__timeFilter(created_at) GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(delivered_at, $__interval), 'delivered', count(*)
FROM alert_outbox WHERE $__timeFilter(delivered_at) GROUP BY 1
UNION ALL
SELECT $__timeGroupAlias(failed_at, $__interval), 'failed', count(*)
FROM alert_outbox WHERE $__timeFilter(failed_at) GROUP BY 1
ORDER BY 1, 2""",
        "time_series",
    ),
    "pipeline.outbox_problems": Query(
        f"""SELECT o.id AS "notification", o.receiver, o.alert_id AS "alert", o.action,
       o.attempts, o.last_error AS "last error", o.created_at AS "queued",
       o.last_attempt_at AS "last attempt", o.failed_at AS "failed for good"
FROM alert_outbox o
WHERE o.created_at <= $__timeTo() AND o.last_error IS NOT NULL
  AND (o.delivered_at IS NULL OR o.delivered_at > {_TO})
  AND (o.failed_at IS NULL OR o.failed_at >= {_FROM})
ORDER BY o.failed_at IS NULL, o.created_at, o.id
LIMIT 200"""
    ),
}
"""Every dashboard query by name; dashboards/ refers to them by these names."""

PROMQL: dict[str, str] = {
    "ingest.received_rate": "sum(rate(pumpfleet_ingest_messages_received_total[$__rate_interval]))",
    "ingest.written_rate": "sum(rate(pumpfleet_ingest_messages_written_total[$__rate_interval]))",
    "ingest.duplicates_rate": (
        "sum(rate(pumpfleet_ingest_duplicates_dropped_total[$__rate_interval]))"
    ),
    "ingest.superseded_rate": (
        "sum(rate(pumpfleet_ingest_statuses_superseded_total[$__rate_interval]))"
    ),
    "ingest.dead_lettered_rate": (
        "sum(rate(pumpfleet_ingest_messages_dead_lettered_total[$__rate_interval]))"
    ),
    "ingest.commit_p99": (
        "histogram_quantile(0.99, sum by (le) "
        "(rate(pumpfleet_ingest_receive_to_commit_seconds_bucket[$__rate_interval])))"
    ),
    "ingest.lag": "max(pumpfleet_ingest_lag_seconds)",
    "ingest.pending": "sum(pumpfleet_ingest_pending)",
    "ingest.up": "min(pumpfleet_ingest_up)",
    "ingest.database_errors": "sum(increase(pumpfleet_ingest_database_errors_total[$__range]))",
}
"""The ingester's own counters (its /metrics, scraped by Prometheus): what storage cannot show,
such as redeliveries dropped as duplicates."""


# Expansion --------------------------------------------------------------------------------------


class ExpandError(ValueError):
    """A query uses a macro or variable that `expand` was not given or does not know."""


_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(?!__)(\w+)|\[\[(\w+)\]\]")
_MACRO = re.compile(r"\$(__\w+)\(([^)]*)\)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
# Grafana's interval rounding (rangeutil.roundInterval): below the bound, this interval.
_ROUND = (
    (0.015, 0.01),
    (0.035, 0.02),
    (0.075, 0.05),
    (0.15, 0.1),
    (0.35, 0.2),
    (0.75, 0.5),
    (1.5, 1),
    (3.5, 2),
    (7.5, 5),
    (12.5, 10),
    (17.5, 15),
    (25, 20),
    (45, 30),
    (90, 60),
    (210, 120),
    (450, 300),
    (750, 600),
    (1050, 900),
    (1500, 1200),
    (2700, 1800),
    (5400, 3600),
    (9000, 7200),
    (16200, 10800),
    (24300, 21600),
    (32400, 28800),
    (86400, 43200),
    (604800, 86400),
    (1814400, 604800),
    (3628800, 2592000),
)


def interval_for(
    time_from: datetime,
    time_to: datetime,
    max_data_points: int = 1000,
    min_interval: timedelta = timedelta(minutes=1),
) -> timedelta:
    """`$__interval` as Grafana picks it: the range over the panel's data points, rounded, and
    at least the datasource's minimum interval."""
    seconds = max((time_to - time_from).total_seconds() / max_data_points, 0.001)
    rounded = next((v for bound, v in _ROUND if seconds < bound), 31536000.0)
    return max(timedelta(seconds=rounded), min_interval)


def _format_interval(value: timedelta) -> str:
    """Grafana's gtime.FormatInterval: the largest whole unit, truncated."""
    ms = int(value.total_seconds() * 1000)
    for unit in ("y", "d", "h", "m", "s", "ms"):
        size = int(_UNIT_S[unit] * 1000)
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


def _parse_interval(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text.strip().strip("'"))
    if not m:
        raise ExpandError(f"{text!r} is not an interval such as 5m")
    return float(m[1]) * _UNIT_S[m[2]]


def _go_float(value: float) -> str:
    """A float as Go's %v prints it (shortest digits, an exponent from 1e+06 on)."""
    d = Decimal(repr(float(value)))
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exp = len(digits) + exponent - 1
    if value == 0:
        return "0"
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    return format(d.normalize(), "f")


def _rfc3339(value: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: fraction without trailing zeros, Z."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _variable(name: str, fmt: str | None, values: Mapping[str, str | Sequence[str]]) -> str:
    if name not in values:
        raise ExpandError(f"variable ${name} has no value")
    value = values[name]
    many = not isinstance(value, str)
    items = [value] if isinstance(value, str) else list(value)
    if fmt == "sqlstring" or (fmt is None and many):  # SQL datasources quote multi-values
        return ",".join(_quote(v) for v in items)
    if fmt in (None, "raw", "csv"):
        return ",".join(items)
    raise ExpandError(f"variable format {fmt!r} is not supported here")


def _macro(name: str, args: list[str], time_from: datetime, time_to: datetime) -> str:
    frm, to = _rfc3339(time_from), _rfc3339(time_to)
    if name in ("__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter") and not args[0]:
        raise ExpandError(f"${name} needs a column")
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{frm}' AND '{to}'"
    if name == "__timeFrom":
        return f"'{frm}'"
    if name == "__timeTo":
        return f"'{to}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise ExpandError(f"${name} needs a column and an interval")
        if len(args) > 2:
            raise ExpandError(f"${name}: fill values are not supported here")
        s = _go_float(_parse_interval(args[1]))
        group = f"floor(extract(epoch from {args[0]})/{s})*{s}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    if name == "__unixEpochFilter":
        a, b = int(time_from.timestamp()), int(time_to.timestamp())
        return f"{args[0]} >= {a} AND {args[0]} <= {b}"
    raise ExpandError(f"macro ${name} is not supported here")


def expand(
    sql: str,
    time_from: datetime,
    time_to: datetime,
    variables: Mapping[str, str | Sequence[str]] | None = None,
    interval: timedelta | None = None,
) -> str:
    """The SQL Grafana would send to the database for this range and these variable values.

    In Grafana's order: template variables (a str is a single value, a sequence a multi-value
    or "All" selection), then `$__interval`, `$__interval_ms`, `$__unixEpochFrom()` and
    `$__unixEpochTo()`, then the PostgreSQL macros (pkg/tsdb/grafana-postgresql-datasource,
    `timescaledb: false`). `interval` defaults to what Grafana would pick (`interval_for`).
    Raises ExpandError for anything it does not know rather than leaving it in the text.
    """
    values = variables or {}
    step = interval if interval is not None else interval_for(time_from, time_to)

    def variable(m: re.Match[str]) -> str:
        name = m[1] or m[3] or m[4]
        return _variable(name, m[2], values)

    out = _VARIABLE.sub(variable, sql)
    out = out.replace("$__interval_ms", str(int(step.total_seconds() * 1000)))
    out = out.replace("$__interval", _format_interval(step))
    out = out.replace("$__unixEpochFrom()", str(int(time_from.timestamp())))
    out = out.replace("$__unixEpochTo()", str(int(time_to.timestamp())))

    def macro(m: re.Match[str]) -> str:
        name = m[1]
        # Grafana: a $__timeGroup directly followed by a comma means $__timeGroupAlias.
        if name == "__timeGroup" and out[m.end() : m.end() + 1] == ",":
            name = "__timeGroupAlias"
        return _macro(name, [a.strip() for a in m[2].split(",")], time_from, time_to)

    out = _MACRO.sub(macro, out)
    if "$" in re.sub(r"'[^']*'", "", out):
        raise ExpandError(f"something was left unexpanded: {out!r}")
    return out
