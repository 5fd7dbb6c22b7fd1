-- bench_tenants.sh: one key and KEYS tenant keys, and the same ROWS rows sealed
-- under one key and under the tenant keys interleaved.
-- psql variables: rows, keys.
CREATE EXTENSION pg_kms;
SELECT kms_create_key('tenant-solo');
SELECT count(kms_create_key('tenant-' || g)) FROM generate_series(0, :keys - 1) g;
-- Each side reads its own table of the same shape (same rows, same column
-- positions, key names of the same length as most tenant names), so the
-- only difference between the two is how many keys the rows use.
CREATE TABLE src_one AS SELECT g AS id, 'user' || g || '@example.com' AS email,
       'tenant-solo'::text AS key_name FROM generate_series(1, :rows) g;
CREATE TABLE src_many AS SELECT g AS id, 'user' || g || '@example.com' AS email,
       'tenant-' || (g % :keys) AS key_name FROM generate_series(1, :rows) g;
CREATE TABLE sealed_one AS SELECT id, kms_encrypt(email, key_name) AS v FROM src_one;
CREATE TABLE sealed_many AS SELECT id, kms_encrypt(email, key_name) AS v FROM src_many;
VACUUM ANALYZE src_one; VACUUM ANALYZE src_many; VACUUM ANALYZE sealed_one; VACUUM ANALYZE sealed_many;
