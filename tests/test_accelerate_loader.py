"""accelerate-prepared shuffled loaders: exact mid-epoch resumes with use_seedable_sampler=True, and
dcp_resume.accelerate_loaders.unresumable_loader_problem naming the setting when it is missing.

Unit tests build prepared loaders in this process with Accelerator(cpu=True) (accelerate's state singletons
are reset around each); the slow tests run tests/users/accelerate_shuffle.py under `accelerate launch` on
2 processes, stop it mid-way through epoch 1 (epoch 0 resumes right even without the setting: a fresh
generator starts where epoch 0 did) and resume it."""
import collections
import os
import sys

import pytest
import torch
from conftest import ROOT, _free_port, run
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from dcp_resume.accelerate_loaders import unresumable_loader_problem  # noqa: E402

SCRIPT = os.path.join(ROOT, "tests", "users", "accelerate_shuffle.py")
SAMPLES, STEPS_PER_EPOCH, STOP = 48, 6, 8  # 48 samples / (4 per batch * 2 ranks); step 8 = epoch 1, batch 2


@pytest.fixture
def prepare(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    def make(shuffle=True, **config):
        reset()
        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))
        ds = TensorDataset(torch.arange(16))
        return acc, acc.prepare(DataLoader(ds, batch_size=4, shuffle=shuffle))

    yield make
    reset()


def test_plain_shuffle_is_reported_with_the_fix(prepare):
    acc, loader = prepare()
    msg = unresumable_loader_problem(loader)
    for needed in ("use_seedable_sampler=True", "set_epoch", "skip_first_batches", "use_stateful_dataloader"):
        assert needed in msg, msg
    assert unresumable_loader_problem(acc.skip_first_batches(loader, 1)) == msg  # still the same sampler
    assert unresumable_loader_problem() is None  # nothing being iterated
    for _ in loader:
        assert unresumable_loader_problem() == msg  # the active loader, from GradientState
    assert unresumable_loader_problem() is None
    _, dispatcher = prepare(dispatch_batches=True)  # rank 0 iterates, plain RandomSampler
    assert "DataLoaderDispatcher" in unresumable_loader_problem(dispatcher)


@pytest.mark.parametrize("shuffle,config", [(False, {}), (True, {"use_seedable_sampler": True}),
                                            (True, {"use_seedable_sampler": True, "dispatch_batches": True})])
def test_resumable_loaders_are_not_reported(prepare, shuffle, config):
    acc, loader = prepare(shuffle, **config)
    assert unresumable_loader_problem(loader) is None
    assert unresumable_loader_problem(acc.skip_first_batches(loader, 1)) is None
    for _ in loader:
        assert unresumable_loader_problem() is None


def test_stateful_loader_needs_the_seedable_sampler_too(prepare):
    pytest.importorskip("torchdata.stateful_dataloader")
    _, loader = prepare(use_stateful_dataloader=True, use_seedable_sampler=True)
    assert unresumable_loader_problem(loader) is None
    _, loader = prepare(use_stateful_dataloader=True)  # replays its position on a fresh generator
    assert "use_stateful_dataloader alone does not cover it" in unresumable_loader_problem(loader)


def test_plain_loaders_and_no_accelerate_are_quiet():
    assert unresumable_loader_problem(DataLoader(TensorDataset(torch.arange(8)), shuffle=True)) is None
    code = ("import sys; from dcp_resume.accelerate_loaders import unresumable_loader_problem as f; "
            "assert f() is None and 'accelerate' not in sys.modules")
    run([sys.executable, "-c", code], timeout=60)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_save_checkpoint_warns_once_naming_the_setting(prepare, tmp_path, caplog):
    from dcp_resume import CheckpointManager

    _, loader = prepare()
    mgr = CheckpointManager(tmp_path, enable_preemption_handling=False)
    with caplog.at_level("WARNING", logger="dcp_resume"):
        for step, _ in enumerate(loader, start=1):  # mid-epoch, the way a training loop saves
            mgr.save_checkpoint({"step": step}, step=step)
    warned = [r.getMessage() for r in caplog.records if "INEXACT RESUME" in r.getMessage()]
    assert len(warned) == 1 and "use_seedable_sampler=True" in warned[0]
    _, quiet = prepare(use_seedable_sampler=True)
    mgr = CheckpointManager(tmp_path / "seedable", enable_preemption_handling=False)
    with caplog.at_level("WARNING", logger="dcp_resume"):
        for step, _ in enumerate(quiet, start=1):
            mgr.save_checkpoint({"step": step}, step=step)
    assert len([r for r in caplog.records if "INEXACT RESUME" in r.getMessage()]) == 1
