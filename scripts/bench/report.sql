-- bench.sh: the report (results table, ratios and targets) over bench.results
-- and bench.facts. psql variables: rows, nsub, reps, stat (min or median).
\pset footer off
\pset null 'n/a'
CREATE TEMP VIEW s AS
SELECT op_ord, op, col_ord, col, nrows, count(*) AS runs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS med, min(ms) AS mn,
       CASE :'stat' WHEN 'min' THEN min(ms) ELSE percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) END * 1e6 / nrows AS ns
  FROM bench.results GROUP BY op_ord, op, col_ord, col, nrows;
CREATE TEMP VIEW f AS SELECT name, value FROM bench.facts;

\echo '== results:' :reps 'runs each; ns/row =' :stat 'ms * 1e6 / rows (which is also the ms per 1M rows)'
\echo '   each run is SELECT sum(octet_length(f(col))) FROM table (no rows sent to the client), serial, jit off'
\echo '   [subset] = the first' :nsub 'rows (pgcrypto, and kms on the same rows); the other lines use all' :rows 'rows'
SELECT op AS operation, col AS "column", nrows AS rows, runs,
       round(med::numeric, 1) AS "median ms", round(mn::numeric, 1) AS "min ms", round(ns::numeric) AS "ns/row"
  FROM s ORDER BY op_ord, col_ord;

