"""Queries the dashboards and the on-call tools run. They must give the same answers on
TimescaleDB and on plain PostgreSQL; tests/test_schema.py runs each on both."""

from __future__ import annotations

QUERIES: dict[str, str] = {
    # Fleet overview: the newest reading of every pump.
    "latest_per_pump": """
        SELECT DISTINCT ON (pump_id) pump_id, time, reservoir_ml, battery_pct, pump_state, alarms
        FROM telemetry ORDER BY pump_id, time DESC""",
    # Reservoir and flow per pump per hour (the continuous aggregate on TimescaleDB).
    "hourly_per_pump": """
        SELECT bucket, pump_id, samples, round(delivered_ul_per_h_avg::numeric, 6) AS delivered,
               round(reservoir_ml_min::numeric, 6) AS res_min,
               round(reservoir_ml_last::numeric, 6) AS res_last, any_alarm
        FROM telemetry_hourly
        WHERE bucket >= now() - INTERVAL '2 days'
        ORDER BY pump_id, bucket""",
    # Pumps at or below their low-reservoir alarm volume, with the registry's risk flag.
    "low_reservoir": """
        SELECT l.pump_id, l.reservoir_ml, p.high_risk
        FROM (SELECT DISTINCT ON (pump_id) pump_id, reservoir_ml, low_reservoir_alarm_ml
              FROM telemetry ORDER BY pump_id, time DESC) l
        JOIN pumps p USING (pump_id)
        WHERE l.reservoir_ml <= greatest(l.low_reservoir_alarm_ml, p.low_reservoir_alarm_ml)
        ORDER BY l.pump_id""",
    # Open alerts for on-call, most urgent first.
    "open_alerts": """
        SELECT pump_id, rule, priority, phase, acked_by IS NOT NULL AS acked
        FROM alerts WHERE ended_at IS NULL
        ORDER BY array_position(ARRAY['high','medium','low','info'], priority), started_at""",
    # Refills in the last 30 days with their discrepancy.
    "recent_refills": """
        SELECT pump_id, time, (body->>'expected_ml')::float8 - (body->>'withdrawn_ml')::float8
               AS discrepancy_ml
        FROM events WHERE event = 'refill' AND time > now() - INTERVAL '30 days'
        ORDER BY time""",
    # Messages rejected per hour.
    "dead_letters_hourly": """
        SELECT date_trunc('hour', received_at) AS hour, count(*) AS n
        FROM dead_letter GROUP BY 1 ORDER BY 1""",
}
