-- bench.sh: the data set (ROWS rows of realistic PII), its sealed copies, the
-- pgcrypto subset (NSUB rows), the results tables and a sanity check.
-- psql variables: rows, nsub, aeskey (benchmark-only AES key), psw (pgp password).
CREATE EXTENSION pg_kms;
CREATE EXTENSION pgcrypto;
SET max_parallel_workers_per_gather = 0;
SELECT kms_create_key('bench') \gset
CREATE SCHEMA bench;

-- Realistic PII, ASCII only (so bytes = characters):
--   email  ~20 bytes  e.g. "greta.3f9c1@gmail.com"
--   nat_id  9 digits  e.g. "048213377"
--   addr  200 bytes   street address, c/o name, delivery note, reference
SELECT setseed(0.4242) \gset
CREATE TABLE pii AS
SELECT i AS id,
       f.first || '.' || substr(md5(i::text), 1, 5) || '@' || f.domain AS email,
       lpad(floor(random() * 1e9)::bigint::text, 9, '0') AS nat_id,
       rpad(format('%s %s %s, Apt %s, %s, %s %s, United States | c/o %s %s | %s | ref ',
                   1 + floor(random() * 9999)::int,
                   (ARRAY['Maple','Oak','Cedar','Elm','Pine','Birch','Willow','Lakeview','Hillcrest','Sunset'])[1 + floor(random() * 10)::int],
                   (ARRAY['Street','Avenue','Road','Boulevard','Lane','Drive','Court'])[1 + floor(random() * 7)::int],
                   1 + floor(random() * 300)::int,
                   (ARRAY['Springfield','Riverside','Franklin','Greenville','Bristol','Clinton','Fairview','Madison'])[1 + floor(random() * 8)::int],
                   (ARRAY['IL','CA','TX','NY','OR','WA','MA','OH'])[1 + floor(random() * 8)::int],
                   lpad(floor(random() * 100000)::int::text, 5, '0'),
                   initcap(f.first),
                   (ARRAY['Smith','Johnson','Garcia','Miller','Davis','Martinez','Wilson','Anderson'])[1 + floor(random() * 8)::int],
                   (ARRAY['leave parcel at the back door','ring twice, intercom broken','deliver to neighbour at no. 12 if absent',
                          'gate code 4711, dog in yard','call 30 minutes before arrival'])[1 + floor(random() * 5)::int]),
            200, md5(i::text) || md5((i + 1)::text)) AS addr
  FROM generate_series(1, :rows) AS i,
       LATERAL (SELECT (ARRAY['anna','ben','carla','david','emma','felix','greta','hugo',
                              'ines','jonas','karl','lena','mia','noah','olga','paul'])[1 + floor(random() * 16 + i * 0)::int] AS first,
                       (ARRAY['gmail.com','yahoo.com','outlook.com','web.de','proton.me','icloud.com','gmx.net'])[1 + floor(random() * 7 + i * 0)::int] AS domain) f;

-- Sealed with pg_kms under key version 1; version 2 becomes primary below, so
-- kms_rewrap has real work to do (v1 -> v2) on every row.
CREATE TABLE pii_sealed AS
SELECT id, kms_encrypt(email, 'bench') AS email, kms_encrypt(nat_id, 'bench') AS nat_id, kms_encrypt(addr, 'bench') AS addr
  FROM pii;
ALTER TABLE pii_sealed SET (parallel_workers = 2);
SELECT kms_rotate_key('bench', 'benchmark: make v1 values rewrappable') \gset