\echo '== ratios and targets (of' :stat 'ns/row; vs sha256 on all rows, vs pgcrypto on the subset for both sides)'
WITH
ns AS (SELECT op_ord, col_ord, col, ns FROM s),
ratio AS (
  SELECT x.ord, a.col_ord, a.col, x.label, a.ns / b.ns AS v, x.target, x.maxv, x.minv
    FROM (VALUES (1, 31, 20, 'kms_decrypt time / sha256 time',              '<= 1.00x', 1.0::float8, NULL::float8),
                 (2, 30, 20, 'kms_encrypt time / sha256 time',              '<= 1.20x', 1.2, NULL),
                 (3, 32, 20, 'kms_rewrap time / sha256 time',               '-',        NULL, NULL),
                 (4, 61, 52, 'kms_decrypt speedup over decrypt_iv',         '>= 2.00x', NULL, 2.0),
                 (5, 60, 51, 'kms_encrypt speedup over encrypt_iv+random IV', '>= 2.00x', NULL, 2.0),
                 (6, 73, 52, 'kms_decrypt speedup over pgp_sym_decrypt',    '-',        NULL, NULL),
                 (7, 71, 52, 'kms_decrypt speedup over pgp (s2k-mode=0)',   '-',        NULL, NULL),
                 (8, 31, 11, 'kms_decrypt time / floor sum(octet_length)', '<= 3.50x', 3.5, NULL),
                 (9, 30, 11, 'kms_encrypt time / floor sum(octet_length)', '<= 3.50x', 3.5, NULL))
         AS x(ord, num, den, label, target, maxv, minv)
    JOIN ns a ON a.op_ord = x.num
    JOIN ns b ON b.op_ord = x.den AND b.col_ord = a.col_ord
   WHERE x.ord < 8 OR a.col_ord = 0  -- the ratios to the floor: emails (issue 17, goal 4)
),
par AS (
  SELECT (SELECT ns FROM ns WHERE op_ord = 80) / (SELECT ns FROM ns WHERE op_ord = 81) AS speedup,
         (SELECT value FROM f WHERE name = 'workers_planned') AS planned,
         (SELECT value FROM f WHERE name = 'workers_launched') AS launched,
         (SELECT value FROM f WHERE name = 'error_parallel') AS err
),
ovh AS (
  SELECT c.ord, c.col, k.sealed - p.plain AS kms, p.plain, k.sealed
    FROM (VALUES (0, 'email'), (1, 'id'), (2, 'address')) AS c(ord, col)
    JOIN LATERAL (SELECT avg(CASE c.ord WHEN 0 THEN pg_column_size(email) WHEN 1 THEN pg_column_size(nat_id) ELSE pg_column_size(addr) END) AS plain FROM pii) p ON true
    JOIN LATERAL (SELECT avg(CASE c.ord WHEN 0 THEN pg_column_size(email) WHEN 1 THEN pg_column_size(nat_id) ELSE pg_column_size(addr) END) AS sealed FROM pii_sealed) k ON true
),
pgp AS (
  SELECT avg(pg_column_size(c.email_pgp) - pg_column_size(p.email)) AS dflt,
         avg(pg_column_size(c.email_pgp0) - pg_column_size(p.email)) AS s2k0_email,
         avg(pg_column_size(c.nat_pgp0) - pg_column_size(p.nat_id)) AS s2k0_id,
         avg(pg_column_size(c.addr_pgp0) - pg_column_size(p.addr)) AS s2k0_addr
    FROM pii_sub p JOIN pgc_sub c USING (id)
),
mem AS (
  SELECT (SELECT value::float8 FROM f WHERE name = 'hwm1') - (SELECT value::float8 FROM f WHERE name = 'hwm0') AS hwm_kb,
         (SELECT value::float8 FROM f WHERE name = 'rss1') - (SELECT value::float8 FROM f WHERE name = 'rss0') AS rss_kb,
         (SELECT value::float8 FROM f WHERE name = 'anon1') - (SELECT value::float8 FROM f WHERE name = 'anon0') AS anon_kb,
         (SELECT value::float8 FROM f WHERE name = 'shm1') - (SELECT value::float8 FROM f WHERE name = 'shm0') AS shm_kb,
         (SELECT value FROM f WHERE name = 'error_memory') AS err
),
lines AS (
  SELECT 10 AS o1, ord AS o2,
         col_ord AS o3, label AS a, col AS b, to_char(v, 'FM999990.00') || 'x' AS c, target AS d,
         CASE WHEN maxv IS NOT NULL THEN v <= maxv WHEN minv IS NOT NULL THEN v >= minv END AS ok
    FROM ratio
  UNION ALL
  SELECT 20, 1, 0, 'parallel speedup, 2 workers vs none', 'email',
         coalesce(to_char(speedup, 'FM990.00') || 'x', 'ERROR: ' || err), '>= 1.60x',
         coalesce(speedup >= 1.6 AND launched::int >= 2, false)
    FROM par
  UNION ALL
  SELECT 20, 2, 0, 'parallel workers planned / launched', 'email',
         coalesce(planned, '?') || ' / ' || coalesce(launched, '?'), '2 / 2',
         coalesce(planned = '2' AND launched = '2', false)
    FROM par
  UNION ALL
  SELECT 30, 1, ord, 'pg_kms overhead per value (pg_column_size)', col,
         format('+%s B (%s -> %s)', round(kms, 1), round(plain, 1), round(sealed, 1)), '<= 40 B', kms <= 40
    FROM ovh
  UNION ALL
  SELECT 30, 2, 0, 'pgp_sym_encrypt default overhead per value', 'email', format('+%s B', round(dflt, 1)), '-', NULL FROM pgp
  UNION ALL
  SELECT 30, 3, x.o, 'pgp_sym_encrypt s2k-mode=0 overhead per value', x.c, format('+%s B', round(x.v, 1)), '-', NULL
    FROM pgp, LATERAL (VALUES (0, 'email', s2k0_email), (1, 'id', s2k0_id), (2, 'address', s2k0_addr)) AS x(o, c, v)
  UNION ALL
  SELECT 40, 1, 0, 'backend memory growth (VmHWM) over the decrypt', '3 columns',
         coalesce(to_char(hwm_kb / 1024, 'FM99990.00') || ' MB', 'ERROR: ' || err), '<= 5 MB', coalesce(hwm_kb / 1024 <= 5, false)
    FROM mem
  UNION ALL
  SELECT 40, 2, 0, 'backend VmRSS change (= RssAnon + RssShmem + file)', '3 columns',
         format('%s MB (anon %s, shmem %s)', to_char(rss_kb / 1024, 'FM99990.00'), to_char(anon_kb / 1024, 'FM99990.00'),
                to_char(shm_kb / 1024, 'FM99990.00')), '-', NULL
    FROM mem
)
SELECT a AS "check", b AS "column", c AS measured, d AS target,
       CASE WHEN ok THEN 'PASS' WHEN NOT ok THEN 'FAIL' ELSE '' END AS result
  FROM lines ORDER BY o1, o2, o3;
\echo '   VmHWM/VmRSS count the shared-buffer pages the backend touches (RssShmem) as well as its private memory (RssAnon).'
\echo '   PASS/FAIL are labels only: the exit status is non-zero only when a step errors.'
