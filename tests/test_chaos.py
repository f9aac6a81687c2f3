"""Faults while files flow: daemons SIGKILLed at random and restarted, the database server
restarted once, the API SIGKILLed once. Afterwards the same ground-truth checks as the
end-to-end test hold."""
from __future__ import annotations

import random
import threading
import time

from app.ingest.generator import Rates, generate_files
from tests import ground_truth, servers
from tests.pipeline_harness import Pipeline, chaos_loop, check_against_truth

RATES = Rates(duplicate=0.03, later_duplicate=0.03, return_first=0.03, return_first_later=0.02,
              over_balance=0.02, malformed=0.02, unroutable_return=0.02, shopless_return=0.02)


def test_kills_and_a_database_restart_lose_nothing_and_duplicate_nothing(tmp_path, private_mariadb,
                                                                         make_database):
    host, port = "127.0.0.1", private_mariadb.port
    pipeline_db = make_database("chaos_pipe", host, port)
    shard_dbs = [make_database(f"chaos_shard{n}", host, port) for n in range(2)]
    source = tmp_path / "generated"
    names = generate_files(source, 50, 120, seed=4242, rates=RATES, start="20260201000000")
    truth = ground_truth.compute(sorted(source.glob(f"*{ground_truth.SUFFIX}")))

    # Short leases: a killed daemon's task comes back quickly.
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs,
                    extra_env={"LEASE_SECONDS": "2", "REAP_INTERVAL": "0.3"}).start()
    rng = random.Random(7)
    batches = [names[i:i + 10] for i in range(0, len(names), 10)]
    restarted_db, killed_api = threading.Event(), threading.Event()

    def feed():
        for i, batch in enumerate(batches):
            staging = tmp_path / f"batch{i}"
            staging.mkdir()
            for name in batch:
                (staging / f"{name}{ground_truth.SUFFIX}").write_bytes(
                    (source / f"{name}{ground_truth.SUFFIX}").read_bytes())
            pipe.import_files(staging)
            time.sleep(2)

    def also_kill_servers(kills: int):
        if kills == 4 and not restarted_db.is_set():
            private_mariadb.stop()
            time.sleep(1.5)
            private_mariadb.start()
            restarted_db.set()
        if kills == 8 and not killed_api.is_set():
            pipe.kill_api()
            killed_api.set()

    feeder = threading.Thread(target=feed)
    try:
        feeder.start()
        killed = chaos_loop(pipe, seconds=20, every=1.5, rng=rng, on_tick=also_kill_servers)
        feeder.join(120)
        assert not feeder.is_alive()
        assert restarted_db.is_set() and killed_api.is_set() and len(killed) >= 8
        pipe.wait_loaded(len(names), timeout=240)
        check_against_truth(pipe, truth, list(names), check_rejected_files=False)
        # Every kill and the restart were survived by the API's own bookkeeping too.
        assert servers.query(pipeline_db, "SELECT COUNT(*) FROM pipeline_tracking "
                                          "WHERE owner IS NOT NULL OR lease_expires_at IS NOT NULL") == [(0,)]
    finally:
        pipe.stop()
