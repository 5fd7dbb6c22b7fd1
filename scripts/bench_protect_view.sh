#!/usr/bin/env bash
# Protected columns: single-row writes and reads through the decrypted view
# (kms_protect_column's INSTEAD OF trigger) against the same statements
# calling kms_encrypt / kms_decrypt directly on the table (issue 15,
# Performance: view writes within 1.3x of direct). One run; every figure is
# a ratio to a baseline measured in the same run, the variants interleaved
# round by round; nothing is asserted on time.
#
#   writes: INSERT INTO people_decrypted (id, name, email)
#               VALUES (nextval(...), 'name', $1)        -- the view: context id::text
#       vs. INSERT INTO people (id, name, email)
#               SELECT i, 'name', kms_encrypt($1, 'pii', i::text) FROM nextval(...) i
#     both with and without a blind index (blind_index_bits => 16; direct:
#     kms_blind_index(...) into an indexed bytea column). Both take the id
#     from the sequence explicitly, so they do the same work.
#   reads:  SELECT email FROM people_decrypted WHERE id = $1
#       vs. SELECT kms_decrypt(email, id::text) FROM people WHERE id = $1
#
# pgbench -M prepared (as drivers and ORMs prepare), one client, N
# statements per run, ROUNDS rounds; synchronous_commit = off by default
# (SYNC=on to include the WAL flush each single-row transaction waits for,
# the same for both, which hides the difference in CPU). Two measures per
# run: the server's CPU time per statement (the backend's user + system
# time, which the postmaster collects when the backend exits: autovacuum is
# off, so no other child exits meanwhile), robust on a shared machine, and
# the wall-clock TPS, which other load on the machine disturbs. The ratios
# use the median CPU time; the TPS ratio is printed next to it.
# Needs the extension installed (release build: `cargo pgrx install
# --release`). Run as root on Debian 12: bash scripts/bench_protect_view.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

ROWS=${ROWS:-100000}        # rows preloaded for the reads
N=${N:-20000}               # statements per pgbench run
ROUNDS=${ROUNDS:-5}
SYNC=${SYNC:-off}
DIR=${DIR:-/tmp/pg_kms_bench_view}
PORT=${PORT:-54379}
KEY=$DIR.keys/master.key
trap 'cluster_stop "$DIR"' EXIT

