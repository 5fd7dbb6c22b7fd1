#!/usr/bin/env bash
# pg_kms benchmark: per-row cost of kms_encrypt / kms_decrypt / kms_rewrap next
# to a scan floor, built-in sha256() and pgcrypto; parallel decrypt speedup;
# per-value storage overhead; backend memory growth during a 1M-row decrypt.
#
# Usage (Debian 12, as root, from the repository root):
#   bash scripts/bench.sh
# Prerequisite: pg_kms is ALREADY installed into Debian's PostgreSQL 15
# (/usr/lib/postgresql/15), e.g. by scripts/quickstart.sh or
# `cargo pgrx install --release`, and postgresql-contrib (pgcrypto) is present.
# This script installs nothing: it only creates a throwaway cluster (as the
# postgres user, Unix socket only) with a fresh master key, and stops it at exit.
#
# Environment (all optional):
#   ROWS=1000000   rows in the main table (pgcrypto runs on min(ROWS, 100000))
#   REPS=3         repetitions per measurement (at least 3)
#   STAT=min       statistic over the repetitions used for ns/row and all ratios:
#                  min (default: the least disturbed run; other load on the
#                  machine can only add time) or median. Both are printed.
#   PORT=54377     cluster port
#   DIR=/tmp/pg_kms_bench   cluster directory (deleted at exit unless KEEP_DIR=1
#                  or the run failed)
#   VERBOSE=1      print every timed run, not only a line per repetition
#   PIN=1          pin the installed build (off by default): snapshot pg_kms.so, its
#                  control and SQL files into $DIR.pinned and start the cluster in
#                  a private mount namespace (unshare -m) where those copies are
#                  bind-mounted over the installed paths. A concurrent
#                  `cargo pgrx install` then cannot swap or truncate the library
#                  under the running backends (SIGBUS, mixed builds). Nothing
#                  outside that namespace changes. PIN=0 (default) uses the files
#                  in place: do not reinstall the extension while it runs.
#
# Method: every measurement is an aggregate over the whole table, e.g.
#   SELECT sum(octet_length(kms_decrypt(email))) FROM pii_sealed
# so no rows are sent to the client. It is timed with clock_timestamp() deltas
# taken in the same session around the query, run REPS times; the report uses
# the min (STAT=median for the median; both are printed).
# ns/row = ms * 1e6 / rows.
# Serial measurements run with max_parallel_workers_per_gather = 0 and jit = off.
# The exit status is 0 unless something errors; the targets are reported as
# PASS/FAIL labels only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

ROWS=${ROWS:-1000000}
REPS=${REPS:-3}
STAT=${STAT:-min}
PORT=${PORT:-54377}
DIR=${DIR:-/tmp/pg_kms_bench}
KEEP_DIR=${KEEP_DIR:-0}
VERBOSE=${VERBOSE:-0}
PIN=${PIN:-0}
PIN_DIR=$DIR.pinned

[[ $ROWS =~ ^[1-9][0-9]*$ ]] || { echo "ROWS must be a positive integer" >&2; exit 2; }
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "REPS must be a positive integer" >&2; exit 2; }
[[ $STAT == min || $STAT == median ]] || { echo "STAT must be min or median" >&2; exit 2; }
[[ $PORT =~ ^[0-9]+$ ]] || { echo "PORT must be a number" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "run as root (the cluster runs as postgres via runuser; /proc sampling needs root)" >&2; exit 2; }
[ -x "$PG_BIN/postgres" ] || { echo "PostgreSQL 15 not found in $PG_BIN" >&2; exit 2; }
[ -f /usr/share/postgresql/15/extension/pg_kms.control ] \
    || { echo "pg_kms is not installed into PostgreSQL 15; install it first (scripts/quickstart.sh)" >&2; exit 2; }
[ -f /usr/share/postgresql/15/extension/pgcrypto.control ] \
    || { echo "pgcrypto is missing (package postgresql-contrib / postgresql-15)" >&2; exit 2; }
[ "$REPS" -ge 3 ] || echo "warning: REPS=$REPS; the spec asks for at least 3 repetitions" >&2

NSUB=$(( ROWS < 100000 ? ROWS : 100000 ))   # rows for the pgcrypto measurements
AESKEY='\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'  # benchmark-only key
PGPPSW='bench-password'

ok=0
cleanup() {
    cluster_stop "$DIR"
    if [ "$ok" = 1 ] && [ "$KEEP_DIR" != 1 ]; then
        rm -rf "$DIR" "$PIN_DIR"
    elif [ -d "$DIR" ]; then
        echo "(cluster directory kept: $DIR; server log: $DIR/server.log)" >&2
    fi
}
trap cleanup EXIT

psql_bench() { cluster_psql "$DIR" "$PORT" -d bench -q -X -v ON_ERROR_STOP=1 "$@"; }

