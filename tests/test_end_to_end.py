"""The whole pipeline, real processes end to end, checked against an independent ground truth."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.ingest.generator import Rates, generate_files
from tests import ground_truth
from tests.pipeline_harness import Pipeline, check_against_truth

# Every injected case, often enough to show up in a handful of small files.
ALL_CASES = Rates(duplicate=0.03, later_duplicate=0.03, return_first=0.03, return_first_later=0.02,
                  over_balance=0.02, malformed=0.02, unroutable_return=0.02, shopless_return=0.02)


def generate(tmp_path: Path, files: int, events: int, seed: int, rates: Rates = ALL_CASES):
    source = tmp_path / "generated"
    names = generate_files(source, files, events, seed=seed, rates=rates, start="20260101000000")
    truth = ground_truth.compute(sorted(source.glob(f"*{ground_truth.SUFFIX}")))
    fates = ground_truth.resolved_fates(truth)
    # The model and the generator agree on every injected case before the pipeline is asked.
    assert all(fates[(c.filename, c.line_no)] == c.expect for c in names.truth)
    assert {c.kind.split(":")[0] for c in names.truth} >= {n for n in Rates.names() if getattr(rates, n)}
    return source, list(names), truth


# With two splitters, a file split while an earlier one is still being indexed does not see that
# file's purchases (docs/splitter.md), so a shop-less return of such a purchase may be
# `unroutable`: deterministic per file, but not predictable from the input alone.
TWO_SPLITTERS = Rates(**{**{n: getattr(ALL_CASES, n) for n in Rates.names()}, "shopless_return": 0.0})


@pytest.mark.parametrize("replicas,rates", [(1, ALL_CASES), (2, TWO_SPLITTERS)],
                         ids=["one-replica", "two-replicas-of-every-stage"])
def test_generated_files_flow_through_and_match_the_ground_truth(tmp_path, pipeline_db, shard_dbs, replicas,
                                                                  rates):
    source, names, truth = generate(tmp_path, files=8, events=250, seed=20261126 + replicas, rates=rates)
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs, replicas=replicas).start()
    try:
        assert pipe.import_files(source) == names
        pipe.wait_loaded(len(names), timeout=150)
        check_against_truth(pipe, truth, names)
    finally:
        codes = pipe.stop()
    assert all(code == 0 for code in codes.values()), codes
    # Stopped daemons leave their folders empty (only activity logs stay).
    for folder in ["shard-splitter", "shard-worker-0", "shard-worker-1", "mysql-sender/shard-0",
                   "mysql-sender/shard-1"]:
        left = [p.name for p in (pipe.shared / folder).iterdir() if p.name != "activity.log"]
        assert left == [], (folder, left)


def test_original_generator_fixture_flows_through(tmp_path, pipeline_db, shard_dbs):
    # shared/ lies beside the checkout (here and in CI).
    fixture_dir = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original-generator"
    files = sorted(fixture_dir.glob(f"*{ground_truth.SUFFIX}"))
    assert files, f"no fixture under {fixture_dir}"
    truth = ground_truth.compute(files)
    names = [f.name[: -len(ground_truth.SUFFIX)] for f in files]
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs).start()
    try:
        pipe.import_files(fixture_dir)
        pipe.wait_loaded(len(names), timeout=60)
        check_against_truth(pipe, truth, names)
        # The original's returns carry no shop_id and match no purchase: all unroutable.
        assert truth.splitter_rejected[names[0]] == {"unroutable": 16}
    finally:
        pipe.stop()
