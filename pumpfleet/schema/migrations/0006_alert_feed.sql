-- Alerting as its own service (ingest/alerts/README.md, "The feed"). The ingester writes one
-- feed row per first-stored message in the same statement as the message; the active alerting
-- instance reads the feed, runs the rules, and deletes the rows it handled in the same
-- transaction as the alert transitions they caused: every stored message reaches the rules
-- exactly once, across restarts and takeovers. Rows are keys only; the message is read back
-- from its table, so the ingester writes a few bytes more per message, not the message twice.
CREATE TABLE alert_feed (
    id      bigserial PRIMARY KEY,
    urgent  boolean NOT NULL,
    pump_id text NOT NULL,
    time    timestamptz NOT NULL,
    seq     bigint NOT NULL,
    kind    text NOT NULL CHECK (kind IN ('telemetry', 'event', 'status'))
);
-- Read in stored order (the primary key), except that a pump with an urgent row (its own
-- alarm event) has its rows up to that one read first: per pump, order always holds.
CREATE INDEX alert_feed_urgent ON alert_feed (pump_id, id) WHERE urgent;
-- Per pump: the urgent pumps' rows, and what a restart leaves out of its replay.
CREATE INDEX alert_feed_pump ON alert_feed (pump_id, id);
COMMENT ON TABLE alert_feed IS
    'Stored messages the alerting service has not yet run its rules on (keys only)';

-- Wake the alerting service at each commit that fed it (one notification per transaction).
CREATE FUNCTION alert_feed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pumpfleet_feed', '');
    RETURN NULL;
END $$;
CREATE TRIGGER alert_feed_notify AFTER INSERT ON alert_feed
    FOR EACH STATEMENT EXECUTE FUNCTION alert_feed_notify();

-- Which alerting instance is active: a lease renewed by the holder and taken over when it
-- expires. Every write of the active instance checks holder and epoch in its transaction, so
-- an instance that was paused past its lease cannot write once another has taken over.
CREATE TABLE alerting_lease (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);

-- Every status as it came (pump_status keeps only the newest): the rules need each one, a will's
-- seq being no gap, when they judge the feed late or rebuild after a restart.
CREATE TABLE status_log (
    pump_id     text NOT NULL,
    time        timestamptz NOT NULL,
    seq         bigint NOT NULL,
    online      boolean NOT NULL,
    reason      text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pump_id, time, seq)
);
INSERT INTO status_log (pump_id, time, seq, online, reason, received_at)
SELECT pump_id, time, seq, online, reason, received_at FROM pump_status;
