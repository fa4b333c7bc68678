#!/bin/sh
# Run once by the official postgres image on an empty data directory
# (/docker-entrypoint-initdb.d, as the postgres user, with POSTGRES_USER and
# POSTGRES_DB set): one database and one login role per service that reads
# DATABASE_URL, each role owning only its own database.
#   auth     accounts, API keys, usage          (AUTH_DB_PASSWORD)
#   gateway  shared limits, every gateway       (GATEWAY_DB_PASSWORD)
# The metrics service keeps no database (it reads no DATABASE_URL).
# The roles are not superuser and cannot create databases or roles; PUBLIC's
# default CONNECT on every database and CREATE on each public schema are
# revoked, so a role reaches its own database only.
# The same script is in deploy/k8s/postgres.yaml (ConfigMap inferswarm-postgres-init).
set -e

refuse() {
    echo "postgres-init: $1" >&2
    exit 1
}

# An empty password, or a placeholder left in place, is no password.
check_password() {
    case "$2" in
        "") refuse "$1 is not set" ;;
        *CHANGE-ME*|*change-me*) refuse "$1 is still the placeholder: set a real password" ;;
    esac
    [ "${#2}" -ge 16 ] || refuse "$1 is shorter than 16 characters"
}

check_password POSTGRES_PASSWORD "${POSTGRES_PASSWORD:-}"
check_password AUTH_DB_PASSWORD "${AUTH_DB_PASSWORD:-}"
check_password GATEWAY_DB_PASSWORD "${GATEWAY_DB_PASSWORD:-}"

run_sql() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" "$@"
}

# The databases the image made (and the templates) admit no one but the superuser.
run_sql <<'SQL'
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', datname)
  FROM pg_database WHERE datallowconn \gexec
SQL

create_service() {  # role/database name, password
    run_sql -v name="$1" -v password="$2" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
\connect :"name"
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO :"name";
SQL
}

create_service auth "$AUTH_DB_PASSWORD"
create_service gateway "$GATEWAY_DB_PASSWORD"
