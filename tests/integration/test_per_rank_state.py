"""State that differs per rank comes back to the rank that saved it (3 real gloo ranks), and at another world
size it is refused with a message naming it, or left fresh on request. Before this, every rank got rank 0's."""
import re

import pytest
from conftest import torchrun

from dcp_resume import CheckpointManager

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


def lines(out: str, prefix: str, value: str = ".*") -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(rf"^rank (\d+) {prefix}({value})", out, re.M)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("per_rank")
    return save_dir, torchrun(3, "per_rank_state.py", "save", save_dir).stdout


def test_each_rank_gets_its_own_state_back_at_three_ranks(saved):
    save_dir, out = saved
    assert lines(out, "obj ") == {r: f"{100 + r} {100 + r} same 7 loaded ['model', 'obj', 'same']" for r in range(3)}
    loaded = CheckpointManager(save_dir, enable_preemption_handling=False).load_checkpoint()
    assert sorted(loaded["__per_rank__"]) == ["rank0", "rank1", "rank2"]
    assert [loaded["__per_rank__"][f"rank{r}"]["obj"]["v"] for r in range(3)] == [100, 101, 102]
    assert loaded["same"]["v"] == 7 and "same" not in loaded["__per_rank__"]["rank0"]  # agreed: stored once


def test_plain_ddp_at_three_ranks_warns_once_and_exact_gradient_sync_silences_it(saved):
    _, out = saved
    assert lines(out, "inexact warnings: ", r"\d+") == {0: "1", 1: "1", 2: "1"}  # the first save only, before the fix
    assert "Call dcp_resume.exact_ddp(module) to wrap (DDP with find_unused_parameters=True)" in lines(out, "warning: ")[0]


def test_another_world_size_refuses_naming_the_state_or_leaves_it_fresh(saved):
    save_dir, _ = saved
    out = torchrun(2, "per_rank_state.py", "load", save_dir).stdout
    refusal = lines(out, "refuse: ")
    assert refusal[0] == refusal[1]
    assert refusal[0].startswith("checkpoint was saved at world size 3 and this run has 2 ranks; per-rank state "
                                 "cannot be resharded: |   state['obj'] was saved separately by each of 3 ranks "
                                 "(it differed between ranks) | Resume with 3 ranks;")
    assert lines(out, "fresh: ") == {r: "obj -1 same 7 loaded ['model', 'same']" for r in range(2)}


def test_loaders_and_rng_are_saved_per_rank_even_alone_and_old_rng_layout_still_loads(tmp_path):
    import random

    import torch
    from torch.utils.data import DataLoader

    from dcp_resume import RNGState
    from dcp_resume.rng import capture_rng

    loader = DataLoader(list(range(8)), batch_size=2)
    loader.state_dict = lambda: {"pos": 3}  # a stateful loader, as torchdata's or accelerate's are
    loader.load_state_dict = lambda s: setattr(loader, "restored", s)
    mgr = CheckpointManager(tmp_path, enable_preemption_handling=False, verbose=False)
    mgr.save_checkpoint({"loader": loader, "rng": RNGState(), "step": 4}, step=4)
    raw = mgr.load_checkpoint()
    assert sorted(raw["__per_rank__"]["rank0"]) == ["loader", "rng"] and raw["step"] == 4
    mgr.load_checkpoint(state={"loader": loader})
    assert loader.restored == {"pos": 3}

    random.seed(1)
    old = {"rank0": capture_rng(), "rank1": capture_rng()}  # how RNGState saved before per-rank state
    expected = random.random()
    random.seed(2)
    rng = RNGState(rank=1)
    rng.load_state_dict(old)
    assert rng.restored and random.random() == expected
    torch.manual_seed(0)
