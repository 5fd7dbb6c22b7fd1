#!/usr/bin/env bash
# Cost of the access audit in instructions, immune to the load of a shared
# machine: N point selects decrypting 3 encrypted columns (as in
# scripts/bench_access_audit.sh), run by a standalone backend
# (postgres --single, pg_kms preloaded, each statement its own transaction)
# under valgrind's callgrind, with pg_kms.access_audit = off, then on.
# Prints the instructions of each run and the difference per statement.
# (User-space instructions only: the audit makes no system call.)
# Needs valgrind and the extension installed (release build). Run as root
# on Debian 12: bash scripts/bench_access_audit_instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

N=${N:-1000}
ROWS=${ROWS:-10000}
DIR=${DIR:-/tmp/pg_kms_bench_access_ir}
PORT=${PORT:-54387}
KEY=$DIR.keys/master.key
trap 'cluster_stop "$DIR"' EXIT

new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_preload_libraries = 'pg_kms'" \
    "jit = off" "autovacuum = off" "synchronous_commit = off"
cluster_psql "$DIR" "$PORT" -d postgres -qAtX -v ON_ERROR_STOP=1 -v rows="$ROWS" >/dev/null <<'SQL'
CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
CREATE TABLE t (id int PRIMARY KEY, a encrypted_text, b encrypted_text, c encrypted_text);
INSERT INTO t SELECT g, kms_encrypt('a' || g, 'pii'), kms_encrypt('b' || g, 'pii'), kms_encrypt('c' || g, 'pii')
  FROM generate_series(1, :rows) g;
VACUUM ANALYZE t;
SQL
cluster_stop "$DIR"
F=$DIR/statements.sql
for i in $(seq 1 "$N"); do
    echo "SELECT kms_decrypt(a), kms_decrypt(b), kms_decrypt(c) FROM t WHERE id = $(( (i * 7919) % ROWS + 1 ));"
done >"$F"
chmod 644 "$F"
declare -A IR
for v in off on; do
    as_pg valgrind --tool=callgrind --callgrind-out-file="$DIR/callgrind.$v" "$PG_BIN/postgres" --single \
        -D "$DIR/data" -c pg_kms.access_audit=$v postgres <"$F" >"$DIR/out.$v" 2>"$DIR/err.$v"
    IR[$v]=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$DIR/err.$v")
    echo "   access_audit = $v: ${IR[$v]} instructions for $N statements"
done
awk -v on="${IR[on]}" -v off="${IR[off]}" -v n="$N" \
    'BEGIN { printf "   on - off: %.0f instructions per statement (%.3f%% of the run)\n", (on - off) / n, (on - off) / off * 100 }'
