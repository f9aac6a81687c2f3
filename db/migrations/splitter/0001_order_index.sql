-- shard-splitter's own state in the pipeline database: the order_id -> shop_id index that
-- routes returns without shop_id (see docs/splitter.md).
-- creates: splitter_file splitter_order splitter_seq

-- One row per source file the splitter has started. `horizon` is the index sequence visible
-- when the file was first split (fixed forever: it makes a re-split decide the same way);
-- `indexed_seq` is set, from the counter below, once all of the file's purchases are indexed.
CREATE TABLE IF NOT EXISTS splitter_file (
  file_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  filename VARCHAR(255) NOT NULL,
  horizon BIGINT NOT NULL,
  indexed_seq BIGINT NULL,
  purchases INT UNSIGNED NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  indexed_at DATETIME(3) NULL,
  UNIQUE KEY uq_splitter_file (filename),
  KEY ix_splitter_indexed (indexed_seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Every purchase line seen: its file, line number, order and shop. Clustered by file so a
-- file's rows are appended in order (and could be pruned by file); looked up by order. A
-- re-split writes the same rows again (same key, same values).
CREATE TABLE IF NOT EXISTS splitter_order (
  file_id BIGINT NOT NULL,
  line INT UNSIGNED NOT NULL,
  order_id BIGINT NOT NULL,
  shop_id BIGINT NOT NULL,
  PRIMARY KEY (file_id, line),
  KEY ix_splitter_order (order_id)
) ENGINE=InnoDB;

-- The sequence handed to files as their index completes; its row lock orders completions,
-- so a horizon read from it covers exactly the files completed before.
CREATE TABLE IF NOT EXISTS splitter_seq (
  id TINYINT NOT NULL PRIMARY KEY,
  value BIGINT NOT NULL
) ENGINE=InnoDB;

INSERT INTO splitter_seq (id, value) VALUES (1, 0) ON DUPLICATE KEY UPDATE id = id;
