-- The task-count triggers of 0004, cheaper for the moves every file makes: a registration, an
-- ingest's done, a claim (new -> started) and a done (started -> done) of one stage write their
-- two to four counters with one INSERT ... VALUES (rows in primary-key order, as before, so two
-- transactions lock shared counters in the same order). Any other change (a fail, retry,
-- release, rewind, reap, a hand-made UPDATE, a shard moved) takes 0004's general statement,
-- unchanged. The counts mean exactly what they meant (tests/test_api_counts.py compares them
-- with a scan after every kind of move); what changes is the server's work: 0004's statement
-- is a derived table of 15 (7) SELECTs, each optimised, materialised and sorted on every
-- status change, about 90 us of server CPU per move on this machine; the VALUES form ~25 us.
-- The old triggers are replaced with the table locked, so no writer moves a task between them.
-- (No table of its own: an applied 0005 is not run again; if 0004 runs again because a counts
-- table was dropped by hand, its slower triggers count just as exactly.)
LOCK TABLES pipeline_tracking WRITE, pipeline_task_counts WRITE;
DROP TRIGGER IF EXISTS pipeline_task_counts_update;
CREATE TRIGGER pipeline_task_counts_update AFTER UPDATE ON pipeline_tracking FOR EACH ROW
IF OLD.event_ingest_status <> NEW.event_ingest_status OR OLD.shard_splitter_status <> NEW.shard_splitter_status OR OLD.shard_worker_status <> NEW.shard_worker_status OR OLD.mysql_sender_status <> NEW.mysql_sender_status OR OLD.shard <> NEW.shard THEN
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
IF NEW.event_ingest_status IN ('new', 'started', 'failed') AND NEW.shard_splitter_status IN ('new', 'started', 'failed') AND NEW.shard_worker_status IN ('new', 'started', 'failed') AND NEW.mysql_sender_status IS NOT NULL THEN
  INSERT INTO pipeline_task_counts (stage, shard, status, n) VALUES ('event-ingest', NEW.shard, NEW.event_ingest_status, 1), ('mysql-sender', NEW.shard, NEW.mysql_sender_status, 1), ('shard-splitter', NEW.shard, NEW.shard_splitter_status, 1), ('shard-worker', NEW.shard, NEW.shard_worker_status, 1) ON DUPLICATE KEY UPDATE n = n + VALUES(n)
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
  ON DUPLICATE KEY UPDATE n = n + VALUES(n); END IF;
UNLOCK TABLES;
