-- Contract v2 (docs/contract/MIGRATION.md): what the rules need to be honest about what a pump
-- can see. Nullable, no defaults, so rows from v1 pumps (and rows written before this migration)
-- stay valid and adding the columns is cheap on a compressed hypertable. NULL v means 1.
ALTER TABLE telemetry
    ADD COLUMN v smallint,
    ADD COLUMN reservoir_source text CHECK (reservoir_source IN ('calculated', 'measured')),
    ADD COLUMN reporting_interval_s integer,
    ADD COLUMN scheduled_ul_per_h double precision,
    ADD COLUMN eri_since timestamptz;
COMMENT ON COLUMN telemetry.reservoir_source IS
    'calculated: refill entry minus rotor/valve counts; measured: an independent sensor; NULL (v1): calculated';
COMMENT ON COLUMN telemetry.scheduled_ul_per_h IS
    'Flow the programme (steps and boluses) asked for over the interval delivered_ul_per_h covers';
COMMENT ON COLUMN telemetry.eri_since IS 'When ERI began, as the pump recorded it';
