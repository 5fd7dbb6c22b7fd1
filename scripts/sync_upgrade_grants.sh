#!/usr/bin/env bash
# Copies sql/grants.sql's DO block into the upgrade script to the current
# version (Cargo.toml's), between its "-- BEGIN sql/grants.sql" and
# "-- END sql/grants.sql" lines, so that an updated database gets exactly a
# fresh install's privileges. pgrx_tests/tests/upgrade.rs checks the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
shopt -s nullglob
scripts=(sql/pg_kms--*--"$version".sql)
[ "${#scripts[@]}" -eq 1 ] || { echo "expected one sql/pg_kms--*--$version.sql, found ${#scripts[@]}" >&2; exit 1; }
f=${scripts[0]}
grep -qx -- '-- BEGIN sql/grants.sql' "$f" && grep -qx -- '-- END sql/grants.sql' "$f" \
    || { echo "$f has no BEGIN/END sql/grants.sql lines" >&2; exit 1; }
{
    sed -n '1,/^-- BEGIN sql\/grants\.sql$/p' "$f"
    sed -n '/^DO \$grants\$$/,$p' sql/grants.sql
    sed -n '/^-- END sql\/grants\.sql$/,$p' "$f"
} > "$f.tmp"
mv "$f.tmp" "$f"
echo "sql/grants.sql's block copied into $f"
