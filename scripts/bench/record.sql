-- bench.sh: records one timed run, started at :t0 (a \gset just before the
-- query), in bench.results; with verbose=1 also prints it.
-- psql variables: op_ord, op, col_ord, label, n (rows), rep, t0, verbose.
INSERT INTO bench.results VALUES (:op_ord, :'op', :col_ord, :'label', :n, :rep, 1000 * extract(epoch FROM clock_timestamp() - :'t0'::timestamptz))
\if :verbose
  RETURNING format('   rep %s  %-44s %-8s %8s rows %10s ms', rep, op, col, nrows, to_char(ms, 'FM9999999990.0'))
\endif
;
