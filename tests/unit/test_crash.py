"""A real SIGKILL between the shard writes and the commit never yields a loadable half checkpoint."""
import os

import torch
from common import Tiny
from conftest import torchrun
from helpers import assert_same

from dcp_resume import CheckpointManager, IncompleteCheckpointError


def test_kill_after_shards_before_commit_leaves_previous_latest(tmp_path, checker):
    save_dir = tmp_path / "run"
    proc = torchrun(2, "kill_before_commit.py", save_dir, check=False)
    assert proc.returncode != 0
    half = save_dir / "step_2"
    shards = sorted(os.listdir(half / "state"))
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards and ".metadata" in shards
    assert not (half / "metadata.json").exists()

    mgr = CheckpointManager(save_dir, verbose=False)
    assert mgr.find_latest_checkpoint() == str(save_dir / "step_1")
    model = Tiny()
    mgr.load_checkpoint(state={"model": model})
    assert_same(torch.load(tmp_path / "step1.pt"), dict(model.state_dict()))
    try:
        mgr.load_checkpoint(str(half), state={"model": Tiny()})
        raise AssertionError("loading the half checkpoint should fail")
    except IncompleteCheckpointError as e:
        assert "no metadata.json" in str(e) and str(half) in str(e)
    out = checker(save_dir, deep=False)
    assert "step_2: incomplete (no metadata.json)" in out.stdout and out.returncode == 0

    # The next save (the writer's start-up) removes the leftover; the previous checkpoint stays.
    mgr.save_checkpoint({"model": model}, step=3)
    assert not half.exists()
    assert sorted(os.listdir(save_dir)) == [".dcp-resume.lock", "step_1", "step_3"]  # the killed writer's
    # stale lock was taken over by this manager, which holds it until close()
    assert mgr.find_latest_checkpoint() == str(save_dir / "step_3")
