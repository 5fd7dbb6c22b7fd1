#!/usr/bin/env bash
# OLTP cost of pg_kms (issue 17): what a transaction rate and a load time
# lose when three columns are encrypted. Every figure is a ratio to a
# plaintext baseline measured in the same run; nothing is asserted on time
# (PASS/FAIL are labels; the exit status is non-zero only if a step errors).
#
# Data: ROWS rows in a plaintext table p(id int PRIMARY KEY, email, phone,
# ssn text) ('user123@example.com', '+15550000123', '000000123') and a
# table e with the same ids and kms_encrypt(col, 'pii') of each column
# (encrypted_text); VACUUM ANALYZE.
#
# 1. Point read, pgbench -M prepared and -M simple (\set id random(1, :rows)):
#      plaintext  SELECT email, phone, ssn FROM p WHERE id = :id
#      pg_kms     SELECT kms_decrypt(email), kms_decrypt(phone), kms_decrypt(ssn) FROM e WHERE id = :id
#      reference  SELECT reverse(email), reverse(phone), reverse(ssn) FROM p WHERE id = :id
#    The reference calls a trivial built-in function three times: what any
#    three SQL function calls add, i.e. the ceiling for any function-based
#    approach (its ratio to plaintext is printed as such).
# 2. Point write (UPDATE of 2 columns by id, synchronous_commit = off), both protocols:
#      plaintext  UPDATE p SET email = 'u' || :id || '@example.com', phone = '+1' || :id WHERE id = :id
#      pg_kms     UPDATE e SET email = kms_encrypt('u' || ..., 'pii'), phone = kms_encrypt(..., 'pii') WHERE id = :id
# 3. Bulk load: INSERT INTO p2 SELECT ... FROM generate_series(1, BULK_ROWS)
#    (3 text columns built from g) vs the same with kms_encrypt on the 3
#    columns into e2 (encrypted_text). Heap tables without indexes (the
#    strictest ratio: no index build to dilute the encryption); the target
#    is truncated and a CHECKPOINT taken before every timed INSERT. Timed
#    with clock_timestamp() deltas in one psql session (after an untimed
#    warm-up that loads the key), REPS repetitions alternating the order;
#    the MEDIAN time is used. Ratio = pg_kms time / plaintext time.
# 4. Scans of SCAN_ROWS emails in one-column tables (scan_p: the emails
#    of the plaintext bulk-load table; scan_e: the same emails encrypted,
#    from the pg_kms one), vacuumed (frozen) first, as in
#    scripts/bench_oltp_instructions.sh. One column, so that each scan reads
#    only the column it measures: with the bulk-load tables the decrypt
#    would also read the pages of two more encrypted columns. REPS
#    repetitions alternating the order, one warm-up run each, MEDIAN time:
#      floor    SELECT sum(octet_length(email)) FROM scan_p
#      decrypt  SELECT sum(octet_length(kms_decrypt(email))) FROM scan_e
#      encrypt  SELECT sum(octet_length(kms_encrypt(email, 'pii')::bytea)) FROM scan_p
#    ns/row = ms * 1e6 / rows; ratio to the floor. The verdicts use the
#    ratio of the medians; the ratios within each repetition (floor,
#    decrypt and encrypt back to back; the two bulk loads back to back) and
#    their median are printed too, as the host's speed can change between
#    repetitions by more than the difference measured.
#
# Method (pgbench): CLIENTS clients and JOBS threads (default 2 and 2), T
# seconds per run, ROUNDS rounds. Each round runs every variant once; within
# each workload and protocol the order alternates round by round (plaintext
# first in odd rounds, pg_kms first in even rounds; the reference runs in
# between). Before every run: VACUUM p, e and a CHECKPOINT (so that no run
# inherits the previous run's dead tuples or dirty pages). The ratio uses
# the MEDIAN TPS of each variant: pg_kms TPS / plaintext TPS. Each run's TPS
# is printed as it goes. On a shared machine other load moves single runs
# by 10% or more: look at the per-round figures, and at
# scripts/bench_oltp_instructions.sh for a figure immune to load.
#
# Cluster: shared_preload_libraries = 'pg_kms' (the production setting; the
# access audit is on by default), jit = off,
# max_parallel_workers_per_gather = 0, autovacuum = off, shared_buffers =
# 256MB, synchronous_commit = off, checkpoint_timeout = 1h and max_wal_size
# = 4GB (no timed checkpoint inside a run).
#
# Environment (all optional):
#   ROWS=100000        rows in p and e (point reads and writes)
#   BULK_ROWS=1000000  rows per bulk load
#   SCAN_ROWS=1000000  rows scanned
#   REPS=3             repetitions of each bulk load and scan
#   T=10               seconds per pgbench run
#   ROUNDS=3           pgbench rounds
#   CLIENTS=2 JOBS=2   pgbench -c / -j
#   QUICK=1            smoke test: T=2 ROUNDS=1 ROWS=10000 BULK_ROWS=100000
#                      SCAN_ROWS=100000 (variables set explicitly still win)
#   DIR=/tmp/pg_kms_bench_oltp  PORT=54391   the throwaway cluster
#
# Needs the extension installed into Debian's PostgreSQL 15 (release build:
# `cargo pgrx install --release`, or scripts/quickstart.sh) and pgbench.
# Installs nothing. Run as root on Debian 12: bash scripts/bench_oltp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

