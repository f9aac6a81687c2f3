-- A batch's COMMIT in its write script (app/worker/stage.py `FileRun._write`): the affected-row
-- checks the worker made on the script's answers (every new key, order and user went in; a load
-- stored nothing with a warning) are made by the server, right after each checked statement,
-- by `CALL worker_expect(ROW_COUNT(), <rows expected or -1>, <@@warning_count or 0>, <what>)`.
-- A mismatch SIGNALs (error 1644, the message `p_what`, or 'warnings'): the server stops the
-- script before its COMMIT and the worker rolls back and decides the batch again, as it did on
-- its own check. No SQL, no state: SQL SECURITY
-- INVOKER, the caller's transaction untouched.
-- (No `;` at a line's end inside the body: migrations are split there, app/db.py split_sql.)
DROP PROCEDURE IF EXISTS worker_expect;
CREATE PROCEDURE worker_expect(IN p_got BIGINT, IN p_want BIGINT, IN p_warnings BIGINT, IN p_what VARCHAR(32))
  NO SQL SQL SECURITY INVOKER
BEGIN
  DECLARE v_what VARCHAR(32) DEFAULT 'warnings'
  ; IF p_want >= 0 AND p_got <> p_want THEN
      SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = p_what, MYSQL_ERRNO = 1644
    ; ELSEIF p_warnings <> 0 THEN
      SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = v_what, MYSQL_ERRNO = 1644
    ; END IF
; END;
