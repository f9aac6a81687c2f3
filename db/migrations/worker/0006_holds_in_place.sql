-- Holds resolved in place (issue 12, state bytes per event). A hold's row was written with
-- `code` and the `resolved_*` columns NULL and grew by ~20 bytes when resolved; rows are
-- appended in (file, line) order, so the page was full and the grown row split it, leaving
-- holds' pages about half full. Now every column has its final size at insert: the sentinels
-- below mean "not yet" (a file id is never 0), a resolution updates the row in place.
-- `code` is 1 (HELD, app/worker/rules.py) while the hold is held; `resolved_file_id`,
-- `resolved_line`, `resolved_seq` are 0 until a file reports the hold (an idle-expired hold
-- too); `resolved_at` is 1970-01-01 until resolved. app/worker/state.py reads them back as NULL.

-- Each part runs only while the columns are still nullable, so the migration can run again from
-- its start after stopping halfway (prepared statements: the condition works on MariaDB and
-- MySQL 8.0). The copy rebuilds the table in key order, so existing pages come out full.
SET @nullable = (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
                   AND table_name = 'worker_holds' AND column_name = 'resolved_file_id' AND is_nullable = 'YES');
SET @sql = IF(@nullable > 0, 'UPDATE worker_holds SET code = COALESCE(code, 1), resolved_file_id = COALESCE(resolved_file_id, 0),
  resolved_line = COALESCE(resolved_line, 0), resolved_seq = COALESCE(resolved_seq, 0),
  resolved_at = COALESCE(resolved_at, ''1970-01-01 00:00:00.000'')', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
SET @sql = IF(@nullable > 0, 'ALTER TABLE worker_holds MODIFY code TINYINT NOT NULL DEFAULT 1,
  MODIFY resolved_file_id INT NOT NULL DEFAULT 0, MODIFY resolved_line INT NOT NULL DEFAULT 0,
  MODIFY resolved_seq INT NOT NULL DEFAULT 0,
  MODIFY resolved_at DATETIME(3) NOT NULL DEFAULT ''1970-01-01 00:00:00.000'', ALGORITHM=COPY', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
