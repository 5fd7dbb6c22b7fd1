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
# The SQL it runs is in scripts/bench/ (psql variables set with -v and \set).
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
SQL_DIR=scripts/bench   # the SQL this script runs

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
psql_bench -At -v rows="$ROWS" -v nsub="$NSUB" -v aeskey="$AESKEY" -v psw="$PGPPSW" -f "$SQL_DIR/setup.sql"
echo "   setup took $(( SECONDS - t_setup )) s"

# ---------------------------------------------------------------- measurements
# The SQL is in scripts/bench/*.sql; each section below runs a small driver
# that sets the repetition number and includes those files (\i), in one session.
# serial: REPS repetitions of scripts/bench/serial_rep.sql (every operation on
# every column), repetitions outermost, so drift from other load on the
# machine spreads over all operations instead of hitting one of them.
driver_serial() {
    local rep
    echo "\\i $SQL_DIR/serial_start.sql"
    for ((rep = 1; rep <= REPS; rep++)); do echo "\\set rep $rep"; echo "\\i $SQL_DIR/serial_rep.sql"; done
}
driver_parallel() {
    local rep
    echo "\\i $SQL_DIR/parallel_start.sql"
    for ((rep = 1; rep <= REPS; rep++)); do echo "\\set rep $rep"; echo "\\i $SQL_DIR/parallel_rep.sql"; done
}
driver_memory() { echo "\\i $SQL_DIR/memory.sql"; }

errors=()
run_section() {   # NAME KEY: runs driver_KEY's SQL; on error, records it and continues
    local name=$1 key=$2 file="$DIR/$2.sql" err="$DIR/$2.err"
    "driver_$key" > "$file"
    if ! psql_bench -At -v rows="$ROWS" -v nsub="$NSUB" -v reps="$REPS" -v aeskey="$AESKEY" -v psw="$PGPPSW" \
            -v verbose="$([ "$VERBOSE" = 1 ] && echo 1 || echo 0)" -f "$file" 2>"$err"; then
        local msg
        msg=$(grep -m1 -E 'ERROR|FATAL|PANIC' "$err" | sed -E 's/^psql:[^ ]* //; s/^(ERROR|FATAL|PANIC): +//' || true)
        echo "   FAILED: ERROR: ${msg:-psql failed} (full message: $err)"
        errors+=("$name: ${msg:-psql failed}")
        psql_bench -v name="error_$key" -v msg="${msg:-psql failed}" -f "$SQL_DIR/record_error.sql" || true
    fi
}

echo
echo "== serial measurements (max_parallel_workers_per_gather = 0), $REPS repetitions, interleaved"
run_section "serial measurements" serial

echo
echo "== parallel: the same kms_decrypt query, 2 workers vs none ($REPS runs each, interleaved)"
echo "   ($(nproc) CPUs here; parallel_leader_participation = off, so the 2 workers do all the scanning)"
run_section "parallel kms_decrypt" parallel

echo
echo "== backend memory during a $ROWS-row decrypt (3 columns per row; fresh backend, after a 1000-row warm-up and a plain scan)"
echo "   /proc/<pid>/status is read between the queries by psql (running as root) through \\set var \`awk ...\`"
run_section "memory" memory

# ---------------------------------------------------------------- report
echo
psql_bench -v rows="$ROWS" -v nsub="$NSUB" -v reps="$REPS" -v stat="$STAT" -f "$SQL_DIR/report.sql"

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
