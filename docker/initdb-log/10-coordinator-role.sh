#!/bin/sh
# The coordinators' role on the decision-log database (docker/compose.ha.yaml): not a
# superuser; owns the database, so the daemon creates and migrates its schema
# `twopc_coordinator` itself. Every coordinator process of one id logs in as this role,
# which lets a standby end a paused active's sessions (pg_terminate_backend on
# sessions of its own role). Runs once, when the data volume is new.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v password="$(cat /run/secrets/log-db-password)" <<'SQL'
CREATE ROLE twopc_coordinator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
ALTER DATABASE decisions OWNER TO twopc_coordinator;
SQL
