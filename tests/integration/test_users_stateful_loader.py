"""A user's own torchdata StatefulDataLoader (2 workers, per-rank seeds, random augmentation) in the engine's
state: stopped mid-epoch and resumed at the same world size it sees the same samples and ends with the same
weights; at another world size its per-rank position is refused by name, unless a ResumableSampler drives it,
which reshards: the rest of the epoch is seen exactly once. Real torchrun, real worker processes."""
import shutil
import sys
from collections import Counter

import pytest
from conftest import ROOT, _free_port, run

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals

SCRIPT = f"{ROOT}/tests/users/stateful_loader.py"
N = 40  # samples; 4 per rank per step: 5 steps an epoch at 2 ranks


def launch(nproc, *args):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port())] if nproc > 1 else [sys.executable])
    return run(cmd + [SCRIPT, *map(str, args)], env={"PYTHONPATH": ROOT}, check=False)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def final(out: str) -> str:
    hashes = {line.split()[1] for line in out.splitlines() if line.startswith("FINAL ")}
    assert len(hashes) == 1, out
    return hashes.pop()


def trace(prefix, ranks):
    return {r: open(f"{prefix}.{r}").read().splitlines() for r in range(ranks)}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Per sampler: an uninterrupted 2-rank run, and a copy of a run stopped after step 7 (epoch 1)."""
    out = {}
    for sampler in ("distributed", "resumable"):
        d = tmp_path_factory.mktemp(sampler)
        ref = final(ok(launch(2, "--save_dir", d / "ref", "--trace", d / "ref.t", "--sampler", sampler)))
        ok(launch(2, "--save_dir", d / "run", "--trace", d / "run.t", "--sampler", sampler, "--stop_after", 7))
        shutil.copytree(d / "run", d / "other")
        for r in (0, 1):
            shutil.copy(d / f"run.t.{r}", d / f"other.t.{r}")
        out[sampler] = d, ref
    return out


@pytest.mark.parametrize("sampler", ["distributed", "resumable"])
def test_same_world_size_resume_is_exact_with_workers(stopped, sampler):
    d, ref = stopped[sampler]
    resumed = ok(launch(2, "--save_dir", d / "run", "--trace", d / "run.t", "--sampler", sampler, "--resume"))
    assert final(resumed) == ref
    assert trace(d / "run.t", 2) == trace(d / "ref.t", 2)  # every rank, every step, the same sample ids


def test_another_world_size_refuses_the_per_rank_loader_by_name(stopped):
    d, _ = stopped["distributed"]
    before = sorted(p.name for p in (d / "other").rglob("*"))
    proc = launch(1, "--save_dir", d / "other", "--trace", d / "other.t", "--resume")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert ("REFUSED: checkpoint was saved at world size 2 and this run has 1 ranks; per-rank state cannot be "
            "resharded:\n  state['loader'] was saved separately by each of 2 ranks (a data loader: its position "
            "is its rank's share of the data)\n") in proc.stdout
    assert sorted(p.name for p in (d / "other").rglob("*")) == before


def test_resumable_sampler_reshards_the_loader_to_one_rank(stopped):
    d, _ = stopped["resumable"]
    proc = launch(1, "--save_dir", d / "other", "--trace", d / "other.t", "--sampler", "resumable", "--resume")
    assert final(ok(proc))
    assert "world size 2 -> 1: data loaders loader continue from the saved global sampler position" in proc.stdout
    # other.t.0: rank 0 before the stop, then the 1-rank resume; other.t.1: rank 1 before the stop
    lines = [line.split() for r in (0, 1) for line in open(d / f"other.t.{r}").read().splitlines()]
    seen = Counter(int(i) for e, _, _, ids in lines if e == "1" for i in ids.split(","))
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}  # epoch 1: each sample exactly once
