-- Worked examples over the tracking schema of db/migrations/tracking/: every transition exactly as
-- pipeline-apid performs it (app/api/tracking.py), then the monitoring queries an operator needs.
-- Run it against a scratch database that has the schema (tests/test_schema_examples.py does):
--   mariadb -h127.0.0.1 -uroot scratch_db < db/pipeline-examples.sql
-- Only pipeline-apid writes pipeline_tracking in production; use these to understand it, to
-- debug, or to repair by hand with the API stopped.
--
-- The rule of every transition: one transaction; an UPDATE whose WHERE holds the status the
-- rule requires (its affected-row count says whether it applied: 0 means refused or a repeat);
-- and a row appended to pipeline_transitions in the same commit.

SET @file = '20250101000000';
SET @worker = 'host-a/shard-worker-0';
SET @lease_s = 60;

-- == event-ingest ==============================================================================

-- register: one row per shard, ingest started, the rest new. The unique key plus an explicit
-- no-op makes a repeat harmless (affected rows 0 = existed already, the API's created=false).
START TRANSACTION;
INSERT INTO pipeline_tracking (filename, shard, event_ingest_status) VALUES (@file, 0, 'started')
  ON DUPLICATE KEY UPDATE id = id;
INSERT INTO pipeline_tracking (filename, shard, event_ingest_status) VALUES (@file, 1, 'started')
  ON DUPLICATE KEY UPDATE id = id;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action)
  SELECT id, filename, shard, 'event-ingest', NULL, 'started', 'register'
  FROM pipeline_tracking WHERE filename = @file;
COMMIT;

-- event-ingest done: every shard of the file at once.
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, events)
  SELECT id, filename, shard, 'event-ingest', event_ingest_status, 'done', 'done', 500
  FROM pipeline_tracking WHERE filename = @file AND event_ingest_status IN ('new', 'started');
UPDATE pipeline_tracking SET event_ingest_status = 'done'
  WHERE filename = @file AND event_ingest_status IN ('new', 'started');
COMMIT;

-- == a work stage: claim, heartbeat, done ==========================================================

-- claim (the splitter's queue, oldest first): lock the ready rows nobody else is locking, then
-- mark them started with an owner, a lease and one more attempt. A concurrent claimer skips the
-- rows locked here, so each task is won once.
START TRANSACTION;
SELECT id, filename, shard FROM pipeline_tracking FORCE INDEX (ix_splitter_ready)
  WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new'
  ORDER BY id LIMIT 2 FOR UPDATE SKIP LOCKED;
UPDATE pipeline_tracking
  SET shard_splitter_status = 'started', owner = 'host-a/shard-splitter', started_at = NOW(3),
      lease_expires_at = NOW(3) + INTERVAL @lease_s SECOND,
      shard_splitter_attempts = shard_splitter_attempts + 1
  WHERE filename = @file AND event_ingest_status = 'done' AND shard_splitter_status = 'new';
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor)
  SELECT id, filename, shard, 'shard-splitter', 'new', 'started', 'claim', owner
  FROM pipeline_tracking WHERE filename = @file AND shard_splitter_status = 'started';
COMMIT;

-- heartbeat: extend the lease, only while this owner still holds the task (one statement).
UPDATE pipeline_tracking SET lease_expires_at = NOW(3) + INTERVAL @lease_s SECOND
  WHERE filename = @file AND shard = 0 AND shard_splitter_status = 'started'
    AND owner = 'host-a/shard-splitter';

-- done: copy the log row from the task while it is started by this worker, then the guarded
-- UPDATE; if that UPDATE changes 0 rows the API rolls both back and explains (repeat or 409).
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                  duration_ms, events, stats)
  SELECT id, filename, shard, 'shard-splitter', 'started', 'done', 'done', owner,
         TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000, 250, '{"lines": 250}'
  FROM pipeline_tracking
  WHERE filename = @file AND shard_splitter_status = 'started' AND owner = 'host-a/shard-splitter';
UPDATE pipeline_tracking SET shard_splitter_status = 'done', owner = NULL, lease_expires_at = NULL
  WHERE filename = @file AND shard_splitter_status = 'started' AND owner = 'host-a/shard-splitter';
COMMIT;

-- == the shard worker: start, fail, retry, release ==================================================

