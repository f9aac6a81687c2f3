-- A cheaper `events` table, and one the original writers can insert into again. One ALTER, so a
-- crash leaves either shape, never half of it. No row is added, lost or changed: the new unique
-- key is implied by the old one.
--
-- * The unique key leads with `timestamp`: files arrive in time order, so each load's key
--   lookups and inserts stay on the newest pages instead of one random page per row once the
--   table outgrows the buffer pool (bench/shard_schema.py: fresh and after 2M rows). The
--   worker never sends one event_key with two timestamps (the order ledger and the seen keys
--   decide that upstream), so a line that reaches the shard twice still collides here and is
--   an explicit no-op.
-- * Secondary indexes: only (shop_id, timestamp). The user, order and type indexes are built
--   on demand (SHARD_INDEXES, docs/sender.md), each costs load speed.
-- * event_key, source_file and payload accept NULL: an INSERT with the original column list
--   (event_type, shop_id, user_id, timestamp, shard) succeeds, and its NULL key never
--   collides. The sender always sets all three.
ALTER TABLE events
    MODIFY event_key VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    MODIFY source_file VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    MODIFY payload JSON NULL,
    DROP INDEX uq_events_event_key,
    DROP INDEX ix_events_user_time,
    DROP INDEX ix_events_type_time,
    DROP INDEX ix_events_order,
    ADD UNIQUE KEY uq_events_time_key (`timestamp`, event_key);
