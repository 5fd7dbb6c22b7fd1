-- bench.sh: serial measurements, untimed warm-up (key cache, page cache).
SET max_parallel_workers_per_gather = 0;
SELECT count(kms_decrypt(email)) FROM (SELECT email FROM pii_sealed LIMIT 10) s \gset w_
SELECT count(kms_encrypt(email, 'bench')) FROM (SELECT email FROM pii LIMIT 10) s \gset w_
SELECT count(*) FROM pii \gset w_
SELECT count(*) FROM pii_sealed \gset w_
\echo '   warm-up done (key cache, page cache; untimed)'
