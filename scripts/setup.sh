#!/usr/bin/env bash
# Installs what pg_kms needs to build and test on Debian 12, idempotently:
# Debian's PostgreSQL 15 (+ server headers), clang, sudo, cargo-pgrx 0.18.0,
# the other PostgreSQL majors asked for (built from Debian's source packages
# by scripts/pg_servers.sh into /opt/pg_kms/pgNN, cached), and
# `cargo pgrx init` pointed at every one of them. Run as root.
#
#   bash scripts/setup.sh              # PostgreSQL 15 only
#   bash scripts/setup.sh 15 17 18     # also build 17 and 18 (once per machine)
#
# A major whose source cannot be had here is reported (pg_servers.sh says
# why) and left out; setup fails for it only with PG_KMS_REQUIRE_MAJORS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG_PREFIX_ROOT=${PG_KMS_PG_PREFIX_ROOT:-/opt/pg_kms}
PKGS=(postgresql-15 postgresql-server-dev-15 clang libclang-dev pkg-config sudo locales
      python3-venv libpostgresql-jdbc-java)

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and runs PostgreSQL as the postgres user)" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo (Rust 1.95) is required" >&2; exit 1; }

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(15)
others=()
for m in "${majors[@]}"; do
    case "$m" in
        15) ;;
        16 | 17 | 18) others+=("$m") ;;
        *) echo "setup.sh: PostgreSQL $m is not supported (15 to 18)" >&2; exit 1 ;;
    esac
done

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ${#others[@]} -gt 0 ]; then
    bash scripts/pg_servers.sh "${others[@]}"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
    echo "== installing cargo-pgrx 0.18.0 (about 5 minutes)"
    cargo install cargo-pgrx --version 0.18.0 --locked
fi

# `cargo pgrx init` rewrites its config with exactly the majors it is given:
# give it 15 and every server built so far, whenever one is missing.
init_args=(--pg15="$PG15_CONFIG")
need_init=0
config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
grep -qs "pg15 = \"$PG15_CONFIG\"" "$config" || need_init=1
for m in 16 17 18; do
    pgc=$PG_PREFIX_ROOT/pg$m/bin/pg_config
    [ -x "$pgc" ] || continue
    init_args+=(--pg$m="$pgc")
    grep -qs "pg$m = \"$pgc\"" "$config" || need_init=1
done
for m in "${others[@]}"; do
    if [ ! -x "$PG_PREFIX_ROOT/pg$m/bin/pg_config" ]; then
        why=$(cat "$PG_PREFIX_ROOT/pg$m.unavailable" 2>/dev/null || echo "not built")
        echo "setup.sh: WARNING: PostgreSQL $m is not available on this machine: $why" >&2
        [ "${PG_KMS_REQUIRE_MAJORS:-0}" = 1 ] && exit 1
    fi
done
if [ "$need_init" = 1 ]; then
    echo "== cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}"
fi

# The real client libraries of pgrx_tests/tests/clients.rs (pinned; pip into
# a venv and npm into target/clients; a no-op once installed).
bash scripts/clients.sh
