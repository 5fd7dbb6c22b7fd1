#!/usr/bin/env bash
# Installs what pg_kms needs to build and test on Debian 12, idempotently:
# Debian's PostgreSQL 15 (+ server headers), clang, sudo, cargo-pgrx 0.18.0,
# and `cargo pgrx init` pointed at Debian's pg_config. Run as root.
set -euo pipefail

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PKGS=(postgresql-15 postgresql-server-dev-15 clang libclang-dev pkg-config sudo locales)

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and runs PostgreSQL as the postgres user)" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo (Rust 1.95) is required" >&2; exit 1; }

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
    echo "== installing cargo-pgrx 0.18.0 (about 5 minutes)"
    cargo install cargo-pgrx --version 0.18.0 --locked
fi

if ! grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "== cargo pgrx init --pg15=$PG_CONFIG"
    cargo pgrx init --pg15="$PG_CONFIG"
fi