psql_q() { cluster_psql "$DIR" "$PORT" -d bench -qAtX -v ON_ERROR_STOP=1 "$@"; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GB RAM"
new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_buffers = '512MB'" \
    "synchronous_commit = $SYNC" "jit = off" "autovacuum = off" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
cluster_psql "$DIR" "$PORT" -d postgres -qc "CREATE DATABASE bench"
echo "PostgreSQL: $(psql_q -c 'SHOW server_version'); pg_kms: $(stat -c '%y' "$("$PG_BIN/pg_config" --pkglibdir)/pg_kms.so" | cut -d. -f1)"
echo "pgbench -M prepared, 1 client, $N statements per run, $ROUNDS rounds, synchronous_commit = $SYNC, $ROWS rows for reads"

psql_q -v rows="$ROWS" >/dev/null <<'SQL'
CREATE EXTENSION pg_kms;
SELECT kms_create_key('pii');
-- Through the view (the context is computed from NEW.id).
CREATE TABLE people (id bigserial PRIMARY KEY, name text, email encrypted_text);
SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text');
CREATE TABLE people_b (id bigserial PRIMARY KEY, name text, email encrypted_text);
SELECT kms_protect_column('people_b', 'email', 'pii', context => 'id::text', blind_index_bits => 16);
-- Direct: the same tables, written with kms_encrypt (and kms_blind_index).
CREATE TABLE direct (id bigserial PRIMARY KEY, name text, email encrypted_text);
CREATE TABLE direct_b (id bigserial PRIMARY KEY, name text, email encrypted_text, email_bidx bytea);
CREATE INDEX ON direct_b (email_bidx);
-- The rows the reads look up, the same values in both.
INSERT INTO people_decrypted (id, name, email)
     SELECT g, 'n' || g, 'user' || g || '@example.com' FROM generate_series(1, :rows) g;
INSERT INTO direct (id, name, email)
     SELECT g, 'n' || g, kms_encrypt('user' || g || '@example.com', 'pii', g::text) FROM generate_series(1, :rows) g;
SELECT setval('people_id_seq', :rows), setval('direct_id_seq', :rows);
VACUUM ANALYZE;
SQL
same=$(psql_q -c "SELECT count(*) FROM people_decrypted v JOIN direct d USING (id) WHERE v.email = kms_decrypt(d.email, d.id::text)")
[ "$same" = "$ROWS" ] || { echo "setup: the view and the direct table differ ($same of $ROWS rows)" >&2; exit 1; }

W=$DIR/scripts
install -d -o postgres -g postgres "$W"
cat >"$W/write_view.sql" <<'SQL'
\set r random(1, 1000000000)
INSERT INTO people_decrypted (id, name, email) VALUES (nextval('people_id_seq'), 'name', 'user' || :r || '@example.com');
SQL
cat >"$W/write_direct.sql" <<'SQL'
\set r random(1, 1000000000)
INSERT INTO direct (id, name, email) SELECT i, 'name', kms_encrypt('user' || :r || '@example.com', 'pii', i::text) FROM nextval('direct_id_seq') AS i;
SQL
cat >"$W/write_view_bidx.sql" <<'SQL'
\set r random(1, 1000000000)
INSERT INTO people_b_decrypted (id, name, email) VALUES (nextval('people_b_id_seq'), 'name', 'user' || :r || '@example.com');
SQL
cat >"$W/write_direct_bidx.sql" <<'SQL'
\set r random(1, 1000000000)
INSERT INTO direct_b (id, name, email, email_bidx)
     SELECT i, 'name', kms_encrypt(p, 'pii', i::text), kms_blind_index(p, 'pii', NULL, 16)
       FROM nextval('direct_b_id_seq') AS i, (SELECT 'user' || :r || '@example.com' AS p) AS x;
SQL
cat >"$W/read_view.sql" <<'SQL'
\set id random(1, :rows)
SELECT email FROM people_decrypted WHERE id = :id;
SQL
cat >"$W/read_direct.sql" <<'SQL'
\set id random(1, :rows)
SELECT kms_decrypt(email, id::text) FROM direct WHERE id = :id;
SQL

VARIANTS=(write_view write_direct write_view_bidx write_direct_bidx read_view read_direct)
declare -A CPU TPS
PM_PID=$(head -1 "$DIR/data/postmaster.pid")
HZ=$(getconf CLK_TCK)
children_cpu() {  # user + system ticks of the postmaster's exited children
    awk '{ print $16 + $17 }' "/proc/$PM_PID/stat"
}
run() {  # prints "<server CPU us per statement> <tps>"
    local before after out
    before=$(children_cpu)
    out=$("$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M prepared -c 1 -j 1 -t "$N" \
        -D rows="$ROWS" -f "$W/$1.sql" bench 2>"$DIR/pgbench.err") || { cat "$DIR/pgbench.err" >&2; return 1; }
    sleep 0.2  # the backend has exited and been reaped
    after=$(children_cpu)
    awk -v d="$((after - before))" -v hz="$HZ" -v n="$N" -v t="$(echo "$out" | awk '/^tps/ {print $3; exit}')" \
        'BEGIN { printf "%.1f %.0f\n", d / hz * 1e6 / n, t }'
}
for round in $(seq 1 "$ROUNDS"); do
    line="   round $round (CPU us/statement, tps):"
    for v in "${VARIANTS[@]}"; do
        read -r c t < <(run "$v")
        [ -n "$c" ] && [ "$t" != 0 ] || { echo "pgbench $v failed" >&2; exit 1; }
        CPU[$v]="${CPU[$v]:-} $c"; TPS[$v]="${TPS[$v]:-} $t"
        line="$line $v=$c,$t"
    done
    echo "$line"
done
# Every row written through the view decrypts, with its id as context.
bad=$(psql_q -c "SELECT count(*) FROM people WHERE kms_decrypt(email, id::text) IS NULL")
[ "$bad" = 0 ] || { echo "rows written through the view do not decrypt: $bad" >&2; exit 1; }

pick() {  # pick best|least|median LIST: of the numbers in LIST
    echo "$2" | tr ' ' '\n' | sed '/^$/d' | sort -g | awk -v s="$1" '
        { v[NR] = $1 } END { if (s == "best") print v[NR]; else if (s == "least") print v[1];
                             else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
echo
printf '   %-18s | %14s | %14s | %10s | %10s\n' variant "median CPU us" "least CPU us" "median tps" "best tps"
for v in "${VARIANTS[@]}"; do
    printf '   %-18s | %14.1f | %14.1f | %10.0f | %10.0f\n' "$v" "$(pick median "${CPU[$v]}")" \
        "$(pick least "${CPU[$v]}")" "$(pick median "${TPS[$v]}")" "$(pick best "${TPS[$v]}")"
done
echo
ratio() {  # VIEW DIRECT: median CPU time ratio, and the median wall-clock ratio (direct tps / view tps)
    awk -v a="$(pick median "${CPU[$1]}")" -v b="$(pick median "${CPU[$2]}")" \
        -v x="$(pick median "${TPS[$2]}")" -v y="$(pick median "${TPS[$1]}")" \
        'BEGIN { printf "%5.2fx | %5.2fx", a / b, x / y }'
}
printf '   %-58s | %6s | %6s | %s\n' "check (through the view / direct)" CPU wall target
printf '   %-58s | %s | <= 1.30x\n' "INSERT, context id::text" "$(ratio write_view write_direct)"
printf '   %-58s | %s | <= 1.30x\n' "INSERT, context id::text, blind index (16 bits)" "$(ratio write_view_bidx write_direct_bidx)"
printf '   %-58s | %s | -\n' "SELECT by id" "$(ratio read_view read_direct)"