-- The pgcrypto subset (and the same rows for kms, to compare like with like).
CREATE TABLE pii_sub AS SELECT * FROM pii WHERE id <= :nsub;
CREATE TABLE pii_sealed_sub AS SELECT * FROM pii_sealed WHERE id <= :nsub;
CREATE TABLE pgc_sub AS
SELECT id, email_iv, encrypt_iv(convert_to(email, 'UTF8'), :'aeskey'::bytea, email_iv, 'aes') AS email_ct,
           nat_iv,   encrypt_iv(convert_to(nat_id, 'UTF8'), :'aeskey'::bytea, nat_iv, 'aes')  AS nat_ct,
           addr_iv,  encrypt_iv(convert_to(addr, 'UTF8'), :'aeskey'::bytea, addr_iv, 'aes')  AS addr_ct,
           pgp_sym_encrypt(email, :'psw') AS email_pgp,
           pgp_sym_encrypt(email, :'psw', 's2k-mode=0') AS email_pgp0,
           pgp_sym_encrypt(nat_id, :'psw', 's2k-mode=0') AS nat_pgp0,
           pgp_sym_encrypt(addr, :'psw', 's2k-mode=0') AS addr_pgp0
  FROM (SELECT p.*, gen_random_bytes(16) AS email_iv, gen_random_bytes(16) AS nat_iv, gen_random_bytes(16) AS addr_iv
          FROM pii_sub p) s;

VACUUM (FREEZE, ANALYZE) pii, pii_sealed, pii_sub, pii_sealed_sub, pgc_sub;
CHECKPOINT;

CREATE TABLE bench.results (op_ord int, op text, col_ord int, col text, nrows bigint, rep int, ms float8);
CREATE TABLE bench.facts (name text PRIMARY KEY, value text);
-- EXPLAIN ANALYZE as rows, so the plan can be printed and "Workers Launched" read back.
CREATE FUNCTION bench.explain(q text, do_analyze boolean) RETURNS SETOF text LANGUAGE plpgsql AS $f$
DECLARE l text;
BEGIN
  FOR l IN EXECUTE format('EXPLAIN (ANALYZE %s, COSTS OFF, TIMING OFF, SUMMARY OFF) %s', CASE WHEN do_analyze THEN 'on' ELSE 'off' END, q) LOOP
    RETURN NEXT l;
  END LOOP;
END $f$;

-- Sanity: sizes and round trips (a benchmark of wrong results is worthless).
SELECT format('   plaintext:  avg bytes email %s, nat_id %s, addr %s; table %s, sealed table %s',
              round(avg(octet_length(email)), 1), round(avg(octet_length(nat_id)), 1), round(avg(octet_length(addr)), 1),
              pg_size_pretty(pg_table_size('pii')), pg_size_pretty(pg_table_size('pii_sealed')))
  FROM pii;
SELECT format('   check:      kms round trip %s/%s ok, rewrap v%s -> v%s ok %s, decrypt_iv ok %s, pgp ok %s',
              count(*) FILTER (WHERE kms_decrypt(s.email) = p.email AND kms_decrypt(s.nat_id) = p.nat_id AND kms_decrypt(s.addr) = p.addr),
              count(*),
              min(kms_key_version(s.email)),
              max(kms_key_version(kms_rewrap(s.email))),
              bool_and(kms_decrypt(kms_rewrap(s.addr)) = p.addr),
              bool_and(convert_from(decrypt_iv(c.addr_ct, :'aeskey'::bytea, c.addr_iv, 'aes'), 'UTF8') = p.addr),
              bool_and(pgp_sym_decrypt(c.email_pgp, :'psw') = p.email AND pgp_sym_decrypt(c.addr_pgp0, :'psw') = p.addr))
  FROM pii p JOIN pii_sealed s USING (id) JOIN pgc_sub c USING (id)
 WHERE id <= 1000;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pii p JOIN pii_sealed s USING (id)
              WHERE id <= 1000
                AND (kms_decrypt(s.email) IS DISTINCT FROM p.email OR kms_decrypt(s.nat_id) IS DISTINCT FROM p.nat_id
                     OR kms_decrypt(s.addr) IS DISTINCT FROM p.addr OR kms_key_version(s.email) <> 1
                     OR kms_key_version(kms_rewrap(s.email)) <> 2)) THEN
    RAISE EXCEPTION 'sanity check failed: kms round trip or rewrap is wrong';
  END IF;
END $$;
