-- The contract's tracking table, as the original deployment creates it: one row per task
-- (filename, shard), each stage with its own status. Every tracking database starts here; an
-- original deployment's table IS this migration (it is recorded as applied without running),
-- and 0002 brings both to the shape the API needs.
-- creates: pipeline_tracking
CREATE TABLE IF NOT EXISTS pipeline_tracking (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  filename VARCHAR(255) NOT NULL,
  event_ingest_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard_splitter_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard_worker_status ENUM('new','started','done','failed') DEFAULT 'new',
  mysql_sender_status ENUM('new','started','done','failed') DEFAULT 'new',
  shard TINYINT NOT NULL,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  UNIQUE KEY uq_filename_shard (filename, shard),
  -- Listings of one stage's tasks in one status (failed, started), in id order.
  KEY ix_ingest_status (event_ingest_status),
  KEY ix_splitter_status (shard_splitter_status),
  KEY ix_worker_status (shard_worker_status),
  KEY ix_sender_status (mysql_sender_status)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
