-- Balances of new users first in a small table of their own (issue 12, state bytes per event).
-- Both shard workers create users: a generator's new customers get ascending ids, and each
-- worker inserts the ones its shard saw first, so the two workers' inserts interleave at the top
-- of worker_balances and split its pages in the middle: ~128 bytes a user there for a ~37-byte
-- row. New users now go to `worker_balances_young`; once it holds enough, the users below its
-- newest few thousand move to worker_balances in key order (app/worker/ledger.py `seal`), where
-- they are appended and pages stay full. A user is in one of the two tables; a batch locks its
-- users in both.
-- `worker_ledger` has one row: every batch that reads balances holds it shared until it commits
-- and the sealing pass holds it exclusive, so a user never moves while a batch counts it new
-- or changes it. `sealed_below`: the last pass's bound (nothing young below it then).
-- creates: worker_balances_young worker_ledger

CREATE TABLE IF NOT EXISTS worker_balances_young (
  user_id BIGINT NOT NULL PRIMARY KEY,
  balance DECIMAL(18,2) NOT NULL
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS worker_ledger (
  id TINYINT NOT NULL PRIMARY KEY,
  sealed_below BIGINT NOT NULL
) ENGINE=InnoDB;

INSERT INTO worker_ledger (id, sealed_below)
  SELECT 1, COALESCE(MAX(user_id), -9223372036854775808) FROM worker_balances
  ON DUPLICATE KEY UPDATE id = id;
