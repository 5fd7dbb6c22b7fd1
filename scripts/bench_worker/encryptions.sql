-- bench_worker.sh: encryptions under the newest key version so far (the
-- worker's rewraps while pgbench runs are the difference of two readings).
SELECT coalesce(max(encryptions), 0) FROM kms_stats WHERE version = (SELECT max(version) FROM kms_keys);
