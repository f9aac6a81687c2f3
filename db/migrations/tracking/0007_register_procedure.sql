-- A file's registration as one stored procedure: `CALL pipeline_register(filename, 'shard,shard',
-- done, actor, events)` inserts each (filename, shard) task that does not exist yet (ingest
-- `started`, or `done` when the file is complete), logs each created task's moves (register;
-- then done, the file's `events` on its first created shard) and answers one row per task of
-- the file: its shard, and whether this call created it. It is what the API sent as two round
-- trips of six statements (the INSERTs, then the log and a read), decided in Python from each
-- INSERT's affected rows and insert id; the same rows, counts and history, one round trip. The
-- caller's transaction holds it (START TRANSACTION; CALL; COMMIT in one packet), so a deadlock
-- or an error rolls all of it back as before.
--
-- SQL SECURITY INVOKER: it runs with the caller's rights, never its creator's. Body statements
-- end with `;` at the start of the next line: a `;` at a line's end separates migration statements.
-- No table of its own: an applied 0007 is not run again; running it again replaces the procedure
-- with itself. A database that lost the procedure (restored from a dump made without
-- `--routines`) runs it again: the API's first call then answers 503 and the next one works.
-- creates: pipeline_register()
DROP PROCEDURE IF EXISTS pipeline_register;
CREATE PROCEDURE pipeline_register(IN p_filename VARCHAR(255), IN p_shards VARCHAR(4000), IN p_done BOOLEAN,
                                   IN p_actor VARCHAR(128), IN p_events INT)
SQL SECURITY INVOKER
BEGIN
  DECLARE v_rest VARCHAR(4000) DEFAULT p_shards
  ; DECLARE v_shard INT
  ; DECLARE v_id BIGINT
  ; DECLARE v_created VARCHAR(4000) DEFAULT ''
  ; WHILE v_rest <> '' DO
    SET v_shard = CAST(SUBSTRING_INDEX(v_rest, ',', 1) AS SIGNED)
    ; SET v_rest = IF(LOCATE(',', v_rest) > 0, SUBSTRING(v_rest, LOCATE(',', v_rest) + 1), '')
    -- The unique key and an explicit no-op: a task that exists (a repeat, a racing registration
    -- that committed first) is left alone and counts 0 affected rows; one inserted counts 1.
    ; INSERT INTO pipeline_tracking (filename, shard, event_ingest_status)
      VALUES (p_filename, v_shard, IF(p_done, 'done', 'started')) ON DUPLICATE KEY UPDATE id = id
    ; IF ROW_COUNT() = 1 THEN
      SET v_id = LAST_INSERT_ID()
      -- One INSERT of the task's moves: register, and done when the file is complete.
      ; IF p_done THEN
        INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                         error, duration_ms, events, stats)
        VALUES (v_id, p_filename, v_shard, 'event-ingest', NULL, 'started', 'register', NULL, NULL, NULL, NULL, NULL),
               (v_id, p_filename, v_shard, 'event-ingest', 'started', 'done', 'done', p_actor, NULL, NULL,
                IF(v_created = '', p_events, NULL), NULL)
      ; ELSE
        INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                         error, duration_ms, events, stats)
        VALUES (v_id, p_filename, v_shard, 'event-ingest', NULL, 'started', 'register', NULL, NULL, NULL, NULL, NULL)
      ; END IF
      ; SET v_created = CONCAT(v_created, ',', v_shard)
    ; END IF
  ; END WHILE
  ; SELECT shard, FIND_IN_SET(shard, SUBSTRING(v_created, 2)) > 0 AS created FROM pipeline_tracking
    WHERE filename = p_filename ORDER BY shard
; END;
