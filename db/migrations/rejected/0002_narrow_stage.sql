-- Narrower rejected rows (issue 12, state bytes per event). `stage` was a VARCHAR(32) holding
-- 'shard-splitter' or 'shard-worker', 13-15 bytes a row and as many again in the unique key;
-- only those two stages reject lines (app/api/rejected.py STAGES), so it is an ENUM of them, one
-- byte, read and compared as the same text (a stage that comes to reject lines adds its name at
-- the end: an instant change). `shard` (-1, or below SHARD_COUNT, at most 64) fits a TINYINT, as
-- in the worker's tables. The copy also rebuilds the table and its indexes in key order.
-- A row of another stage stops the copy (strict sql_mode, MariaDB's and MySQL 8.0's default)
-- instead of losing its stage.

-- Runs only while `stage` is still a VARCHAR, so the migration can run again from its start
-- (prepared statements: the condition works on MariaDB and MySQL 8.0).
SET @wide = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
               AND table_name = 'rejected_lines' AND column_name = 'stage' AND data_type = 'varchar');
SET @sql = IF(@wide > 0, 'ALTER TABLE rejected_lines MODIFY stage ENUM(''shard-splitter'', ''shard-worker'') NOT NULL,
  MODIFY shard TINYINT NOT NULL, ALGORITHM=COPY', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
