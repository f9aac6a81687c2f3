-- Schema of a shard database (shop_shard_<N>), owned by mysql-sender (app/sender/loader.py).
-- The worker's state (balances, stock, seen keys) lives in the pipeline database, not here: a
-- shard server holds only what the sender loads. An original deployment's `events` table
-- (without event_key) is refused by the sender before this runs: it is never loaded into.
-- creates: events.event_key events.source_file loaded_files purchase_history order_return

-- One row per accepted event. The contract's columns come first (timestamp now keeps
-- milliseconds, UTC); event_key makes a second load of an event a no-op, source_file says
-- which prepared file put it here. Indexed for what users ask (a shop's, a user's, an order's
-- events, a type over time); each index costs load speed (~6% each at 300k rows), so per-file
-- questions go to loaded_files instead of an index on source_file.
CREATE TABLE IF NOT EXISTS events (
    id          BIGINT NOT NULL AUTO_INCREMENT,
    event_type  TINYINT NOT NULL,
    shop_id     BIGINT NULL,
    user_id     BIGINT NULL,
    `timestamp` DATETIME(3) NOT NULL,
    shard       TINYINT NOT NULL,
    created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    event_key   VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    source_file VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    order_id    BIGINT NULL,
    good_id     BIGINT NULL,
    qty         INT NULL,
    amount      DECIMAL(18,2) NULL,
    payload     JSON NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_events_event_key (event_key),
    KEY ix_events_shop_time (shop_id, `timestamp`),
    KEY ix_events_user_time (user_id, `timestamp`),
    KEY ix_events_type_time (event_type, `timestamp`),
    KEY ix_events_order (order_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- One row per prepared file loaded, written in the same transaction as its events: a file
-- whose row is here is never loaded again, whatever happened after the commit.
CREATE TABLE IF NOT EXISTS loaded_files (
    source_file     VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    shard           TINYINT NOT NULL,
    line_count      INT NOT NULL,
    loaded_count    INT NOT NULL,
    duplicate_count INT NOT NULL,
    checksum        CHAR(40) CHARACTER SET ascii NOT NULL,
    method          VARCHAR(32) CHARACTER SET ascii NOT NULL,
    seconds         DECIMAL(10,3) NULL,
    loaded_at       DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (source_file)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Read-only views with the original deployment's purchase and return tables' columns, so a
-- reader of those tables keeps working; they cost nothing at load time. Where an original
-- table of that name already exists it is left alone: each view is created only where no base
-- table has its name (a prepared statement, so the condition runs on MySQL 8.0 and MariaDB).
SET @purchase_history = IF(
    (SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()
       AND table_name = 'purchase_history' AND table_type = 'BASE TABLE') = 0,
    'CREATE OR REPLACE VIEW purchase_history AS
         SELECT order_id, user_id, good_id, shop_id, qty, amount AS price_at_order,
                `timestamp`, event_key, source_file
         FROM events WHERE event_type = 1',
    'DO 0');
PREPARE create_view FROM @purchase_history;
EXECUTE create_view;
DEALLOCATE PREPARE create_view;

SET @order_return = IF(
    (SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()
       AND table_name = 'order_return' AND table_type = 'BASE TABLE') = 0,
    'CREATE OR REPLACE VIEW order_return AS
         SELECT order_id, user_id, good_id, shop_id, qty, amount,
                `timestamp`, event_key, source_file
         FROM events WHERE event_type = 3',
    'DO 0');
PREPARE create_view FROM @order_return;
EXECUTE create_view;
DEALLOCATE PREPARE create_view;
