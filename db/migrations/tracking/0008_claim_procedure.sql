-- A claim as one stored procedure: `CALL pipeline_claim(stage, shard or NULL, owner, limit,
-- lease_us, go)` locks what the owner already holds of the stage (of the shard), then up to
-- `limit` minus that many ready tasks nobody else is locking (an ordered stage's shard: under
-- its claim lock, below its gate, none while another daemon holds one of its files), starts
-- them (status, owner, lease, attempts) and logs their moves, extends the held ones' leases,
-- and answers one row per task, with `resumed` 1 for the held ones, the attempts as they now
-- stand and `n`, its place: held ones first, then the new ones, each in id order. It is what the API sent as
-- two round trips (the locking reads, then the writes decided in Python from their rows); the
-- same locks, rows, counts and history, one round trip: the caller sends START TRANSACTION;
-- [a done's statements;] CALL; COMMIT in one packet.
--
-- Set-based: each locking read is one index range read whose ids go into a list, in the
-- index's id order (a GROUP_CONCAT without ORDER BY: no sort; a list out of order would change
-- only the answer's and the log's order, never which rows are claimed) (the ready read: a derived
-- table with its LIMIT, locking exactly the rows it returns: SKIP LOCKED passes other claims'
-- rows as the two-trip read did); the writes find the listed rows by primary key or on ix_owner
-- (never a scan: an UPDATE that scans waits on and locks every row it reads, and a claim must
-- pass another claim's locked rows, as tests/test_api_done_claim.py checks). Only the ready
-- reads name a stage's columns (each its ready index); the writes set every stage's status
-- column to itself but the claimed stage's.
--
-- `go` false: a `done` sent ahead in the same transaction did not take effect as a first `done`
-- (its gate, `@pipeline_done = n`); the procedure then rolls the whole transaction back, claims
-- nothing and answers no row; the caller explains the `done` on its own, as before.
--
-- The ordered gate is read with plain reads into local variables: a consistent read, no lock
-- (a `SET @v = (subquery)` would lock the files still pending upstream; see
-- tests/test_api_done_claim.py). SQL SECURITY INVOKER: it runs with the caller's rights. Body
-- statements end with `;` at the start of the next line: a `;` at a line's end separates
-- migration statements. No table of its own: running it again replaces the procedure with
-- itself; a database that lost it (a dump without `--routines`) runs it again.
-- creates: pipeline_claim()
DROP PROCEDURE IF EXISTS pipeline_claim;
CREATE PROCEDURE pipeline_claim(IN p_stage VARCHAR(32), IN p_shard INT, IN p_owner VARCHAR(128), IN p_limit INT,
                                IN p_lease_us BIGINT, IN p_go BOOLEAN)
SQL SECURITY INVOKER
BEGIN
  DECLARE v_mine TEXT DEFAULT NULL
  ; DECLARE v_fresh TEXT DEFAULT NULL
  ; DECLARE v_held INT DEFAULT 0
  ; DECLARE v_want INT DEFAULT 0
  ; DECLARE v_busy INT DEFAULT 0
  ; DECLARE v_blocker BIGINT DEFAULT NULL
  ; DECLARE v_rest TEXT DEFAULT NULL
  ; DECLARE v_id BIGINT
  -- The id lists are GROUP_CONCATs: never cut short (a cut list would name other rows).
  ; IF p_limit * 21 > @@SESSION.group_concat_max_len THEN
    SET SESSION group_concat_max_len = p_limit * 21
  ; END IF
  ; IF NOT p_go THEN
    ROLLBACK
  ; ELSE
    -- What the owner holds (ix_owner: only started tasks carry an owner), locked: all of it
    -- (its own rows, a few), no derived table; the first `limit` of them are claimed again.
    SELECT GROUP_CONCAT(id), COUNT(*) INTO v_mine, v_held
      FROM pipeline_tracking FORCE INDEX (ix_owner) WHERE owner = p_owner
        AND CASE p_stage WHEN 'shard-splitter' THEN shard_splitter_status WHEN 'shard-worker' THEN shard_worker_status
                         WHEN 'mysql-sender' THEN mysql_sender_status END = 'started'
        AND (p_shard IS NULL OR shard = p_shard)
      FOR UPDATE
    ; IF v_held > p_limit THEN
      SET v_mine = SUBSTRING_INDEX(v_mine, ',', p_limit), v_held = p_limit
    ; END IF
    ; SET v_want = p_limit - v_held
    ; IF v_want > 0 THEN
      IF p_stage = 'shard-splitter' AND p_shard IS NULL THEN
        SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_splitter_ready)
          WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new'
          ORDER BY id LIMIT v_want FOR UPDATE SKIP LOCKED) AS ready
      ; ELSEIF p_stage = 'shard-splitter' THEN
        SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_splitter_ready_shard)
          WHERE event_ingest_status = 'done' AND shard_splitter_status = 'new' AND shard = p_shard
          ORDER BY id LIMIT v_want FOR UPDATE SKIP LOCKED) AS ready
      ; ELSEIF p_stage = 'shard-worker' AND p_shard IS NULL THEN
        SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_worker_ready)
          WHERE shard_splitter_status = 'done' AND shard_worker_status = 'new'
          ORDER BY id LIMIT v_want FOR UPDATE SKIP LOCKED) AS ready
      ; ELSEIF p_stage = 'shard-worker' THEN
        -- The ordered stage: the shard's claim lock (two replicas never take consecutive files
        -- at once); whether another daemon holds one of its files; its oldest file still
        -- pending at the splitter although ingest is done (one ORDER BY id LIMIT 1 per status,
        -- each stopping at its first qualifying file); then its oldest ready files below that.
        INSERT INTO pipeline_claim_lock (stage, shard) VALUES (p_stage, p_shard) ON DUPLICATE KEY UPDATE shard = shard
        ; SELECT EXISTS(SELECT 1 FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
                        WHERE shard_splitter_status IN ('new', 'started', 'done', 'failed')
                        AND shard_worker_status = 'started' AND shard = p_shard AND NOT (owner <=> p_owner) LIMIT 1),
                 NULLIF(LEAST(
                   COALESCE((SELECT id FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
                             WHERE shard_splitter_status = 'new' AND shard_worker_status = 'new' AND shard = p_shard
                             AND event_ingest_status = 'done' ORDER BY id LIMIT 1), 9223372036854775807),
                   COALESCE((SELECT id FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
                             WHERE shard_splitter_status = 'started' AND shard_worker_status = 'new' AND shard = p_shard
                             AND event_ingest_status = 'done' ORDER BY id LIMIT 1), 9223372036854775807)),
                   9223372036854775807)
          INTO v_busy, v_blocker
        ; SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_worker_ready_shard)
          WHERE shard_splitter_status = 'done' AND shard_worker_status = 'new' AND shard = p_shard
          AND id < IF(v_busy, 0, COALESCE(v_blocker, 9223372036854775807))
          ORDER BY id LIMIT v_want FOR UPDATE) AS ready
      ; ELSEIF p_stage = 'mysql-sender' AND p_shard IS NULL THEN
        SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_sender_ready)
          WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new'
          ORDER BY id LIMIT v_want FOR UPDATE SKIP LOCKED) AS ready
      ; ELSEIF p_stage = 'mysql-sender' THEN
        SELECT GROUP_CONCAT(id) INTO v_fresh FROM (
          SELECT id FROM pipeline_tracking FORCE INDEX (ix_sender_ready_shard)
          WHERE shard_worker_status = 'done' AND mysql_sender_status = 'new' AND shard = p_shard
          ORDER BY id LIMIT v_want FOR UPDATE SKIP LOCKED) AS ready
      ; END IF
    ; END IF
    -- The writes over the lists. No JSON_TABLE (each use is a temporary table) and no UPDATE
    -- by a range: the held tasks and the logged ones are found on ix_owner (the owner's
    -- started tasks, all locked above), a new task by its primary key, one UPDATE each (the
    -- lists are short: `limit` tasks).
    ; IF v_mine IS NOT NULL THEN
      UPDATE pipeline_tracking FORCE INDEX (ix_owner) SET lease_expires_at = NOW(3) + INTERVAL p_lease_us MICROSECOND
      WHERE owner = p_owner AND FIND_IN_SET(id, v_mine)
    ; END IF
    ; IF v_fresh IS NOT NULL THEN
      SET v_rest = v_fresh
      ; WHILE v_rest <> '' DO
        SET v_id = CAST(SUBSTRING_INDEX(v_rest, ',', 1) AS UNSIGNED)
        ; SET v_rest = IF(LOCATE(',', v_rest) > 0, SUBSTRING(v_rest, LOCATE(',', v_rest) + 1), '')
        ; UPDATE pipeline_tracking
          SET shard_splitter_status = IF(p_stage = 'shard-splitter', 'started', shard_splitter_status),
              shard_worker_status = IF(p_stage = 'shard-worker', 'started', shard_worker_status),
              mysql_sender_status = IF(p_stage = 'mysql-sender', 'started', mysql_sender_status),
              shard_splitter_attempts = shard_splitter_attempts + (p_stage = 'shard-splitter'),
              shard_worker_attempts = shard_worker_attempts + (p_stage = 'shard-worker'),
              mysql_sender_attempts = mysql_sender_attempts + (p_stage = 'mysql-sender'),
              owner = p_owner, started_at = NOW(3), lease_expires_at = NOW(3) + INTERVAL p_lease_us MICROSECOND
          WHERE id = v_id
      ; END WHILE
      ; INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status, action, actor,
                                         error, duration_ms, events, stats)
        SELECT id, filename, shard, p_stage, 'new', 'started', 'claim', p_owner, NULL, NULL, NULL, NULL
        FROM pipeline_tracking FORCE INDEX (ix_owner) WHERE owner = p_owner AND FIND_IN_SET(id, v_fresh)
    ; END IF
  ; END IF
  -- The answer, from the owner's tasks (ix_owner): `n` the task's place in the lists (held
  -- ones first), which the caller orders by.
  ; SET v_rest = CONCAT_WS(',', v_mine, v_fresh)
  ; SELECT id, filename, shard, created_at,
           CASE p_stage WHEN 'shard-splitter' THEN shard_splitter_attempts WHEN 'shard-worker' THEN shard_worker_attempts
                        WHEN 'mysql-sender' THEN mysql_sender_attempts END AS attempts,
           FIND_IN_SET(id, v_rest) <= v_held AS resumed, FIND_IN_SET(id, v_rest) AS n
    FROM pipeline_tracking FORCE INDEX (ix_owner) WHERE owner = p_owner AND FIND_IN_SET(id, v_rest)
; END;
