-- bench_worker.sh: ROWS rows sealed under key 'pii' version 1.
-- psql variables: rows.
CREATE EXTENSION pg_kms;
SELECT kms_create_key('pii');
CREATE TABLE people (id int PRIMARY KEY, email encrypted_text);
INSERT INTO people SELECT g, kms_encrypt('user' || g || '@example.com', 'pii') FROM generate_series(1, :rows) g;
VACUUM ANALYZE people;
