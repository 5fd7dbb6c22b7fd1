#!/usr/bin/env bash
# Installs the real client libraries that pgrx_tests/tests/clients.rs runs
# against a cluster, pinned exactly, idempotently:
#   - Python: pgrx_tests/clients/python/requirements.txt into a venv,
#     target/clients/venv (psycopg 3, SQLAlchemy 2, Django 5, asyncpg);
#   - Node.js: pgrx_tests/clients/node/package.json + package-lock.json into
#     target/clients/node (`npm ci`: node-postgres, Sequelize 6);
#   - JDBC: Debian's libpostgresql-jdbc-java (PgJDBC, /usr/share/java/
#     postgresql.jar; apt-get, as root) for the machine's Java 17.
# Each part is stamped with the sha256 of its pin file (and the interpreter's
# version): a second run with the same pins does nothing and takes well under a
# second. Needs python3 (with venv), node/npm, java, and the package
# registries.
# Exits non-zero with a message naming what failed (the test then fails).
#
#   bash scripts/clients.sh            # install (or check) both
#   PG_KMS_PYTHON=/usr/bin/python3 bash scripts/clients.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
src=$root/pgrx_tests/clients
dest=${PG_KMS_CLIENTS_DIR:-$root/target/clients}
python=${PG_KMS_PYTHON:-python3}
mkdir -p "$dest"

die() {
    echo "clients.sh: $*" >&2
    exit 1
}

# --- Python -------------------------------------------------------------
command -v "$python" >/dev/null || die "$python not found (install python3 and python3-venv)"
pyver=$("$python" -c 'import sys; print(sys.version.split()[0])')
want="$(sha256sum "$src/python/requirements.txt" | cut -d' ' -f1) python $pyver"
venv=$dest/venv
if [ "$(cat "$venv/.pg_kms_stamp" 2>/dev/null)" != "$want" ]; then
    echo "== clients.sh: Python $pyver venv at $venv (pip install -r pgrx_tests/clients/python/requirements.txt)"
    rm -rf "$venv"
    "$python" -m venv "$venv" ||
        die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -r "$src/python/requirements.txt" ||
        die "pip install of the pinned Python clients failed (is the package registry reachable?)"
    "$venv/bin/python" -c 'import psycopg, sqlalchemy, django, asyncpg' ||
        die "the installed Python clients do not import"
    echo "$want" >"$venv/.pg_kms_stamp"
fi

# --- Node.js ------------------------------------------------------------
command -v node >/dev/null || die "node not found (install nodejs and npm)"
command -v npm >/dev/null || die "npm not found (install npm)"
nodever=$(node --version)
want="$(cat "$src/node/package.json" "$src/node/package-lock.json" | sha256sum | cut -d' ' -f1) node $nodever"
nd=$dest/node
if [ "$(cat "$nd/.pg_kms_stamp" 2>/dev/null)" != "$want" ]; then
    echo "== clients.sh: Node.js $nodever packages at $nd (npm ci from pgrx_tests/clients/node)"
    rm -rf "$nd"
    mkdir -p "$nd"
    cp "$src/node/package.json" "$src/node/package-lock.json" "$nd/"
    (cd "$nd" && npm ci --no-audit --no-fund --loglevel=error) ||
        die "npm ci of the pinned Node.js clients failed (is the package registry reachable?)"
    (cd "$nd" && node -e 'require("pg"); require("sequelize")') ||
        die "the installed Node.js clients do not load"
    echo "$want" >"$nd/.pg_kms_stamp"
fi

# --- JDBC ---------------------------------------------------------------
command -v java >/dev/null || die "java not found (install openjdk-17-jdk-headless)"
if ! dpkg-query -W -f='${Status}' libpostgresql-jdbc-java 2>/dev/null | grep -q "install ok installed"; then
    [ "$(id -u)" = 0 ] || die "libpostgresql-jdbc-java is not installed (apt-get install libpostgresql-jdbc-java, as root)"
    echo "== clients.sh: apt-get install libpostgresql-jdbc-java"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpostgresql-jdbc-java >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpostgresql-jdbc-java >/dev/null; }; } ||
        die "apt-get install libpostgresql-jdbc-java failed (are Debian's package archives reachable?)"
fi
[ -r /usr/share/java/postgresql.jar ] || die "/usr/share/java/postgresql.jar is missing"
jdbcver=$(dpkg-query -W -f='${Version}' libpostgresql-jdbc-java)

echo "clients.sh: ready: $("$venv/bin/python" -c 'import psycopg, sqlalchemy, django, asyncpg; print("psycopg", psycopg.__version__, "SQLAlchemy", sqlalchemy.__version__, "Django", django.__version__, "asyncpg", asyncpg.__version__)'); node $nodever, pg $(cd "$nd" && node -p 'require("pg/package.json").version'), sequelize $(cd "$nd" && node -p 'require("sequelize/package.json").version'); PgJDBC $jdbcver"
