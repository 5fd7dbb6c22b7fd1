#!/usr/bin/env bash
# Throwaway PostgreSQL clusters run as the postgres user on a private
# socket directory (no TCP). Sourced by quickstart.sh and test.sh.
#   pg_bin_of MAJOR       (bin directory: Debian's for 15, /opt/pg_kms/pgNN/bin
#                          for the servers scripts/pg_servers.sh builds)
#   cluster_start DIR PORT [extra postgresql.conf lines...]
#   cluster_stop DIR
#   cluster_psql DIR PORT [psql args...]
#   new_master_key FILE   (64 random hex chars, mode 0600, owned by postgres)
# The server: $PG_BIN if set, else the major $PG_KMS_PG (default 15).
pg_bin_of() {
    if [ "$1" = 15 ]; then
        echo /usr/lib/postgresql/15/bin
    else
        echo "${PG_KMS_PG_PREFIX_ROOT:-/opt/pg_kms}/pg$1/bin"
    fi
}
PG_BIN=${PG_BIN:-$(pg_bin_of "${PG_KMS_PG:-15}")}

as_pg() {
    if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

new_master_key() {
    local f=$1
    install -d -o postgres -g postgres -m 0700 "$(dirname "$f")"
    (umask 077; od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' > "$f")
    chown postgres:postgres "$f"
    chmod 0600 "$f"
}

cluster_start() {
    local dir=$1 port=$2; shift 2
    rm -rf "$dir"
    install -d -o postgres -g postgres -m 0700 "$dir"
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log"; return 1; }
    {
        echo "listen_addresses = ''"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "logging_collector = off"
        for line in "$@"; do echo "$line"; done
    } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { cat "$dir/server.log"; return 1; }
}

cluster_stop() {
    local dir=$1
    [ -d "$dir/data" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

cluster_psql() {
    local dir=$1 port=$2; shift 2
    "$PG_BIN/psql" -X -h "$dir" -p "$port" -U postgres "$@"
}
