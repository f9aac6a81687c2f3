-- Task counts per stage, shard and status, kept exact by triggers on pipeline_tracking: every
-- writer (the API's transitions, claims, the reaper, a hand-made UPDATE) changes them in its own
-- transaction, so /metrics/summary, /metrics and the long-poll claims read a few dozen rows
-- instead of scanning the table. `ready` (a pseudo-status of the work stages) counts the tasks
-- whose previous stage is done and this one new: the claimable queue.
-- Beside them, for GET /metrics: the outcomes of tasks (done, fail, reap, retry, release, rewind)
-- by stage and shard, with the run times of finished ones in histogram buckets (a trigger on
-- pipeline_transitions, so they count from this migration on and survive the log's pruning);
-- and rejected lines by reason (the API adds what a `done` reports).
-- creates: pipeline_task_counts pipeline_transition_counts pipeline_rejected_counts

CREATE TABLE IF NOT EXISTS pipeline_task_counts (
  stage VARCHAR(32) NOT NULL,
  shard TINYINT NOT NULL,
  -- new | started | done | failed, or ready
  status VARCHAR(16) NOT NULL,
  n BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (stage, shard, status)
) ENGINE=InnoDB;

-- le_ms: the run-time bucket's upper bound in ms (2147483647: above the largest, +Inf) of a
-- finished task, each run counted in its own bucket only (the reader accumulates) with the sum
-- of run times; -1 for outcomes without a run time.
CREATE TABLE IF NOT EXISTS pipeline_transition_counts (
  stage VARCHAR(32) NOT NULL,
  shard TINYINT NOT NULL,
  action VARCHAR(16) NOT NULL,
  to_status VARCHAR(16) NOT NULL,
  le_ms INT NOT NULL,
  n BIGINT NOT NULL DEFAULT 0,
  sum_ms BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (stage, shard, action, to_status, le_ms)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS pipeline_rejected_counts (
  stage VARCHAR(32) NOT NULL,
  reason VARCHAR(64) NOT NULL,
  n BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (stage, reason)
) ENGINE=InnoDB;

-- Each trigger writes only the counters a row's change moves, in primary-key order (ORDER BY),
-- so two transactions moving the same counters lock them in the same order and cannot deadlock
-- on them. A change that moves no status (a lease renewal) runs no statement at all (the IF);
-- neither do claims and registrations in the log (the task counts have them).
DROP TRIGGER IF EXISTS pipeline_task_counts_insert;
CREATE TRIGGER pipeline_task_counts_insert AFTER INSERT ON pipeline_tracking FOR EACH ROW
INSERT INTO pipeline_task_counts (stage, shard, status, n)
  SELECT st, sh, su, d FROM (
    SELECT 'event-ingest' st, NEW.shard sh, NEW.event_ingest_status su, 1 d
    UNION ALL SELECT 'shard-splitter', NEW.shard, NEW.shard_splitter_status, 1
    UNION ALL SELECT 'shard-worker', NEW.shard, NEW.shard_worker_status, 1
    UNION ALL SELECT 'mysql-sender', NEW.shard, NEW.mysql_sender_status, 1
    UNION ALL SELECT 'shard-splitter', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new'
    UNION ALL SELECT 'shard-worker', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new'
    UNION ALL SELECT 'mysql-sender', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new'
  ) AS delta
  ORDER BY st, sh, su
  ON DUPLICATE KEY UPDATE n = n + VALUES(n);

DROP TRIGGER IF EXISTS pipeline_task_counts_update;
CREATE TRIGGER pipeline_task_counts_update AFTER UPDATE ON pipeline_tracking FOR EACH ROW
IF OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard THEN
  INSERT INTO pipeline_task_counts (stage, shard, status, n)
  SELECT st, sh, su, d FROM (
    SELECT 'event-ingest' st, OLD.shard sh, OLD.event_ingest_status su, -1 d FROM DUAL WHERE (OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'event-ingest', NEW.shard, NEW.event_ingest_status, 1 FROM DUAL WHERE (OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'shard-splitter', OLD.shard, OLD.shard_splitter_status, -1 FROM DUAL WHERE (OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'shard-splitter', NEW.shard, NEW.shard_splitter_status, 1 FROM DUAL WHERE (OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'shard-worker', OLD.shard, OLD.shard_worker_status, -1 FROM DUAL WHERE (OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'shard-worker', NEW.shard, NEW.shard_worker_status, 1 FROM DUAL WHERE (OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'mysql-sender', OLD.shard, OLD.mysql_sender_status, -1 FROM DUAL WHERE (OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'mysql-sender', NEW.shard, NEW.mysql_sender_status, 1 FROM DUAL WHERE (OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard)
    UNION ALL SELECT 'shard-splitter', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new') AND NOT ((NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new') AND OLD.shard = NEW.shard)
    UNION ALL SELECT 'shard-splitter', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new') AND NOT ((OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new') AND OLD.shard = NEW.shard)
    UNION ALL SELECT 'shard-worker', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new') AND NOT ((NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new') AND OLD.shard = NEW.shard)
    UNION ALL SELECT 'shard-worker', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new') AND NOT ((OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new') AND OLD.shard = NEW.shard)
    UNION ALL SELECT 'mysql-sender', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new') AND NOT ((NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new') AND OLD.shard = NEW.shard)
    UNION ALL SELECT 'mysql-sender', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new') AND NOT ((OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new') AND OLD.shard = NEW.shard)
  ) AS delta
  ORDER BY st, sh, su
  ON DUPLICATE KEY UPDATE n = n + VALUES(n); END IF;

