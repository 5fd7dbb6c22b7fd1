#!/usr/bin/env bash
# Background re-encryption benchmark (one run, ratios against a baseline
# measured in the same run):
#   1. capacity: rows rewrapped per second on ROWS rows, unthrottled;
#   2. impact: pgbench TPS with the worker idle vs. re-encrypting at the
#      default throttle (pg_kms.reencrypt_max_rows_per_second = 5000).
# Needs the extension installed (bash scripts/test.sh or quickstart.sh
# installs it). Run as root on Debian 12: bash scripts/bench_worker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh
SQL_DIR=scripts/bench_worker   # the SQL this script runs

ROWS=${ROWS:-1000000}
DIR=${DIR:-/tmp/pg_kms_bench_worker}
PORT=${PORT:-54378}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-30}
KEY=$DIR.keys/master.key
trap 'cluster_stop "$DIR"' EXIT

psql_q() { cluster_psql "$DIR" "$PORT" -d bench -qAtX -v ON_ERROR_STOP=1 "$@"; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GB RAM"
new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_preload_libraries = 'pg_kms'" \
    "pg_kms.reencrypt_naptime = '500ms'" "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
cluster_psql "$DIR" "$PORT" -d postgres -qc "CREATE DATABASE bench"
echo "PostgreSQL: $(psql_q -c 'SHOW server_version')"

psql_q -v rows="$ROWS" -f "$SQL_DIR/setup.sql" >/dev/null

wait_done() {  # waits until no old versions remain; prints seconds
    local start=$SECONDS
    until [ "$(psql_q -f "$SQL_DIR/pass_done.sql")" = t ]; do
        [ $((SECONDS - start)) -lt 1800 ] || { echo "timeout waiting for the worker" >&2; exit 1; }
        sleep 0.2
    done
}

echo "== 1. capacity: rewrap $ROWS rows, unthrottled"
psql_q -f "$SQL_DIR/unthrottled.sql" >/dev/null
t0=$(date +%s.%N)
psql_q -c "SELECT kms_rotate_key('pii')" >/dev/null
wait_done
t1=$(date +%s.%N)
awk -v r="$ROWS" -v a="$t0" -v b="$t1" 'BEGIN { printf "   %d rows in %.1f s: %.0f rows/s (goal >= 50000)\n", r, b - a, r / (b - a) }'

echo "== 2. pgbench TPS, worker idle vs. working at the default throttle (5000 rows/s)"
"$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -i -s 10 -q bench >/dev/null 2>&1
psql_q -f "$SQL_DIR/default_throttle.sql" >/dev/null
tps() { "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -c 2 -j 2 -T "$PGBENCH_SECONDS" -n bench 2>/dev/null \
        | awk '/^tps/ {print $3; exit}'; }
idle=$(tps)
psql_q -c "SELECT kms_rotate_key('pii')" >/dev/null
# wait until the worker has started its new pass, then count from there
until [ "$(psql_q -f "$SQL_DIR/pass_started.sql")" = t ]; do sleep 0.1; done
before=$(psql_q -f "$SQL_DIR/encryptions.sql")
working=$(tps)
after=$(psql_q -f "$SQL_DIR/encryptions.sql")
awk -v i="$idle" -v w="$working" -v n="$((after - before))" -v s="$PGBENCH_SECONDS" 'BEGIN {
    printf "   idle: %.0f tps; working: %.0f tps while rewrapping %.0f rows/s\n", i, w, n / s
    printf "   TPS ratio working/idle = %.3f (loss %.1f%%, goal < 10%%)\n", w / i, (1 - w / i) * 100 }'
