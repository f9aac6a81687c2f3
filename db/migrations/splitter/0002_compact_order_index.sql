-- The order index made compact, time-ordered and prunable (docs/splitter.md, "Window and
-- pruning"). Every statement can run again: a migration stopped halfway restarts from the top.
-- creates: splitter_order.epoch splitter_file.epoch splitter_file.floor_seq splitter_file.opened_at
-- creates: splitter_seq.epoch splitter_seq.epoch_rows splitter_seq.pruned_epoch splitter_epoch
--
-- A portable rewrite of the text released first, which used MariaDB's `ADD COLUMN IF NOT EXISTS`
-- and so could not run on MySQL 8.0 (db/README.md, "Replacing a released migration"). A database
-- that applied that text has everything this one makes and is left as it is; the same schema
-- results either way (tests/test_migrations.py compares them).
-- replaces: 61511e8c21c4ff2a530dacd0ca15d37f4d43b7c31dfc23e803b05ded54e21c1f
-- Each column and index is added only where it is missing, by a prepared statement from
-- information_schema, as shard/0001 and splitter/0003 do. The columns of splitter_seq, listed
-- above, are made last: until the last is there, `migrate` runs this again from the top instead
-- of taking the work as done (a stop after the RENAME would otherwise leave the old table).

-- A file's `epoch` is the index epoch its purchase rows are written in (the epoch current when
-- it was last opened before its index completed); `floor_seq` is the oldest index sequence it
-- sees (files indexed within ORDER_INDEX_WINDOW before its first split), fixed with the horizon.
-- Files made before this migration see everything up to their horizon, as they did.
SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_file' AND column_name = 'epoch') = 0,
    'ALTER TABLE splitter_file ADD COLUMN epoch INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_file' AND column_name = 'floor_seq') = 0,
    'ALTER TABLE splitter_file ADD COLUMN floor_seq BIGINT NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_file' AND column_name = 'opened_at') = 0,
    'ALTER TABLE splitter_file ADD COLUMN opened_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE()
       AND table_name = 'splitter_file' AND index_name = 'ix_splitter_indexed_at') = 0,
    'ALTER TABLE splitter_file ADD KEY ix_splitter_indexed_at (indexed_at)',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

-- Per epoch, the index sequence numbers of its files: a file's lookups read the epochs whose
-- range meets its window [floor_seq, horizon] (one row per epoch, not one per file; kept after
-- the epoch's rows are pruned, so a re-split can tell it needs them).
CREATE TABLE IF NOT EXISTS splitter_epoch (
  epoch INT UNSIGNED NOT NULL PRIMARY KEY,
  first_seq BIGINT NOT NULL,
  last_seq BIGINT NOT NULL
) ENGINE=InnoDB;

-- Each epoch's range covers its files' sequence numbers, as the splitter widens it (run again,
-- a range only widens, and the columns later migrations add to a row are left alone).
INSERT INTO splitter_epoch (epoch, first_seq, last_seq)
  SELECT epoch, MIN(indexed_seq), MAX(indexed_seq) FROM splitter_file WHERE indexed_seq IS NOT NULL GROUP BY epoch
  ON DUPLICATE KEY UPDATE first_seq = LEAST(splitter_epoch.first_seq, VALUES(first_seq)),
    last_seq = GREATEST(splitter_epoch.last_seq, VALUES(last_seq));

-- One tree, clustered by (epoch, order_id): a purchase is written into the current epoch's
-- part of the tree (a small, hot range, not a random page of the whole index), a lookup reads
-- its order in the epochs its file sees, and pruning deletes whole epochs from the front.
-- Replaces the old table (clustered by file, plus a secondary index on order_id); its rows
-- are copied into epoch 0. The copy and the swap run only while `splitter_order` is the old
-- table (no `epoch`): stopped before the RENAME, this copies again (an explicit no-op on each
-- row already copied); stopped after it, the old table left as splitter_order_0001 is dropped;
-- and the new table (with its epochs, and partitioned by 0003) is never copied again.
CREATE TABLE IF NOT EXISTS splitter_order_0002 (
  epoch INT UNSIGNED NOT NULL,
  order_id BIGINT NOT NULL,
  file_id INT UNSIGNED NOT NULL,
  line INT UNSIGNED NOT NULL,
  shop_id BIGINT NOT NULL,
  PRIMARY KEY (epoch, order_id, file_id, line)
) ENGINE=InnoDB;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_order' AND column_name = 'epoch') = 0,
    'INSERT INTO splitter_order_0002 (epoch, order_id, file_id, line, shop_id)
       SELECT 0, order_id, file_id, line, shop_id FROM splitter_order
       ON DUPLICATE KEY UPDATE line = splitter_order_0002.line',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

DROP TABLE IF EXISTS splitter_order_0001;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_order' AND column_name = 'epoch') = 0,
    'RENAME TABLE splitter_order TO splitter_order_0001, splitter_order_0002 TO splitter_order',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

DROP TABLE IF EXISTS splitter_order_0001;
DROP TABLE IF EXISTS splitter_order_0002;

-- The current epoch and how many purchases it holds (a new one starts past a fixed count), and
-- the epoch below which every row was deleted by pruning.
SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'epoch') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN epoch INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'epoch_rows') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN epoch_rows BIGINT NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;

SET @splitter_0002 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'pruned_epoch') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN pruned_epoch INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0002 FROM @splitter_0002;
EXECUTE splitter_0002;
DEALLOCATE PREPARE splitter_0002;
