#!/usr/bin/env bash
# OLTP cost of pg_kms in instructions (issue 17), repeatable on a noisy
# shared machine: the point reads and point writes of scripts/bench_oltp.sh,
# run by a standalone backend (postgres --single, pg_kms preloaded as in
# production, each statement its own transaction) under valgrind's
# callgrind, which counts the instructions executed (user space only).
#
# Variants (ROWS rows in p and e as in bench_oltp.sh; ids spread over the table):
#   read  plaintext  SELECT email, phone, ssn FROM p WHERE id = <id>
#   read  reference  SELECT reverse(email), reverse(phone), reverse(ssn) FROM p WHERE id = <id>
#   read  pg_kms     SELECT kms_decrypt(email), kms_decrypt(phone), kms_decrypt(ssn) FROM e WHERE id = <id>
#   write plaintext  UPDATE p SET email = 'u' || <id> || '@example.com', phone = '+1' || <id> WHERE id = <id>
#   write pg_kms     UPDATE e SET email = kms_encrypt(..., 'pii'), phone = kms_encrypt(..., 'pii') WHERE id = <id>
# each "simple" (literal ids: parsed and planned every time) and "prepared"
# (PREPARE s(int) AS ...; EXECUTE s(<id>)); and scans of all ROWS rows,
# instructions per row (one scan more in the big run than in the small):
#   scan floor       SELECT sum(octet_length(email)) FROM scan_p
#   scan decrypt     SELECT sum(octet_length(kms_decrypt(email))) FROM scan_e
#   scan encrypt     SELECT sum(octet_length(kms_encrypt(email, 'pii')::bytea)) FROM scan_p
# (scan_p and scan_e: one-column copies of p's emails and e's encrypted ones)
#
# Method: startup and first-use costs (backend start, catalog caches, loading
# the key) are removed by running every variant twice, with the same prefix:
# [PREPARE, for prepared variants] + one warm-up statement (in the pg_kms
# variants it loads the key: a first kms_decrypt, plus a kms_encrypt for the
# writes) + 1 statement, then the same prefix + 1+N statements;
# instructions per statement = (big - small) / N. Every run starts from a
# copy of the same data directory (freshly vacuumed tables), so the writes
# of one run do not change what the next one finds. The backend's exit
# (a shutdown checkpoint in single-user mode) is in both runs; the big run
# writes more dirty pages then, as a server eventually would.
# The ratio printed is plaintext / pg_kms instructions per statement: an
# instruction-count analogue of the TPS ratio of bench_oltp.sh. It excludes
# the network, the client and the protocol handling of a real connection
# (postgres --single reads statements from stdin), so it OVERSTATES the
# relative cost of pg_kms compared with pgbench; it does not count cache
# misses or system calls either. Its value is that it repeats to a fraction
# of a percent whatever else runs on the machine.
#
# Environment (all optional):
#   N=2000     statements measured per variant
#   ROWS=100000
#   DIR=/tmp/pg_kms_bench_oltp_ir  PORT=54392   (the cluster; the callgrind
#              output goes to $DIR/callgrind, owned by postgres)
#
# Needs valgrind and the extension installed into Debian's PostgreSQL 15
# (release build). Installs nothing. Run as root on Debian 12:
#   bash scripts/bench_oltp_instructions.sh
# Nothing is asserted on the figures; the exit status is non-zero only if a
# step errors.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster.sh

N=${N:-2000}
ROWS=${ROWS:-100000}
DIR=${DIR:-/tmp/pg_kms_bench_oltp_ir}
PORT=${PORT:-54392}
KEY=$DIR.keys/master.key

for v in N ROWS PORT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v must be a positive integer (got '${!v}')" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "run as root (the server and valgrind run as postgres via runuser)" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
[ -x "$PG_BIN/postgres" ] || { echo "PostgreSQL not found in $PG_BIN" >&2; exit 2; }
SO=$("$PG_BIN/pg_config" --pkglibdir)/pg_kms.so
[ -f "$("$PG_BIN/pg_config" --sharedir)/extension/pg_kms.control" ] && [ -f "$SO" ] \
    || { echo "pg_kms is not installed into $("$PG_BIN/pg_config" --version); install it first (cargo pgrx install --release)" >&2; exit 2; }
trap 'cluster_stop "$DIR"' EXIT

so_id() { echo "$(stat -c '%y' "$SO" | cut -d. -f1) $(sha256sum "$SO" | cut -c1-12)"; }
SO_AT_START=$(so_id)
so_kind="$(( $(stat -c %s "$SO") / 1024 )) kB"
if command -v readelf >/dev/null && readelf -S --wide "$SO" 2>/dev/null | grep -q '\.debug_info'; then
    so_kind="$so_kind, WITH DEBUG INFO: probably a debug build; measure a release build (cargo pgrx install --release)"
