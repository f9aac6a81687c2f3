-- The young balances as a ring of three partitions (issue 12, ninth round): a sealing pass
-- emptied the young table by a DELETE, whose rows and their purge cost about half the pass
-- (~1.8-2 µs of server CPU per user moved, docs/performance.md "The young balances' price,
-- located"). Each young row now carries the epoch it was created in (`worker_ledger.epoch`,
-- where new users go), in its key, and the table is partitioned by it: epoch modulo 3. The
-- epochs at or above `worker_ledger.epoch` - 1 are live; a pass (app/worker/ledger.py `seal`,
-- serialized between the two workers by a named lock) empties the partition the next epoch
-- will use by ALTER TABLE ... TRUNCATE PARTITION (it holds an epoch copied by the pass before:
-- dead), then, holding worker_ledger's row exclusive, copies the previous epoch's users to
-- worker_balances in key order and moves the epoch on. Rows of dead epochs not emptied yet are
-- ignored by every reader. `sealed_below` (0007) is no longer written.
-- Existing young rows and the ledger start at epoch 1: live, copied by the second pass.
-- Every statement can run again (a column added where it is missing, the table repartitioned
-- where it is not partitioned yet; prepared statements: MariaDB and MySQL 8.0).
-- creates: worker_ledger.epoch worker_balances_young.epoch

SET @worker_0008 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'worker_ledger' AND column_name = 'epoch') = 0,
    'ALTER TABLE worker_ledger ADD COLUMN epoch INT NOT NULL DEFAULT 1',
    'DO 0');
PREPARE worker_0008 FROM @worker_0008;
EXECUTE worker_0008;
DEALLOCATE PREPARE worker_0008;

-- One statement: the column, the key and the partitioning together, so a migration stopped
-- halfway never leaves the column without its partitions.
SET @worker_0008 = IF(
    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
       AND table_name = 'worker_balances_young' AND column_name = 'epoch') = 0,
    'ALTER TABLE worker_balances_young ADD COLUMN epoch INT NOT NULL DEFAULT 1 AFTER user_id, '
    'DROP PRIMARY KEY, ADD PRIMARY KEY (user_id, epoch) PARTITION BY HASH (epoch) PARTITIONS 3',
    'DO 0');
PREPARE worker_0008 FROM @worker_0008;
EXECUTE worker_0008;
DEALLOCATE PREPARE worker_0008;
