-- The task-count triggers (0005's update, 0006's insert) count nothing while the session
-- variable @pipeline_counted is set. The API sets it in the first statement of its hot
-- transactions (a claim, a first `done` of a named worker alone, in a batch or with its claim, a
-- registration) and writes those transactions' net changes to pipeline_task_counts itself, with
-- one statement before the COMMIT (app/api/counts.py), and clears it in the same packet and on
-- every rollback path (app/api/store.py). A trigger cost the server ~55-60 us per row it counted
-- (its invocation and its INSERT ... ON DUPLICATE KEY UPDATE); the API's statement counts a
-- whole transaction's rows at once. Every other writer (an operator's UPDATE, a retry, rewind,
-- fail, release, the reaper, ingest's own `done`, a registration's rows that existed, an older
-- API during a rolling upgrade) never sets the variable, and the triggers count it as before.
-- The delete trigger and the transition-count trigger are unchanged. A gate, not removal: an
-- unset variable is NULL in MariaDB and MySQL 8.0 alike, so a session that knows nothing of
-- it is counted. Replaced with the tables locked, so no writer moves a task between a DROP and
-- its CREATE. No table of its own: an applied 0007 is not run again; running it again changes
-- nothing.
LOCK TABLES pipeline_tracking WRITE, pipeline_task_counts WRITE;
DROP TRIGGER IF EXISTS pipeline_task_counts_update;
CREATE TRIGGER pipeline_task_counts_update AFTER UPDATE ON pipeline_tracking FOR EACH ROW
IF @pipeline_counted IS NULL AND (OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard) THEN
  IF OLD.event_ingest_status = 'new' AND NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new' AND OLD.shard = NEW.shard AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, 'done', 1), ('event-ingest', NEW.shard, 'new', -1), ('shard-splitter', NEW.shard, 'ready', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.event_ingest_status = 'new' AND NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status <> 'new' AND OLD.shard = NEW.shard AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, 'done', 1), ('event-ingest', NEW.shard, 'new', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.event_ingest_status = 'started' AND NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new' AND OLD.shard = NEW.shard AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, 'done', 1), ('event-ingest', NEW.shard, 'started', -1), ('shard-splitter', NEW.shard, 'ready', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.event_ingest_status = 'started' AND NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status <> 'new' AND OLD.shard = NEW.shard AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, 'done', 1), ('event-ingest', NEW.shard, 'started', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_splitter_status = 'new' AND NEW.shard_splitter_status = 'started' AND NEW.event_ingest_status = 'done' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('shard-splitter', NEW.shard, 'new', -1), ('shard-splitter', NEW.shard, 'ready', -1), ('shard-splitter', NEW.shard, 'started', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_splitter_status = 'started' AND NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status = 'new' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('shard-splitter', NEW.shard, 'done', 1), ('shard-splitter', NEW.shard, 'started', -1), ('shard-worker', NEW.shard, 'ready', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_splitter_status = 'started' AND NEW.shard_splitter_status = 'done' AND NEW.shard_worker_status <> 'new' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_worker_status <=> NEW.shard_worker_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('shard-splitter', NEW.shard, 'done', 1), ('shard-splitter', NEW.shard, 'started', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_worker_status = 'new' AND NEW.shard_worker_status = 'started' AND NEW.shard_splitter_status = 'done' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('shard-worker', NEW.shard, 'new', -1), ('shard-worker', NEW.shard, 'ready', -1), ('shard-worker', NEW.shard, 'started', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_worker_status = 'started' AND NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status = 'new' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('mysql-sender', NEW.shard, 'ready', 1), ('shard-worker', NEW.shard, 'done', 1), ('shard-worker', NEW.shard, 'started', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.shard_worker_status = 'started' AND NEW.shard_worker_status = 'done' AND NEW.mysql_sender_status <> 'new' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.mysql_sender_status <=> NEW.mysql_sender_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('shard-worker', NEW.shard, 'done', 1), ('shard-worker', NEW.shard, 'started', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.mysql_sender_status = 'new' AND NEW.mysql_sender_status = 'started' AND NEW.shard_worker_status = 'done' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('mysql-sender', NEW.shard, 'new', -1), ('mysql-sender', NEW.shard, 'ready', -1), ('mysql-sender', NEW.shard, 'started', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF OLD.mysql_sender_status = 'started' AND NEW.mysql_sender_status = 'done' AND OLD.shard = NEW.shard AND OLD.event_ingest_status <=> NEW.event_ingest_status AND OLD.shard_splitter_status <=> NEW.shard_splitter_status AND OLD.shard_worker_status <=> NEW.shard_worker_status THEN
    INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('mysql-sender', NEW.shard, 'done', 1), ('mysql-sender', NEW.shard, 'started', -1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSE
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
  ON DUPLICATE KEY UPDATE n = n + VALUES(n); END IF; END IF;
DROP TRIGGER IF EXISTS pipeline_task_counts_insert;
CREATE TRIGGER pipeline_task_counts_insert AFTER INSERT ON pipeline_tracking FOR EACH ROW
IF @pipeline_counted IS NULL THEN
IF NEW.event_ingest_status IN ('new', 'started', 'failed') AND NEW.shard_splitter_status IN ('new', 'started', 'failed') AND NEW.shard_worker_status IN ('new', 'started', 'failed') AND NEW.mysql_sender_status IS NOT NULL THEN
  INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, NEW.event_ingest_status, 1), ('mysql-sender', NEW.shard, NEW.mysql_sender_status, 1), ('shard-splitter', NEW.shard, NEW.shard_splitter_status, 1), ('shard-worker', NEW.shard, NEW.shard_worker_status, 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSEIF NEW.event_ingest_status = 'done' AND NEW.shard_splitter_status = 'new' AND NEW.shard_worker_status = 'new' AND NEW.mysql_sender_status = 'new' THEN
  INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, 'done', 1), ('mysql-sender', NEW.shard, 'new', 1), ('shard-splitter', NEW.shard, 'new', 1), ('shard-splitter', NEW.shard, 'ready', 1), ('shard-worker', NEW.shard, 'new', 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
  ; ELSE
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
  ON DUPLICATE KEY UPDATE n = n + VALUES(n); END IF; END IF;
UNLOCK TABLES;