-- start (a direct start rather than a claim): only from new, only after the splitter is done.
START TRANSACTION;
SELECT id, shard_splitter_status, shard_worker_status, owner FROM pipeline_tracking
  WHERE filename = @file AND shard = 0 FOR UPDATE;
UPDATE pipeline_tracking
  SET shard_worker_status = 'started', owner = @worker, started_at = NOW(3),
      lease_expires_at = NOW(3) + INTERVAL @lease_s SECOND, shard_worker_attempts = shard_worker_attempts + 1
  WHERE filename = @file AND shard = 0 AND shard_worker_status = 'new' AND shard_splitter_status = 'done';
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor)
  SELECT id, filename, shard, 'shard-worker', 'new', 'started', 'start', @worker
  FROM pipeline_tracking WHERE filename = @file AND shard = 0;
COMMIT;

-- fail (from new or started), keeping the reason on the task and in its history.
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                  error, duration_ms)
  SELECT id, filename, shard, 'shard-worker', shard_worker_status, 'failed', 'fail', @worker,
         'line 17: amount is not a number', TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000
  FROM pipeline_tracking WHERE filename = @file AND shard = 0 AND shard_worker_status IN ('new', 'started');
UPDATE pipeline_tracking
  SET shard_worker_status = 'failed', owner = NULL, lease_expires_at = NULL,
      last_error = 'line 17: amount is not a number'
  WHERE filename = @file AND shard = 0 AND shard_worker_status IN ('new', 'started');
COMMIT;

-- retry: failed -> new with a fresh set of attempts (the API's {"all": true} drops the shard test).
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action)
  SELECT id, filename, shard, 'shard-worker', 'failed', 'new', 'retry'
  FROM pipeline_tracking WHERE filename = @file AND shard = 0 AND shard_worker_status = 'failed';
UPDATE pipeline_tracking SET shard_worker_status = 'new', shard_worker_attempts = 0
  WHERE filename = @file AND shard = 0 AND shard_worker_status = 'failed';
COMMIT;

-- the ordered claim of shard 0: serialise on the shard's claim-lock row; nothing if another
-- worker holds a file of the shard; never past the oldest file still waiting for the splitter.
START TRANSACTION;
INSERT INTO pipeline_claim_lock (stage, shard) VALUES ('shard-worker', 0) ON DUPLICATE KEY UPDATE shard = shard;
SELECT stage FROM pipeline_claim_lock WHERE stage = 'shard-worker' AND shard = 0 FOR UPDATE;
SELECT 1 AS busy FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
  WHERE shard_splitter_status IN ('new', 'started', 'done', 'failed') AND shard_worker_status = 'started'
    AND shard = 0 AND NOT (owner <=> @worker) LIMIT 1;
SELECT MIN(id) INTO @blocker FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
  WHERE shard_splitter_status IN ('new', 'started') AND shard_worker_status = 'new' AND shard = 0
    AND event_ingest_status = 'done';
SELECT id, filename FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
  WHERE shard_splitter_status = 'done' AND shard_worker_status = 'new' AND shard = 0
    AND (@blocker IS NULL OR id < @blocker)
  ORDER BY id LIMIT 4 FOR UPDATE;
UPDATE pipeline_tracking
  SET shard_worker_status = 'started', owner = @worker, started_at = NOW(3),
      lease_expires_at = NOW(3) + INTERVAL @lease_s SECOND, shard_worker_attempts = shard_worker_attempts + 1
  WHERE filename = @file AND shard = 0 AND shard_worker_status = 'new' AND shard_splitter_status = 'done';
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor)
  SELECT id, filename, shard, 'shard-worker', 'new', 'started', 'claim', @worker
  FROM pipeline_tracking WHERE filename = @file AND shard = 0;
COMMIT;

-- release: a stopping daemon hands the task back; the attempt it had taken is given back too.
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor, error)
  SELECT id, filename, shard, 'shard-worker', 'started', 'new', 'release', owner, 'daemon stopping'
  FROM pipeline_tracking WHERE filename = @file AND shard = 0 AND shard_worker_status = 'started' AND owner = @worker;
UPDATE pipeline_tracking
  SET shard_worker_status = 'new', owner = NULL, lease_expires_at = NULL,
      shard_worker_attempts = GREATEST(shard_worker_attempts - 1, 0)
  WHERE filename = @file AND shard = 0 AND shard_worker_status = 'started' AND owner = @worker;
