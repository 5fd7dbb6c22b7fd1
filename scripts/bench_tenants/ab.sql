-- bench_tenants.sh: sum(octet_length((expr)::text)) over <tbl>_one, then over
-- <tbl>_many, alternating in one session so that drift on a shared host hits
-- both alike, after one untimed run of each; prints "ms_one ms_many", each
-- side's best of runs. psql variables: expr, tbl, runs.
CREATE FUNCTION pg_temp.ab(expr text, tbl text, runs int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  q_one text := format('SELECT sum(octet_length((%s)::text)) FROM %s_one', expr, tbl);
  q_many text := format('SELECT sum(octet_length((%s)::text)) FROM %s_many', expr, tbl);
  t timestamptz; a float8 := 1e12; b float8 := 1e12; d bigint;
BEGIN
  EXECUTE q_one INTO d; EXECUTE q_many INTO d;
  FOR i IN 1..runs LOOP
    t := clock_timestamp(); EXECUTE q_one INTO d; a := least(a, extract(epoch FROM clock_timestamp() - t) * 1000);
    t := clock_timestamp(); EXECUTE q_many INTO d; b := least(b, extract(epoch FROM clock_timestamp() - t) * 1000);
  END LOOP;
  RETURN round(a::numeric, 1) || ' ' || round(b::numeric, 1);
END $$;
SELECT pg_temp.ab(:'expr', :'tbl', :runs);
