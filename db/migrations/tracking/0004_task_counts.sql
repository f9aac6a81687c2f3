-- Task counts per stage, shard and status, kept exact by triggers on pipeline_tracking: every
-- writer (the API's transitions, claims, the reaper, a hand-made UPDATE) changes them in its own
-- transaction, so /metrics/summary, /metrics and the long-poll claims read a few dozen rows
-- instead of scanning the table. `ready` (a pseudo-status of the work stages) counts the tasks
-- whose previous stage is done and this one new: the claimable queue.
-- creates: pipeline_task_counts

CREATE TABLE IF NOT EXISTS pipeline_task_counts (
  stage VARCHAR(32) NOT NULL,
  shard TINYINT NOT NULL,
  -- new | started | done | failed, or ready
  status VARCHAR(16) NOT NULL,
  n BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (stage, shard, status)
) ENGINE=InnoDB;

-- Each trigger writes only the counters a row's change moves (a lease renewal moves none), in
-- primary-key order (ORDER BY), so two transactions moving the same counters lock them in the
-- same order and cannot deadlock on them.
DROP TRIGGER IF EXISTS pipeline_task_counts_insert;
CREATE TRIGGER pipeline_task_counts_insert AFTER INSERT ON pipeline_tracking FOR EACH ROW
INSERT INTO pipeline_task_counts (stage, shard, status, n)
SELECT st, sh, su, d FROM (
  SELECT 'event-ingest' st, NEW.shard sh, NEW.event_ingest_status su, 1 d
  UNION ALL SELECT 'shard-splitter' st, NEW.shard sh, NEW.shard_splitter_status su, 1 d
  UNION ALL SELECT 'shard-worker' st, NEW.shard sh, NEW.shard_worker_status su, 1 d
  UNION ALL SELECT 'mysql-sender' st, NEW.shard sh, NEW.mysql_sender_status su, 1 d
  UNION ALL SELECT 'shard-splitter', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new'
  UNION ALL SELECT 'shard-worker', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new'
  UNION ALL SELECT 'mysql-sender', NEW.shard, 'ready', 1 FROM DUAL WHERE NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new'
) AS delta
ORDER BY st, sh, su
ON DUPLICATE KEY UPDATE n = n + VALUES(n);

DROP TRIGGER IF EXISTS pipeline_task_counts_update;
CREATE TRIGGER pipeline_task_counts_update AFTER UPDATE ON pipeline_tracking FOR EACH ROW
INSERT INTO pipeline_task_counts (stage, shard, status, n)
SELECT st, sh, su, d FROM (
  SELECT 'event-ingest' st, OLD.shard sh, OLD.event_ingest_status su, -1 d FROM DUAL WHERE (OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'event-ingest', NEW.shard, NEW.event_ingest_status, 1 FROM DUAL WHERE (OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'shard-splitter' st, OLD.shard sh, OLD.shard_splitter_status su, -1 d FROM DUAL WHERE (OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'shard-splitter', NEW.shard, NEW.shard_splitter_status, 1 FROM DUAL WHERE (OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'shard-worker' st, OLD.shard sh, OLD.shard_worker_status su, -1 d FROM DUAL WHERE (OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'shard-worker', NEW.shard, NEW.shard_worker_status, 1 FROM DUAL WHERE (OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'mysql-sender' st, OLD.shard sh, OLD.mysql_sender_status su, -1 d FROM DUAL WHERE (OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'mysql-sender', NEW.shard, NEW.mysql_sender_status, 1 FROM DUAL WHERE (OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard)
  UNION ALL SELECT 'shard-splitter', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new') AND NOT ((NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new') AND OLD.shard = NEW.shard)
  UNION ALL SELECT 'shard-splitter', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new') AND NOT ((OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new') AND OLD.shard = NEW.shard)
  UNION ALL SELECT 'shard-worker', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new') AND NOT ((NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new') AND OLD.shard = NEW.shard)
  UNION ALL SELECT 'shard-worker', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new') AND NOT ((OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new') AND OLD.shard = NEW.shard)
  UNION ALL SELECT 'mysql-sender', OLD.shard, 'ready', -1 FROM DUAL WHERE (OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new') AND NOT ((NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new') AND OLD.shard = NEW.shard)
  UNION ALL SELECT 'mysql-sender', NEW.shard, 'ready', 1 FROM DUAL WHERE (NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new') AND NOT ((OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new') AND OLD.shard = NEW.shard)
) AS delta
ORDER BY st, sh, su
ON DUPLICATE KEY UPDATE n = n + VALUES(n);

DROP TRIGGER IF EXISTS pipeline_task_counts_delete;
CREATE TRIGGER pipeline_task_counts_delete AFTER DELETE ON pipeline_tracking FOR EACH ROW
INSERT INTO pipeline_task_counts (stage, shard, status, n)
SELECT st, sh, su, d FROM (
  SELECT 'event-ingest' st, OLD.shard sh, OLD.event_ingest_status su, -1 d
  UNION ALL SELECT 'shard-splitter' st, OLD.shard sh, OLD.shard_splitter_status su, -1 d
  UNION ALL SELECT 'shard-worker' st, OLD.shard sh, OLD.shard_worker_status su, -1 d
  UNION ALL SELECT 'mysql-sender' st, OLD.shard sh, OLD.mysql_sender_status su, -1 d
  UNION ALL SELECT 'shard-splitter', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.event_ingest_status = 'done' AND OLD.shard_splitter_status = 'new'
  UNION ALL SELECT 'shard-worker', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.shard_splitter_status = 'done' AND OLD.shard_worker_status = 'new'
  UNION ALL SELECT 'mysql-sender', OLD.shard, 'ready', -1 FROM DUAL WHERE OLD.shard_worker_status = 'done' AND OLD.mysql_sender_status = 'new'
) AS delta
ORDER BY st, sh, su
ON DUPLICATE KEY UPDATE n = n + VALUES(n);

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