COMMIT;

-- == rewind: the input file is missing ================================================================

-- The worker of shard 1 finds no splitter output: this stage and the splitter go back to new,
-- so the splitter rebuilds the file (after MAX_ATTEMPTS the API fails the task instead).
UPDATE pipeline_tracking SET shard_splitter_status = 'started', owner = 'host-a/shard-splitter'
  WHERE filename = @file AND shard = 1;
UPDATE pipeline_tracking SET shard_splitter_status = 'done', shard_worker_status = 'started', owner = @worker,
  started_at = NOW(3), lease_expires_at = NOW(3) + INTERVAL @lease_s SECOND, shard_worker_attempts = 1
  WHERE filename = @file AND shard = 1;
START TRANSACTION;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor, error)
  SELECT id, filename, shard, 'shard-worker', 'started', 'new', 'rewind', @worker,
         'input missing, rebuilt by shard-splitter: no such file'
  FROM pipeline_tracking WHERE filename = @file AND shard = 1 AND shard_worker_status = 'started';
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor, error)
  SELECT id, filename, shard, 'shard-splitter', 'done', 'new', 'rewind', @worker,
         'input missing, rebuilt by shard-splitter: no such file'
  FROM pipeline_tracking WHERE filename = @file AND shard = 1 AND shard_worker_status = 'started';
UPDATE pipeline_tracking
  SET shard_worker_status = 'new', shard_splitter_status = 'new', owner = NULL, lease_expires_at = NULL,
      last_error = 'input missing, rebuilt by shard-splitter: no such file'
  WHERE filename = @file AND shard = 1 AND shard_worker_status = 'started';
COMMIT;

-- == the reaper ==========================================================================================

-- Expired leases: back to new (attempt already counted at start), or failed once the attempts
-- are spent (MAX_ATTEMPTS, 5 here). Make shard 0's worker task look long dead first:
UPDATE pipeline_tracking SET shard_worker_status = 'started', owner = 'host-b/shard-worker-0',
  started_at = NOW(3) - INTERVAL 10 MINUTE, lease_expires_at = NOW(3) - INTERVAL 9 MINUTE,
  shard_worker_attempts = 5
  WHERE filename = @file AND shard = 0;
START TRANSACTION;
SELECT id, filename, shard, owner, shard_worker_attempts FROM pipeline_tracking FORCE INDEX (ix_lease)
  WHERE lease_expires_at < NOW(3) ORDER BY lease_expires_at LIMIT 500 FOR UPDATE SKIP LOCKED;
INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                  error, duration_ms)
  SELECT id, filename, shard, 'shard-worker', 'started', IF(shard_worker_attempts >= 5, 'failed', 'new'), 'reap',
         owner, CONCAT('lease of ', QUOTE(owner), ' expired (attempt ', shard_worker_attempts, ' of 5)'),
         TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000
  FROM pipeline_tracking WHERE lease_expires_at < NOW(3) AND shard_worker_status = 'started';
UPDATE pipeline_tracking
  SET last_error = CONCAT('lease of ', QUOTE(owner), ' expired (attempt ', shard_worker_attempts, ' of 5)',
                          IF(shard_worker_attempts >= 5, '; attempts exhausted', '')),
      shard_worker_status = IF(shard_worker_attempts >= 5, 'failed', 'new'),
      owner = NULL, lease_expires_at = NULL
  WHERE lease_expires_at < NOW(3) AND shard_worker_status = 'started';
COMMIT;

-- == monitoring ===========================================================================================

-- Ready-queue depth and age of the oldest ready task, per stage (index reads only).
SELECT 'shard-splitter' AS stage, COUNT(*) AS ready,
       TIMESTAMPDIFF(SECOND, MIN(created_at), NOW()) AS oldest_ready_s
  FROM pipeline_tracking WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new'
UNION ALL
SELECT 'shard-worker', COUNT(*), TIMESTAMPDIFF(SECOND, MIN(created_at), NOW())
  FROM pipeline_tracking WHERE shard_splitter_status = 'done' AND shard_worker_status = 'new'
