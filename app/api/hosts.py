"""`GET /hosts`: which host runs what, read from what the daemons already leave in the tracking
database. Every daemon's owner id is `<host>/<program>` (WORKER_ID, app/daemon.py): the tasks
it holds now carry it with their lease (renewed by heartbeats), and each of its moves is a
transition with it as actor. So no table of its own: a host is as alive as its programs'
latest claim, heartbeat or move, and a program that claimed nothing for `minutes` minutes and
holds nothing is not listed.
"""
from __future__ import annotations

from ..stages import STAGES, STATUSES, Action, sql_in
from .queries import iso
from .store import Store

# Actors of the last `minutes` minutes, per stage: the transitions' index (stage, to_status, at)
# serves the range with both leading columns listed.
SQL_RECENT = (
    f"SELECT actor, stage, MAX(at) AS last_seen, COUNT(*) AS moves, SUM(action = '{Action.DONE}') AS done "
    "FROM pipeline_transitions "
    f"WHERE stage IN {sql_in(*STAGES)} AND to_status IN {sql_in(*STATUSES)} "
    "AND at >= NOW(3) - INTERVAL %s MINUTE AND actor IS NOT NULL "
    "GROUP BY actor, stage")

# Tasks held now, with the last heartbeat (a lease is renewed to LEASE_SECONDS from then).
SQL_HELD = (
    "SELECT owner, COUNT(*) AS holding, MAX(lease_expires_at) AS lease_until, NOW(3) AS now "
    "FROM pipeline_tracking FORCE INDEX (ix_lease) WHERE lease_expires_at IS NOT NULL AND owner IS NOT NULL "
    "GROUP BY owner")


def split_owner(owner: str) -> tuple[str, str]:
    """(host, program) of an owner id; one without a host part (an old client, an operator's
    call) is listed under host "-"."""
    host, sep, program = owner.partition("/")
    return (host, program) if sep and host else ("-", owner)


class Hosts:
    def __init__(self, store: Store, lease_seconds: float):
        self._read = store.read
        self.lease_seconds = lease_seconds

    def report(self, minutes: int) -> dict:
        programs: dict[str, dict] = {}

        def entry(owner: str) -> dict:
            if owner not in programs:
                host, program = split_owner(owner)
                programs[owner] = {"owner": owner, "host": host, "program": program, "stages": [],
                                   "holding": 0, Action.DONE.value: 0, "last_seen": None, "lease_until": None}
            return programs[owner]

        for r in self._read(SQL_RECENT, (minutes,)):
            e = entry(r["actor"])
            e["stages"].append(r["stage"])
            e[Action.DONE] += int(r[Action.DONE] or 0)
            e["last_seen"] = max(filter(None, [e["last_seen"], r["last_seen"]]))
        for r in self._read(SQL_HELD):
            e = entry(r["owner"])
            e["holding"] = int(r["holding"])
            e["lease_until"] = r["lease_until"]
            expired = r["lease_until"] < r["now"]
            e["lease_expired"] = bool(expired)
        hosts: dict[str, dict] = {}
        for e in sorted(programs.values(), key=lambda e: (e["host"], e["program"])):
            h = hosts.setdefault(e["host"], {"host": e["host"], "programs": [], "holding": 0, "last_seen": None})
            h["holding"] += e["holding"]
            h["last_seen"] = max(filter(None, [h["last_seen"], e["last_seen"]]), default=None)
            e["stages"] = sorted(set(e["stages"]))
            e["last_seen"], e["lease_until"] = iso(e["last_seen"]), iso(e["lease_until"])
            e.setdefault("lease_expired", False)
            h["programs"].append(e)
        for h in hosts.values():
            h["last_seen"] = iso(h["last_seen"])
        return {"minutes": minutes, "lease_seconds": self.lease_seconds, "hosts": list(hosts.values())}