DROP TRIGGER IF EXISTS pipeline_task_counts_delete;
CREATE TRIGGER pipeline_task_counts_delete AFTER DELETE ON pipeline_tracking FOR EACH ROW
INSERT INTO pipeline_task_counts (stage, shard, status, n)
  SELECT st, sh, su, d FROM (
    SELECT 'event-ingest' st, OLD.shard sh, OLD.event_ingest_status su, -1 d
    UNION ALL SELECT 'shard-splitter', OLD.shard, OLD.shard_splitter_status, -1
    UNION ALL SELECT 'shard-worker', OLD.shard, OLD.shard_worker_status, -1
    UNION ALL SELECT 'mysql-sender', OLD.shard, OLD.mysql_sender_status, -1
    UNION ALL SELECT 'shard-splitter', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new'
    UNION ALL SELECT 'shard-worker', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new'
    UNION ALL SELECT 'mysql-sender', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new'
  ) AS delta
  ORDER BY st, sh, su
  ON DUPLICATE KEY UPDATE n = n + VALUES(n);

DROP TRIGGER IF EXISTS pipeline_transition_counts_insert;
CREATE TRIGGER pipeline_transition_counts_insert AFTER INSERT ON pipeline_transitions FOR EACH ROW
IF NEW.action IN ('done', 'fail', 'reap', 'retry', 'release', 'rewind') THEN
  INSERT INTO pipeline_transition_counts (stage, shard, action, to_status, le_ms, n, sum_ms)
  VALUES (NEW.stage, NEW.shard, NEW.action, NEW.to_status,
          IF(NEW.to_status = 'done' AND NEW.duration_ms IS NOT NULL,
             CASE WHEN NEW.duration_ms <= 50 THEN 50 WHEN NEW.duration_ms <= 100 THEN 100 WHEN NEW.duration_ms <= 250 THEN 250 WHEN NEW.duration_ms <= 500 THEN 500 WHEN NEW.duration_ms <= 1000 THEN 1000 WHEN NEW.duration_ms <= 2500 THEN 2500 WHEN NEW.duration_ms <= 5000 THEN 5000 WHEN NEW.duration_ms <= 10000 THEN 10000 WHEN NEW.duration_ms <= 30000 THEN 30000 WHEN NEW.duration_ms <= 60000 THEN 60000 WHEN NEW.duration_ms <= 300000 THEN 300000 ELSE 2147483647 END, -1),
          1, COALESCE(NEW.duration_ms, 0))
  ON DUPLICATE KEY UPDATE n = n + 1, sum_ms = sum_ms + VALUES(sum_ms); END IF;

-- The counts of the rows already there, with writers held off (an older API still running
-- waits here for the moment the count takes; the triggers above count whatever it does next).
LOCK TABLES pipeline_tracking AS t1 READ, pipeline_tracking AS t2 READ, pipeline_tracking AS t3 READ, pipeline_tracking AS t4 READ, pipeline_tracking AS t5 READ, pipeline_tracking AS t6 READ, pipeline_tracking AS t7 READ,
  pipeline_task_counts WRITE;
DELETE FROM pipeline_task_counts;
INSERT INTO pipeline_task_counts (stage, shard, status, n)
SELECT st, sh, su, d FROM (
  SELECT 'event-ingest' st, shard sh, event_ingest_status su, COUNT(*) d FROM pipeline_tracking t1 GROUP BY shard, event_ingest_status
  UNION ALL SELECT 'shard-splitter' st, shard sh, shard_splitter_status su, COUNT(*) d FROM pipeline_tracking t2 GROUP BY shard, shard_splitter_status
  UNION ALL SELECT 'shard-worker' st, shard sh, shard_worker_status su, COUNT(*) d FROM pipeline_tracking t3 GROUP BY shard, shard_worker_status
  UNION ALL SELECT 'mysql-sender' st, shard sh, mysql_sender_status su, COUNT(*) d FROM pipeline_tracking t4 GROUP BY shard, mysql_sender_status
  UNION ALL SELECT 'shard-splitter', shard, 'ready', COUNT(*) FROM pipeline_tracking t5 WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new' GROUP BY shard
  UNION ALL SELECT 'shard-worker', shard, 'ready', COUNT(*) FROM pipeline_tracking t6 WHERE shard_splitter_status = 'done' AND shard_worker_status = 'new' GROUP BY shard
  UNION ALL SELECT 'mysql-sender', shard, 'ready', COUNT(*) FROM pipeline_tracking t7 WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new' GROUP BY shard
) AS counted;
UNLOCK TABLES;