UNION ALL
SELECT 'mysql-sender', COUNT(*), TIMESTAMPDIFF(SECOND, MIN(created_at), NOW())
  FROM pipeline_tracking WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new';

-- Stuck: started tasks whose lease has expired (the reaper is behind or not running), or that
-- have run for more than 10 minutes while still heartbeating.
SELECT filename, shard, owner, started_at, lease_expires_at,
       CASE WHEN shard_splitter_status = 'started' THEN 'shard-splitter'
            WHEN shard_worker_status = 'started' THEN 'shard-worker'
            ELSE 'mysql-sender' END AS stage,
       TIMESTAMPDIFF(SECOND, started_at, NOW(3)) AS running_s,
       lease_expires_at < NOW(3) AS lease_expired
  FROM pipeline_tracking FORCE INDEX (ix_lease)
  WHERE lease_expires_at IS NOT NULL
    AND (lease_expires_at < NOW(3) OR started_at < NOW(3) - INTERVAL 10 MINUTE)
  ORDER BY started_at;

-- Stuck in ingest: registered but never finished (the generator died mid-file).
SELECT filename, MIN(created_at) AS registered, COUNT(*) AS shards
  FROM pipeline_tracking WHERE event_ingest_status = 'started' AND created_at < NOW() - INTERVAL 10 MINUTE
  GROUP BY filename ORDER BY registered;

-- Failed tasks with their reason and attempts, newest first (one stage; the others alike).
SELECT filename, shard, shard_worker_attempts AS attempts, last_error, updated_at
  FROM pipeline_tracking WHERE shard_worker_status = 'failed' ORDER BY id DESC LIMIT 100;

-- Per shard: totals and the sender's statuses (the contract's by_shard), plus what is in flight.
SELECT shard, COUNT(*) AS total,
       SUM(mysql_sender_status = 'done') AS done, SUM(mysql_sender_status = 'failed') AS failed,
       SUM(shard_splitter_status = 'failed' OR shard_worker_status = 'failed'
           OR mysql_sender_status = 'failed') AS failed_anywhere,
       SUM(lease_expires_at IS NOT NULL) AS in_flight
  FROM pipeline_tracking GROUP BY shard ORDER BY shard;

-- Average, median-ish (p50 by rank) and worst run time per stage over the last hour, from the
-- transitions log (duration_ms is set on done, on a failure of a started task, and on reaping).
SELECT stage, COUNT(*) AS runs, ROUND(AVG(duration_ms)) AS avg_ms, MAX(duration_ms) AS max_ms,
       SUM(events) AS events
  FROM pipeline_transitions
  WHERE to_status = 'done' AND duration_ms IS NOT NULL AND at > NOW(3) - INTERVAL 1 HOUR
  GROUP BY stage ORDER BY FIELD(stage, 'shard-splitter', 'shard-worker', 'mysql-sender');

-- End-to-end latency: registration to loaded, per file and shard, the slowest first.
SELECT t.filename, t.shard,
       TIMESTAMPDIFF(MICROSECOND, MIN(CASE WHEN x.action = 'register' THEN x.at END),
                     MAX(CASE WHEN x.stage = 'mysql-sender' AND x.to_status = 'done' THEN x.at END)) DIV 1000
         AS end_to_end_ms
  FROM pipeline_tracking t JOIN pipeline_transitions x ON x.tracking_id = t.id
  WHERE t.mysql_sender_status = 'done'
  GROUP BY t.id, t.filename, t.shard ORDER BY end_to_end_ms DESC LIMIT 20;

-- Retries and reaps: which tasks keep coming back (flaky input, a crashing daemon).
SELECT filename, shard, stage, SUM(action = 'retry') AS retries, SUM(action = 'reap') AS reaped,
       SUM(action = 'rewind') AS rewinds
  FROM pipeline_transitions
  WHERE action IN ('retry', 'reap', 'rewind')
  GROUP BY filename, shard, stage HAVING retries + reaped + rewinds > 0 ORDER BY reaped DESC, retries DESC;

-- One file's story, as GET /files/{filename} shows it.
SELECT x.shard, x.stage, x.from_status, x.to_status, x.action, x.at, x.actor, x.error, x.duration_ms, x.events
  FROM pipeline_transitions x JOIN pipeline_tracking t ON t.id = x.tracking_id
  WHERE t.filename = @file ORDER BY x.id;
