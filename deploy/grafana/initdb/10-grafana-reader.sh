#!/bin/bash
# TimescaleDB container, first start only (/docker-entrypoint-initdb.d): the login role Grafana
# uses, a member of pumpfleet_reader, the read-only group that migration 0005_reader_role grants
# SELECT to. The group is created here as 0005 creates it, since this runs before the
# migrations. The password comes from the environment (docker-compose.yml), never from this file.
set -euo pipefail
: "${PUMPFLEET_GRAFANA_DB_USER:=grafana_reader}"
: "${PUMPFLEET_GRAFANA_DB_PASSWORD:?set PUMPFLEET_GRAFANA_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v reader="$PUMPFLEET_GRAFANA_DB_USER" -v password="$PUMPFLEET_GRAFANA_DB_PASSWORD" <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pumpfleet_reader') THEN
        CREATE ROLE pumpfleet_reader NOLOGIN;
    END IF;
END
$$;
CREATE ROLE :"reader" LOGIN IN ROLE pumpfleet_reader;
ALTER ROLE :"reader" PASSWORD :'password';
SQL
