-- Fuller pages for the dedup keys (issue 12, state bytes per event). New keys land at random
-- places inside the last minutes of `worker_seen` (a random 64-bit hash after the minute), which
-- leaves its pages little more than half full. Minutes older than the shard clock by a few
-- (app/worker/state.py SEAL_MINUTES) are moved once, in key order, to `worker_seen_sealed`,
-- where they are appended to the end of the shard's part and pages stay full. Each shard's
-- `sealed_below` (a minute) says which table holds a key: its minute below it, the sealed one;
-- otherwise `worker_seen`. The INT minimum means nothing is sealed yet, which is what a
-- database of 0003 holds, so no key moves here: the worker seals them bit by bit.
-- The balances lose `updated_at`, which nothing read (7 bytes of a 47-byte row).
-- creates: worker_seen_sealed worker_shards.sealed_below

CREATE TABLE IF NOT EXISTS worker_seen_sealed (
  shard TINYINT NOT NULL,
  bucket INT NOT NULL,
  hash BIGINT NOT NULL,
  PRIMARY KEY (shard, bucket, hash)
) ENGINE=InnoDB;

-- Each part runs only where it is not done yet, so the migration can run again from its start
-- (prepared statements: the condition works on MariaDB and MySQL 8.0).
SET @no_column = (SELECT COUNT(*) = 0 FROM information_schema.columns WHERE table_schema = DATABASE()
                    AND table_name = 'worker_shards' AND column_name = 'sealed_below');
SET @sql = IF(@no_column, 'ALTER TABLE worker_shards ADD COLUMN sealed_below INT NOT NULL DEFAULT -2147483648', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;

SET @has_column = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
                     AND table_name = 'worker_balances' AND column_name = 'updated_at');
SET @sql = IF(@has_column > 0, 'ALTER TABLE worker_balances DROP COLUMN updated_at', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