# ---------------------------------------------------------------- machine
cpu_model=$(grep -m1 -E '^(model name|Model name|cpu model|Hardware)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
[ -n "$cpu_model" ] || cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
mem_total=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)

SO=$("$PG_BIN/pg_config" --pkglibdir)/pg_kms.so
EXT_DIR=$("$PG_BIN/pg_config" --sharedir)/extension
so_id() { stat -c '%y' "$SO" | cut -d. -f1; sha256sum "$SO" | cut -c1-12; }

# The files of the installed build: the library, its control file and SQL scripts.
PIN_FILES=("$SO" "$EXT_DIR/pg_kms.control")
for f in "$EXT_DIR"/pg_kms--*.sql; do PIN_FILES+=("$f"); done

# Copies the installed build into $PIN_DIR once it has been quiet for 5 s
# (an install in progress writes the .so, then the SQL) and the copies match.
snapshot_build() {
    local attempt f newest newest2
    for ((attempt = 1; attempt <= 60; attempt++)); do
        newest=$(stat -c %Y "${PIN_FILES[@]}" | sort -n | tail -1)
        if (( $(date +%s) - newest >= 5 )); then
            rm -rf "$PIN_DIR"
            install -d -m 0755 "$PIN_DIR"
            cp -p "${PIN_FILES[@]}" "$PIN_DIR/"
            local same=1
            for f in "${PIN_FILES[@]}"; do cmp -s "$f" "$PIN_DIR/${f##*/}" || same=0; done
            newest2=$(stat -c %Y "${PIN_FILES[@]}" | sort -n | tail -1)
            [ "$same" = 1 ] && [ "$newest2" = "$newest" ] && return 0
        fi
        sleep 2
    done
    echo "the installed pg_kms files keep changing; cannot take a consistent snapshot" >&2
    return 1
}

if [ "$PIN" = 1 ] && ! unshare -m --propagation private true 2>/dev/null; then
    echo "warning: unshare -m is not permitted here; running unpinned (PIN=0)" >&2
    PIN=0
fi
if [ "$PIN" = 1 ]; then
    snapshot_build
    SO_AT_START="$(stat -c '%y' "$PIN_DIR/pg_kms.so" | cut -d. -f1) $(sha256sum "$PIN_DIR/pg_kms.so" | cut -c1-12)"
else
    SO_AT_START=$(so_id | paste -sd' ')
fi
SO_USED=$SO
[ "$PIN" = 1 ] && SO_USED=$PIN_DIR/pg_kms.so
so_kind="$(( $(stat -c %s "$SO_USED") / 1024 )) kB"
if command -v readelf >/dev/null && readelf -S --wide "$SO_USED" 2>/dev/null | grep -q '\.debug_info'; then
    so_kind="$so_kind, WITH DEBUG INFO: probably a debug build; benchmark a release build (cargo pgrx install --release)"
fi

echo "== pg_kms benchmark"
echo "   machine:    $(nproc) CPUs, ${cpu_model:-unknown CPU}, $mem_total RAM, $(uname -sr)"
echo "   load avg:   $(cut -d' ' -f1-3 /proc/loadavg) (at start; absolute numbers are noisy on a busy machine)"
if [ "$PIN" = 1 ]; then
    echo "   pg_kms:     build of $SO_AT_START ($so_kind), pinned: copies in $PIN_DIR"
else
    echo "   pg_kms:     $SO of $SO_AT_START ($so_kind), used in place (PIN=0)"
fi
echo "   rows:       $ROWS (pgcrypto and the apples-to-apples kms rows: $NSUB), repetitions: $REPS ($STAT used for ns/row and ratios)"

# ---------------------------------------------------------------- cluster
CONF=(
    "pg_kms.master_key_file = '$DIR/keys/master.key'"
    "jit = off"
    "max_parallel_workers_per_gather = 0"
    "max_worker_processes = 8"
    "max_parallel_workers = 8"
    "fsync = off"
    "synchronous_commit = off"
    "full_page_writes = off"
    "max_wal_size = '8GB'"
    "checkpoint_timeout = '1h'"
    "autovacuum = off"
)
cluster_stop "$DIR"
if [ "$PIN" = 1 ]; then
    # The postmaster (and every backend it forks) lives in a private mount
    # namespace that sees the snapshot at the installed paths.
    PIN_LIST="${PIN_FILES[*]}" PIN_DIR="$PIN_DIR" unshare -m --propagation private bash -c '
        set -euo pipefail
        for f in $PIN_LIST; do mount --bind "$PIN_DIR/${f##*/}" "$f"; done
        source scripts/cluster.sh
        cluster_start "$@"' cluster_start "$DIR" "$PORT" "${CONF[@]}"
else
    cluster_start "$DIR" "$PORT" "${CONF[@]}"
fi
new_master_key "$DIR/keys/master.key"
cluster_psql "$DIR" "$PORT" -d postgres -q -X -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench"

