-- Alert lifecycle and notifications (ingest/alerts/). Same on TimescaleDB and PostgreSQL.

-- What the lifecycle needs beyond 0001's columns. All nullable or defaulted, so rows written
-- before this migration (or by hand) stay valid.
ALTER TABLE alerts
    ADD COLUMN clinic text,
    ADD COLUMN priority_since timestamptz,
    ADD COLUMN escalated_at timestamptz,
    ADD COLUMN resolved_by text,
    ADD COLUMN rev integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN alerts.clinic IS
    'The pump''s clinic when the alert started: the Alertmanager label stays stable until it ends';
COMMENT ON COLUMN alerts.priority_since IS
    'When the alert reached its current priority (unacknowledged-escalation timer); NULL = started_at';
COMMENT ON COLUMN alerts.escalated_at IS
    'When a high alert escalated for want of acknowledgement; NULL if it has not';
COMMENT ON COLUMN alerts.resolved_by IS 'Person who ended it by hand; NULL when the condition ended';
COMMENT ON COLUMN alerts.rev IS 'Bumped by every write: a writer with a stale copy notices';

CREATE INDEX alerts_started ON alerts (started_at DESC);

-- ack is not an IHE PCD ACM phase; the history records it beside the phases.
ALTER TABLE alert_history ADD CONSTRAINT alert_history_phase
    CHECK (phase IN ('start', 'continue', 'escalate', 'de-escalate', 'end', 'ack'));

-- Notifications to send, written in the same transaction as the transition that caused them, so
-- a transition is never committed without its notification (nor the reverse). Rows are kept
-- after delivery as a record of what was told to whom and when, and pruned after a while.
CREATE TABLE alert_outbox (
    id              bigserial PRIMARY KEY,
    receiver        text NOT NULL CHECK (receiver IN ('alertmanager', 'webhook')),
    alert_id        bigint NOT NULL REFERENCES alerts (alert_id),
    action          text NOT NULL CHECK (action IN ('trigger', 'acknowledge', 'resolve')),
    event           jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    last_attempt_at timestamptz,
    last_error      text,
    delivered_at    timestamptz,
    failed_at       timestamptz
);
COMMENT ON COLUMN alert_outbox.event IS 'Snapshot of the alert at the transition; rendered per receiver';
COMMENT ON COLUMN alert_outbox.failed_at IS 'The receiver rejected it for good (HTTP 4xx); not retried';
CREATE INDEX alert_outbox_pending ON alert_outbox (receiver, id)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX alert_outbox_alert ON alert_outbox (alert_id);
