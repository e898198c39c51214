-- A read-only role for the dashboards (Grafana) and anyone else who only looks. NOLOGIN: it is a
-- group; a deployment grants it to a login role of its own (docker-compose.yml:
-- deploy/grafana/initdb/). Roles are cluster-wide, so another database of the same cluster may
-- have created it already, or be creating it right now.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_reader') THEN
        CREATE ROLE pumpfleet_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created concurrently by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA public TO pumpfleet_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO pumpfleet_reader;
-- Tables and views later migrations create (as the role that runs them) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO pumpfleet_reader;

-- A rejected message's raw bytes may be anything a sender put there: the dashboards see why it
-- was rejected, not what it said.
REVOKE SELECT ON dead_letter FROM pumpfleet_reader;
GRANT SELECT (id, received_at, topic, reason, pump_id) ON dead_letter TO pumpfleet_reader;
