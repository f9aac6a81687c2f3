-- A file registered complete (`POST /files/register` with "done": true, the importer's one
-- request) is inserted with event_ingest_status='done', which 0005's insert trigger counted with
-- its general statement (a derived table of 7 SELECTs, materialised and sorted). Such a row
-- (the rest 'new') now takes one INSERT ... VALUES of its five counters, in primary-key order
-- as every other path; any other inserted row is counted as before. The counts mean what they
-- meant (tests/test_api_counts.py compares them with a scan). Replaced with the tables locked,
-- so no row is inserted between the DROP and the CREATE; no table of its own, so an applied
-- 0006 is not run again and running it again changes nothing.
LOCK TABLES pipeline_tracking WRITE, pipeline_task_counts WRITE;
DROP TRIGGER IF EXISTS pipeline_task_counts_insert;
CREATE TRIGGER pipeline_task_counts_insert AFTER INSERT ON pipeline_tracking FOR EACH ROW
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
  ON DUPLICATE KEY UPDATE n = n + VALUES(n); END IF;
UNLOCK TABLES;
