-- A held return's line may be as long as MAX_LINE_BYTES (up to 4 MiB); a BLOB holds 64 KiB, so a
-- longer held return failed its whole file ("Data too long for column 'raw'"). On a table of
-- 0001 this copies the table once; run again it changes nothing.
ALTER TABLE worker_holds MODIFY raw MEDIUMBLOB NOT NULL;
