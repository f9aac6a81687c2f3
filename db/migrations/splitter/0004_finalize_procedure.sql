-- A file's index completion as one stored procedure (app/splitter/order_index.py `finalize`):
-- the statements it ran one by one in the completion's transaction, the sequence's row locked
-- first, now one CALL. The caller's transaction is the procedure's: it starts none and commits
-- nothing. The answer (`p_state`: indexed 0/1, the current, closed, sealed and truncated epochs)
-- comes back through an OUT variable, so the CALL answers no result set of its own. It runs
-- with the caller's privileges (SQL SECURITY INVOKER): no account but the splitter's is involved.
-- A file is marked indexed only if it is not yet, its epoch is not closed, and (`p_seen_from`
-- not NULL) pruning has not passed the first epoch its lookups read; then its epoch's range
-- takes the new sequence number and the sequence moves on, with the epoch when it is full
-- (`p_epoch_rows`) and the ring (`p_ring` partitions) has room.
-- (No `;` at a line's end inside the body: migrations are split there, app/db.py split_sql.
-- Plain SQL/PSM that MySQL 8.0 runs too: no VALUES() in ON DUPLICATE KEY, locals prefixed
-- so that no name is a column's.)
DROP PROCEDURE IF EXISTS splitter_finalize;
CREATE PROCEDURE splitter_finalize(IN p_file_id BIGINT, IN p_epoch BIGINT, IN p_purchases BIGINT,
    IN p_epoch_rows BIGINT, IN p_ring BIGINT, IN p_seen_from BIGINT, OUT p_state VARCHAR(200))
  MODIFIES SQL DATA SQL SECURITY INVOKER
BEGIN
  DECLARE v_seq, v_epoch, v_rows, v_closed, v_trunc, v_pruned BIGINT
  ; SELECT value, epoch, epoch_rows, closed_below, truncated_below, pruned_epoch
      INTO v_seq, v_epoch, v_rows, v_closed, v_trunc, v_pruned
      FROM splitter_seq WHERE id = 1 FOR UPDATE
  ; UPDATE splitter_file SET indexed_seq = v_seq + 1, indexed_at = NOW(3), purchases = p_purchases
      WHERE file_id = p_file_id AND indexed_seq IS NULL AND p_epoch >= v_closed
        AND (p_seen_from IS NULL OR p_seen_from >= v_pruned)
  ; IF ROW_COUNT() > 0 THEN
      INSERT INTO splitter_epoch (epoch, first_seq, last_seq) VALUES (p_epoch, v_seq + 1, v_seq + 1)
        ON DUPLICATE KEY UPDATE first_seq = LEAST(first_seq, v_seq + 1), last_seq = GREATEST(last_seq, v_seq + 1)
      ; IF v_rows + p_purchases >= p_epoch_rows AND v_epoch + 1 < v_trunc + p_ring THEN
          UPDATE splitter_seq SET value = v_seq + 1, epoch = v_epoch + 1, epoch_rows = 0 WHERE id = 1
        ; ELSE
          UPDATE splitter_seq SET value = v_seq + 1, epoch_rows = v_rows + p_purchases WHERE id = 1
        ; END IF
    ; END IF
  ; SELECT CONCAT_WS(' ', f.indexed_seq IS NOT NULL, s.epoch, s.closed_below, s.sealed_below, s.truncated_below)
      INTO p_state FROM splitter_seq s JOIN splitter_file f ON f.file_id = p_file_id WHERE s.id = 1
; END;