fi
echo "== pg_kms OLTP instruction counts (callgrind, postgres --single)"
echo "   machine:  $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   pg_kms:   $SO of $SO_AT_START ($so_kind)"
echo "   $(valgrind --version), N = $N statements per variant, $ROWS rows"

new_master_key "$KEY"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEY'" "shared_preload_libraries = 'pg_kms'" \
    "jit = off" "max_parallel_workers_per_gather = 0" "autovacuum = off" "shared_buffers = '256MB'" \
    "synchronous_commit = off"
cluster_psql "$DIR" "$PORT" -d postgres -qAtX -v ON_ERROR_STOP=1 -v rows="$ROWS" <<'SQL'
\ir scripts/bench/oltp_tables.sql
-- The scans read one-column copies: the emails, plaintext and encrypted.
CREATE TABLE scan_p AS SELECT email FROM p;
CREATE TABLE scan_e AS SELECT email FROM e;
VACUUM ANALYZE;
CHECKPOINT;
SQL
echo "   server:   PostgreSQL $(cluster_psql "$DIR" "$PORT" -d postgres -qAtX -c 'SHOW server_version')"
cluster_stop "$DIR"
# Every run starts from a copy of this data directory, so that no run sees
# the dead tuples or moved rows of an earlier run's updates.
rm -rf "$DIR/data.orig"
cp -a "$DIR/data" "$DIR/data.orig"

OUT=$DIR/callgrind
install -d -o postgres -g postgres -m 0700 "$OUT"

# The statement of each variant, with ID standing for the row id.
declare -A STMT=(
    [read_plain]="SELECT email, phone, ssn FROM p WHERE id = ID"
    [read_ref]="SELECT reverse(email), reverse(phone), reverse(ssn) FROM p WHERE id = ID"
    [read_kms]="SELECT kms_decrypt(email), kms_decrypt(phone), kms_decrypt(ssn) FROM e WHERE id = ID"
    [read_kms_null]="SELECT kms_decrypt(email, NULL), kms_decrypt(phone, NULL), kms_decrypt(ssn, NULL) FROM e WHERE id = ID"
    [write_plain]="UPDATE p SET email = 'u' || ID || '@example.com', phone = '+1' || ID WHERE id = ID"
    [write_kms]="UPDATE e SET email = kms_encrypt('u' || ID || '@example.com', 'pii'), phone = kms_encrypt('+1' || ID, 'pii') WHERE id = ID"
    [scan_floor]="SELECT sum(octet_length(email)) FROM scan_p"
    [scan_decrypt]="SELECT sum(octet_length(kms_decrypt(email))) FROM scan_e"
    [scan_encrypt]="SELECT sum(octet_length(kms_encrypt(email, 'pii')::bytea)) FROM scan_p"
)
declare -A WARMUP=(
    [read_plain]="SELECT email FROM p WHERE id = 1"
    [read_ref]="SELECT reverse(email) FROM p WHERE id = 1"
    [read_kms]="SELECT kms_decrypt(email) FROM e WHERE id = 1"
    [read_kms_null]="SELECT kms_decrypt(email) FROM e WHERE id = 1"
    [write_plain]="SELECT email FROM p WHERE id = 1"
    [write_kms]="SELECT kms_decrypt(email), kms_encrypt('warm-up', 'pii') FROM e WHERE id = 1"
    [scan_floor]="SELECT email FROM p WHERE id = 1"
    [scan_decrypt]="SELECT kms_decrypt(email) FROM e WHERE id = 1"
    [scan_encrypt]="SELECT kms_decrypt(email), kms_encrypt('warm-up', 'pii') FROM e WHERE id = 1"
)
# statements VARIANT PROTOCOL COUNT: the input of a standalone backend
statements() {
    local v=$1 proto=$2 count=$3 i stmt=${STMT[$1]}
    if [ "$proto" = prepared ]; then
        echo "PREPARE s(int) AS ${stmt//ID/(\$1)}"
        stmt="EXECUTE s(ID)"
    fi
    echo "${WARMUP[$v]}"
    for ((i = 0; i < count; i++)); do
        echo "${stmt//ID/$(( (i * 7919) % ROWS + 1 ))}"
    done
}
# run VARIANT PROTOCOL COUNT: prints the instructions of the whole run
run() {
    local tag="$1.$2.$3" ir
    statements "$1" "$2" "$3" >"$OUT/$tag.sql"
    rm -rf "$DIR/data"
    cp -a "$DIR/data.orig" "$DIR/data"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$tag" "$PG_BIN/postgres" --single \
        -D "$DIR/data" postgres <"$OUT/$tag.sql" >"$OUT/$tag.out" 2>"$OUT/$tag.err" \
        || { echo "postgres --single failed for $tag (see $OUT/$tag.err):" >&2; tail -5 "$OUT/$tag.err" >&2; return 1; }
    if grep -qE '(ERROR|FATAL|PANIC): ' "$OUT/$tag.err" "$OUT/$tag.out"; then
        echo "an error in $tag:" >&2; grep -hE '(ERROR|FATAL|PANIC): ' "$OUT/$tag.err" "$OUT/$tag.out" | head -3 >&2
        return 1
    fi
    ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/$tag.err")
    [ -n "$ir" ] || { echo "no callgrind total in $OUT/$tag.err" >&2; return 1; }
    echo "$ir"
}

