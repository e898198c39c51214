-- TimescaleDB: hypertables, compression segmented by pump, retention, and the hourly
-- continuous aggregate. Same names and columns as the plain PostgreSQL variant.
SELECT create_hypertable('telemetry', by_range('time', INTERVAL '1 day'), migrate_data => true);
SELECT create_hypertable('events', by_range('time', INTERVAL '7 days'), migrate_data => true);

ALTER TABLE telemetry SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'pump_id',
    timescaledb.compress_orderby = 'time DESC, seq DESC'
);
SELECT add_compression_policy('telemetry', INTERVAL '7 days');
ALTER TABLE events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'pump_id',
    timescaledb.compress_orderby = 'time DESC, seq DESC'
);
SELECT add_compression_policy('events', INTERVAL '30 days');

-- Raw readings are kept two years; the hourly aggregate and events outlive them.
SELECT add_retention_policy('telemetry', INTERVAL '730 days');

CREATE MATERIALIZED VIEW telemetry_hourly WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', time)             AS bucket,
       pump_id,
       count(*)                                         AS samples,
       avg(delivered_ul_per_h)                          AS delivered_ul_per_h_avg,
       avg(programmed_rate_ul_per_h)                    AS programmed_rate_ul_per_h_avg,
       min(reservoir_ml)                                AS reservoir_ml_min,
       max(reservoir_ml)                                AS reservoir_ml_max,
       last(reservoir_ml, time)                         AS reservoir_ml_last,
       min(battery_pct)                                 AS battery_pct_min,
       bool_or(cardinality(alarms) > 0)                 AS any_alarm
FROM telemetry
GROUP BY 1, 2
WITH NO DATA;
ALTER MATERIALIZED VIEW telemetry_hourly SET (timescaledb.materialized_only = false);
SELECT add_continuous_aggregate_policy('telemetry_hourly',
    start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes');
