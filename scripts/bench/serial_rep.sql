-- bench.sh: one repetition of the serial measurements: every operation on the
-- three columns, then the default pgp options on email.
-- psql variables: rows, nsub, aeskey, psw, rep, reps, verbose.
SELECT clock_timestamp() AS rep_t0 \gset

\set col_ord 0 \set col email  \set label email   \set ct email_ct \set iv email_iv \set pgp0 email_pgp0
\ir serial_column.sql
\set col_ord 1 \set col nat_id \set label id      \set ct nat_ct   \set iv nat_iv   \set pgp0 nat_pgp0
\ir serial_column.sql
\set col_ord 2 \set col addr   \set label address \set ct addr_ct  \set iv addr_iv  \set pgp0 addr_pgp0
\ir serial_column.sql

-- Default pgp options: the iterated-and-salted S2K key derivation (tens of
-- thousands of SHA-1 rounds per value) dominates whatever the value size, so
-- the email column alone shows it.
\set col_ord 0 \set label email

\set op_ord 72 \set op 'pgp_sym_encrypt default [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(pgp_sym_encrypt(email, :'psw'))) AS v FROM pii_sub \gset res_
\ir record.sql

\set op_ord 73 \set op 'pgp_sym_decrypt default [subset]' \set n :nsub
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(pgp_sym_decrypt(email_pgp, :'psw'))) AS v FROM pgc_sub \gset res_
\ir record.sql

SELECT format('   repetition %s/%s done in %s s', :rep, :reps, round(extract(epoch FROM clock_timestamp() - :'rep_t0'::timestamptz))) AS msg \gset
\echo :msg
