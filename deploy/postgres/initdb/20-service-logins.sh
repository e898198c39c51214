#!/bin/bash
# TimescaleDB container, first start only (/docker-entrypoint-initdb.d): a login for the
# ingesters and one for the alerting instances, members of the groups the migrations grant
# (0008_security: pumpfleet_ingest, pumpfleet_alerting). The groups are created here as the
# migration creates them, since this runs before the migrations. All alerting replicas share one
# login: a takeover ends the stale holder's sessions, which PostgreSQL allows a member of the
# holder's role. Passwords come from the environment (docker-compose.yml), never from this file.
set -euo pipefail
: "${PUMPFLEET_INGEST_DB_USER:=pumpfleet_ingest_svc}"
: "${PUMPFLEET_ALERTING_DB_USER:=pumpfleet_alerting_svc}"
: "${PUMPFLEET_INGEST_DB_PASSWORD:?set PUMPFLEET_INGEST_DB_PASSWORD}"
: "${PUMPFLEET_ALERTING_DB_PASSWORD:?set PUMPFLEET_ALERTING_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v ingest="$PUMPFLEET_INGEST_DB_USER" -v ingest_password="$PUMPFLEET_INGEST_DB_PASSWORD" \
    -v alerting="$PUMPFLEET_ALERTING_DB_USER" \
    -v alerting_password="$PUMPFLEET_ALERTING_DB_PASSWORD" <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_ingest') THEN
        CREATE ROLE pumpfleet_ingest NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_alerting') THEN
        CREATE ROLE pumpfleet_alerting NOLOGIN;
    END IF;
END
$$;
CREATE ROLE :"ingest" LOGIN IN ROLE pumpfleet_ingest;
ALTER ROLE :"ingest" PASSWORD :'ingest_password';
CREATE ROLE :"alerting" LOGIN IN ROLE pumpfleet_alerting;
ALTER ROLE :"alerting" PASSWORD :'alerting_password';
SQL
