-- The order index made compact, time-ordered and prunable (docs/splitter.md, "Window and
-- pruning"). Every statement can run again: a migration stopped halfway restarts from the top.
-- creates: splitter_order.epoch splitter_file.epoch splitter_file.floor_seq splitter_file.opened_at
-- creates: splitter_seq.epoch splitter_seq.epoch_rows splitter_seq.pruned_epoch splitter_epoch

-- A file's `epoch` is the index epoch its purchase rows are written in (the epoch current when
-- it was last opened before its index completed); `floor_seq` is the oldest index sequence it
-- sees (files indexed within ORDER_INDEX_WINDOW before its first split), fixed with the horizon.
-- Files made before this migration see everything up to their horizon, as they did.
ALTER TABLE splitter_file
  ADD COLUMN IF NOT EXISTS epoch INT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS floor_seq BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS opened_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  ADD KEY IF NOT EXISTS ix_splitter_indexed_at (indexed_at);

-- The current epoch and how many purchases it holds (a new one starts past a fixed count), and
-- the epoch below which every row was deleted by pruning.
ALTER TABLE splitter_seq
  ADD COLUMN IF NOT EXISTS epoch INT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS epoch_rows BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS pruned_epoch INT UNSIGNED NOT NULL DEFAULT 0;

-- Per epoch, the index sequence numbers of its files: a file's lookups read the epochs whose
-- range meets its window [floor_seq, horizon] (one row per epoch, not one per file; kept after
-- the epoch's rows are pruned, so a re-split can tell it needs them).
CREATE TABLE IF NOT EXISTS splitter_epoch (
  epoch INT UNSIGNED NOT NULL PRIMARY KEY,
  first_seq BIGINT NOT NULL,
  last_seq BIGINT NOT NULL
) ENGINE=InnoDB;

REPLACE INTO splitter_epoch (epoch, first_seq, last_seq)
  SELECT epoch, MIN(indexed_seq), MAX(indexed_seq) FROM splitter_file WHERE indexed_seq IS NOT NULL GROUP BY epoch;

-- One tree, clustered by (epoch, order_id): a purchase is written into the current epoch's
-- part of the tree (a small, hot range, not a random page of the whole index), a lookup reads
-- its order in the epochs its file sees, and pruning deletes whole epochs from the front.
-- Replaces the old table (clustered by file, plus a secondary index on order_id); its rows
-- are copied into epoch 0.
CREATE TABLE IF NOT EXISTS splitter_order_0002 (
  epoch INT UNSIGNED NOT NULL,
  order_id BIGINT NOT NULL,
  file_id INT UNSIGNED NOT NULL,
  line INT UNSIGNED NOT NULL,
  shop_id BIGINT NOT NULL,
  PRIMARY KEY (epoch, order_id, file_id, line)
) ENGINE=InnoDB;

INSERT INTO splitter_order_0002 (epoch, order_id, file_id, line, shop_id)
  SELECT 0, order_id, file_id, line, shop_id FROM splitter_order
  ON DUPLICATE KEY UPDATE line = splitter_order_0002.line;

DROP TABLE IF EXISTS splitter_order_0001;

RENAME TABLE splitter_order TO splitter_order_0001, splitter_order_0002 TO splitter_order;

DROP TABLE splitter_order_0001;
