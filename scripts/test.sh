#!/usr/bin/env bash
# The whole test suite: unit + property tests of the crypto core and the
# #[pg_test]s, then pg_regress and the real-cluster integration tests.
# Installs its prerequisites first (scripts/setup.sh). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGDATA_DIR=/tmp/pg_kms_pgtest_data
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

echo "== 1/3 unit, property and #[pg_test] tests (cargo pgrx test)"
rm -rf "$PGDATA_DIR"
install -d -o postgres -g postgres -m 0700 "$PGDATA_DIR"
cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_DIR" 2>&1 | tee -a "$LOG"
rm -rf "$PGDATA_DIR"

echo "== 2/3 installing the extension (release build) into Debian's PostgreSQL 15"
cargo pgrx install --release --pg-config "$PG_CONFIG"

echo "== 3/3 pg_regress suite and real-cluster integration tests (pgrx_tests/)"
cargo test -p pg_kms_integration 2>&1 | tee -a "$LOG"

# One closing line over all runners (pipefail has already stopped on failure).
passed=$(grep -ho 'test result: [a-zA-Z]*\. [0-9]* passed' "$LOG" | awk '{s += $4} END {print s + 0}')
failed=$(grep -ho '; [0-9]* failed' "$LOG" | awk '{s += $2} END {print s + 0}')
echo "pg_kms: $passed passed, $failed failed"
[ "$passed" -gt 0 ] && [ "$failed" -eq 0 ]
