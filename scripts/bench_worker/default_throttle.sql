-- bench_worker.sh: back to the default throttle and batch size.
ALTER SYSTEM RESET pg_kms.reencrypt_max_rows_per_second;
ALTER SYSTEM RESET pg_kms.reencrypt_batch_size;
SELECT pg_reload_conf();
