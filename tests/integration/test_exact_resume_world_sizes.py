"""Exactness where two ranks hide order bugs: the trainer killed with SIGKILL and resumed at 3 and 4 DDP ranks,
4 FSDP2 ranks, and on 2 simulated nodes x 2 processes (c10d rendezvous on 127.0.0.1), ends bit-identical to a
run that never stopped. Before exact_gradient_sync, 3- and 4-rank DDP resumes differed in ~half the tensors."""
import subprocess
import sys
import time

import pytest
from conftest import ROOT, _free_port
from helpers import assert_same, env  # noqa: F401
from trainer_runs import TRAIN, final_state, kill_tree, launcher, train, train_until_killed  # noqa: F401

from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals

# 48 samples / (2 x ranks) per step: 8 steps an epoch at 3 ranks, 6 at 4, so step_3 is mid-epoch.
FLAGS = ["--tiny", "--samples", "48", "--batch_size", "2", "--save_every", "3", "--epochs", "2", "--seed", "22"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted, synchronously saving run per (ranks, extra flags), shared by the tests below."""
    made = {}

    def get(nproc: int, *extra: str):
        if (nproc, extra) not in made:
            save_dir = tmp_path_factory.mktemp(f"ref{nproc}")
            train(launcher(nproc), *FLAGS, *extra, "--save_dir", save_dir, "--no_async_save")
            made[nproc, extra] = save_dir
        return made[nproc, extra]

    return get


def assert_same_final(ref, run, nproc):
    (a, meta_a), (b, meta_b) = final_state(ref), final_state(run)
    assert meta_a["kind"] == meta_b["kind"] == "final" and meta_a["step"] == meta_b["step"]
    for key in COMPARED:
        assert_same(a[key], b[key], key)
    assert b["counters"]["world_size"] == nproc


@pytest.mark.parametrize("nproc,extra", [(3, ()), (4, ()), (4, ("--fsdp",))], ids=["ddp3", "ddp4", "fsdp2_4"])
def test_kill9_and_resume_is_bit_identical(tmp_path, references, checker, nproc, extra):
    cmd, run = launcher(nproc), tmp_path / "run"
    out = train_until_killed(cmd, *FLAGS, *extra, "--save_dir", run, kill_after=f"Saved checkpoint: {run}/step_3")
    assert "Training complete" not in out
    resumed = train(cmd, *FLAGS, *extra, "--save_dir", run, "--auto_resume").stdout
    assert f"Resuming from checkpoint: {run}/step_" in resumed
    assert_same_final(references(nproc, *extra), run, nproc)
    assert checker(run).returncode == 0  # the shared contract checker accepts per-rank state


def two_nodes(*args) -> list[list[str]]:
    """Two torchrun launchers, 2 processes each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{_free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
             "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "t",
             TRAIN, *map(str, args)] for n in (0, 1)]


def run_two_nodes(tmp_path, *args, kill_after: str | None = None) -> str:
    """Run both nodes to the end, or SIGKILL both process trees once either prints kill_after (the c10d
    rendezvous, not --node_rank, decides which node holds global rank 0). Returns both nodes' output."""
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
                              start_new_session=True) for cmd, log in zip(two_nodes(*args), logs)]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = "".join(log.read_text() for log in logs)
            if kill_after is not None and kill_after in text:
                return text
            if all(p.poll() is not None for p in procs):
                assert kill_after is None, f"run ended before printing {kill_after!r}:\n{text[-4000:]}"
                assert [p.returncode for p in procs] == [0, 0], text[-4000:]
                return text
            time.sleep(0.05)
        raise AssertionError(f"two-node run did not finish in 300 s:\n{text[-4000:]}")
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait()


def test_two_nodes_killed_and_resumed_match_four_standalone_ranks(tmp_path, references):
    run = tmp_path / "run"
    out = run_two_nodes(tmp_path, *FLAGS, "--save_dir", run, kill_after=f"Saved checkpoint: {run}/step_3")
    assert "Training complete" not in out
    resumed = run_two_nodes(tmp_path, *FLAGS, "--save_dir", run, "--auto_resume")
    assert f"Resuming from checkpoint: {run}/step_" in resumed
    assert_same_final(references(4), run, 4)