if [ "${QUICK:-0}" = 1 ]; then
    T=${T:-2}; ROUNDS=${ROUNDS:-1}; ROWS=${ROWS:-10000}; BULK_ROWS=${BULK_ROWS:-100000}; SCAN_ROWS=${SCAN_ROWS:-100000}
fi
ROWS=${ROWS:-100000}
BULK_ROWS=${BULK_ROWS:-1000000}
SCAN_ROWS=${SCAN_ROWS:-1000000}
REPS=${REPS:-3}
T=${T:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-2}
JOBS=${JOBS:-$CLIENTS}
DIR=${DIR:-/tmp/pg_kms_bench_oltp}
PORT=${PORT:-54391}
KEY=$DIR.keys/master.key

for v in ROWS BULK_ROWS SCAN_ROWS REPS T ROUNDS CLIENTS JOBS PORT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer (got '${!v}')" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "run as root (the cluster runs as postgres via runuser)" >&2; exit 2; }
[ -x "$PG_BIN/postgres" ] || { echo "PostgreSQL not found in $PG_BIN" >&2; exit 2; }
[ -x "$PG_BIN/pgbench" ] || { echo "pgbench not found in $PG_BIN (package postgresql-15)" >&2; exit 2; }
SO=$("$PG_BIN/pg_config" --pkglibdir)/pg_kms.so
[ -f "$("$PG_BIN/pg_config" --sharedir)/extension/pg_kms.control" ] && [ -f "$SO" ] \
    || { echo "pg_kms is not installed into $("$PG_BIN/pg_config" --version); install it first (cargo pgrx install --release)" >&2; exit 2; }

trap 'cluster_stop "$DIR"' EXIT
psql_q() { cluster_psql "$DIR" "$PORT" -d bench -qAtX -v ON_ERROR_STOP=1 "$@"; }
so_id() { echo "$(stat -c '%y' "$SO" | cut -d. -f1) $(sha256sum "$SO" | cut -c1-12)"; }

