-- bench.sh: parallel kms_decrypt, the forced plan and its EXPLAIN ANALYZE
-- (workers planned / launched go to bench.facts). The timed runs are in
-- parallel_rep.sql; both use the query in par_q.
\set par_q 'SELECT sum(octet_length(kms_decrypt(email))) AS v FROM pii_sealed'
-- The two workers do all the work: on a 2-CPU machine a participating
-- leader would make three processes share two CPUs.
SET parallel_leader_participation = off;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
\echo '   forced plan (pii_sealed has parallel_workers = 2):'
SELECT string_agg('      ' || l, E'\n') AS plan FROM bench.explain(:'par_q', false) AS l \gset
\echo :plan
INSERT INTO bench.facts VALUES ('workers_planned', coalesce(substring(:'plan' FROM 'Workers Planned: (\d+)'), '0'));
\echo '   EXPLAIN ANALYZE:'
SELECT string_agg('      ' || l, E'\n') AS plan FROM bench.explain(:'par_q', true) AS l \gset
\echo :plan
INSERT INTO bench.facts VALUES ('workers_launched', coalesce(substring(:'plan' FROM 'Workers Launched: (\d+)'), '0'));
