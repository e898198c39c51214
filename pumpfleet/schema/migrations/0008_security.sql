-- Security (docs/security.md): revoked devices, the quarantine of messages from pumps that are
-- not provisioned, and the application's database roles. Same on TimescaleDB and PostgreSQL.

-- A pump is trusted from its `pumps` row until revoked_at: from then on its messages are
-- quarantined (dead letter, raw bytes kept) like those of a pump that was never provisioned.
ALTER TABLE pumps ADD COLUMN revoked_at timestamptz;
COMMENT ON COLUMN pumps.revoked_at IS
    'From this time the pump is not trusted: its messages are quarantined, never stored as data';
-- The ingesters re-read the revoked pumps every few seconds: a small index, not a scan.
CREATE INDEX pumps_revoked ON pumps (pump_id) WHERE revoked_at IS NOT NULL;

-- Pumps whose messages were quarantined, written by the ingester in the same transaction as
-- their dead letters; the alerting service's watchdog raises one `unprovisioned_device` alert
-- per pump from it. Receive times (the database's clock), never the device's.
CREATE TABLE quarantine_seen (
    pump_id  text PRIMARY KEY,
    first_at timestamptz NOT NULL DEFAULT now(),
    last_at  timestamptz NOT NULL DEFAULT now(),
    messages bigint NOT NULL DEFAULT 0
);
CREATE INDEX quarantine_seen_last ON quarantine_seen (last_at DESC);
COMMENT ON TABLE quarantine_seen IS
    'Pumps not provisioned (or revoked) that published; their messages are in dead_letter';
GRANT SELECT ON quarantine_seen TO pumpfleet_reader;

-- The application's roles, NOLOGIN groups as pumpfleet_reader (0005) is: a deployment grants
-- each to a login role of its own. The owner (whoever runs the migrations) keeps DDL; these
-- roles get exactly what their service does, nothing on tables they do not touch, and no
-- UPDATE or DELETE on alert_history: the record of who did what to an alert is append-only for
-- the application. Tables added by later migrations need their grants added there too.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_ingest') THEN
        CREATE ROLE pumpfleet_ingest NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created concurrently by a migration of another database
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_alerting') THEN
        CREATE ROLE pumpfleet_alerting NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT USAGE ON SCHEMA public TO pumpfleet_ingest, pumpfleet_alerting;

-- `pumpfleet ingest`: stores messages (SELECT for RETURNING and ON CONFLICT), reads the pump
-- registry. No INSERT on pumps: registering unknown pumps (`unknown_pumps = "register"`) is a
-- lab's opt-in, and a lab that wants it with this role grants INSERT on pumps itself.
GRANT SELECT ON pumps TO pumpfleet_ingest;
GRANT SELECT, INSERT ON telemetry, events, status_log, alert_feed, dead_letter
    TO pumpfleet_ingest;
GRANT SELECT, INSERT, UPDATE ON pump_status, quarantine_seen TO pumpfleet_ingest;
GRANT USAGE ON SEQUENCE alert_feed_id_seq, dead_letter_id_seq TO pumpfleet_ingest;

-- `pumpfleet alerting` and `pumpfleet alerts ack|resolve`: reads what was stored, consumes the
-- feed, keeps the alerts, appends their history, delivers and prunes notifications, holds the
-- lease. Ending a stale holder's sessions at a takeover needs the same login role for every
-- alerting instance (or pg_signal_backend, not granted here).
GRANT SELECT ON pumps, telemetry, events, status_log, pump_status, quarantine_seen
    TO pumpfleet_alerting;
GRANT SELECT, DELETE ON alert_feed TO pumpfleet_alerting;
GRANT SELECT, INSERT, UPDATE ON alerts, alerting_lease TO pumpfleet_alerting;
GRANT SELECT, INSERT ON alert_history TO pumpfleet_alerting;
GRANT SELECT, INSERT, UPDATE, DELETE ON alert_outbox TO pumpfleet_alerting;
GRANT USAGE ON SEQUENCE alerts_alert_id_seq, alert_history_id_seq, alert_outbox_id_seq
    TO pumpfleet_alerting;

-- Said outright, whatever was granted by hand before: nobody but the owner rewrites history.
REVOKE UPDATE, DELETE, TRUNCATE ON alert_history
    FROM pumpfleet_ingest, pumpfleet_alerting, pumpfleet_reader;
