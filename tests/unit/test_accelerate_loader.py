"""accelerate-prepared shuffled loaders: dcp_resume.accelerate_loaders.unresumable_loader_problem names
use_seedable_sampler=True when it is missing. Loaders are prepared in this process with Accelerator(cpu=True)
(accelerate's state singletons are reset around each). The resumes themselves, under `accelerate launch`:
tests/integration/test_accelerate_resume.py."""
import sys

import pytest
import torch
from conftest import run
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from dcp_resume.accelerate_loaders import unresumable_loader_problem  # noqa: E402



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
