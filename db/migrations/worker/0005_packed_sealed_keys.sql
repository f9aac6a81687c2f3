-- Sealed dedup keys packed (issue 12, state bytes per event). A sealed key was a row of its own,
-- ~35 bytes for an 8-byte hash (InnoDB's ~18 bytes a row, the minute, the shard). A sealed
-- minute's keys are now one row per part (the hash's top byte: `part`, 0-255, as the server's
-- unsigned `hash >> 56` gives it), their hashes in `hashes`, 8 bytes each, big-endian
-- (app/worker/state.py `seal`, `seen_sql`): a few hundred keys a row at the generator's rate. The
-- existing rows are packed in key order into a new table, which then takes the name.
-- creates: worker_seen_sealed.hashes

CREATE TABLE IF NOT EXISTS worker_seen_packed (
  shard TINYINT NOT NULL,
  bucket INT NOT NULL,
  part TINYINT UNSIGNED NOT NULL,
  hashes MEDIUMBLOB NOT NULL,
  PRIMARY KEY (shard, bucket, part)
) ENGINE=InnoDB;

-- Each part runs only while worker_seen_sealed is still of 0004 (a `hash` column), so the migration
-- can run again from its start: a copy stopped halfway is emptied and made again.
SET @old_sealed = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
                     AND table_name = 'worker_seen_sealed' AND column_name = 'hash');
SET SESSION group_concat_max_len = 1073741824;
SET @sql = IF(@old_sealed > 0, 'DELETE FROM worker_seen_packed', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_sealed > 0, 'INSERT INTO worker_seen_packed (shard, bucket, part, hashes) SELECT shard, bucket,
  hash >> 56, GROUP_CONCAT(UNHEX(LPAD(HEX(hash), 16, ''0'')) ORDER BY hash SEPARATOR '''') FROM worker_seen_sealed
  GROUP BY shard, bucket, hash >> 56 ORDER BY shard, bucket, hash >> 56', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@old_sealed > 0, 'RENAME TABLE worker_seen_sealed TO worker_seen_sealed_0004, worker_seen_packed TO worker_seen_sealed',
              'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
DROP TABLE IF EXISTS worker_seen_sealed_0004;
DROP TABLE IF EXISTS worker_seen_packed;
