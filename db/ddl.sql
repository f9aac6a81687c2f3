-- Tracking schema of pipeline-apid. Idempotent: the API applies it at start (under a named lock)
-- and then upgrades an older or original-shaped pipeline_tracking in place (app/api/tracking.py adds
-- every column and index below that is missing; it never drops anything).
-- CREATE DATABASE and USE are for a bare server (docker init); the API skips them and applies
-- the rest to the database of MYSQL_PIPELINE_URL. Runs on MariaDB 10.11 and MySQL 8.0.
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
  -- The daemon holding the started stage, and until when (NULL unless a stage is started).
  owner VARCHAR(128) NULL,
  started_at DATETIME(3) NULL,
  lease_expires_at DATETIME(3) NULL,
  shard_splitter_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  shard_worker_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  mysql_sender_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  last_error VARCHAR(2000) NULL,
  UNIQUE KEY uq_filename_shard (filename, shard),
  -- Ready queues: equality on (previous, current) status [and shard], then id order (InnoDB
  -- appends the primary key), so a queue page or a claim is an index range read of exactly
  -- the ready rows, in order, never a filesort, however much finished history the table holds.
  KEY ix_splitter_ready (event_ingest_status, shard_splitter_status),
  KEY ix_splitter_ready_shard (event_ingest_status, shard_splitter_status, shard),
  KEY ix_worker_ready (shard_splitter_status, shard_worker_status),
  KEY ix_worker_ready_shard (shard_splitter_status, shard_worker_status, shard),
  KEY ix_sender_ready (shard_worker_status, mysql_sender_status),
  KEY ix_sender_ready_shard (shard_worker_status, mysql_sender_status, shard),
  -- Listings of one stage's tasks in one status (failed, started), in id order. These are the
  -- original's single-column indexes: right for listings, not enough for the queues above.
  KEY ix_ingest_status (event_ingest_status),
  KEY ix_splitter_status (shard_splitter_status),
  KEY ix_worker_status (shard_worker_status),
  KEY ix_sender_status (mysql_sender_status),
  -- The reaper (expired leases) and a restarted daemon's own work: only started tasks carry
  -- a lease and an owner, so these stay small however big the table grows.
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
  -- register | start | claim | done | fail | retry | release | rewind | reap
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

-- One row per (stage, shard) of an ordered stage: claims lock it, so two replicas never take
-- consecutive files of one shard at once, without locking the queue rows themselves.
CREATE TABLE IF NOT EXISTS pipeline_claim_lock (
  stage VARCHAR(32) NOT NULL,
  shard TINYINT NOT NULL,
  PRIMARY KEY (stage, shard)
) ENGINE=InnoDB;