declare -A PER
echo
echo "== instructions (small run: prefix + 1 statement; big run: prefix + 1+$N statements)"
# (Each run starts from the same copy of the data directory.)
for v in read_plain read_ref read_kms read_kms_null write_plain write_kms; do
    for proto in simple prepared; do
        small=$(run "$v" "$proto" 1)
        big=$(run "$v" "$proto" $((1 + N)))
        PER["$v $proto"]=$(awk -v b="$big" -v s="$small" -v n="$N" 'BEGIN { printf "%.0f", (b - s) / n }')
        printf '   %-12s %-9s small %13s  big %13s  -> %9s instructions per statement\n' \
            "$v" "$proto" "$small" "$big" "${PER["$v $proto"]}"
    done
done

echo
echo "== scans of the $ROWS rows (small run: prefix + 1 scan; big run: prefix + 2 scans)"
# The tables were vacuumed before the copy every run starts from, so no
# scan pays for setting hint bits (a first scan of fresh rows would).
declare -A ROW
for v in scan_floor scan_decrypt scan_encrypt; do
    small=$(run "$v" simple 1)
    big=$(run "$v" simple 2)
    ROW[$v]=$(awk -v b="$big" -v s="$small" -v n="$ROWS" 'BEGIN { printf "%.0f", (b - s) / n }')
    printf '   %-13s small %13s  big %13s  -> %6s instructions per row\n' "$v" "$small" "$big" "${ROW[$v]}"
done

SO_AT_END=$(so_id)
[ "$SO_AT_END" = "$SO_AT_START" ] || echo "== WARNING: pg_kms.so was replaced during the run ($SO_AT_START -> $SO_AT_END): re-run"
echo
echo "== ratios: plaintext / other instructions per statement (analogue of a TPS ratio; excludes network and client, so it overstates pg_kms's relative cost)"
echo
echo "| workload | plaintext (instr/statement) | other (instr/statement) | plaintext / other | TPS goal in bench_oltp.sh |"
echo "|---|---|---|---|---|"
line() {  # line LABEL PLAIN_KEY OTHER_KEY GOAL
    awk -v l="$1" -v p="${PER[$2]}" -v k="${PER[$3]}" -v g="$4" \
        'BEGIN { printf "| %s | %d | %d | %.3fx | %s |\n", l, p, k, p / k, g }'
}
line "point read, pg_kms, simple" "read_plain simple" "read_kms simple" ">= 0.90x"
line "point read, pg_kms, prepared" "read_plain prepared" "read_kms prepared" ">= 0.95x"
line "point read, pg_kms, kms_decrypt(col, NULL), simple" "read_plain simple" "read_kms_null simple" "- (no default argument to expand)"
line "point read, 3 × reverse() reference, simple" "read_plain simple" "read_ref simple" "- (ceiling for any function-based approach)"
line "point read, 3 × reverse() reference, prepared" "read_plain prepared" "read_ref prepared" "- (ceiling for any function-based approach)"
line "point write (UPDATE 2 columns), pg_kms, simple" "write_plain simple" "write_kms simple" ">= 0.95x"
line "point write (UPDATE 2 columns), pg_kms, prepared" "write_plain prepared" "write_kms prepared" ">= 0.95x"
echo
for proto in simple prepared; do
    awk -v r="${PER["read_ref $proto"]}" -v k="${PER["read_kms $proto"]}" -v pl="${PER["read_plain $proto"]}" -v p="$proto" \
        'BEGIN { printf "   point read %-8s: pg_kms - plaintext = %d instructions per statement (%d per kms_decrypt); pg_kms - reference = %d\n",
                 p, k - pl, (k - pl) / 3, k - r }'
done
awk -v k="${PER["write_kms prepared"]}" -v pl="${PER["write_plain prepared"]}" \
    'BEGIN { printf "   point write prepared: pg_kms - plaintext = %d instructions per statement (%d per kms_encrypt)\n", k - pl, (k - pl) / 2 }'
echo
echo "| scan of $ROWS rows (instructions per row) | floor sum(octet_length(email)) | pg_kms | pg_kms / floor | time goal in bench_oltp.sh |"
echo "|---|---|---|---|---|"
for op in decrypt encrypt; do
    awk -v f="${ROW[scan_floor]}" -v k="${ROW[scan_$op]}" -v op="$op" \
        'BEGIN { printf "| kms_%s | %d | %d | %.2fx | <= 3.50x (stretch 2.50x) |\n", op, f, k, k / f }'
done
echo "   (no PASS/FAIL here: the goals are TPS and time ratios, measured by scripts/bench_oltp.sh)"
