-- bench_worker.sh: the worker rewraps as fast as it can, in batches of 5000.
ALTER SYSTEM SET pg_kms.reencrypt_max_rows_per_second = 0;
ALTER SYSTEM SET pg_kms.reencrypt_batch_size = 5000;
SELECT pg_reload_conf();
