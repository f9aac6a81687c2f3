-- Tracking schema of pipeline-apid. Idempotent: the API applies it at start.
-- CREATE DATABASE and USE are for a bare server (docker init); the API skips them and applies
-- the rest to the database of MYSQL_PIPELINE_URL.
CREATE DATABASE IF NOT EXISTS pipeline_db CHARACTER SET utf8mb4;
USE pipeline_db;

-- One row per task (filename, shard); each stage has its own status. Only one stage of a row
-- can be `started` at a time (a stage starts only when the one before it is done), so one
-- owner/lease pair serves them all.
CREATE TABLE IF NOT EXISTS pipeline_tracking (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  filename VARCHAR(255) NOT NULL,
  event_ingest_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  shard_splitter_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  shard_worker_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  mysql_sender_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  shard TINYINT NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  owner VARCHAR(128) NULL,
  started_at DATETIME(3) NULL,
  lease_expires_at DATETIME(3) NULL,
  shard_splitter_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  shard_worker_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  mysql_sender_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  last_error VARCHAR(2000) NULL,
  UNIQUE KEY uq_filename_shard (filename, shard),
  -- Ready queues: equality on (previous, current) status, then id order (InnoDB appends the
  -- primary key), so a queue page or a claim is an index range scan, never a filesort.
  KEY ix_splitter_ready (event_ingest_status, shard_splitter_status),
  KEY ix_splitter_ready_shard (event_ingest_status, shard_splitter_status, shard),
  KEY ix_worker_ready (shard_splitter_status, shard_worker_status),
  KEY ix_worker_ready_shard (shard_splitter_status, shard_worker_status, shard),
  KEY ix_sender_ready (shard_worker_status, mysql_sender_status),
  KEY ix_sender_ready_shard (shard_worker_status, mysql_sender_status, shard),
  -- The worker takes a shard's files in registration order.
  KEY ix_worker_order (shard, shard_worker_status),
  -- The reaper and a restarted daemon's own work: only started tasks carry a lease and owner.
  KEY ix_lease (lease_expires_at),
  KEY ix_owner (owner)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Every status change, for timings and the history view.
CREATE TABLE IF NOT EXISTS pipeline_transitions (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  tracking_id BIGINT NOT NULL,
  filename VARCHAR(255) NOT NULL,
  shard TINYINT NOT NULL,
  stage VARCHAR(32) NOT NULL,
  from_status VARCHAR(16) NULL,
  to_status VARCHAR(16) NOT NULL,
  action VARCHAR(16) NOT NULL,
  at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  actor VARCHAR(128) NULL,
  error VARCHAR(2000) NULL,
  duration_ms INT NULL,
  events INT NULL,
  stats TEXT NULL,
  KEY ix_task (tracking_id, stage, id),
  KEY ix_stage_done (stage, to_status, at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Serialises ordered claims of one (stage, shard) without locking the queue itself.
CREATE TABLE IF NOT EXISTS pipeline_claim_lock (
  stage VARCHAR(32) NOT NULL,
  shard TINYINT NOT NULL,
  PRIMARY KEY (stage, shard)
) ENGINE=InnoDB;