echo "   PostgreSQL: $(psql_bench -At -c 'SELECT version()')"
echo "   settings:   shared_buffers=$(psql_bench -At -c 'SHOW shared_buffers'), jit=off, autovacuum=off, fsync=off (throwaway cluster)"

# ---------------------------------------------------------------- data set
echo
echo "== building the data set ($ROWS rows) and sealed copies"
t_setup=$SECONDS
psql_bench -At -v rows="$ROWS" -v nsub="$NSUB" -v aeskey="$AESKEY" -v psw="$PGPPSW" <<'SQL'
CREATE EXTENSION pg_kms;
CREATE EXTENSION pgcrypto;
SET max_parallel_workers_per_gather = 0;
SELECT kms_create_key('bench') \gset
CREATE SCHEMA bench;

-- Realistic PII, ASCII only (so bytes = characters):
--   email  ~20 bytes  e.g. "greta.3f9c1@gmail.com"
--   nat_id  9 digits  e.g. "048213377"
--   addr  200 bytes   street address, c/o name, delivery note, reference
SELECT setseed(0.4242) \gset
CREATE TABLE pii AS
SELECT i AS id,
       f.first || '.' || substr(md5(i::text), 1, 5) || '@' || f.domain AS email,
       lpad(floor(random() * 1e9)::bigint::text, 9, '0') AS nat_id,
       rpad(format('%s %s %s, Apt %s, %s, %s %s, United States | c/o %s %s | %s | ref ',
                   1 + floor(random() * 9999)::int,
                   (ARRAY['Maple','Oak','Cedar','Elm','Pine','Birch','Willow','Lakeview','Hillcrest','Sunset'])[1 + floor(random() * 10)::int],
                   (ARRAY['Street','Avenue','Road','Boulevard','Lane','Drive','Court'])[1 + floor(random() * 7)::int],
                   1 + floor(random() * 300)::int,
                   (ARRAY['Springfield','Riverside','Franklin','Greenville','Bristol','Clinton','Fairview','Madison'])[1 + floor(random() * 8)::int],
                   (ARRAY['IL','CA','TX','NY','OR','WA','MA','OH'])[1 + floor(random() * 8)::int],
                   lpad(floor(random() * 100000)::int::text, 5, '0'),
                   initcap(f.first),
                   (ARRAY['Smith','Johnson','Garcia','Miller','Davis','Martinez','Wilson','Anderson'])[1 + floor(random() * 8)::int],
                   (ARRAY['leave parcel at the back door','ring twice, intercom broken','deliver to neighbour at no. 12 if absent',
                          'gate code 4711, dog in yard','call 30 minutes before arrival'])[1 + floor(random() * 5)::int]),
            200, md5(i::text) || md5((i + 1)::text)) AS addr
  FROM generate_series(1, :rows) AS i,
       LATERAL (SELECT (ARRAY['anna','ben','carla','david','emma','felix','greta','hugo',
                              'ines','jonas','karl','lena','mia','noah','olga','paul'])[1 + floor(random() * 16 + i * 0)::int] AS first,
                       (ARRAY['gmail.com','yahoo.com','outlook.com','web.de','proton.me','icloud.com','gmx.net'])[1 + floor(random() * 7 + i * 0)::int] AS domain) f;

-- Sealed with pg_kms under key version 1; version 2 becomes primary below, so
-- kms_rewrap has real work to do (v1 -> v2) on every row.
CREATE TABLE pii_sealed AS
SELECT id, kms_encrypt(email, 'bench') AS email, kms_encrypt(nat_id, 'bench') AS nat_id, kms_encrypt(addr, 'bench') AS addr
  FROM pii;
ALTER TABLE pii_sealed SET (parallel_workers = 2);
SELECT kms_rotate_key('bench', 'benchmark: make v1 values rewrappable') \gset

-- The pgcrypto subset (and the same rows for kms, to compare like with like).
CREATE TABLE pii_sub AS SELECT * FROM pii WHERE id <= :nsub;
CREATE TABLE pii_sealed_sub AS SELECT * FROM pii_sealed WHERE id <= :nsub;
CREATE TABLE pgc_sub AS
SELECT id, email_iv, encrypt_iv(convert_to(email, 'UTF8'), :'aeskey'::bytea, email_iv, 'aes') AS email_ct,
           nat_iv,   encrypt_iv(convert_to(nat_id, 'UTF8'), :'aeskey'::bytea, nat_iv, 'aes')  AS nat_ct,
           addr_iv,  encrypt_iv(convert_to(addr, 'UTF8'), :'aeskey'::bytea, addr_iv, 'aes')  AS addr_ct,
           pgp_sym_encrypt(email, :'psw') AS email_pgp,
           pgp_sym_encrypt(email, :'psw', 's2k-mode=0') AS email_pgp0,
           pgp_sym_encrypt(nat_id, :'psw', 's2k-mode=0') AS nat_pgp0,
           pgp_sym_encrypt(addr, :'psw', 's2k-mode=0') AS addr_pgp0
  FROM (SELECT p.*, gen_random_bytes(16) AS email_iv, gen_random_bytes(16) AS nat_iv, gen_random_bytes(16) AS addr_iv
          FROM pii_sub p) s;

