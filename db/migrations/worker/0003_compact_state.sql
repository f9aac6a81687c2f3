-- Compact worker state with locality (issue 12): keys are 8-byte hashes or order ids, and the
-- big tables are clustered by time (dedup keys by their event's minute, `bucket`: minutes since
-- 1970-01-01, clamped to INT) or by file (the ledger), so new rows land at the end of each
-- shard's part of the tree, the pages a batch touches stay in the buffer pool as history grows,
-- and pruning by window (DEDUP_WINDOW, ORDER_WINDOW: docs/business-rules.md) deletes from the
-- start of the tree.
-- creates: worker_seen.bucket worker_return_keys

-- Dedup keys of restocks, price changes and shop statuses: (shard, minute of the event, the first
-- 8 bytes of the key's digest, signed). A duplicate has the same timestamp (it is part of the
-- key), so its minute is known before the lookup; no secondary index.
CREATE TABLE IF NOT EXISTS worker_seen_compact (
  shard TINYINT NOT NULL,
  bucket INT NOT NULL,
  hash BIGINT NOT NULL,
  PRIMARY KEY (shard, bucket, hash)
) ENGINE=InnoDB;

-- Dedup keys of returns that were held or rejected (their key is the order, not the time).
CREATE TABLE IF NOT EXISTS worker_return_keys (
  shard TINYINT NOT NULL,
  order_id BIGINT NOT NULL,
  bucket INT NOT NULL,
  PRIMARY KEY (shard, order_id),
  KEY ix_bucket (shard, bucket)
) ENGINE=InnoDB;

-- Each part runs only where the table is still of 0001 (a column or index only it has), so the migration
-- can run again from its start after a failure, or after a table was dropped by hand and 0001
-- made it again (prepared statements: the condition works on MariaDB and MySQL 8.0).
SET @old_seen = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
                   AND table_name = 'worker_seen' AND column_name = 'event_key');
SET @old_orders = (SELECT COUNT(*) = 0 FROM information_schema.statistics WHERE table_schema = DATABASE()
                     AND table_name = 'worker_orders' AND index_name = 'uq_order');

-- The old keys: `t:h<32 hex digits>` keep their hash (the first 16 hex digits); their event's
-- minute was not recorded, so they go under the minute of their file's newest event and the one
-- before (exact for a file whose events span less than a minute; a key in the wrong minute is
-- never found and is pruned with it). `3:<order>` keys move as they are.
SET @sql = IF(@old_seen > 0, 'INSERT INTO worker_return_keys (shard, order_id, bucket) SELECT s.shard, CAST(SUBSTRING(s.event_key, 3) AS SIGNED), LEAST(GREATEST(FLOOR(TIMESTAMPDIFF(SECOND, ''1970-01-01'', COALESCE(f.newest_event, f.created_at, ''1970-01-01'')) / 60), -2147483648), 2147483647) FROM worker_seen s JOIN worker_files f ON f.id = s.file_id WHERE s.event_key LIKE ''3:%'' AND s.event_key NOT LIKE ''3:h%'' ON DUPLICATE KEY UPDATE bucket = worker_return_keys.bucket', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_seen > 0, 'INSERT INTO worker_seen_compact (shard, bucket, hash) SELECT s.shard, LEAST(GREATEST(FLOOR(TIMESTAMPDIFF(SECOND, ''1970-01-01'', COALESCE(f.newest_event, f.created_at, ''1970-01-01'')) / 60) - m.back, -2147483648), 2147483647), CAST(CONV(SUBSTRING(s.event_key, 4, 16), 16, -10) AS SIGNED) FROM worker_seen s JOIN worker_files f ON f.id = s.file_id JOIN (SELECT 0 AS back UNION ALL SELECT 1) m WHERE s.event_key LIKE ''_:h%'' ON DUPLICATE KEY UPDATE hash = worker_seen_compact.hash', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_seen > 0, 'RENAME TABLE worker_seen TO worker_seen_0002, worker_seen_compact TO worker_seen', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
DROP TABLE IF EXISTS worker_seen_0002;
DROP TABLE IF EXISTS worker_seen_compact;

-- The ledger, clustered by where each purchase was decided: (shard, file id, line), which only
-- grows within a shard, so rows are appended and pages stay full; the order id stays unique
-- (a secondary index), which is what lookups, and the at-most-once money movements, use.
-- ORDER_WINDOW prunes it file by file from the start of the shard's part.
CREATE TABLE IF NOT EXISTS worker_orders_compact (
  shard TINYINT NOT NULL,
  file_id INT NOT NULL,
  line INT NOT NULL,
  order_id BIGINT NOT NULL,
  user_id BIGINT NOT NULL,
  shop_id BIGINT NOT NULL,
  good_id BIGINT NOT NULL,
  qty INT NOT NULL,
  amount DECIMAL(18,2) NOT NULL,
  debited TINYINT(1) NOT NULL,
  credit DECIMAL(18,2) NULL,
  PRIMARY KEY (shard, file_id, line),
  UNIQUE KEY uq_order (order_id)
) ENGINE=InnoDB;

SET @sql = IF(@old_orders > 0, 'INSERT INTO worker_orders_compact (shard, file_id, line, order_id, user_id,
  shop_id, good_id, qty, amount, debited, credit) SELECT shard, file_id, line, order_id, user_id, shop_id, good_id, qty,
  amount, debited, credit FROM worker_orders ON DUPLICATE KEY UPDATE line = worker_orders_compact.line', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_orders > 0, 'RENAME TABLE worker_orders TO worker_orders_0002, worker_orders_compact TO worker_orders', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
DROP TABLE IF EXISTS worker_orders_0002;
DROP TABLE IF EXISTS worker_orders_compact;
