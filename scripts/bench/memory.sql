-- bench.sh: backend memory growth during a whole-table decrypt (3 columns per
-- row) in a fresh backend. psql (as root) reads /proc/<pid>/status between the
-- queries; the figures go to bench.facts for the report.
SET max_parallel_workers_per_gather = 0;
SELECT pg_backend_pid() AS pid \gset
-- Warm-up in this fresh backend: library, key cache, executor (1000 rows
-- decrypted), then a plain scan of the whole table, so that the shared-buffer
-- pages the decrypt scan will touch are already counted in VmRSS/VmHWM
-- before the first sample (they are shared memory, not this backend's).
SELECT sum(octet_length(kms_decrypt(email)) + octet_length(kms_decrypt(nat_id)) + octet_length(kms_decrypt(addr))) AS v
  FROM (SELECT * FROM pii_sealed LIMIT 1000) s \gset w_
SELECT sum(octet_length(email::bytea) + octet_length(nat_id::bytea) + octet_length(addr::bytea)) AS v FROM pii_sealed \gset w_
\set hwm0 `awk '/^VmHWM:/ {print $2}' /proc/:pid/status`
\set rss0 `awk '/^VmRSS:/ {print $2}' /proc/:pid/status`
\set anon0 `awk '/^RssAnon:/ {print $2}' /proc/:pid/status`
\set shm0 `awk '/^RssShmem:/ {print $2}' /proc/:pid/status`
\echo '   backend pid' :pid 'before: VmHWM' :hwm0 'kB, VmRSS' :rss0 'kB, RssAnon' :anon0 'kB, RssShmem' :shm0 'kB'
SELECT clock_timestamp() AS t0 \gset
SELECT sum(octet_length(kms_decrypt(email)) + octet_length(kms_decrypt(nat_id)) + octet_length(kms_decrypt(addr))) AS v FROM pii_sealed \gset w_
SELECT round(1000 * extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)) AS ms \gset
\set hwm1 `awk '/^VmHWM:/ {print $2}' /proc/:pid/status`
\set rss1 `awk '/^VmRSS:/ {print $2}' /proc/:pid/status`
\set anon1 `awk '/^RssAnon:/ {print $2}' /proc/:pid/status`
\set shm1 `awk '/^RssShmem:/ {print $2}' /proc/:pid/status`
\echo '   backend pid' :pid 'after:  VmHWM' :hwm1 'kB, VmRSS' :rss1 'kB, RssAnon' :anon1 'kB, RssShmem' :shm1 'kB'
\echo '   (decrypted' :w_v 'bytes in' :ms 'ms)'
INSERT INTO bench.facts VALUES ('hwm0', :'hwm0'), ('hwm1', :'hwm1'), ('rss0', :'rss0'), ('rss1', :'rss1'),
                               ('anon0', :'anon0'), ('anon1', :'anon1'), ('shm0', :'shm0'), ('shm1', :'shm1'),
                               ('mem_ms', :'ms');
