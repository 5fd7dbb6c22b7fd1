-- bench.sh: one repetition of the serial measurements on one column.
-- Each measurement: its labels, t0, the timed query (an aggregate returning
-- one row, no rows sent to the client), then record.sql.
-- psql variables: col (column of pii / pii_sealed), col_ord, label (in the
-- report), ct, iv, pgp0 (its columns in pgc_sub), rows, nsub, aeskey, psw, rep.
--
-- Results are summed with octet_length(): O(1) for text and bytea alike.
-- length(text) counts UTF-8 characters (a few ns per byte), which would be
-- charged only to the functions that return text (kms_decrypt, decrypt_iv via
-- convert_from, pgp_sym_decrypt) and not to sha256(), which returns bytea.
-- The spec's floor sum(length(col)) is measured too, to show that cost.

\set op_ord 10 \set op 'floor sum(length(col))' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(length(:col)) AS v FROM pii \gset res_
\ir record.sql

\set op_ord 11 \set op 'floor sum(octet_length(col))' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(:col)) AS v FROM pii \gset res_
\ir record.sql

\set op_ord 12 \set op 'floor, sealed table' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(:col::bytea)) AS v FROM pii_sealed \gset res_
\ir record.sql

\set op_ord 20 \set op 'sha256(convert_to(col, ''UTF8''))' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(sha256(convert_to(:col, 'UTF8')))) AS v FROM pii \gset res_
\ir record.sql

\set op_ord 30 \set op 'kms_encrypt' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_encrypt(:col, 'bench')::bytea)) AS v FROM pii \gset res_
\ir record.sql

\set op_ord 31 \set op 'kms_decrypt' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_decrypt(:col))) AS v FROM pii_sealed \gset res_
\ir record.sql

\set op_ord 32 \set op 'kms_rewrap (v1 -> v2)' \set n :rows
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_rewrap(:col)::bytea)) AS v FROM pii_sealed \gset res_
\ir record.sql

\set op_ord 50 \set op 'floor [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(:col)) AS v FROM pii_sub \gset res_
\ir record.sql

\set op_ord 51 \set op 'kms_encrypt [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_encrypt(:col, 'bench')::bytea)) AS v FROM pii_sub \gset res_
\ir record.sql

\set op_ord 52 \set op 'kms_decrypt [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_decrypt(:col))) AS v FROM pii_sealed_sub \gset res_
\ir record.sql

\set op_ord 60 \set op 'encrypt_iv aes, random IV [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(encrypt_iv(convert_to(:col, 'UTF8'), :'aeskey'::bytea, gen_random_bytes(16), 'aes'))) AS v FROM pii_sub \gset res_
\ir record.sql

\set op_ord 61 \set op 'decrypt_iv aes [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(convert_from(decrypt_iv(:ct, :'aeskey'::bytea, :iv, 'aes'), 'UTF8'))) AS v FROM pgc_sub \gset res_
\ir record.sql

\set op_ord 70 \set op 'pgp_sym_encrypt s2k-mode=0 [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(pgp_sym_encrypt(:col, :'psw', 's2k-mode=0'))) AS v FROM pii_sub \gset res_
\ir record.sql

\set op_ord 71 \set op 'pgp_sym_decrypt s2k-mode=0 [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(pgp_sym_decrypt(:pgp0, :'psw'))) AS v FROM pgc_sub \gset res_
\ir record.sql
