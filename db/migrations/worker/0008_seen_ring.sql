-- Dedup keys emptied by TRUNCATE PARTITION, not DELETE (issue 12, ninth round). A sealing pass
-- (app/worker/state.py `WorkerState.seal`) packs a shard's keys of old minutes into
-- worker_seen_sealed, then removed them one by one (DELETE: undo, locks, InnoDB's purge later,
-- about half the pass). `worker_seen` is now a ring: each of shards 0-3 has 8 partitions, a
-- minute's keys in the one of its minute modulo 8 (`s<shard>m<slot>`), so a partition holding no
-- minute the shard has not sealed (the last SEAL_MINUTES and the late keys since) is emptied
-- whole by `ALTER TABLE ... TRUNCATE PARTITION`. Keys of other shards (`others`; a negative
-- shard, `below0`) and the sealed keys of a partition that also holds unsealed minutes are
-- still deleted. The key (shard, bucket, hash) decides the partition, so a key is unique in the
-- whole table as before (an insert's affected-row count still proves a key new).
-- Runs only while worker_seen is not partitioned, so the migration can run again from its start;
-- the table holds only the last minutes' keys (sealing moves the rest), a short copy.

SET @plain = (SELECT COUNT(*) = 0 FROM information_schema.partitions WHERE table_schema = DATABASE()
                AND table_name = 'worker_seen' AND partition_name IS NOT NULL);
SET @sql = IF(@plain, 'ALTER TABLE worker_seen PARTITION BY RANGE (shard * 8 + MOD(ABS(bucket), 8)) (
  PARTITION below0 VALUES LESS THAN (0),
  PARTITION s0m0 VALUES LESS THAN (1),
  PARTITION s0m1 VALUES LESS THAN (2),
  PARTITION s0m2 VALUES LESS THAN (3),
  PARTITION s0m3 VALUES LESS THAN (4),
  PARTITION s0m4 VALUES LESS THAN (5),
  PARTITION s0m5 VALUES LESS THAN (6),
  PARTITION s0m6 VALUES LESS THAN (7),
  PARTITION s0m7 VALUES LESS THAN (8),
  PARTITION s1m0 VALUES LESS THAN (9),
  PARTITION s1m1 VALUES LESS THAN (10),
  PARTITION s1m2 VALUES LESS THAN (11),
  PARTITION s1m3 VALUES LESS THAN (12),
  PARTITION s1m4 VALUES LESS THAN (13),
  PARTITION s1m5 VALUES LESS THAN (14),
  PARTITION s1m6 VALUES LESS THAN (15),
  PARTITION s1m7 VALUES LESS THAN (16),
  PARTITION s2m0 VALUES LESS THAN (17),
  PARTITION s2m1 VALUES LESS THAN (18),
  PARTITION s2m2 VALUES LESS THAN (19),
  PARTITION s2m3 VALUES LESS THAN (20),
  PARTITION s2m4 VALUES LESS THAN (21),
  PARTITION s2m5 VALUES LESS THAN (22),
  PARTITION s2m6 VALUES LESS THAN (23),
  PARTITION s2m7 VALUES LESS THAN (24),
  PARTITION s3m0 VALUES LESS THAN (25),
  PARTITION s3m1 VALUES LESS THAN (26),
  PARTITION s3m2 VALUES LESS THAN (27),
  PARTITION s3m3 VALUES LESS THAN (28),
  PARTITION s3m4 VALUES LESS THAN (29),
  PARTITION s3m5 VALUES LESS THAN (30),
  PARTITION s3m6 VALUES LESS THAN (31),
  PARTITION s3m7 VALUES LESS THAN (32),
  PARTITION others VALUES LESS THAN MAXVALUE)', 'DO 0');
PREPARE step FROM @sql;
EXECUTE step;
DEALLOCATE PREPARE step;
