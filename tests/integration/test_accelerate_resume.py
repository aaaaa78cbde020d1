"""accelerate-prepared shuffled loaders resumed mid-epoch: exact with use_seedable_sampler=True, and without it
the reported problem is real. tests/users/accelerate_shuffle.py runs under `accelerate launch` on 2 processes,
stops mid-way through epoch 1 (epoch 0 resumes right even without the setting: a fresh generator starts where
epoch 0 did) and resumes."""
import collections
import os
import sys

import pytest
import torch
from conftest import ROOT, _free_port, run

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow  # integration: two accelerate launches per test

SCRIPT = os.path.join(ROOT, "tests", "users", "accelerate_shuffle.py")
SAMPLES, STEPS_PER_EPOCH, STOP = 48, 6, 8  # 48 samples / (4 per batch * 2 ranks); step 8 = epoch 1, batch 2


def _launch(tmp, name, *flags):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), SCRIPT, "--save_dir", str(tmp / name / "ckpt"),
           "--log", str(tmp / name / "log"), *map(str, flags)]
    return run(cmd, timeout=120).stdout


def _steps(tmp, name):
    """{rank: [(global_step, epoch, step_in_epoch, ids), ...]} from the script's per-rank logs."""
    out = {}
    for rank in (0, 1):
        with open(tmp / name / f"log.rank{rank}") as f:
            out[rank] = [tuple(int(v) for v in line.split()[:3]) + (tuple(int(v) for v in line.split()[3:]),)
                         for line in f]
    return out


def _epoch_counts(steps, epoch):
    return collections.Counter(i for rank in steps.values() for (_, e, _, ids) in rank if e == epoch for i in ids)


def test_seedable_sampler_resume_is_exact(tmp_path):
    _launch(tmp_path, "full", "--seedable", "--final", tmp_path / "full.pt")
    stop = _launch(tmp_path, "cut", "--seedable", "--stop_after", STOP, "--check")
    assert "UNRESUMABLE: None" in stop
    resumed = _launch(tmp_path, "cut", "--seedable", "--resume", "--final", tmp_path / "cut.pt")
    assert f"resumed at epoch 1 step {STOP - STEPS_PER_EPOCH}" in resumed
    a, b = _steps(tmp_path, "full"), _steps(tmp_path, "cut")
    assert len(a[0]) == 2 * STEPS_PER_EPOCH and a == b  # same samples per rank per step
    assert _epoch_counts(b, 1) == collections.Counter(range(SAMPLES))  # each sample once in epoch 1
    wa, wb = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "cut.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_without_seedable_sampler_the_problem_is_reported_and_real(tmp_path):
    stop = _launch(tmp_path, "cut", "--stop_after", STOP, "--check")
    line = next(line for line in stop.splitlines() if line.startswith("UNRESUMABLE: "))
    assert "DataLoaderConfiguration(use_seedable_sampler=True)" in line and "skip_first_batches" in line
    _launch(tmp_path, "cut", "--resume")
    steps = _steps(tmp_path, "cut")
    assert _epoch_counts(steps, 0) == collections.Counter(range(SAMPLES))  # epoch 0 ran uninterrupted
    seen = _epoch_counts(steps, 1)  # 2 batches before the stop, 4 after the resume, on each rank
    repeated = sorted(i for i, n in seen.items() if n > 1)
    skipped = sorted(set(range(SAMPLES)) - set(seen))
    print(f"epoch 1 after the resume: repeated {repeated}, never seen {skipped}")
    assert sum(seen.values()) == SAMPLES and repeated and skipped
