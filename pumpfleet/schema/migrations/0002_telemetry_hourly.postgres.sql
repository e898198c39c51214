-- Plain PostgreSQL: hourly per-pump figures as an ordinary view with the continuous aggregate's
-- name and columns, so dashboards and rules run unchanged.
CREATE VIEW telemetry_hourly AS
SELECT date_trunc('hour', time)                         AS bucket,
       pump_id,
       count(*)                                         AS samples,
       avg(delivered_ul_per_h)                          AS delivered_ul_per_h_avg,
       avg(programmed_rate_ul_per_h)                    AS programmed_rate_ul_per_h_avg,
       min(reservoir_ml)                                AS reservoir_ml_min,
       max(reservoir_ml)                                AS reservoir_ml_max,
       (array_agg(reservoir_ml ORDER BY time DESC))[1]  AS reservoir_ml_last,
       min(battery_pct)                                 AS battery_pct_min,
       bool_or(cardinality(alarms) > 0)                 AS any_alarm
FROM telemetry
GROUP BY 1, 2;
