-- bench_worker.sh: 't' once the worker has finished its pass (in the last hour)
-- and no row of people is left under an old key version; 'f' before.
SELECT CASE WHEN (SELECT count(*) FROM kms_reencryption_progress
                   WHERE rows_pending = 0 AND finished_at > now() - interval '1 hour' AND last_batch_at IS NOT NULL) = 1
            THEN (SELECT count(*) FROM people WHERE kms_key_version(email) <> (SELECT max(version) FROM kms_keys)) = 0
            ELSE false END;