VACUUM (FREEZE, ANALYZE) pii, pii_sealed, pii_sub, pii_sealed_sub, pgc_sub;
CHECKPOINT;

CREATE TABLE bench.results (op_ord int, op text, col_ord int, col text, nrows bigint, rep int, ms float8);
CREATE TABLE bench.facts (name text PRIMARY KEY, value text);
-- EXPLAIN ANALYZE as rows, so the plan can be printed and "Workers Launched" read back.
CREATE FUNCTION bench.explain(q text, do_analyze boolean) RETURNS SETOF text LANGUAGE plpgsql AS $f$
DECLARE l text;
BEGIN
  FOR l IN EXECUTE format('EXPLAIN (ANALYZE %s, COSTS OFF, TIMING OFF, SUMMARY OFF) %s', CASE WHEN do_analyze THEN 'on' ELSE 'off' END, q) LOOP
    RETURN NEXT l;
  END LOOP;
END $f$;

-- Sanity: sizes and round trips (a benchmark of wrong results is worthless).
SELECT format('   plaintext:  avg bytes email %s, nat_id %s, addr %s; table %s, sealed table %s',
              round(avg(octet_length(email)), 1), round(avg(octet_length(nat_id)), 1), round(avg(octet_length(addr)), 1),
              pg_size_pretty(pg_table_size('pii')), pg_size_pretty(pg_table_size('pii_sealed')))
  FROM pii;
SELECT format('   check:      kms round trip %s/%s ok, rewrap v%s -> v%s ok %s, decrypt_iv ok %s, pgp ok %s',
              count(*) FILTER (WHERE kms_decrypt(s.email) = p.email AND kms_decrypt(s.nat_id) = p.nat_id AND kms_decrypt(s.addr) = p.addr),
              count(*),
              min(kms_key_version(s.email)),
              max(kms_key_version(kms_rewrap(s.email))),
              bool_and(kms_decrypt(kms_rewrap(s.addr)) = p.addr),
              bool_and(convert_from(decrypt_iv(c.addr_ct, :'aeskey'::bytea, c.addr_iv, 'aes'), 'UTF8') = p.addr),
              bool_and(pgp_sym_decrypt(c.email_pgp, :'psw') = p.email AND pgp_sym_decrypt(c.addr_pgp0, :'psw') = p.addr))
  FROM pii p JOIN pii_sealed s USING (id) JOIN pgc_sub c USING (id)
 WHERE id <= 1000;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pii p JOIN pii_sealed s USING (id)
              WHERE id <= 1000
                AND (kms_decrypt(s.email) IS DISTINCT FROM p.email OR kms_decrypt(s.nat_id) IS DISTINCT FROM p.nat_id
                     OR kms_decrypt(s.addr) IS DISTINCT FROM p.addr OR kms_key_version(s.email) <> 1
                     OR kms_key_version(kms_rewrap(s.email)) <> 2)) THEN
    RAISE EXCEPTION 'sanity check failed: kms round trip or rewrap is wrong';
  END IF;
END $$;
SQL
echo "   setup took $(( SECONDS - t_setup )) s"

