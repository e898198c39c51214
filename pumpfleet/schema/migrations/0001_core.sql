-- Core tables. The same names on TimescaleDB and plain PostgreSQL, so every query works on both.

CREATE TABLE pumps (
    pump_id                  text PRIMARY KEY,
    clinic                   text NOT NULL DEFAULT 'unassigned',
    reservoir_capacity_ml    real,
    concentration_mcg_per_ml real,
    low_reservoir_alarm_ml   real NOT NULL DEFAULT 2,
    reporting_interval_s     integer NOT NULL DEFAULT 600 CHECK (reporting_interval_s > 0),
    high_risk                boolean NOT NULL DEFAULT false,
    risk_notes               text,
    registered_at            timestamptz NOT NULL DEFAULT now(),
    registered_by            text NOT NULL DEFAULT 'operator'
);
COMMENT ON COLUMN pumps.high_risk IS
    'High spinal cord injury or prior withdrawal: 4 mL low-reservoir alarm advised';
COMMENT ON COLUMN pumps.registered_by IS 'operator, or ingest when a first message registered it';

-- Periodic readings. Redelivered messages carry the same device time, so (pump_id, time, seq)
-- deduplicates and still includes the time column a hypertable's unique keys need.
CREATE TABLE telemetry (
    time                        timestamptz NOT NULL,
    pump_id                     text NOT NULL,
    seq                         bigint NOT NULL,
    received_at                 timestamptz NOT NULL DEFAULT now(),
    delivered_ul_per_h          double precision NOT NULL,
    programmed_rate_ul_per_h    double precision NOT NULL,
    programmed_dose_mcg_per_day double precision NOT NULL,
    reservoir_ml                double precision NOT NULL,
    reservoir_capacity_ml       double precision NOT NULL,
    low_reservoir_alarm_ml      double precision NOT NULL,
    concentration_mcg_per_ml    double precision NOT NULL,
    battery_pct                 double precision NOT NULL,
    battery_eri                 boolean NOT NULL,
    pump_state                  text NOT NULL,
    alarms                      text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (pump_id, time, seq)
);

-- Pump events (refill, reprogram, bolus, MRI, stall, alarms); the message's own fields in body.
CREATE TABLE events (
    time        timestamptz NOT NULL,
    pump_id     text NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL,
    body        jsonb NOT NULL,
    PRIMARY KEY (pump_id, time, seq)
);
CREATE INDEX events_event_time ON events (event, time DESC);

-- Latest retained status per pump (online/offline, last will).
CREATE TABLE pump_status (
    pump_id     text PRIMARY KEY,
    online      boolean NOT NULL,
    reason      text,
    time        timestamptz NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Messages that broke the contract: kept whole so nothing is lost and they can be replayed.
CREATE TABLE dead_letter (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    reason      text NOT NULL,
    pump_id     text
);
CREATE INDEX dead_letter_received_at ON dead_letter (received_at DESC);

-- One row per alert condition (IHE PCD ACM): one open alert per (pump, rule).
CREATE TABLE alerts (
    alert_id     bigserial PRIMARY KEY,
    pump_id      text NOT NULL,
    rule         text NOT NULL,
    priority     text NOT NULL CHECK (priority IN ('high', 'medium', 'low', 'info')),
    phase        text NOT NULL CHECK (phase IN ('start', 'continue', 'escalate', 'de-escalate', 'end')),
    summary      text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    ended_at     timestamptz,
    acked_at     timestamptz,
    acked_by     text,
    last_seq     bigint
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (pump_id, rule) WHERE ended_at IS NULL;
CREATE INDEX alerts_open_priority ON alerts (priority, started_at DESC) WHERE ended_at IS NULL;

-- Every transition of every alert, with who did it.
CREATE TABLE alert_history (
    id        bigserial PRIMARY KEY,
    alert_id  bigint NOT NULL REFERENCES alerts (alert_id),
    at        timestamptz NOT NULL DEFAULT now(),
    phase     text NOT NULL,
    priority  text NOT NULL,
    actor     text NOT NULL DEFAULT 'rules',
    note      text,
    details   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX alert_history_alert ON alert_history (alert_id, at);
