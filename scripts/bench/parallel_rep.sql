-- bench.sh: one repetition of the parallel comparison: the query in par_q
-- (parallel_start.sql) with no parallel workers, then with 2.
-- psql variables: par_q, rows, rep, verbose.
\set col_ord 0 \set label email \set n :rows

SET max_parallel_workers_per_gather = 0;
\set op_ord 80 \set op 'kms_decrypt, no parallel workers'
SELECT clock_timestamp() AS t0 \gset
:par_q \gset res_
\ir record.sql

SET max_parallel_workers_per_gather = 2;
\set op_ord 81 \set op 'kms_decrypt, 2 parallel workers'
SELECT clock_timestamp() AS t0 \gset
:par_q \gset res_
\ir record.sql