# ---------------------------------------------------------------- measurements
# measure OP_ORD OP COL_ORD COL NROWS QUERY REP: one timed run of QUERY (an
# aggregate returning one row), recorded in bench.results (and echoed if VERBOSE=1).
measure() {
    local op_ord=$1 op=${2//\'/\'\'} col_ord=$3 col=$4 n=$5 q=$6 rep=$7
    printf '%s\n' \
        'SELECT clock_timestamp() AS t0 \gset' \
        "$q"' \gset res_' \
        "INSERT INTO bench.results VALUES ($op_ord, '$op', $col_ord, '$col', $n, $rep, 1000 * extract(epoch FROM clock_timestamp() - :'t0'::timestamptz))"
    if [ "$VERBOSE" = 1 ]; then
        echo "  RETURNING format('   rep %s  %-44s %-8s %8s rows %10s ms', rep, op, col, nrows, to_char(ms, 'FM9999999990.0'));"
    else
        echo ";"
    fi
}

COLS=(email nat_id addr)          # column in pii / pii_sealed
CLABEL=(email id address)         # label in the report
CPFX=(email nat addr)             # prefix of the pgcrypto columns in pgc_sub
KEY="'$AESKEY'::bytea"
PSW="'$PGPPSW'"

# Results are summed with octet_length(): O(1) for text and bytea alike.
# length(text) counts UTF-8 characters (a few ns per byte), which would be
# charged only to the functions that return text (kms_decrypt, decrypt_iv via
# convert_from, pgp_sym_decrypt) and not to sha256(), which returns bytea.
# The spec's floor sum(length(col)) is measured too, to show that cost.
gen_serial() {
    echo "SET max_parallel_workers_per_gather = 0;"
    echo "SELECT count(kms_decrypt(email)) FROM (SELECT email FROM pii_sealed LIMIT 10) s \\gset w_"
    echo "SELECT count(kms_encrypt(email, 'bench')) FROM (SELECT email FROM pii LIMIT 10) s \\gset w_"
    echo "SELECT count(*) FROM pii \\gset w_"
    echo "SELECT count(*) FROM pii_sealed \\gset w_"
    echo "\\echo '   warm-up done (key cache, page cache; untimed)'"
    local rep i c l p
    # Repetitions outermost, so drift from other load on the machine spreads
    # over all operations instead of hitting one of them.
    for ((rep = 1; rep <= REPS; rep++)); do
        echo "SELECT clock_timestamp() AS rep_t0 \\gset"
        for i in 0 1 2; do
            c=${COLS[$i]} l=${CLABEL[$i]} p=${CPFX[$i]}
            measure 10 "floor sum(length(col))"                 "$i" "$l" "$ROWS" "SELECT sum(length($c)) AS v FROM pii" "$rep"
            measure 11 "floor sum(octet_length(col))"           "$i" "$l" "$ROWS" "SELECT sum(octet_length($c)) AS v FROM pii" "$rep"
            measure 12 "floor, sealed table"                    "$i" "$l" "$ROWS" "SELECT sum(octet_length($c::bytea)) AS v FROM pii_sealed" "$rep"
            measure 20 "sha256(convert_to(col, 'UTF8'))"        "$i" "$l" "$ROWS" "SELECT sum(octet_length(sha256(convert_to($c, 'UTF8')))) AS v FROM pii" "$rep"
            measure 30 "kms_encrypt"                            "$i" "$l" "$ROWS" "SELECT sum(octet_length(kms_encrypt($c, 'bench')::bytea)) AS v FROM pii" "$rep"
            measure 31 "kms_decrypt"                            "$i" "$l" "$ROWS" "SELECT sum(octet_length(kms_decrypt($c))) AS v FROM pii_sealed" "$rep"
            measure 32 "kms_rewrap (v1 -> v2)"                  "$i" "$l" "$ROWS" "SELECT sum(octet_length(kms_rewrap($c)::bytea)) AS v FROM pii_sealed" "$rep"
            measure 50 "floor [subset]"                         "$i" "$l" "$NSUB" "SELECT sum(octet_length($c)) AS v FROM pii_sub" "$rep"
            measure 51 "kms_encrypt [subset]"                   "$i" "$l" "$NSUB" "SELECT sum(octet_length(kms_encrypt($c, 'bench')::bytea)) AS v FROM pii_sub" "$rep"
            measure 52 "kms_decrypt [subset]"                   "$i" "$l" "$NSUB" "SELECT sum(octet_length(kms_decrypt($c))) AS v FROM pii_sealed_sub" "$rep"
            measure 60 "encrypt_iv aes, random IV [subset]"     "$i" "$l" "$NSUB" "SELECT sum(octet_length(encrypt_iv(convert_to($c, 'UTF8'), $KEY, gen_random_bytes(16), 'aes'))) AS v FROM pii_sub" "$rep"
            measure 61 "decrypt_iv aes [subset]"                "$i" "$l" "$NSUB" "SELECT sum(octet_length(convert_from(decrypt_iv(${p}_ct, $KEY, ${p}_iv, 'aes'), 'UTF8'))) AS v FROM pgc_sub" "$rep"
            measure 70 "pgp_sym_encrypt s2k-mode=0 [subset]"    "$i" "$l" "$NSUB" "SELECT sum(octet_length(pgp_sym_encrypt($c, $PSW, 's2k-mode=0'))) AS v FROM pii_sub" "$rep"
            measure 71 "pgp_sym_decrypt s2k-mode=0 [subset]"    "$i" "$l" "$NSUB" "SELECT sum(octet_length(pgp_sym_decrypt(${p}_pgp0, $PSW))) AS v FROM pgc_sub" "$rep"
        done
        # Default pgp options: the iterated-and-salted S2K key derivation
        # (tens of thousands of SHA-1 rounds per value) dominates whatever
        # the value size, so the email column alone shows it.
        measure 72 "pgp_sym_encrypt default [subset]" 0 email "$NSUB" "SELECT sum(octet_length(pgp_sym_encrypt(email, $PSW))) AS v FROM pii_sub" "$rep"
        measure 73 "pgp_sym_decrypt default [subset]" 0 email "$NSUB" "SELECT sum(octet_length(pgp_sym_decrypt(email_pgp, $PSW))) AS v FROM pgc_sub" "$rep"
        echo "SELECT format('   repetition $rep/$REPS done in %s s', round(extract(epoch FROM clock_timestamp() - :'rep_t0'::timestamptz))) AS msg \\gset"
        echo "\\echo :msg"
    done
}

PAR_Q="SELECT sum(octet_length(kms_decrypt(email))) AS v FROM pii_sealed"
gen_parallel() {
    cat <<SQL
-- The two workers do all the work: on a 2-CPU machine a participating
-- leader would make three processes share two CPUs.
SET parallel_leader_participation = off;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
\\echo '   forced plan (pii_sealed has parallel_workers = 2):'
SELECT string_agg('      ' || l, E'\\n') AS plan FROM bench.explain('$PAR_Q', false) AS l \\gset
\\echo :plan
INSERT INTO bench.facts VALUES ('workers_planned', coalesce(substring(:'plan' FROM 'Workers Planned: (\\d+)'), '0'));
\\echo '   EXPLAIN ANALYZE:'
SELECT string_agg('      ' || l, E'\\n') AS plan FROM bench.explain('$PAR_Q', true) AS l \\gset
\\echo :plan
INSERT INTO bench.facts VALUES ('workers_launched', coalesce(substring(:'plan' FROM 'Workers Launched: (\\d+)'), '0'));
SQL
    local rep
    for ((rep = 1; rep <= REPS; rep++)); do
        echo "SET max_parallel_workers_per_gather = 0;"
        measure 80 "kms_decrypt, no parallel workers" 0 email "$ROWS" "$PAR_Q" "$rep"
        echo "SET max_parallel_workers_per_gather = 2;"
        measure 81 "kms_decrypt, 2 parallel workers" 0 email "$ROWS" "$PAR_Q" "$rep"
    done
}

gen_memory() {
    cat <<'SQL'
SET max_parallel_workers_per_gather = 0;
SELECT pg_backend_pid() AS pid \gset
-- Warm-up in this fresh backend: library, key cache, executor (1000 rows
-- decrypted), then a plain scan of the whole table, so that the shared-buffer
-- pages the decrypt scan will touch are already counted in VmRSS/VmHWM
-- before the first sample (they are shared memory, not this backend's).
SELECT sum(octet_length(kms_decrypt(email)) + octet_length(kms_decrypt(nat_id)) + octet_length(kms_decrypt(addr))) AS v
  FROM (SELECT * FROM pii_sealed LIMIT 1000) s \gset w_
SELECT sum(octet_length(email::bytea) + octet_length(nat_id::bytea) + octet_length(addr::bytea)) AS v FROM pii_sealed \gset w_
\set hwm0 `awk '/^VmHWM:/ {print $2}' /proc/:pid/status`
\set rss0 `awk '/^VmRSS:/ {print $2}' /proc/:pid/status`
\set anon0 `awk '/^RssAnon:/ {print $2}' /proc/:pid/status`
\set shm0 `awk '/^RssShmem:/ {print $2}' /proc/:pid/status`
\echo '   backend pid' :pid 'before: VmHWM' :hwm0 'kB, VmRSS' :rss0 'kB, RssAnon' :anon0 'kB, RssShmem' :shm0 'kB'
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_decrypt(email)) + octet_length(kms_decrypt(nat_id)) + octet_length(kms_decrypt(addr))) AS v FROM pii_sealed \gset w_
SELECT round(1000 * extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)) AS ms \gset
\set hwm1 `awk '/^VmHWM:/ {print $2}' /proc/:pid/status`
\set rss1 `awk '/^VmRSS:/ {print $2}' /proc/:pid/status`
\set anon1 `awk '/^RssAnon:/ {print $2}' /proc/:pid/status`
\set shm1 `awk '/^RssShmem:/ {print $2}' /proc/:pid/status`
\echo '   backend pid' :pid 'after:  VmHWM' :hwm1 'kB, VmRSS' :rss1 'kB, RssAnon' :anon1 'kB, RssShmem' :shm1 'kB'
\echo '   (decrypted' :w_v 'bytes in' :ms 'ms)'
INSERT INTO bench.facts VALUES ('hwm0', :'hwm0'), ('hwm1', :'hwm1'), ('rss0', :'rss0'), ('rss1', :'rss1'),
                               ('anon0', :'anon0'), ('anon1', :'anon1'), ('shm0', :'shm0'), ('shm1', :'shm1'),
                               ('mem_ms', :'ms');
