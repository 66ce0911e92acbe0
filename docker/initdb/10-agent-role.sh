#!/bin/sh
# The participant agent's least-privilege database role (see README.md, "Database
# roles"): not a superuser; owns only its own schema, where the agent creates its
# branch-marker table; member of `bank_app`, which may read and write the tables the
# bank demo creates as the owner `twopc`. Runs once, when the data volume is new.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v password="$(cat /run/secrets/agent-db-password)" <<'SQL'
CREATE ROLE bank_app NOLOGIN;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO bank_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO bank_app;
CREATE ROLE twopc_agent LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password' IN ROLE bank_app;
CREATE SCHEMA twopc_agent AUTHORIZATION twopc_agent;
ALTER ROLE twopc_agent SET search_path = twopc_agent, public;
SQL
