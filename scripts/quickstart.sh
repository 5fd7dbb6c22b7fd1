#!/usr/bin/env bash
# pg_kms quickstart: installs prerequisites, builds and installs the
# extension into Debian's PostgreSQL 15 (or the major PG_KMS_PG names:
# `PG_KMS_PG=18 bash scripts/quickstart.sh` builds PostgreSQL 18 from
# Debian's source package first, once per machine), starts a throwaway
# cluster as the postgres user with a freshly generated master key, and runs
# a narrated demo. Run as root on Debian 12. Re-running starts a fresh demo
# cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_KMS_PG=${PG_KMS_PG:-15}
bash scripts/setup.sh "$PG_KMS_PG"
source scripts/cluster.sh
PG_CONFIG=$PG_BIN/pg_config
[ -x "$PG_CONFIG" ] || { echo "quickstart.sh: no PostgreSQL $PG_KMS_PG server here ($PG_BIN); see scripts/pg_servers.sh" >&2; exit 1; }

DIR=${PG_KMS_DEMO_DIR:-/tmp/pg_kms_demo}
PORT=${PG_KMS_DEMO_PORT:-54329}
KEYFILE=$DIR.keys/master.key

echo "== building and installing pg_kms (release) into PostgreSQL $PG_KMS_PG ($PG_BIN)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null

echo "== starting a throwaway cluster in $DIR (socket only, port $PORT)"
cluster_stop "$DIR"
rm -rf "$DIR.keys"
new_master_key "$KEYFILE"
echo "   master key: $KEYFILE (mode $(stat -c %a "$KEYFILE"), owner $(stat -c %U "$KEYFILE")); it never enters the database"
cluster_start "$DIR" "$PORT" "pg_kms.master_key_file = '$KEYFILE'"
cluster_psql "$DIR" "$PORT" -d postgres -qc "CREATE DATABASE demo"

cluster_psql "$DIR" "$PORT" -d demo -v ON_ERROR_STOP=1 <<'SQL'
\pset footer off
\echo
\echo '-- 1. A DBA installs the extension and creates a key (version 1, primary).'
\echo 'CREATE EXTENSION pg_kms;  SELECT kms_create_key(''pii'', interval ''90 days'');'
CREATE EXTENSION pg_kms;
SELECT kms_create_key('pii', interval '90 days');

\echo '-- 2. A migration declares encrypted columns; the application inserts PII with plain SQL.'
CREATE TABLE customers (
    id    serial PRIMARY KEY,
    name  text,
    email encrypted_text,
    ssn   encrypted_text
);
\echo 'INSERT INTO customers (name, email, ssn) VALUES ($1, kms_encrypt($2, ''pii''), kms_encrypt($3, ''pii'', ''customer-ssn''));'
INSERT INTO customers (name, email, ssn) VALUES
    ('Alice', kms_encrypt('alice@example.com', 'pii'), kms_encrypt('123-45-6789', 'pii', 'customer-ssn')),
    ('Bob',   kms_encrypt('bob@example.org',   'pii'), kms_encrypt('987-65-4321', 'pii', 'customer-ssn'));

\echo
\echo '-- 3. At rest the columns hold only ciphertext (format, key id, version, nonce, ciphertext, tag):'
SELECT id, name, email, ssn FROM customers;
CHECKPOINT;
SELECT pg_relation_filepath('customers') AS heap_file \gset
\echo 'Searching the table''s data file on disk for "alice@example.com":'
SELECT count(*) AS plaintext_occurrences_on_disk
  FROM (SELECT position(convert_to('alice@example.com', 'UTF8') IN pg_read_binary_file(:'heap_file')) AS p) s
 WHERE p > 0;

\echo
\echo '-- 4. The application decrypts (the ssn was sealed with a context, which must be given back):'
SELECT id, name, kms_decrypt(email) AS email, kms_decrypt(ssn, 'customer-ssn') AS ssn FROM customers;

\echo
\echo '-- 5. The DBA rotates the key: new rows use version 2, old rows still decrypt.'
SELECT kms_rotate_key('pii', 'quarterly rotation');
INSERT INTO customers (name, email, ssn) VALUES ('Carol', kms_encrypt('carol@example.net', 'pii'), kms_encrypt('555-01-2345', 'pii', 'customer-ssn'));
SELECT id, name, kms_key_version(email) AS key_version, kms_decrypt(email) AS email FROM customers ORDER BY id;
SELECT key_name, version, state, is_primary, next_rotation_at::date FROM kms_keys;

\echo
\echo '-- 6. Rewrap moves old rows to the primary version without exposing plaintext:'
UPDATE customers SET email = kms_rewrap(email), ssn = kms_rewrap(ssn, 'customer-ssn')
 WHERE kms_key_version(email) < 2;
SELECT kms_key_version(email) AS key_version, count(*) FROM customers GROUP BY 1;

\echo
\echo '-- 7. Every lifecycle act is in a hash-chained audit log:'
SELECT id, actor, operation, key_name, version, reason FROM kms_audit_log ORDER BY id;
SELECT kms_verify_audit_log() AS audit_log_intact;

\echo
\echo '-- 8. Mistakes fail loudly with a SQLSTATE and a hint, never silently:'
\set VERBOSITY verbose
\set ON_ERROR_STOP 0
INSERT INTO customers (name, email) VALUES ('Mallory', 'mallory@example.com');
SELECT kms_decrypt(ssn, 'wrong-context') FROM customers WHERE id = 1;
\set ON_ERROR_STOP 1
SQL

cat <<MSG

== demo ready. Keep exploring with:
   $PG_BIN/psql "host=$DIR port=$PORT user=postgres dbname=demo"
   (stop it with: runuser -u postgres -- $PG_BIN/pg_ctl -D $DIR/data stop)
MSG