# ---------------------------------------------------------------- machine
cpu_model=$(grep -m1 -E '^(model name|Model name|cpu model|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs || true)
SO_AT_START=$(so_id)
so_kind="$(( $(stat -c %s "$SO") / 1024 )) kB"
if command -v readelf >/dev/null && readelf -S --wide "$SO" 2>/dev/null | grep -q '\.debug_info'; then
    so_kind="$so_kind, WITH DEBUG INFO: probably a debug build; benchmark a release build (cargo pgrx install --release)"
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== pg_kms OLTP benchmark"
echo "   machine:  $(nproc) CPUs, ${cpu_model:-unknown CPU}, load average $LOAD_START (at start)"
echo "   pg_kms:   $SO of $SO_AT_START ($so_kind)"

new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_preload_libraries = 'pg_kms'" \
    "jit = off" "max_parallel_workers_per_gather = 0" "autovacuum = off" "shared_buffers = '256MB'" \
    "synchronous_commit = off" "checkpoint_timeout = '1h'" "max_wal_size = '4GB'"
cluster_psql "$DIR" "$PORT" -d postgres -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench"
echo "   server:   PostgreSQL $(psql_q -c 'SHOW server_version'), shared_preload_libraries = '$(psql_q -c 'SHOW shared_preload_libraries')', pg_kms.access_audit = $(psql_q -c 'SHOW pg_kms.access_audit' 2>/dev/null || echo '?')"
echo "   pgbench:  $CLIENTS clients, $JOBS threads, ${T}s per run, $ROUNDS rounds (median TPS), $ROWS rows"
echo "   bulk:     $BULK_ROWS rows, scans: $SCAN_ROWS rows, $REPS repetitions each (median time)"

# ---------------------------------------------------------------- data
echo
echo "== setup: $ROWS rows in p (plaintext) and e (encrypted)"
psql_q -v rows="$ROWS" <<'SQL'
\ir scripts/bench/oltp_tables.sql
-- The bulk-load targets: heap tables without indexes.
CREATE TABLE p2 (id int, email text, phone text, ssn text);
CREATE TABLE e2 (id int, email encrypted_text, phone encrypted_text, ssn encrypted_text);
VACUUM ANALYZE;
SQL
same=$(psql_q -c "SELECT count(*) FROM p JOIN e USING (id) WHERE p.email = kms_decrypt(e.email) AND p.phone = kms_decrypt(e.phone) AND p.ssn = kms_decrypt(e.ssn)")
[ "$same" = "$ROWS" ] || { echo "setup: p and e differ ($same of $ROWS rows decrypt to the plaintext)" >&2; exit 1; }
echo "   p: $(psql_q -c "SELECT pg_size_pretty(pg_table_size('p'))"), e: $(psql_q -c "SELECT pg_size_pretty(pg_table_size('e'))"); every row of e decrypts to p's"

W=$DIR/pgbench
install -d -o postgres -g postgres "$W"
cat >"$W/read_plain.sql" <<'SQL'
\set id random(1, :rows)
SELECT email, phone, ssn FROM p WHERE id = :id;
SQL
cat >"$W/read_ref.sql" <<'SQL'
\set id random(1, :rows)
SELECT reverse(email), reverse(phone), reverse(ssn) FROM p WHERE id = :id;
SQL
cat >"$W/read_kms.sql" <<'SQL'
\set id random(1, :rows)
SELECT kms_decrypt(email), kms_decrypt(phone), kms_decrypt(ssn) FROM e WHERE id = :id;
SQL
# The context passed as NULL: no default argument for the parser and the
# planner to read and expand (what the simple protocol pays per call).
cat >"$W/read_kms_null.sql" <<'SQL'
\set id random(1, :rows)
SELECT kms_decrypt(email, NULL), kms_decrypt(phone, NULL), kms_decrypt(ssn, NULL) FROM e WHERE id = :id;
SQL
# (:id)::int gives the parameter its type under -M prepared.
cat >"$W/write_plain.sql" <<'SQL'
\set id random(1, :rows)
UPDATE p SET email = 'u' || (:id)::int || '@example.com', phone = '+1' || (:id)::int WHERE id = :id;
SQL
cat >"$W/write_kms.sql" <<'SQL'
\set id random(1, :rows)
UPDATE e SET email = kms_encrypt('u' || (:id)::int || '@example.com', 'pii'), phone = kms_encrypt('+1' || (:id)::int, 'pii') WHERE id = :id;
SQL

# ---------------------------------------------------------------- pgbench
declare -A TPS   # variant -> space-separated TPS of its runs
pgb() {  # pgb FILE PROTOCOL: one pgbench run after VACUUM + CHECKPOINT; prints its TPS
    local out
    psql_q -c "VACUUM p, e" -c "CHECKPOINT"
    out=$("$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -M "$2" -c "$CLIENTS" -j "$JOBS" -T "$T" \
        -D rows="$ROWS" -f "$W/$1.sql" bench 2>"$DIR/pgbench.err") \
        || { echo "pgbench $1 -M $2 failed:" >&2; cat "$DIR/pgbench.err" >&2; return 1; }
    awk '/^tps/ { printf "%.0f\n", $3; exit }' <<<"$out"
}
median() {  # median of the numbers in $1 (space-separated)
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '
        { v[NR] = $1 } END { if (NR == 0) print "nan"; else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
# Groups of variants (plaintext first, pg_kms last; reversed in even rounds).
GROUPS_=("read prepared:read_plain read_ref read_kms" "read simple:read_plain read_ref read_kms read_kms_null"
         "write prepared:write_plain write_kms" "write simple:write_plain write_kms")
echo
echo "== pgbench: $ROUNDS rounds, every variant once per round (TPS of each run)"
for round in $(seq 1 "$ROUNDS"); do
    for g in "${GROUPS_[@]}"; do
        name=${g%%:*}; proto=${name#* }; variants=${g#*:}
        [ $((round % 2)) = 1 ] || variants=$(tr ' ' '\n' <<<"$variants" | tac | xargs)
        line="   round $round, $(printf '%-15s' "$name"):"
        for v in $variants; do
            tps=$(pgb "$v" "$proto")
            [ -n "$tps" ] || { echo "pgbench $v -M $proto printed no TPS" >&2; exit 1; }
            TPS["$v $proto"]="${TPS["$v $proto"]:-} $tps"
            line="$line $(printf '%-6s %7.0f ' "${v#*_}" "$tps")"
        done
        echo "$line"
    done
done

# ---------------------------------------------------------------- bulk load and scans
SQL_PLAIN_ROWS="g, 'user' || g || '@example.com', '+1555' || lpad(g::text, 7, '0'), lpad(g::text, 9, '0')"
SQL_KMS_ROWS="g, kms_encrypt('user' || g || '@example.com', 'pii'), kms_encrypt('+1555' || lpad(g::text, 7, '0'), 'pii'), kms_encrypt(lpad(g::text, 9, '0'), 'pii')"
# psql prints one line per timed statement: "RESULT <what> <rep> <ms>".
timed() {  # timed WHAT REP SQL: the psql lines that time SQL
    echo "SELECT clock_timestamp() AS t0 \\gset"
    echo "$3"
    echo "SELECT format('RESULT %s %s %s', '$1', $2, round((1000 * extract(epoch FROM clock_timestamp() - :'t0'::timestamptz))::numeric, 3));"
}
bulk_driver() {
    local rep v order
    echo "SELECT count(kms_encrypt('warm-up', 'pii')) \\gset w_"
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then order="plain kms"; else order="kms plain"; fi
        for v in $order; do
            if [ "$v" = plain ]; then echo "TRUNCATE p2;"; else echo "TRUNCATE e2;"; fi
            echo "CHECKPOINT;"
            if [ "$v" = plain ]; then
                timed bulk_plain "$rep" "INSERT INTO p2 SELECT $SQL_PLAIN_ROWS FROM generate_series(1, $BULK_ROWS) g;"
            else
                timed bulk_kms "$rep" "INSERT INTO e2 SELECT $SQL_KMS_ROWS FROM generate_series(1, $BULK_ROWS) g;"
            fi
        done
    done
}
echo
echo "== bulk load: INSERT ... SELECT of $BULK_ROWS rows, $REPS repetitions (ms of each run)"
bulk_driver >"$DIR/bulk.sql"
psql_q -f "$DIR/bulk.sql" | tee "$DIR/bulk.out" | awk '{ printf "   rep %s %-10s %12.1f ms\n", $3, $2, $4 }'

BIG_P=scan_p; BIG_E=scan_e
if [ "$SCAN_ROWS" = "$BULK_ROWS" ]; then
    psql_q -c "CREATE TABLE scan_p AS SELECT email FROM p2" \
           -c "CREATE TABLE scan_e AS SELECT email FROM e2"
else
    psql_q -c "CREATE TABLE scan_p AS SELECT email FROM (SELECT $SQL_PLAIN_ROWS FROM generate_series(1, $SCAN_ROWS) g) s(id, email, phone, ssn)" \
           -c "CREATE TABLE scan_e AS SELECT kms_encrypt(email, 'pii') AS email FROM scan_p"
fi
psql_q -c "VACUUM (FREEZE, ANALYZE) $BIG_P, $BIG_E" -c "CHECKPOINT"
for t in "$BIG_P" "$BIG_E"; do
    [ "$(psql_q -c "SELECT count(*) FROM $t")" = "$SCAN_ROWS" ] || { echo "scan table $t does not hold $SCAN_ROWS rows" >&2; exit 1; }
done
SCAN_FLOOR="SELECT sum(octet_length(email)) AS v FROM $BIG_P \\gset r_"
SCAN_DEC="SELECT sum(octet_length(kms_decrypt(email))) AS v FROM $BIG_E \\gset r_"
SCAN_ENC="SELECT sum(octet_length(kms_encrypt(email, 'pii')::bytea)) AS v FROM $BIG_P \\gset r_"
scan_driver() {
    local rep v order
    echo "$SCAN_FLOOR"; echo "$SCAN_DEC"; echo "$SCAN_ENC"   # warm-up (untimed)
    for rep in $(seq 1 "$REPS"); do
        if [ $((rep % 2)) = 1 ]; then order="floor decrypt encrypt"; else order="encrypt decrypt floor"; fi
        for v in $order; do
            case $v in
                floor) timed scan_floor "$rep" "$SCAN_FLOOR" ;;
                decrypt) timed scan_decrypt "$rep" "$SCAN_DEC" ;;
                encrypt) timed scan_encrypt "$rep" "$SCAN_ENC" ;;
            esac
        done
    done
}
echo
echo "== scans of $SCAN_ROWS emails ($BIG_P, $BIG_E), $REPS repetitions (ms and ns/row of each run)"
scan_driver >"$DIR/scan.sql"
psql_q -f "$DIR/scan.sql" | tee "$DIR/scan.out" \
    | awk -v n="$SCAN_ROWS" '{ printf "   rep %s %-13s %10.1f ms %8.1f ns/row\n", $3, $2, $4, $4 * 1e6 / n }'

ms_of() {  # ms_of WHAT FILE: the median ms of WHAT's runs
    median "$(awk -v w="$1" '$2 == w { print $4 }' "$2" | xargs)"
}
BULK_PLAIN=$(ms_of bulk_plain "$DIR/bulk.out"); BULK_KMS=$(ms_of bulk_kms "$DIR/bulk.out")
NS_FLOOR=$(awk -v ms="$(ms_of scan_floor "$DIR/scan.out")" -v n="$SCAN_ROWS" 'BEGIN { print ms * 1e6 / n }')
NS_DEC=$(awk -v ms="$(ms_of scan_decrypt "$DIR/scan.out")" -v n="$SCAN_ROWS" 'BEGIN { print ms * 1e6 / n }')
NS_ENC=$(awk -v ms="$(ms_of scan_encrypt "$DIR/scan.out")" -v n="$SCAN_ROWS" 'BEGIN { print ms * 1e6 / n }')

# ---------------------------------------------------------------- report
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
echo
echo "== medians"
for k in "read_plain prepared" "read_ref prepared" "read_kms prepared" "read_plain simple" "read_ref simple" \
         "read_kms simple" "read_kms_null simple" "write_plain prepared" "write_kms prepared" "write_plain simple" "write_kms simple"; do
    printf '   %-22s median %9.0f TPS   (runs:%s)\n' "$k" "$(median "${TPS[$k]}")" "${TPS[$k]}"
done
printf '   %-22s median %9.1f ms\n' "bulk plaintext" "$BULK_PLAIN" "bulk pg_kms" "$BULK_KMS"
printf '   %-22s median %9.1f ns/row\n' "scan floor" "$NS_FLOOR" "scan kms_decrypt" "$NS_DEC" "scan kms_encrypt" "$NS_ENC"
echo "   load average: $LOAD_START at start, $LOAD_END at end"
SO_AT_END=$(so_id)
[ "$SO_AT_END" = "$SO_AT_START" ] || echo "== WARNING: pg_kms.so was replaced during the run ($SO_AT_START -> $SO_AT_END): re-run for consistent figures"

row() {  # row WORKLOAD PLAIN KMS RATIO GOAL VERDICT
    printf '| %s | %s | %s | %s | %s | %s |\n' "$@"
}
# tps_row LABEL VARIANT PROTOCOL GOAL: a TPS ratio (>= goal; goal "-" for none)
tps_row() {
    local p k
    p=$(median "${TPS["read_plain $3"]}"); [[ $2 == write_* ]] && p=$(median "${TPS["write_plain $3"]}")
    k=$(median "${TPS["$2 $3"]}")
    awk -v l="$1" -v p="$p" -v k="$k" -v goal="$4" 'BEGIN {
        r = k / p
        v = goal == "-" ? "reference" : (r >= goal + 0 ? "PASS" : "FAIL")
        printf "| %s | %.0f TPS | %.0f TPS | %.3fx | %s | %s |\n", l, p, k, r, goal == "-" ? "-" : ">= " sprintf("%.2f", goal) "x", v }'
}
echo
echo "== ratios (pg_kms / plaintext; medians; one run of this script on $(nproc) CPUs, load $LOAD_START -> $LOAD_END)"
echo
row workload plaintext pg_kms ratio goal verdict
row --- --- --- --- --- ---
tps_row "point read, 3 columns, -M prepared (pgbench -c $CLIENTS -j $JOBS, $ROWS rows)" read_kms prepared 0.95
tps_row "point read, -M prepared: 3 × reverse() reference (ceiling for any function-based approach)" read_ref prepared -
tps_row "point read, 3 columns, -M simple" read_kms simple 0.90
tps_row "point read, -M simple, written kms_decrypt(col, NULL) (no default argument)" read_kms_null simple -
tps_row "point read, -M simple: 3 × reverse() reference (ceiling for any function-based approach)" read_ref simple -
tps_row "point write, UPDATE of 2 columns, -M prepared (synchronous_commit = off)" write_kms prepared 0.95
tps_row "point write, UPDATE of 2 columns, -M simple" write_kms simple 0.95
awk -v p="$BULK_PLAIN" -v k="$BULK_KMS" -v n="$BULK_ROWS" 'BEGIN { r = k / p
    printf "| bulk INSERT ... SELECT of %d rows, 3 columns (time; median of runs) | %.0f ms | %.0f ms | %.3fx | <= 1.30x | %s |\n",
           n, p, k, r, r <= 1.3 ? "PASS" : "FAIL" }'
for op in decrypt encrypt; do
    ns=$NS_DEC; [ "$op" = encrypt ] && ns=$NS_ENC
    awk -v f="$NS_FLOOR" -v k="$ns" -v n="$SCAN_ROWS" -v op="$op" 'BEGIN { r = k / f
        printf "| scan of %d emails: kms_%s vs floor sum(octet_length(email)) | %.0f ns/row | %.0f ns/row | %.2fx | <= 3.50x (stretch 2.50x) | %s |\n",
               n, op, f, k, r, r <= 2.5 ? "PASS (stretch met)" : (r <= 3.5 ? "PASS" : "FAIL") }'
