-- bench_worker.sh: 't' once the worker's new pass has rewrapped its first rows.
SELECT count(*) = 1 FROM kms_reencryption_progress WHERE finished_at IS NULL AND rows_rewrapped > 0;
