-- The order index sealed by epoch (docs/splitter.md, "Sealing"): a closed epoch's rows are
-- packed into ~1.5 KiB buckets and its hot rows dropped by truncating their partition, not by
-- a DELETE. Every statement can run again: a migration stopped halfway restarts from the top
-- (the columns of splitter_epoch, listed below, are made last).
-- creates: splitter_sealed splitter_seq.closed_below splitter_seq.sealed_below splitter_seq.truncated_below
-- creates: splitter_epoch.sealed splitter_epoch.dir splitter_epoch.files

-- The hot rows, one partition per epoch modulo 8 (the ring): a sealed epoch's partition is
-- emptied by ALTER TABLE ... TRUNCATE PARTITION (no undo, no purge). The epoch moves on only
-- onto a partition already emptied of its previous epoch (app/splitter/order_index.py, RING).
-- The rows stay as they are (their epochs unchanged); run again, this copies the table again.
ALTER TABLE splitter_order PARTITION BY HASH (epoch) PARTITIONS 8;

-- Epochs below `closed_below` take no more files: a file of such an epoch whose index is not
-- complete is refused at completion (split again, it takes the current epoch). Below
-- `sealed_below` they are sealed; below `truncated_below` their partition was emptied. An
-- existing database starts from the epochs pruning already removed; its older epochs are
-- sealed by the splitter in turn.
-- (Each column added only where it is missing, by a prepared statement: `ADD COLUMN IF NOT
-- EXISTS` is MariaDB's only, and this must run on MySQL 8.0 too, db/README.md.)
SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'closed_below') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN closed_below INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;

SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'sealed_below') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN sealed_below INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;

SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_seq' AND column_name = 'truncated_below') = 0,
    'ALTER TABLE splitter_seq ADD COLUMN truncated_below INT UNSIGNED NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;

UPDATE splitter_seq SET closed_below = GREATEST(closed_below, pruned_epoch),
  sealed_below = GREATEST(sealed_below, pruned_epoch), truncated_below = GREATEST(truncated_below, pruned_epoch)
  WHERE id = 1;

-- A sealed epoch's purchases: bucket n holds entries n*64 .. n*64+63 of the epoch in
-- (order_id, file_id, line) order, each 24 bytes big-endian (order_id int64, file_id uint32,
-- line uint32, shop_id int64). Written in order, so pages stay full.
CREATE TABLE IF NOT EXISTS splitter_sealed (
  epoch INT UNSIGNED NOT NULL,
  bucket INT UNSIGNED NOT NULL,
  entries BLOB NOT NULL,
  PRIMARY KEY (epoch, bucket)
) ENGINE=InnoDB;

-- Per sealed epoch: `sealed` (read in the same statement as the rows, so a lookup sees either
-- the hot rows or the buckets), `dir` (each bucket's first order_id, int64 big-endian: which
-- bucket an order is in) and `files` (file_id uint32 + indexed_seq int64 of each file indexed
-- in the epoch: the sequence a lookup compares with its window).
SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_epoch' AND column_name = 'sealed') = 0,
    'ALTER TABLE splitter_epoch ADD COLUMN sealed TINYINT NOT NULL DEFAULT 0',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;

SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_epoch' AND column_name = 'dir') = 0,
    'ALTER TABLE splitter_epoch ADD COLUMN dir MEDIUMBLOB NULL',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;

SET @splitter_0003 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'splitter_epoch' AND column_name = 'files') = 0,
    'ALTER TABLE splitter_epoch ADD COLUMN files MEDIUMBLOB NULL',
    'DO 0');
PREPARE splitter_0003 FROM @splitter_0003;
EXECUTE splitter_0003;
DEALLOCATE PREPARE splitter_0003;
