#!/usr/bin/env bash
# AES-256-GCM implementations compared on this machine (issue 17): pg_kms's
# aes-gcm (with the project's build flags, .cargo/config.toml) against ring
# and aws-lc-rs, sealing and opening 16 to 1024-byte values in place with
# pg_kms's 10-byte associated data. No PostgreSQL needed.
#
# It first checks that all three give identical ciphertexts and tags, open
# each other's output and refuse a bad tag; then prints ns per operation
# (best of RUNS timed runs of about MS ms each, pinned to one CPU when
# taskset is there) and each one's ratio to aes-gcm measured in the same
# run. COUNT=1 adds instructions per operation under callgrind,
# (Ir(2K) - Ir(K)) / K: repeatable, but valgrind hides some CPU features
# (VAES, AVX-512), so ring and aws-lc-rs may run another code path there
# than in the timed runs.
#
#   bash scripts/bench_aead.sh                 # about 3 minutes, first build 2 more
#   RUNS=7 MS=500 COUNT=1 bash scripts/bench_aead.sh
#
# scripts/bench_aead is its own crate and workspace: the extension does not
# depend on ring or aws-lc-rs (both build from crates.io; aws-lc-rs needs a
# C compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-5}
MS=${MS:-300}
COUNT=${COUNT:-0}
K=${K:-5000}
export CARGO_TARGET_DIR="$ROOT/target/bench_aead"
BIN="$CARGO_TARGET_DIR/release/bench_aead"

# Built from its own folder so that the project's .cargo/config.toml (the
# x86_64 target features) applies, as to pg_kms.
(cd scripts/bench_aead && cargo build --release --quiet)
"$BIN" check

PIN=()
if command -v taskset >/dev/null; then PIN=(taskset -c "$(($(nproc) - 1))"); fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"${PIN[@]}" "$BIN" bench "$RUNS" "$MS" >"$OUT/bench.csv"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$COUNT" = 1 ]; then
    command -v valgrind >/dev/null || { echo "COUNT=1 needs valgrind" >&2; exit 1; }
    echo "impl,op,size,instr" >"$OUT/count.csv"
    for size in 16 24 32 64 256 1024; do
        for op in seal open; do
            for impl in aes-gcm ring aws-lc-rs; do
                ir=()
                for n in "$K" $((2 * K)); do
                    valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" \
                        "$BIN" count "$impl" "$op" "$size" "$n" 2>/dev/null
                    ir+=("$(awk '/^totals:/ {print $2}' "$OUT/cg.out")")
                done
                echo "$impl,$op,$size,$(((ir[1] - ir[0]) / K))" >>"$OUT/count.csv"
            done
        done
    done
fi

echo
echo "== ns per operation, best of $RUNS (median in brackets); ratio = time / aes-gcm's time in this run"
awk -F, -v count="$COUNT" -v counts="$OUT/count.csv" '
    FNR == 1 { next }
    FILENAME == counts { ins[$1 "," $2 "," $3] = $4; next }
    {
        key = $2 "," $3
        best[$1 "," key] = $4; med[$1 "," key] = $5
        if (!(key in seen)) { seen[key] = 1; order[++n] = key }
    }
    END {
        hdr = "| bytes | op | aes-gcm | ring | ring / aes-gcm | aws-lc-rs | aws-lc-rs / aes-gcm | harness |"
        sep = "|---|---|---|---|---|---|---|---|"
        if (count == 1) { hdr = hdr " instructions: aes-gcm / ring / aws-lc-rs |"; sep = sep "---|" }
        print hdr; print sep
        for (i = 1; i <= n; i++) {
            k = order[i]; split(k, p, ",")
            a = best["aes-gcm," k]; r = best["ring," k]; w = best["aws-lc-rs," k]
            line = sprintf("| %s | %s | %.0f (%.0f) | %.0f (%.0f) | %.2f | %.0f (%.0f) | %.2f | %.0f |",
                p[2], p[1], a, med["aes-gcm," k], r, med["ring," k], r / a,
                w, med["aws-lc-rs," k], w / a, best["nothing," k])
            if (count == 1)
                line = line sprintf(" %s / %s / %s |", ins["aes-gcm," k], ins["ring," k], ins["aws-lc-rs," k])
            print line
        }
    }' $([ "$COUNT" = 1 ] && echo "$OUT/count.csv") "$OUT/bench.csv"
