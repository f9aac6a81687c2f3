-- Fuller pages for the dedup keys (issue 12, state bytes per event). New keys land at random
-- places inside the last minutes of `worker_seen` (a random 64-bit hash after the minute), which
-- leaves its pages little more than half full. Minutes older than the shard clock by a few
-- (app/worker/state.py SEAL_MINUTES) are moved once, in key order, to `worker_seen_sealed`,
-- where they are appended to the end of the shard's part and pages stay full. Each shard's
-- `sealed_below` (a minute) says which table holds a key: its minute below it, the sealed one;
-- otherwise `worker_seen`. The INT minimum means nothing is sealed yet, which is what a
-- database of 0003 holds, so no key moves here: the worker seals them bit by bit.
-- The balances lose `updated_at`, which nothing read (7 bytes of a 47-byte row): copying the
-- table, since an instant DROP COLUMN (MariaDB) keeps the bytes in every row.
-- The ledger keeps only what a later decision reads (app/worker/rules.py `refund`): a return
-- checks its user and good for equality only, so one 8-byte digest of the two (`buyer`:
-- app/worker/rules.py buyer_of, the same MD5 computed here); whether the order was rejected,
-- debited or also credited (`state` 0, 1, 2), not the credit's amount; amounts in DECIMAL(15,2),
-- which holds every amount the rules allow (below 10^13). 82 -> 64 bytes a row.
-- creates: worker_seen_sealed worker_shards.sealed_below worker_orders.buyer

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
SET @sql = IF(@has_column > 0, 'ALTER TABLE worker_balances DROP COLUMN updated_at, ALGORITHM=COPY', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;

-- The ledger, rebuilt from a table of 0001 or 0003 (same columns) in its key order, so the copy's
-- pages are full; the same clustering (shard, file, line) and unique order id as 0003.
SET @old_orders = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
                     AND table_name = 'worker_orders' AND column_name = 'user_id');
CREATE TABLE IF NOT EXISTS worker_orders_0004 (
  shard TINYINT NOT NULL,
  file_id INT NOT NULL,
  line INT NOT NULL,
  order_id BIGINT NOT NULL,
  shop_id BIGINT NOT NULL,
  buyer BIGINT NOT NULL,
  qty INT NOT NULL,
  amount DECIMAL(15,2) NOT NULL,
  state TINYINT NOT NULL,
  PRIMARY KEY (shard, file_id, line),
  UNIQUE KEY uq_order (order_id)
) ENGINE=InnoDB;
SET @sql = IF(@old_orders > 0, 'INSERT INTO worker_orders_0004 (shard, file_id, line, order_id, shop_id, buyer, qty,
  amount, state) SELECT shard, file_id, line, order_id, shop_id,
  CAST(CONV(LEFT(MD5(CONCAT(user_id, '' '', good_id)), 16), 16, -10) AS SIGNED), qty, amount,
  IF(credit IS NOT NULL, 2, IF(debited, 1, 0)) FROM worker_orders ORDER BY shard, file_id, line
  ON DUPLICATE KEY UPDATE line = worker_orders_0004.line', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_orders > 0, 'RENAME TABLE worker_orders TO worker_orders_0003, worker_orders_0004 TO worker_orders',
              'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
DROP TABLE IF EXISTS worker_orders_0003;
DROP TABLE IF EXISTS worker_orders_0004;