SQL
}

errors=()
run_section() {   # NAME GENERATOR: runs the generated SQL; on error, records it and continues
    local name=$1 gen=$2 file="$DIR/$2.sql" err="$DIR/$2.err"
    "$gen" > "$file"
    if ! psql_bench -At -f "$file" 2>"$err"; then
        local msg
        msg=$(grep -m1 -E 'ERROR|FATAL|PANIC' "$err" | sed -E 's/^psql:[^ ]* //; s/^(ERROR|FATAL|PANIC): +//' || true)
        echo "   FAILED: ERROR: ${msg:-psql failed} (full message: $err)"
        errors+=("$name: ${msg:-psql failed}")
        psql_bench -c "INSERT INTO bench.facts VALUES ('error_$gen', \$e\$${msg:-psql failed}\$e\$) ON CONFLICT (name) DO NOTHING" || true
    fi
}

echo
echo "== serial measurements (max_parallel_workers_per_gather = 0), $REPS repetitions, interleaved"
run_section "serial measurements" gen_serial

echo
echo "== parallel: the same kms_decrypt query, 2 workers vs none ($REPS runs each, interleaved)"
echo "   ($(nproc) CPUs here; parallel_leader_participation = off, so the 2 workers do all the scanning)"
run_section "parallel kms_decrypt" gen_parallel

