-- Every rejected input line, durably: the stages' own rejected files live in folders a stop
-- empties (as the contract requires), so the record an operator inspects, fixes and replays
-- is this table (app/rejected.py writes it, GET /rejected lists it; docs/operations.md).
-- creates: rejected_lines

-- One row per rejected line, written by the stage that rejected it, in bulk with its file.
-- `filename`/`line_no`: where the line is (a held return rejected later names its own file);
-- `shard` is -1 for the splitter, which rejects a line before it has a shard. A re-run writes
-- the same rows again: the unique key keeps the first. `line` holds the line without its end,
-- at most its first 65536 bytes (`line_truncated` when cut; a line over MAX_LINE_BYTES keeps
-- the 1024 the stage kept); `line_bytes` is the whole line's length.
CREATE TABLE IF NOT EXISTS rejected_lines (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  filename VARCHAR(255) NOT NULL,
  stage VARCHAR(32) NOT NULL,
  shard SMALLINT NOT NULL,
  line_no INT UNSIGNED NOT NULL,
  reason VARCHAR(64) NOT NULL,
  detail VARCHAR(1000) NULL,
  line_bytes BIGINT UNSIGNED NOT NULL,
  line_truncated TINYINT(1) NOT NULL DEFAULT 0,
  line MEDIUMBLOB NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  UNIQUE KEY uq_rejected_line (filename, stage, shard, line_no),
  KEY ix_rejected_file (filename, id),
  KEY ix_rejected_reason (reason, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
