"""The measuring parts of bench/pipeline.py: CPU from /proc, the per-file split, the request
routes the API counter keys on, and the profile summary. The bench itself prints figures and
is run by hand; these are the parts whose mistakes would silently skew every figure."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql
import pytest

from bench import apicount, machine, pairs, procstat, profiling, wire
from bench.pipeline import GROUPS, split_per_file


def _lines_of(proc: subprocess.Popen) -> queue.Queue:
    """The lines `proc` writes on its stdout, as they come (a reader thread)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line.decode().strip())
    threading.Thread(target=read, daemon=True).start()
    return lines


def test_cpu_seconds_counts_a_process_tree_children_included():
    """A parent that starts a child burning CPU: the tree's CPU holds the child's while it
    runs and keeps it once the child has been waited for. Each step waits for the processes to
    say where they are (the child: burnt, then it waits on stdin; the parent: child reaped), not
    for a time: on a loaded machine a child may need far longer than its CPU to exit."""
    burn = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
            "print('burnt', flush=True)\nsys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time\n"
                               f"child = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
                               f"print(child.pid, flush=True)\n"
                               f"child.wait()\n"
                               f"print('reaped', flush=True)\n"
                               f"time.sleep(60)\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        lines = _lines_of(parent)
        said = {lines.get(timeout=120), lines.get(timeout=120)}   # the child's pid and 'burnt', either first
        assert "burnt" in said
        child = int((said - {"burnt"}).pop())
        assert procstat.children(parent.pid) == [child]
        assert procstat.cpu_seconds(parent.pid) >= 0.6        # the running child's, read from its stat
        parent.stdin.close()                                  # the child's stdin too: it exits
        assert lines.get(timeout=120) == "reaped"
        assert procstat.children(parent.pid) == []
        assert procstat.cpu_seconds(parent.pid) >= 0.6        # folded into the parent's cutime
        assert parent.pid in procstat.peak_rss_mib(parent.pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_wire_counts_round_trips_statements_and_rows_and_puts_pymysql_back():
    """Two statements in one packet are one round trip and two results; the rows are counted
    as read; outside the block nothing is counted (PyMySQL is as it was)."""
    import pymysql.connections as pc

    from tests import servers
    before = pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet
    conn = pymysql.connect(host=servers.MYSQL_HOST, port=servers.MYSQL_PORT, user=servers.MYSQL_USER,
                           password=servers.MYSQL_PASSWORD, ssl_disabled=True,
                           client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    try:
        with wire.counting() as (counts, kinds):
            with conn.cursor() as cur:
                cur.execute("SELECT 1 UNION ALL SELECT 2; SELECT 3")
                cur.fetchall()
                while cur.nextset():
                    cur.fetchall()
        assert counts == {"round_trips": 1, "statements": 2, "rows": 3}
        assert kinds == {"SELECT 1 UNION": 1}
        with conn.cursor() as cur:
            cur.execute("SELECT 4")
        assert counts["round_trips"] == 1
    finally:
        conn.close()
    assert (pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet) == before


def test_cpu_seconds_of_a_gone_process_is_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procstat.cpu_seconds(proc.pid) == 0.0


def test_split_per_file_recovers_the_costs_it_was_built_from():
    per_event = {g: 1e-6 * (i + 1) for i, g in enumerate(GROUPS)}
    per_file = {g: 1e-3 * (i + 2) for i, g in enumerate(GROUPS)}

    def run(events, files):
        return {"events": events, "files": files,
                "cpu_s": {g: events * per_event[g] + files * per_file[g] for g in GROUPS}}
    split = split_per_file(run(200_000, 20), run(200_000, 400))
    for g in GROUPS:
        assert split[g]["us_per_event"] == pytest.approx(1e6 * per_event[g], abs=0.01)
        assert split[g]["ms_per_file"] == pytest.approx(1e3 * per_file[g], abs=0.01)
    assert split["total"]["ms_per_file"] == pytest.approx(sum(1e3 * v for v in per_file.values()), abs=0.05)


def test_api_counter_routes_keep_stages_and_hide_file_names():
    base = "/api/v1/pipeline"
    assert apicount.route(f"{base}/files/20260301000000") == "/files/{name}"
    assert apicount.route(f"{base}/files/register") == "/files/register"
    assert apicount.route(f"{base}/stages/shard-worker/done") == "/stages/shard-worker/done"
    assert apicount.route(f"{base}/queues/mysql-sender/claim") == "/queues/mysql-sender/claim"


def test_profile_summary_shares(tmp_path):
    raw = tmp_path / "raw.txt"
    loop = "<module> (app/worker.py:1);main (app/worker.py:2);Daemon._loop (app/daemon.py:3)"
    raw.write_text(
        f"{loop};validate (app/rules.py:10) 60\n"
        f"{loop};FileRun._decide_tx (app/worker.py:20);Connection._read_packet (pymysql/connections.py:30) 30\n"
        f"{loop};FileRun._decide_tx (app/worker.py:21) 10\n")
    s = profiling.summarise(raw)
    assert s["samples"] == 100
    assert s["self"][0] == ("app.rules.validate", 60.0)
    assert ("pymysql.connections.Connection._read_packet", 30.0) in s["self"]
    inclusive = dict(s["inclusive"])
    assert inclusive["app.worker.FileRun._decide_tx"] == 40.0
    assert "app.daemon.Daemon._loop" not in inclusive      # on every stack: the loop, not a cost
    assert dict(s["modules"]) == {"app.rules": 60.0, "pymysql": 30.0, "app.worker": 10.0}


def test_worker_bench_by_statement_times_the_ledgers_sealing_pass():
    """The young balances' sealing pass (`Ledger.seal`) runs outside the scripts: without its
    own line its copy and delete (the young balances' price) went uncounted by --by-statement."""
    out = subprocess.run([sys.executable, "bench/worker.py", "--private", "--by-statement", "--events", "3000"],
                         env={**__import__("os").environ, "BENCH_SEAL_STATEMENTS": "1"},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "Ledger.seal (all)" in out
    assert "DELETE FROM worker_balances_young" in out and "INSERT INTO worker_balances (user_id, balance) SELECT" in out


def test_worker_bench_by_statement_counts_rows_and_pages_per_kind():
    """With BENCH_COUNTERS, --by-statement also adds up the server's handler calls and page
    accesses per kind of statement: the ledger's load writes a row per purchase and reads pages
    for each (where its CPU goes, not only how much)."""
    out = subprocess.run([sys.executable, "bench/worker.py", "--private", "--by-statement", "--events", "3000"],
                         env={**__import__("os").environ, "BENCH_COUNTERS": "1"},
                         capture_output=True, text=True, timeout=300, check=True).stdout
    [orders] = [line for line in out.splitlines() if line.strip().startswith("LOAD worker_orders")][:1]
    fields = dict(f.split("=") for f in orders.split(")")[-1].split())
    assert float(fields["write"]) > 0.2 and float(fields["pages"]) > float(fields["write"])
    assert "Handler_read_key" in out


def test_credits_bench_credits_every_drawn_order_once_in_each_shape():
    """bench/worker_credits.py: each statement shape counts its rows as the worker expects and
    ends with the same orders credited."""
    from bench import worker_credits
    figures = worker_credits.main(["--rows", "600", "--credits", "50", "--rounds", "4"])
    assert {shape: credited for shape, (credited, _) in figures.items()} == {"odku": 200, "order_id": 200, "key": 200}


def test_ledger_load_bench_ends_with_the_same_ledger_in_every_form():
    """bench/ledger_load.py: each candidate form of `worker_orders` loads every row, reads the
    stored ids, credits each drawn order once and prunes the same files: the same rows and
    credits at the end, whatever the keys (the figures compare equal work)."""
    from bench import ledger_load
    figures = ledger_load.main(["--prefill", "9000", "--rows", "300", "--rounds", "4", "--prune-files", "1",
                                "--settle", "0", "--variants", ",".join(ledger_load.VARIANTS)])
    assert set(figures) == set(ledger_load.VARIANTS)
    [(rows, credited)] = {(f["rows"], f["credited"]) for f in figures.values()}
    assert rows == 2 * 4300 + 4 * 300 - 4300 and 0 < credited <= 4 * 30   # the pruned file's credits gone


def test_young_seal_bench_moves_every_row_in_each_mode():
    """bench/young_seal.py: each way of emptying the young table (DELETE, TRUNCATE TABLE,
    TRUNCATE PARTITION of the epoch ring) ends with every row in the main table once."""
    from bench import young_seal
    figures = young_seal.main(["--rows", "300", "--rounds", "4", "--settle", "0", "--pairs", "1"])
    assert set(figures) == {"delete", "truncate", "partition"} and all(len(v) == 1 for v in figures.values())


def test_seen_ring_bench_keeps_every_key_in_each_mode():
    """bench/seen_ring.py: the worker's sealing pass on worker_seen as a ring (TRUNCATE
    PARTITION) and as one table (DELETE) ends with every key loaded packed or still in
    worker_seen, once (the bench checks it), in both modes."""
    from bench import seen_ring
    figures = seen_ring.main(["--keys", "200", "--rounds", "5", "--settle", "0", "--pairs", "1"])
    assert set(figures) == {"delete", "ring"} and all(len(v) == 1 for v in figures.values())


def test_profile_digests_name_each_statement_of_a_script_and_its_sender():
    """MariaDB gives every statement of a multi-statement packet after the first the first one's
    DIGEST_TEXT ("START TRANSACTION ;" for most of the worker's and the API's scripts): the
    profile's ranking named the wrong statements. Each digest now carries a sample of its own
    text from the statement history, and the client pids that sent it."""
    import os
    from tests import servers
    server = servers.new_private_mariadb(["--performance-schema=ON", *profiling.HISTORY_OPTIONS])
    try:
        admin = servers.admin_connect(port=server.port)
        client = pymysql.connect(host="127.0.0.1", port=server.port, user=servers.MYSQL_USER,
                                 password=servers.MYSQL_PASSWORD, autocommit=True,
                                 client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE d")
            cur.execute("CREATE TABLE d.t (a INT PRIMARY KEY)")
            cur.execute("INSERT INTO d.t SELECT seq FROM d.seq_1_to_50")
            profiling.reset(cur)
        with client.cursor() as cur:
            for _ in range(3):
                cur.execute("START TRANSACTION; SELECT COUNT(*) FROM d.t WHERE a > 10; COMMIT")
                while cur.nextset():
                    pass
        with admin.cursor() as cur:
            rows = profiling.digests(cur)
        [counted] = [r for r in rows if r["sample"].startswith("SELECT COUNT(*) FROM d.t")]
        assert counted["count"] == 3 and counted["examined"] >= 3 * 40
        assert counted["event"] == "statement/sql/select"
        assert counted["pids"] == {os.getpid(): 3}
        assert any(r["sample"].startswith("COMMIT") and r["count"] == 3 for r in rows)
        client.close()
        admin.close()
    finally:
        server.stop()


def test_pairs_run_abba_so_neither_side_always_goes_first():
    assert pairs.order(3) == [(1, "this"), (1, "other"), (2, "other"), (2, "this"), (3, "this"), (3, "other")]


def test_pairs_summary_medians_each_side_and_counts_where_this_tree_was_lower():
    def doc(events_per_s, us, workers, file_ms):
        return {"workloads": {"small": {"events_per_s": events_per_s, "us_per_event_total": us,
                                        "us_per_event": {"workers": workers, "server": 10.0},
                                        "split": {"total": {"us_per_event": 1.0, "ms_per_file": file_ms}}}}}
    this = [doc(30_000, 56.0, 13.0, 17.0), doc(31_000, 58.0, 14.0, 18.0), doc(29_000, 60.0, 12.0, 21.0)]
    other = [doc(28_000, 57.0, 13.5, 16.0), doc(32_000, 55.0, 13.0, 19.0), doc(30_000, 61.0, 12.5, 20.0)]
    rows = {name: rest for name, *rest in pairs.summary(this, other)}
    # lower events/s is worse: the count says where this tree was lower, not which is better
    assert rows["small events/s"] == [30_000, 30_000, 2, 3]
    assert rows["small CPU us/event"] == [58.0, 57.0, 2, 3]
    assert rows["small workers us/event"] == [13.0, 13.0, 2, 3]
    assert rows["small server us/event"] == [10.0, 10.0, 0, 3]
    assert rows["small total ms/file beyond the per-event cost"] == [18.0, 19.0, 1, 3]


def test_pairs_keeps_a_relative_out_folder_for_both_trees(tmp_path, monkeypatch):
    """`--out runs` (relative) used to send the other tree's --json into that tree, where the
    read-back missed it and the run crashed after its first bench: every run lands in one folder."""
    roots = {}
    for side in ("this", "other"):
        tree = tmp_path / side
        (tree / "bench").mkdir(parents=True)
        (tree / "bench" / "pipeline.py").write_text(
            "import json, sys\n"
            f"json.dump({{'side': {side!r}}}, open(sys.argv[sys.argv.index('--json') + 1], 'w'))\n")
        roots[side] = tree
    monkeypatch.chdir(tmp_path)
    out, docs = pairs.run_pairs(roots, Path("runs"), 2, "small")
    assert out == tmp_path / "runs"
    assert docs == {"this": [{"side": "this"}] * 2, "other": [{"side": "other"}] * 2}
    assert sorted(p.name for p in out.glob("*.json")) == ["other-1.json", "other-2.json", "this-1.json", "this-2.json"]


def test_server_threads_books_a_connections_cpu_to_its_sender_and_database():
    """The server's CPU split by thread (bench/server_threads.py, new): a connection that burns
    CPU on the server is booked to the process that opened it (its `_pid` attribute) and to its
    database's role, InnoDB's own threads by their performance_schema names, the sampler's own
    connection apart, and its statements reported to the bench (left out of Com_*)."""
    import os
    from bench import server_threads
    from tests import servers
    server = servers.new_private_mariadb(["--performance-schema=ON"])
    try:
        admin = servers.admin_connect(port=server.port)
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE burn")
        client = pymysql.connect(host="127.0.0.1", port=server.port, user=servers.MYSQL_USER,
                                 password=servers.MYSQL_PASSWORD, database="burn", autocommit=True)
        counted = []
        sampler = server_threads.ThreadSampler(
            server.proc.pid, lambda: servers.admin_connect(port=server.port),
            owner_of_pid=lambda pid: "me" if pid == os.getpid() else "other", roles={"burn": "burner"},
            interval=0.1, counted=counted.append).start()
        with client.cursor() as cur:
            cur.execute("SELECT BENCHMARK(3000000, MD5('x'))")
        time.sleep(0.3)
        seconds = sampler.stop()
        burned = seconds.get("conn me @burner", 0)
        assert burned >= 0.2, seconds
        assert burned > 0.8 * sum(s for label, s in seconds.items() if label != "conn me @burner")
        assert counted and all(n in (1, 2) for n in counted)
        with admin.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM performance_schema.threads WHERE NAME LIKE 'thread/innodb/%%'")
            assert cur.fetchone()[0] > 0        # InnoDB's threads have names to book them by
        summary = server_threads.summary(seconds, events=1_000_000)
        assert summary["connections: me"] >= 0.2
        client.close()
        admin.close()
    finally:
        server.stop()


def test_a_benchs_database_is_dropped_even_when_the_bench_fails():
    """`servers.bench_database`, the benches' one way to a scratch database (three benches had
    their own copy of it): usable inside, gone after, also when the bench raises."""
    from tests import servers
    with pytest.raises(RuntimeError, match="bench failed"):
        with servers.bench_database("t_bench_db", private=False) as (url, pid):
            name = url.database
            assert pid == 0 and servers.query(url, "SELECT DATABASE()") == [(name,)]
            raise RuntimeError("bench failed")
    admin = servers.admin_connect()
    try:
        with admin.cursor() as cur:
            assert not cur.execute("SHOW DATABASES LIKE %s", (name,))
    finally:
        admin.close()


def test_machine_window_books_a_strangers_cpu_as_other_processes():
    """A process the window does not measure burns 0.5 s of CPU: the window counts it among the
    other processes (with everything else the machine ran), never as ours, and the probe timed
    at least one piece. The figure pairs.py needs to tell two runs' machines apart."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
    meter = machine.Window(period=0.05).start()
    subprocess.run([sys.executable, "-c", burn], check=True)
    beside = meter.stop(ours_s=0.0)
    assert beside["probe_n"] >= 1 and beside["probe_ms"] > 0
    assert beside["others_s"] >= 0.45
    assert beside["busy_s"] >= beside["others_s"] + beside["bench_s"] - 0.02


def test_machine_reads_proc_stat_in_seconds_and_subtracts_ours():
    hz = machine.USER_HZ
    before = machine.system_cpu(f"cpu  {10 * hz} 0 {5 * hz} 100 0 0 0 0 0 0\ncpu0 1 2 3\n")
    after = machine.system_cpu(f"cpu  {13 * hz} 0 {6 * hz} 200 {hz} {hz // 2} {hz // 2} {hz} 0 0\n")
    assert machine.others(before, after, ours_s=2.5) == {"busy_s": 5.0, "others_s": 2.5, "steal_s": 1.0,
                                                        "irq_s": 1.0, "iowait_s": 1.0}


def test_pairs_compare_the_machine_beside_each_run():
    doc = {"workloads": {"small": {"us_per_event_total": 80.0, "machine": {"probe_ms": 5.1, "others_cores": 0.2}}}}
    assert pairs.figures(doc) == {"small CPU us/event": 80.0, "small machine probe ms/piece": 5.1,
                                  "small other processes, cores": 0.2}


def test_pairs_flag_a_pair_whose_machines_differ():
    """Two copies of one commit came out 4.5-8% apart with the same copy lower in every pair: the
    machine beside the runs differed, not the code. A pair whose probes differ by more than the
    tolerance, or a run beside other processes, is named; alike quiet runs are not."""
    def doc(probe, others):
        return {"workloads": {"small": {"us_per_event_total": 80.0,
                                        "machine": {"probe_ms": probe, "others_cores": others}}}}
    quiet = {"this": [doc(5.00, 0.01), doc(5.05, 0.02)], "other": [doc(5.02, 0.0), doc(5.00, 0.03)]}
    assert pairs.unequal_machines(quiet) == []
    busy = {"this": [doc(5.00, 0.01), doc(5.40, 0.02)], "other": [doc(5.02, 0.0), doc(5.00, 0.6)]}
    assert pairs.unequal_machines(busy) == ["pair 2 small: probe 5.4 ms here against 5.0 there (+8.0%)",
                                            "pair 2 other small: other processes used 0.6 cores"]


def test_machine_barrier_starts_two_benches_windows_together(tmp_path):
    """`pairs.py --together`: each window of one bench waits for the same window of the other,
    so both sides meet the same neighbours; a side left alone gives up instead of hanging."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys; from pathlib import Path; from bench import machine\n"
                              "sys.exit(0 if machine.barrier(Path(sys.argv[1]), 2, 120) else 1)",
                              str(tmp_path / "pair")], cwd=Path(__file__).resolve().parents[1])
    try:
        assert machine.barrier(tmp_path / "pair", 2, 120)
        assert child.wait(120) == 0
    finally:
        child.kill()
        child.wait()
    assert len(list((tmp_path / "pair").iterdir())) == 2
    assert not machine.barrier(tmp_path / "alone", 2, timeout=0.2)
