-- The history of every status change, and the claim lock of ordered stages.
-- creates: pipeline_transitions pipeline_claim_lock

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
