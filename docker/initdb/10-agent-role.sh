#!/bin/sh
# The least-privilege roles of the deployment (see README.md, "Database roles"); runs
# once, as the superuser, when the data volume is new. Nothing else logs in as the
# superuser.
#   twopc_agent  the agents' login (their --dsn-file): not a superuser; owns schema
#                twopc, where the agent keeps its branch markers and epochs (created
#                here, so it needs no CREATE on the database); member of bank_app so
#                that it may SET ROLE to it.
#   bank_app     the agents' --branch-role: what the transfers' statements run as;
#                may read and write the bank's tables, nothing on schema twopc, no
#                CREATE anywhere.
#   bank_demo    the demo's login (its --shard-dsn-file): creates and owns the bank's
#                tables in schema public and checks them; not a superuser.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v agent_password="$(cat /run/secrets/agent-db-password)" \
    -v demo_password="$(cat /run/secrets/demo-db-password)" <<'SQL'
CREATE ROLE bank_demo LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'demo_password';
GRANT CREATE, USAGE ON SCHEMA public TO bank_demo;
CREATE ROLE bank_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
GRANT USAGE ON SCHEMA public TO bank_app;
ALTER DEFAULT PRIVILEGES FOR ROLE bank_demo IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO bank_app;
ALTER DEFAULT PRIVILEGES FOR ROLE bank_demo IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO bank_app;
CREATE ROLE twopc_agent LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'agent_password';
GRANT bank_app TO twopc_agent;
CREATE SCHEMA twopc AUTHORIZATION twopc_agent;
SQL
