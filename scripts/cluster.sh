#!/usr/bin/env bash
# Throwaway PostgreSQL 15 clusters run as the postgres user on a private
# socket directory (no TCP). Sourced by quickstart.sh and test.sh.
#   cluster_start DIR PORT [extra postgresql.conf lines...]
#   cluster_stop DIR
#   cluster_psql DIR PORT [psql args...]
#   new_master_key FILE   (64 random hex chars, mode 0600, owned by postgres)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

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
