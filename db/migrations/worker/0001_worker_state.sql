-- The shard workers' state (see docs/business-rules.md), in the PIPELINE database. Every change
-- a worker makes to these tables for a batch of lines commits in one transaction with that
-- batch's decisions.
-- creates: worker_shards worker_files worker_batches worker_seen worker_balances worker_orders worker_stock worker_holds worker_shops

-- Per shard: the newest event time seen (the clock that expires held returns).
CREATE TABLE IF NOT EXISTS worker_shards (
  shard TINYINT NOT NULL PRIMARY KEY,
  newest_event DATETIME(3) NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB;

-- One row per (shard, input file) the worker has started; `id` is the compact file reference
-- the other tables use.
CREATE TABLE IF NOT EXISTS worker_files (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  shard TINYINT NOT NULL,
  filename VARCHAR(255) NOT NULL,
  lines_decided INT NOT NULL DEFAULT 0,
  complete TINYINT(1) NOT NULL DEFAULT 0,
  newest_event DATETIME(3) NULL,
  pruned TINYINT(1) NOT NULL DEFAULT 0,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  UNIQUE KEY uq_shard_file (shard, filename),
  KEY ix_prune (shard, pruned, newest_event)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The decisions: one row per committed batch of lines, one code byte per line (app/worker/rules.py
-- CODE). `digest` proves a re-run reads the same lines.
CREATE TABLE IF NOT EXISTS worker_batches (
  file_id INT NOT NULL,
  first_line INT NOT NULL,
  line_count INT NOT NULL,
  digest BINARY(16) NOT NULL,
  codes MEDIUMBLOB NOT NULL,
  PRIMARY KEY (file_id, first_line)
) ENGINE=InnoDB;

-- Deduplication keys (app.events.event_key) of the shard's events that worker_orders does not
-- record (all but purchases and accepted returns), pruned by file once the file's newest event
-- is older than DEDUP_WINDOW.
CREATE TABLE IF NOT EXISTS worker_seen (
  shard TINYINT NOT NULL,
  event_key VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  file_id INT NOT NULL,
  PRIMARY KEY (shard, event_key),
  KEY ix_file (file_id)
) ENGINE=InnoDB;

-- One balance per user across all shards; rows are locked (FOR UPDATE, ascending user_id)
-- while a batch decides purchases and returns.
CREATE TABLE IF NOT EXISTS worker_balances (
  user_id BIGINT NOT NULL PRIMARY KEY,
  balance DECIMAL(18,2) NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)
) ENGINE=InnoDB;

-- Every purchase the workers decided, once per order: its debit when accepted (`debited`),
-- and the credit of its accepted return. The primary key makes each money movement happen at
-- most once; it also deduplicates purchases and returns (their business key is the order).
CREATE TABLE IF NOT EXISTS worker_orders (
  order_id BIGINT NOT NULL PRIMARY KEY,
  shard TINYINT NOT NULL,
  user_id BIGINT NOT NULL,
  shop_id BIGINT NOT NULL,
  good_id BIGINT NOT NULL,
  qty INT NOT NULL,
  amount DECIMAL(18,2) NOT NULL,
  debited TINYINT(1) NOT NULL,
  credit DECIMAL(18,2) NULL,
  file_id INT NOT NULL,
  line INT NOT NULL
) ENGINE=InnoDB;

-- Stock per (shop, good); a shop belongs to one shard, so only that shard's worker writes it.
CREATE TABLE IF NOT EXISTS worker_stock (
  shop_id BIGINT NOT NULL,
  good_id BIGINT NOT NULL,
  count BIGINT NOT NULL,
  PRIMARY KEY (shop_id, good_id)
) ENGINE=InnoDB;

-- Latest status of each shop (a shop never seen is active).
CREATE TABLE IF NOT EXISTS worker_shops (
  shop_id BIGINT NOT NULL PRIMARY KEY,
  active TINYINT(1) NOT NULL,
  changed_at DATETIME(3) NULL
) ENGINE=InnoDB;

-- Returns held until their purchase comes (out-of-order cache). A resolved hold stays, with
-- the file and line that resolved it, so that file's output can be rebuilt.
CREATE TABLE IF NOT EXISTS worker_holds (
  file_id INT NOT NULL,
  line INT NOT NULL,
  shard TINYINT NOT NULL,
  order_id BIGINT NOT NULL,
  event_time DATETIME(3) NOT NULL,
  expires_at DATETIME(3) NOT NULL,
  held_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  raw BLOB NOT NULL,
  state ENUM('held','released','expired') NOT NULL DEFAULT 'held',
  code TINYINT NULL,
  resolved_file_id INT NULL,
  resolved_line INT NULL,
  resolved_seq INT NULL,
  resolved_at DATETIME(3) NULL,
  PRIMARY KEY (file_id, line),
  KEY ix_state (shard, state),
  KEY ix_resolved (resolved_file_id, resolved_line, resolved_seq)
) ENGINE=InnoDB;
