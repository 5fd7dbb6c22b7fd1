#!/usr/bin/env bash
# Online encryption benchmark (kms_protect_column on a plaintext column; one
# run, ratios against a baseline measured in the same run):
#   1. capacity: rows of a ROWS-row text column encrypted per second by the
#      background worker, unthrottled (protect -> state 'protected', swap
#      included), and, as a same-run baseline, the worker's rewrap of the same
#      ROWS values after a rotation;
#   2. impact: pgbench TPS (built-in TPC-B-like script, its own tables) with
#      the worker idle vs. converting another ROWS-row column at the default
#      throttle (pg_kms.reencrypt_max_rows_per_second = 5000): ROUNDS
#      alternating rounds of each (the conversion paused with
#      pg_kms.reencrypt_enabled = off), medians compared.
# Needs the extension installed (cargo pgrx install --release). Run as root
# on Debian 12: bash scripts/bench_protect.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

ROWS=${ROWS:-1000000}
DIR=${DIR:-/tmp/pg_kms_bench_protect}
PORT=${PORT:-54379}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-15}
ROUNDS=${ROUNDS:-3}
KEY=$DIR.keys/master.key
trap 'cluster_stop "$DIR"' EXIT

psql_q() { cluster_psql "$DIR" "$PORT" -d bench -qAtX -v ON_ERROR_STOP=1 "$@"; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GB RAM"
new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_preload_libraries = 'pg_kms'" \
    "pg_kms.reencrypt_naptime = '500ms'" "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
cluster_psql "$DIR" "$PORT" -d postgres -qc "CREATE DATABASE bench"
echo "PostgreSQL: $(psql_q -c 'SHOW server_version')"

# Two tables of ROWS plaintext emails: one for each part.
psql_q -v rows="$ROWS" >/dev/null <<'SQL'
CREATE EXTENSION pg_kms;
SELECT kms_create_key('pii');
CREATE TABLE people (id bigint PRIMARY KEY, email text, note text);
INSERT INTO people SELECT g, 'user' || g || '@example.com', 'n' FROM generate_series(1, :rows) g;
CREATE TABLE people2 (LIKE people INCLUDING ALL);
INSERT INTO people2 SELECT * FROM people;
VACUUM ANALYZE people;
VACUUM ANALYZE people2;
SQL

state() { psql_q -c "SELECT state FROM kms_protected_columns WHERE table_name = '$1'::regclass"; }

echo "== 1. capacity: encrypt a $ROWS-row text column online, unthrottled"
psql_q -c "ALTER SYSTEM SET pg_kms.reencrypt_max_rows_per_second = 0" \
       -c "ALTER SYSTEM SET pg_kms.reencrypt_batch_size = 5000" -c "SELECT pg_reload_conf()" >/dev/null
t0=$(date +%s.%N)
psql_q -c "SELECT kms_protect_column('people', 'email', 'pii')" >/dev/null
start=$SECONDS
until [ "$(state people)" = protected ]; do
    [ $((SECONDS - start)) -lt 1800 ] || { echo "timeout waiting for the conversion" >&2; exit 1; }
    sleep 0.2
done
t1=$(date +%s.%N)
held=$(grep -o 'swap held its lock for [0-9]* ms' "$DIR/server.log" | tail -1 | awk '{print $6}')
awk -v r="$ROWS" -v a="$t0" -v b="$t1" -v h="$held" 'BEGIN {
    printf "   %d rows in %.1f s: %.0f rows/s (goal >= 50000); the swap held its lock %s ms\n", r, b - a, r / (b - a), h }'
bad=$(psql_q -c "SELECT count(*) FROM people_decrypted WHERE email IS DISTINCT FROM 'user' || id || '@example.com'")
echo "   rows not decrypting to their original: $bad"
echo "   baseline: the worker's rewrap of the same $ROWS values after a rotation"
r0=$(date +%s.%N)
psql_q -c "SELECT kms_rotate_key('pii')" >/dev/null
start=$SECONDS
until [ "$(psql_q -c "SELECT count(*) = 0 FROM people WHERE kms_key_version(email) <> 2")" = t ]; do
    [ $((SECONDS - start)) -lt 1800 ] || { echo "timeout waiting for the rewrap" >&2; exit 1; }
    sleep 0.5
done
r1=$(date +%s.%N)
awk -v r="$ROWS" -v a="$t0" -v b="$t1" -v c="$r0" -v d="$r1" 'BEGIN {
    printf "   rewrap: %.0f rows/s; online encryption / rewrap = %.2f\n", r / (d - c), (d - c) / (b - a) }'

echo "== 2. pgbench TPS, worker idle vs. converting at the default throttle (5000 rows/s)"
"$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -i -s 10 -q bench >/dev/null 2>&1
psql_q -c "ALTER SYSTEM RESET pg_kms.reencrypt_max_rows_per_second" \
       -c "ALTER SYSTEM RESET pg_kms.reencrypt_batch_size" -c "SELECT pg_reload_conf()" >/dev/null
psql_q -c "CHECKPOINT" >/dev/null
tps() { "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -c 2 -j 2 -T "$PGBENCH_SECONDS" -n bench 2>/dev/null \
        | awk '/^tps/ {print $3; exit}'; }
set_enabled() { psql_q -c "ALTER SYSTEM SET pg_kms.reencrypt_enabled = $1" -c "SELECT pg_reload_conf()" >/dev/null; }
psql_q -c "SELECT kms_protect_column('people2', 'email', 'pii')" >/dev/null
done_rows() { psql_q -c "SELECT rows_done FROM kms_protected_columns WHERE table_name = 'people2'::regclass"; }
until [ "$(done_rows)" -gt 0 ]; do sleep 0.1; done
idles=(); works=(); converted=0
for round in $(seq "$ROUNDS"); do
    set_enabled off; sleep 1
    idles+=("$(tps)")
    set_enabled on
    before=$(done_rows)
    works+=("$(tps)")
    after=$(done_rows)
    converted=$((converted + after - before))
    echo "   round $round: idle ${idles[-1]} tps, converting ${works[-1]} tps"
done
[ "$(state people2)" = converting ] || echo "   (the conversion finished during the run: raise ROWS)"
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
awk -v i="$(median "${idles[@]}")" -v w="$(median "${works[@]}")" -v n="$converted" -v s="$((PGBENCH_SECONDS * ROUNDS))" 'BEGIN {
    printf "   median idle: %.0f tps; median converting: %.0f tps while encrypting %.0f rows/s\n", i, w, n / s
    printf "   TPS ratio converting/idle = %.3f (goal >= 0.90)\n", w / i }'