echo
echo "== backend memory during a $ROWS-row decrypt (3 columns per row; fresh backend, after a 1000-row warm-up and a plain scan)"
echo "   /proc/<pid>/status is read between the queries by psql (running as root) through \\set var \`awk ...\`"
run_section "memory" gen_memory

# ---------------------------------------------------------------- report
echo
psql_bench -v rows="$ROWS" -v nsub="$NSUB" -v reps="$REPS" -v stat="$STAT" <<'SQL'
\pset footer off
\pset null 'n/a'
CREATE TEMP VIEW s AS
SELECT op_ord, op, col_ord, col, nrows, count(*) AS runs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS med, min(ms) AS mn,
       CASE :'stat' WHEN 'min' THEN min(ms) ELSE percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) END * 1e6 / nrows AS ns
  FROM bench.results GROUP BY op_ord, op, col_ord, col, nrows;
CREATE TEMP VIEW f AS SELECT name, value FROM bench.facts;

\echo '== results:' :reps 'runs each; ns/row =' :stat 'ms * 1e6 / rows (which is also the ms per 1M rows)'
\echo '   each run is SELECT sum(octet_length(f(col))) FROM table (no rows sent to the client), serial, jit off'
\echo '   [subset] = the first' :nsub 'rows (pgcrypto, and kms on the same rows); the other lines use all' :rows 'rows'
SELECT op AS operation, col AS "column", nrows AS rows, runs,
       round(med::numeric, 1) AS "median ms", round(mn::numeric, 1) AS "min ms", round(ns::numeric) AS "ns/row"
  FROM s ORDER BY op_ord, col_ord;

