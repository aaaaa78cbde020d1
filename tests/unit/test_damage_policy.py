"""Damage is never a reason to start over, nor to delete the evidence: a committed checkpoint (metadata.json
there) with a missing or resized file is damaged, not an interrupted save; it is listed as CORRUPT, never loaded,
kept until a newer complete checkpoint exists, and replaced only by a run that resumed from a verified one. A
save_dir whose committed checkpoints are all damaged is refused, in one sentence naming each, and left as it was."""
import json
import re

import pytest
from cli_helpers import run_main
from common import Tiny
from helpers import content_snapshot, flip_byte, stat_snapshot

from dcp_resume import CheckpointManager
from dcp_resume.errors import CheckpointExistsError, CheckpointNotFoundError

SHARD = "state/__0_0.distcp"


def save(save_dir, *steps, keep_last_n=None):
    with CheckpointManager(save_dir, keep_last_n=keep_last_n, verbose=False, incremental=False) as mgr:
        for step in steps:
            mgr.save_checkpoint({"model": Tiny(), "tag": f"step {step}"}, step=step)


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "run"
    save(d, 1, 2)
    return d


def test_a_missing_file_makes_a_committed_checkpoint_damaged_in_ls_verify_and_latest(run):
    (run / "step_2" / SHARD).unlink()
    rows = {r["name"]: r for r in json.loads(run_main("ls", run, "--json").stdout)["checkpoints"]}
    assert rows["step_2"]["status"] == "corrupt" and rows["step_2"]["reason"] == f"listed file missing: {SHARD}"
    assert rows["step_1"]["latest"]
    table = run_main("ls", run).stdout
    assert re.search(rf"step_2 .* CORRUPT: listed file missing: {SHARD}", table), table
    verify = run_main("verify", run)
    assert verify.returncode == 1 and f"BAD  step_2/{SHARD}: listed in metadata.json but missing" in verify.stdout
    latest = run_main("latest", run)
    assert latest.returncode == 0 and latest.stdout.strip() == str(run / "step_1")
    assert f"Skipping checkpoint {run / 'step_2'}: listed file missing: {SHARD}" in latest.stderr


def test_a_save_dir_whose_checkpoints_all_fail_is_refused_and_left_as_it_was(run):
    (run / "step_2" / SHARD).unlink()
    shard = run / "step_1" / SHARD
    shard.write_bytes(shard.read_bytes()[:-1])
    before = stat_snapshot(run)
    want = (f"save_dir {run} holds committed checkpoints and none of them loads: step_2 (listed file missing: "
            f"{SHARD}); step_1 (size mismatch: {SHARD} is ")
    mgr = CheckpointManager(run, verbose=False)
    assert mgr.find_latest_checkpoint() is None
    with pytest.raises(CheckpointExistsError) as refused:
        mgr.start_run(None)  # --auto_resume found nothing: a fresh start is refused
    text = str(refused.value)
    assert text.startswith(want), text
    assert text.endswith(f". Nothing in it was changed. Resume from a checkpoint elsewhere (--resume_from PATH), "
                         f"train into a new --save_dir, or see every damaged file with `dcp-resume verify {run}`")
    with pytest.raises(CheckpointExistsError, match=re.escape(want)):
        mgr.save_checkpoint({"model": Tiny()}, step=3)  # no start_run: the first save refuses the same way
    mgr.close()
    assert stat_snapshot(run) == before
    latest = run_main("latest", run)
    assert latest.returncode == 1 and "every committed checkpoint is damaged" in latest.stderr
    footer = run_main("ls", run).stdout
    assert "--auto_resume refuses to start over (exit 2) and changes nothing" in footer, footer


def test_a_load_that_finds_every_checkpoint_damaged_names_each_and_changes_nothing(run):
    for step in (1, 2):
        flip_byte(run / f"step_{step}" / SHARD)  # only a content hash can tell: found as the load reads
    before = stat_snapshot(run)
    mgr = CheckpointManager(run, verbose=False)
    assert mgr.find_latest_checkpoint() == str(run / "step_2")
    with pytest.raises(CheckpointNotFoundError) as none:
        mgr.load_checkpoint(state={"model": Tiny()})
    assert re.match(rf"save_dir {re.escape(str(run))} holds committed checkpoints and none of them loads: "
                    rf"step_2 \({SHARD} content hash mismatch in bytes .*\); step_1 \({SHARD} content hash "
                    r"mismatch .*\)\. Nothing in it was changed\.", str(none.value)), str(none.value)
    mgr.close()
    assert stat_snapshot(run) == before


def test_a_damaged_checkpoint_is_replaced_only_by_a_run_that_resumed(run):
    flip_byte(run / "step_2" / SHARD)
    kept = content_snapshot(run / "step_2")
    with CheckpointManager(run, verbose=False) as fresh:
        with pytest.raises(CheckpointExistsError, match=rf"{re.escape(str(run / 'step_2'))} holds a damaged "
                                                        r"checkpoint \(.*\); a run replaces a damaged checkpoint "
                                                        "only after it resumed from a verified one"):
            fresh.save_checkpoint({"model": Tiny(), "tag": "again"}, step=2)
    assert content_snapshot(run / "step_2") == kept
    with CheckpointManager(run, verbose=False) as resumed:
        assert resumed.load_checkpoint()["tag"] == "step 1"
        resumed.save_checkpoint({"model": Tiny(), "tag": "step 2 again"}, step=2)
    assert CheckpointManager(run, verbose=False).load_checkpoint()["tag"] == "step 2 again"


def test_retention_keeps_damaged_checkpoints_until_a_newer_complete_one_exists(tmp_path):
    run = tmp_path / "run"
    save(run, 1, 2, 5)
    (run / "step_2" / SHARD).unlink()
    (run / "step_5" / "metadata.json").write_text("{not json")
    with CheckpointManager(run, keep_last_n=2, verbose=False, incremental=False) as mgr:
        assert mgr.load_checkpoint()["tag"] == "step 1"
        mgr.save_checkpoint({"model": Tiny(), "tag": "step 3"}, step=3)
        names = sorted(p.name for p in run.glob("step_*"))
        assert names == ["step_1", "step_3", "step_5"]  # step_2: damaged, older than step_3; step_5: evidence
        mgr.save_checkpoint({"model": Tiny(), "tag": "step 5 again"}, step=5)  # the run reached it: replaced
    assert sorted(p.name for p in run.glob("step_*")) == ["step_3", "step_5"]
    assert CheckpointManager(run, verbose=False).load_checkpoint()["tag"] == "step 5 again"


def test_prune_removes_damaged_checkpoints_only_below_the_newest_complete_one(tmp_path):
    run = tmp_path / "run"
    save(run, 1, 2, 3)
    (run / "step_1" / SHARD).unlink()
    (run / "step_3" / SHARD).unlink()
    r = run_main("prune", run, "--keep", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"removed step_1 (damaged, older than the newest complete checkpoint: listed file missing: {SHARD})",
        f"kept 2: step_2 (--auto_resume loads it), step_3 (CORRUPT: listed file missing: {SHARD}; kept until a "
        "newer complete checkpoint exists)"]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2", "step_3"]
