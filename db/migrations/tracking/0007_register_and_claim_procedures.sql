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
-- No table of its own: an applied 0007 is not run again; running it again replaces both
-- procedures (this one and the claim's below) with themselves. A database that lost them
-- (restored from a dump made without `--routines`) runs it again: the API's first call then
-- answers 503 and the next one works.
-- creates: pipeline_register() pipeline_claim()
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

-- A claim of the splitter or the sender (the unordered stages; the worker's ordered claim stays
-- in the API's statements) as one procedure: `CALL pipeline_claim(stage, shard or NULL, owner,
-- limit, lease_us, expect)`. First the tasks `owner` already holds (its lease extended: a
-- restarted daemon resumes its own work), then ready ones, oldest first, each locked with
-- SKIP LOCKED (another claim's are skipped, never waited for), moved to `started` and logged;
-- answered as one result set, held tasks first (`resumed` 1), then the fresh ones. `expect`:
-- the number of `done`s the statements before the CALL, in the same transaction, must have
-- moved (`@pipeline_done`, set by them); when they did not, the procedure rolls everything back
-- and answers one row whose id is NULL (the API then reports each task on its own). NULL: a
-- plain claim.
DROP PROCEDURE IF EXISTS pipeline_claim;
CREATE PROCEDURE pipeline_claim(IN p_stage VARCHAR(32), IN p_shard INT, IN p_owner VARCHAR(128), IN p_limit INT,
                                IN p_lease_us BIGINT, IN p_expect INT)
SQL SECURITY INVOKER
claim: BEGIN
  DECLARE v_id BIGINT
  ; DECLARE v_last BIGINT DEFAULT 0
  ; DECLARE v_n INT DEFAULT 0
  ; DECLARE v_fresh VARCHAR(4000) DEFAULT ''
  ; DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_id = NULL
  ; IF p_expect IS NOT NULL AND NOT (@pipeline_done <=> p_expect) THEN
    ROLLBACK
    ; SELECT NULL AS id, NULL AS filename, NULL AS shard, NULL AS created_at, NULL AS attempts, NULL AS resumed
    ; LEAVE claim
  ; END IF
  -- What the owner holds, locked, one row at a time in id order (its own rows: few).
  ; held: WHILE v_n < p_limit DO
    SET v_id = NULL
    ; SELECT id INTO v_id FROM pipeline_tracking FORCE INDEX (ix_owner)
      WHERE owner = p_owner AND id > v_last AND (p_shard IS NULL OR shard = p_shard)
        AND ((p_stage = 'shard-splitter' AND shard_splitter_status = 'started')
             OR (p_stage = 'mysql-sender' AND mysql_sender_status = 'started'))
      ORDER BY id LIMIT 1 FOR UPDATE
    ; IF v_id IS NULL THEN
      LEAVE held
    ; END IF
    ; UPDATE pipeline_tracking SET lease_expires_at = NOW(3) + INTERVAL p_lease_us MICROSECOND WHERE id = v_id
    ; SET v_last = v_id, v_n = v_n + 1
  ; END WHILE
  ; SET v_last = 0
  ; fresh: WHILE v_n < p_limit DO
    SET v_id = NULL
    ; IF p_stage = 'shard-splitter' AND p_shard IS NULL THEN
      SELECT id INTO v_id FROM pipeline_tracking FORCE INDEX (ix_splitter_ready)
      WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new' AND id > v_last
      ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
    ; ELSEIF p_stage = 'shard-splitter' THEN
      SELECT id INTO v_id FROM pipeline_tracking FORCE INDEX (ix_splitter_ready_shard)
      WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new' AND shard = p_shard AND id > v_last
      ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
    ; ELSEIF p_stage = 'mysql-sender' AND p_shard IS NULL THEN
      SELECT id INTO v_id FROM pipeline_tracking FORCE INDEX (ix_sender_ready)
      WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new' AND id > v_last
      ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
    ; ELSEIF p_stage = 'mysql-sender' THEN
      SELECT id INTO v_id FROM pipeline_tracking FORCE INDEX (ix_sender_ready_shard)
      WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new' AND shard = p_shard AND id > v_last
      ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
    ; END IF
    ; IF v_id IS NULL THEN
      LEAVE fresh
    ; END IF
    ; IF p_stage = 'shard-splitter' THEN
      UPDATE pipeline_tracking SET shard_splitter_status = 'started', owner = p_owner, started_at = NOW(3),
        lease_expires_at = NOW(3) + INTERVAL p_lease_us MICROSECOND, shard_splitter_attempts = shard_splitter_attempts + 1
      WHERE id = v_id
    ; ELSE
      UPDATE pipeline_tracking SET mysql_sender_status = 'started', owner = p_owner, started_at = NOW(3),
        lease_expires_at = NOW(3) + INTERVAL p_lease_us MICROSECOND, mysql_sender_attempts = mysql_sender_attempts + 1
      WHERE id = v_id
    ; END IF
    ; INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                       error, duration_ms, events, stats)
      SELECT id, filename, shard, p_stage, 'new', 'started', 'claim', p_owner, NULL, NULL, NULL, NULL
      FROM pipeline_tracking WHERE id = v_id
    ; SET v_last = v_id, v_n = v_n + 1, v_fresh = CONCAT(v_fresh, ',', v_id)
  ; END WHILE
  ; SELECT id, filename, shard, created_at,
      IF(p_stage = 'shard-splitter', shard_splitter_attempts, mysql_sender_attempts) AS attempts,
      FIND_IN_SET(id, SUBSTRING(v_fresh, 2)) = 0 AS resumed
    FROM pipeline_tracking FORCE INDEX (ix_owner)
    WHERE owner = p_owner AND (p_shard IS NULL OR shard = p_shard)
      AND ((p_stage = 'shard-splitter' AND shard_splitter_status = 'started')
           OR (p_stage = 'mysql-sender' AND mysql_sender_status = 'started'))
    ORDER BY resumed DESC, id LIMIT p_limit
; END;
