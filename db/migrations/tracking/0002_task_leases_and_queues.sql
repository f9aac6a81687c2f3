-- What the API adds to the contract's table: statuses that are never NULL, millisecond times,
-- the owner and lease of a started task, attempts, the last error, and the indexes the queues
-- name. It only adds or widens: no column, index or row of an original table is dropped (an
-- original's own unique and status indexes stay, under their own names). One ALTER TABLE: one
-- pass over a big table.
-- creates: pipeline_tracking.owner pipeline_tracking.started_at pipeline_tracking.lease_expires_at
-- creates: pipeline_tracking.shard_splitter_attempts pipeline_tracking.shard_worker_attempts
-- creates: pipeline_tracking.mysql_sender_attempts pipeline_tracking.last_error

-- Old NULLs read as the contract's default, 'new'; a time never set becomes now.
UPDATE pipeline_tracking SET event_ingest_status = 'new' WHERE event_ingest_status IS NULL;
UPDATE pipeline_tracking SET shard_splitter_status = 'new' WHERE shard_splitter_status IS NULL;
UPDATE pipeline_tracking SET shard_worker_status = 'new' WHERE shard_worker_status IS NULL;
UPDATE pipeline_tracking SET mysql_sender_status = 'new' WHERE mysql_sender_status IS NULL;
UPDATE pipeline_tracking SET created_at = NOW(3) WHERE created_at IS NULL;
UPDATE pipeline_tracking SET updated_at = NOW(3) WHERE updated_at IS NULL;

-- Only one stage of a row can be `started` at a time (a stage starts only when the one before
-- it is done), so one owner/lease pair serves them all. TIMESTAMP -> DATETIME(3) loses nothing:
-- sessions run in UTC, so each value keeps its instant.
ALTER TABLE pipeline_tracking
  MODIFY event_ingest_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  MODIFY shard_splitter_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  MODIFY shard_worker_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  MODIFY mysql_sender_status ENUM('new','started','done','failed') NOT NULL DEFAULT 'new',
  MODIFY created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  MODIFY updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  -- The daemon holding the started stage, and until when (NULL unless a stage is started).
  ADD COLUMN owner VARCHAR(128) NULL,
  ADD COLUMN started_at DATETIME(3) NULL,
  ADD COLUMN lease_expires_at DATETIME(3) NULL,
  ADD COLUMN shard_splitter_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN shard_worker_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN mysql_sender_attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN last_error VARCHAR(2000) NULL,
  -- Ready queues: equality on (previous, current) status [and shard], then id order (InnoDB
  -- appends the primary key), so a queue page or a claim is an index range read of exactly
  -- the ready rows, in order, never a filesort, however much finished history the table holds.
  -- The queries name these indexes (FORCE INDEX): an original's indexes never serve them.
  ADD KEY ix_splitter_ready (event_ingest_status, shard_splitter_status),
  ADD KEY ix_splitter_ready_shard (event_ingest_status, shard_splitter_status, shard),
  ADD KEY ix_worker_ready (shard_splitter_status, shard_worker_status),
  ADD KEY ix_worker_ready_shard (shard_splitter_status, shard_worker_status, shard),
  ADD KEY ix_sender_ready (shard_worker_status, mysql_sender_status),
  ADD KEY ix_sender_ready_shard (shard_worker_status, mysql_sender_status, shard),
  -- The reaper (expired leases) and a restarted daemon's own work: only started tasks carry
  -- a lease and an owner, so these stay small however big the table grows.
  ADD KEY ix_lease (lease_expires_at),
  ADD KEY ix_owner (owner);