done
echo
echo "   pg_kms vs the reverse() reference (what pg_kms costs beyond three function calls):"
for proto in prepared simple; do
    awk -v r="$(median "${TPS["read_ref $proto"]}")" -v k="$(median "${TPS["read_kms $proto"]}")" -v p="$proto" \
        'BEGIN { printf "   point read -M %s: pg_kms TPS / reference TPS = %.3fx\n", p, k / r }'
done
# paired WHAT BASE FILE: WHAT / BASE within each repetition (the two ran back
# to back, so a change of the host's speed between repetitions cancels out)
paired() {
    awk -v w="$1" -v b="$2" '$2 == w { k[$3] = $4 } $2 == b { f[$3] = $4 } $3 > n { n = $3 }
        END { for (r = 1; r <= n; r++) if ((r in k) && (r in f) && f[r] > 0) printf "%.2f ", k[r] / f[r] }' "$3"
}
paired_line() {  # paired_line LABEL WHAT BASE FILE
    local r
    r=$(paired "$2" "$3" "$4")
    printf '   %-17s %sx  (runs: %s)\n' "$1:" "$(median "$r")" "$(xargs <<<"$r")"
}
echo
echo "   ratios within each repetition (the host's speed varies between repetitions; median of these):"
paired_line "bulk load" bulk_kms bulk_plain "$DIR/bulk.out"
paired_line "scan kms_decrypt" scan_decrypt scan_floor "$DIR/scan.out"
paired_line "scan kms_encrypt" scan_encrypt scan_floor "$DIR/scan.out"
echo "   PASS/FAIL are labels only; the exit status is non-zero only when a step errors."
