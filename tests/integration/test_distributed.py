"""Real multi-process round trips and reshards (torchrun, gloo): DDP and FSDP2, 2->1, 1->2, plain<-FSDP2."""
import glob
import json
import os
import sys

import pytest
import torch
from conftest import WORKERS, run, torchrun
from helpers import assert_same
from common import full_state, make_training

from dcp_resume import CheckpointManager

pytestmark = pytest.mark.slow  # integration: torchrun with gloo ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three torchrun launches shared by every test here: save at 2 ranks; save at 1 rank and load
    the 2-rank checkpoints; load the 1-rank FSDP2 checkpoint at 2 ranks."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(2, "roundtrip.py", out, "--save")
    torchrun(1, "roundtrip.py", out, "--save", "--load", "fsdp2_ws2", "ddp_ws2")
    torchrun(2, "roundtrip.py", out, "--load", "fsdp2_ws1")
    return out


def _pt(out, name):
    return torch.load(os.path.join(out, f"{name}.pt"), weights_only=False)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_rank_round_trip_is_bit_exact(runs, kind):
    assert_same(_pt(runs, f"{kind}_ws2_ref"), _pt(runs, f"{kind}_ws2_same"))


@pytest.mark.parametrize("src,dst", [("fsdp2_ws2", "ws1"), ("fsdp2_ws1", "ws2"), ("ddp_ws2", "ws1")])
def test_reshard_is_bit_exact(runs, src, dst):
    assert_same(_pt(runs, f"{src}_ref"), _pt(runs, f"{src}_at_{dst}"))


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_both_ranks_write_shards_and_only_rank0_commits(runs, kind, checker):
    state = os.path.join(runs, f"{kind}_ws2", "step_3", "state")
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(state, "*.distcp")))
    assert [s.split("_")[2] for s in shards] == ["0", "1"], shards  # __<rank>_<n>.distcp
    meta = json.load(open(os.path.join(runs, f"{kind}_ws2", "step_3", "metadata.json")))
    assert meta["world_size"] == 2 and meta["kind"] == "step" and meta["step"] == 3
    assert {f"state/{s}" for s in shards} | {"state/.metadata"} <= set(meta["files"])
    commits = open(os.path.join(runs, "commit_rank0.log")).read().splitlines()
    assert sum(c.endswith(f"{kind}_ws2/step_3/metadata.json") for c in commits) == 1
    assert not os.path.exists(os.path.join(runs, "commit_rank1.log"))
    result = checker(os.path.join(runs, f"{kind}_ws2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shard ranks=2" in result.stdout


def test_plain_module_loads_fsdp2_checkpoint(runs):
    model, opt, sched = make_training(seed=7)
    mgr = CheckpointManager(os.path.join(runs, "fsdp2_ws2"), verbose=False)
    mgr.load_checkpoint(state={"model": model, "optimizer": opt, "scheduler": sched})
    ref = _pt(runs, "fsdp2_ws2_ref")
    assert_same(ref["model"], full_state(model, opt)["model"])
    assert_same(ref["optim"], full_state(model, opt)["optim"])
    assert sched.state_dict() == ref["sched"]


def test_plain_dcp_reads_state_without_project_code(runs):
    """DESIGN.md: state/ loads with plain DCP; this subprocess never imports dcp_resume."""
    state = os.path.join(runs, "fsdp2_ws2", "step_3", "state")
    code = f"""
import sys, torch, torch.distributed.checkpoint as dcp
sys.modules['dcp_resume'] = None  # importing project code would fail loudly
sys.path.insert(0, {WORKERS!r})
from common import Tiny
m = Tiny()
sd = {{"model": m.state_dict()}}
dcp.load(sd, checkpoint_id={state!r})
torch.save(m.state_dict(), {os.path.join(runs, 'plain_dcp.pt')!r})
"""
    run([sys.executable, "-c", code])
    assert_same(_pt(runs, "fsdp2_ws2_ref")["model"], dict(_pt(runs, "plain_dcp")))
