"""PIPELINE_PROGRAMS: the programs one host runs. supervisord.conf, read by supervisor itself,
holds exactly those (a group this host runs nothing of is empty), and a name that is not a
program, or a selection supervisord cannot express, stops the start in one line."""
from __future__ import annotations

import pytest

from app.config import ConfigError
from app.supervision import supervise
from tests.test_deploy import CONFIG, config_copy


def names(tmp_path, **env):
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    folder.mkdir()
    return supervise.program_names(config_copy(folder), {"SHARD_COUNT": "3", **env})


def test_a_host_runs_only_the_programs_it_names(tmp_path):
    assert names(tmp_path, PIPELINE_PROGRAMS="pipeline-apid,shard-worker-1,mysql-sender-1") == [
        "pipeline-apid", "mysql-sender:mysql-sender-1", "shard-worker:shard-worker-1"]


def test_group_names_and_supervisorctl_spellings_select_too(tmp_path):
    assert names(tmp_path, PIPELINE_PROGRAMS=" shard-worker:shard-worker-2, shard-worker:shard-worker-1 ,"
                                             "mysql-sender:*,event-ingest:event-ingest", SENDER_REPLICAS="2") == [
        *(f"mysql-sender:mysql-sender-{p}" for p in range(6)),
        "shard-worker:shard-worker-1", "shard-worker:shard-worker-2", "event-ingest"]


def test_empty_means_every_program(tmp_path):
    assert names(tmp_path, PIPELINE_PROGRAMS="") == names(tmp_path)
    assert len(names(tmp_path)) == 2 + 1 + 3 + 3


@pytest.mark.parametrize("selection, why", [
    ("shard-worker-3", "no program 'shard-worker-3'"),
    ("pipeline-apid,sender-1", "no program 'sender-1'"),
    ("nothing:*", "no program group 'nothing'"),
    ("shard-worker-0,shard-worker-2", "not a contiguous range"),
])
def test_a_selection_that_cannot_be_run_is_refused_in_one_line(selection, why):
    with pytest.raises(ConfigError, match=why) as caught:
        supervise.config_defaults({"SHARD_COUNT": "3", "PIPELINE_PROGRAMS": selection})
    assert "PIPELINE_PROGRAMS" in str(caught.value) and "\n" not in str(caught.value)


def test_the_counts_a_selection_sets_are_what_supervisord_conf_reads():
    env = supervise.supervisord_env({"SHARD_COUNT": "2", "PIPELINE_PROGRAMS": "shard-worker-1,mysql-sender-1"})
    assert {k: env[k] for k in ("APID_PROCESSES", "INGEST_PROCESSES", "SPLITTER_PROCESSES", "WORKER_PROCESSES",
                                "WORKER_FIRST", "SENDER_PROCESSES", "SENDER_FIRST")} == {
        "APID_PROCESSES": "0", "INGEST_PROCESSES": "0", "SPLITTER_PROCESSES": "0", "WORKER_PROCESSES": "1",
        "WORKER_FIRST": "1", "SENDER_PROCESSES": "1", "SENDER_FIRST": "1"}
    assert env["SHARD_COUNT"] == "2"  # every program still reads the whole pipeline's shard count
    assert CONFIG.is_file()