\echo '== ratios and targets (of' :stat 'ns/row; vs sha256 on all rows, vs pgcrypto on the subset for both sides)'
WITH
ns AS (SELECT op_ord, col_ord, col, ns FROM s),
ratio AS (
  SELECT x.ord, a.col_ord, a.col, x.label, a.ns / b.ns AS v, x.target, x.maxv, x.minv
    FROM (VALUES (1, 31, 20, 'kms_decrypt time / sha256 time',              '<= 1.00x', 1.0::float8, NULL::float8),
                 (2, 30, 20, 'kms_encrypt time / sha256 time',              '<= 1.20x', 1.2, NULL),
                 (3, 32, 20, 'kms_rewrap time / sha256 time',               '-',        NULL, NULL),
                 (4, 61, 52, 'kms_decrypt speedup over decrypt_iv',         '>= 2.00x', NULL, 2.0),
                 (5, 60, 51, 'kms_encrypt speedup over encrypt_iv+random IV', '>= 2.00x', NULL, 2.0),
                 (6, 73, 52, 'kms_decrypt speedup over pgp_sym_decrypt',    '-',        NULL, NULL),
                 (7, 71, 52, 'kms_decrypt speedup over pgp (s2k-mode=0)',   '-',        NULL, NULL))
         AS x(ord, num, den, label, target, maxv, minv)
    JOIN ns a ON a.op_ord = x.num
    JOIN ns b ON b.op_ord = x.den AND b.col_ord = a.col_ord
),
par AS (
  SELECT (SELECT ns FROM ns WHERE op_ord = 80) / (SELECT ns FROM ns WHERE op_ord = 81) AS speedup,
         (SELECT value FROM f WHERE name = 'workers_planned') AS planned,
         (SELECT value FROM f WHERE name = 'workers_launched') AS launched,
         (SELECT value FROM f WHERE name = 'error_gen_parallel') AS err
),
ovh AS (
  SELECT c.ord, c.col, k.sealed - p.plain AS kms, p.plain, k.sealed
    FROM (VALUES (0, 'email'), (1, 'id'), (2, 'address')) AS c(ord, col)
    JOIN LATERAL (SELECT avg(CASE c.ord WHEN 0 THEN pg_column_size(email) WHEN 1 THEN pg_column_size(nat_id) ELSE pg_column_size(addr) END) AS plain FROM pii) p ON true
    JOIN LATERAL (SELECT avg(CASE c.ord WHEN 0 THEN pg_column_size(email) WHEN 1 THEN pg_column_size(nat_id) ELSE pg_column_size(addr) END) AS sealed FROM pii_sealed) k ON true
),
pgp AS (
  SELECT avg(pg_column_size(c.email_pgp) - pg_column_size(p.email)) AS dflt,
         avg(pg_column_size(c.email_pgp0) - pg_column_size(p.email)) AS s2k0_email,
         avg(pg_column_size(c.nat_pgp0) - pg_column_size(p.nat_id)) AS s2k0_id,
         avg(pg_column_size(c.addr_pgp0) - pg_column_size(p.addr)) AS s2k0_addr
    FROM pii_sub p JOIN pgc_sub c USING (id)
),
mem AS (
  SELECT (SELECT value::float8 FROM f WHERE name = 'hwm1') - (SELECT value::float8 FROM f WHERE name = 'hwm0') AS hwm_kb,
         (SELECT value::float8 FROM f WHERE name = 'rss1') - (SELECT value::float8 FROM f WHERE name = 'rss0') AS rss_kb,
         (SELECT value::float8 FROM f WHERE name = 'anon1') - (SELECT value::float8 FROM f WHERE name = 'anon0') AS anon_kb,
         (SELECT value::float8 FROM f WHERE name = 'shm1') - (SELECT value::float8 FROM f WHERE name = 'shm0') AS shm_kb,
         (SELECT value FROM f WHERE name = 'error_gen_memory') AS err
),
lines AS (
  SELECT 10 AS o1, ord AS o2,
         col_ord AS o3, label AS a, col AS b, to_char(v, 'FM999990.00') || 'x' AS c, target AS d,
         CASE WHEN maxv IS NOT NULL THEN v <= maxv WHEN minv IS NOT NULL THEN v >= minv END AS ok
    FROM ratio
  UNION ALL
  SELECT 20, 1, 0, 'parallel speedup, 2 workers vs none', 'email',
         coalesce(to_char(speedup, 'FM990.00') || 'x', 'ERROR: ' || err), '>= 1.60x',
         coalesce(speedup >= 1.6 AND launched::int >= 2, false)
    FROM par
  UNION ALL
  SELECT 20, 2, 0, 'parallel workers planned / launched', 'email',
         coalesce(planned, '?') || ' / ' || coalesce(launched, '?'), '2 / 2',
         coalesce(planned = '2' AND launched = '2', false)
    FROM par
  UNION ALL
  SELECT 30, 1, ord, 'pg_kms overhead per value (pg_column_size)', col,
         format('+%s B (%s -> %s)', round(kms, 1), round(plain, 1), round(sealed, 1)), '<= 40 B', kms <= 40
    FROM ovh
  UNION ALL
  SELECT 30, 2, 0, 'pgp_sym_encrypt default overhead per value', 'email', format('+%s B', round(dflt, 1)), '-', NULL FROM pgp
  UNION ALL
  SELECT 30, 3, x.o, 'pgp_sym_encrypt s2k-mode=0 overhead per value', x.c, format('+%s B', round(x.v, 1)), '-', NULL
    FROM pgp, LATERAL (VALUES (0, 'email', s2k0_email), (1, 'id', s2k0_id), (2, 'address', s2k0_addr)) AS x(o, c, v)
  UNION ALL
  SELECT 40, 1, 0, 'backend memory growth (VmHWM) over the decrypt', '3 columns',
         coalesce(to_char(hwm_kb / 1024, 'FM99990.00') || ' MB', 'ERROR: ' || err), '<= 5 MB', coalesce(hwm_kb / 1024 <= 5, false)
    FROM mem
  UNION ALL
  SELECT 40, 2, 0, 'backend VmRSS change (= RssAnon + RssShmem + file)', '3 columns',
         format('%s MB (anon %s, shmem %s)', to_char(rss_kb / 1024, 'FM99990.00'), to_char(anon_kb / 1024, 'FM99990.00'),
                to_char(shm_kb / 1024, 'FM99990.00')), '-', NULL
    FROM mem
)
SELECT a AS "check", b AS "column", c AS measured, d AS target,
       CASE WHEN ok THEN 'PASS' WHEN NOT ok THEN 'FAIL' ELSE '' END AS result
  FROM lines ORDER BY o1, o2, o3;
\echo '   VmHWM/VmRSS count the shared-buffer pages the backend touches (RssShmem) as well as its private memory (RssAnon).'
\echo '   PASS/FAIL are labels only: the exit status is non-zero only when a step errors.'
SQL

SO_AT_END=$(so_id | paste -sd' ')
if [ "$PIN" != 1 ] && [ "$SO_AT_END" != "$SO_AT_START" ]; then
    echo "== WARNING: pg_kms.so was replaced during the run ($SO_AT_START -> $SO_AT_END):"
    echo "   backends started before and after the reinstall ran different builds; re-run for consistent figures"
fi
if [ ${#errors[@]} -gt 0 ]; then
    echo "== errors during the benchmark:"
    printf '   ERROR in %s\n' "${errors[@]}"
    exit 1
fi
ok=1
echo "== done"
